//! `keygate admin policy check FILE`: the key service's own parser, run
//! locally, so a policy can be checked before it is deployed.

use std::collections::BTreeSet;
use std::fmt::Display;
use std::path::Path;

use serde_json::json;

use super::Ctx;
use super::error::{AdminError, one_line};
use super::output::{Table, emit};
use crate::policy::{PolicyError, PolicyHandle, Role};

pub(crate) fn check(ctx: &Ctx, file: &Path) -> Result<(), AdminError> {
    let policy = PolicyHandle::load(file).map_err(|e| AdminError::usage(describe(&e)))?.current();
    let grants = policy.grants();
    let identities: BTreeSet<&str> = grants.iter().map(|g| g.identity.as_str()).collect();
    let roles = |role: Role| grants.iter().filter(|g| g.roles.contains(&role)).count();
    let role_summary: Vec<String> = Role::ALL
        .iter()
        .map(|r| (r, roles(*r)))
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    let title = format!(
        "OK: {}: {} grant(s) for {} identity pattern(s){}{}",
        file.display(),
        grants.len(),
        identities.len(),
        if role_summary.is_empty() { "" } else { "; grants per role: " },
        role_summary.join(", ")
    );
    let value = json!({
        "file": file.display().to_string(),
        "ok": true,
        "identities": identities,
        "grants": grants,
    });
    emit(ctx.output, &value, Some(&title), || {
        let mut table =
            Table::new(&["GRANT", "IDENTITY", "TENANTS", "ROLES", "CLASSES", "MASKED", "PURPOSES"]);
        for (i, g) in grants.iter().enumerate() {
            table.row(vec![
                (i + 1).to_string(),
                g.identity.to_string(),
                list(&g.tenants),
                list(&g.roles),
                list(&g.classes),
                list(&g.masked),
                list(&g.purposes),
            ]);
        }
        table
    })
}

fn list<T: Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "-".to_owned();
    }
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// The error on one line, with its line number; a TOML syntax error loses
/// the parser's quoted source lines (they would span several lines).
fn describe(e: &PolicyError) -> String {
    match e {
        PolicyError::Syntax { file, line, column, message } => {
            let text: Vec<&str> = message
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("TOML parse error"))
                .filter(|l| !is_snippet(l))
                .collect();
            let at = match (line, column) {
                (Some(l), Some(c)) => format!("line {l}, column {c}: "),
                (Some(l), None) => format!("line {l}: "),
                _ => String::new(),
            };
            format!("{file}: {at}{}", one_line(&text.join("; ")))
        }
        other => one_line(&other.to_string()),
    }
}

/// Whether `line` is part of the parser's source excerpt (`3 | …`, `| ^`).
fn is_snippet(line: &str) -> bool {
    let rest = line.trim_start_matches(|c: char| c.is_ascii_digit()).trim_start();
    rest.starts_with('|')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_become_one_line_with_the_line_number() {
        let e = crate::policy::Policy::from_toml(
            "[[grant]]\nidentity = \"spiffe://a\"\ntenants = [\"*\"\nroles = [\"admin\"]\n",
            "p.toml",
        )
        .unwrap_err();
        let text = describe(&e);
        assert!(text.starts_with("p.toml: line "), "{text}");
        assert!(!text.contains('|') && !text.contains('\n'), "{text}");
        let e = crate::policy::Policy::from_toml(
            "[[grant]]\nidentity = \"spiffe://a\"\ntenants = [\"*\"]\nroles = [\"root\"]\n",
            "p.toml",
        )
        .unwrap_err();
        assert!(describe(&e).contains("line 4"), "{}", describe(&e));
    }
}
