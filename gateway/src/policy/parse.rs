//! The TOML policy file and its validation. Every error names the file and
//! the line and column of the offending value.

use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use super::grant::{Grant, Role};
use super::pattern::{ClassPattern, IdentityPattern, InvalidValue, PurposePattern, TenantPattern};

/// Largest policy file accepted, in bytes (1 MiB).
pub const MAX_POLICY_BYTES: u64 = 1 << 20;

/// A policy could not be loaded. Every variant names the file; parse and
/// validation errors also name the line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{file}: cannot read policy: {source}")]
    Read {
        /// File name.
        file: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_POLICY_BYTES`].
    #[error("{file}: policy file is larger than {limit} bytes")]
    TooLarge {
        /// File name.
        file: String,
        /// The limit, in bytes.
        limit: u64,
    },
    /// Not valid TOML, a value of the wrong type, a missing key or an
    /// unknown key.
    #[error("{file}: {message}")]
    Syntax {
        /// File name.
        file: String,
        /// Line (1-based), where the parser located the problem.
        line: Option<usize>,
        /// Column (1-based, in characters), where the parser located it.
        column: Option<usize>,
        /// The parser's message (it names the line and column itself).
        message: String,
    },
    /// Well-formed TOML but not a valid policy.
    #[error("{file}: line {line}, column {column}: grant {grant}: {reason}")]
    Invalid {
        /// File name.
        file: String,
        /// Line of the offending value (1-based).
        line: usize,
        /// Column of the offending value (1-based, in characters).
        column: usize,
        /// Which `[[grant]]` (1-based, in file order).
        grant: usize,
        /// What is wrong.
        reason: String,
    },
}

impl PolicyError {
    /// The line the error points at, when it points at one.
    pub fn line(&self) -> Option<usize> {
        match self {
            PolicyError::Syntax { line, .. } => *line,
            PolicyError::Invalid { line, .. } => Some(*line),
            PolicyError::Read { .. } | PolicyError::TooLarge { .. } => None,
        }
    }
}

type SpannedList = Spanned<Vec<Spanned<String>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    grant: Vec<Spanned<RawGrant>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    identity: Spanned<String>,
    tenants: SpannedList,
    roles: SpannedList,
    classes: Option<SpannedList>,
    masked: Option<SpannedList>,
    purposes: Option<SpannedList>,
}

/// A validation failure: where (byte span) and why.
type Fault = (Range<usize>, String);

pub(super) fn parse_grants(text: &str, source: &str) -> Result<Vec<Grant>, PolicyError> {
    if u64::try_from(text.len()).map_or(true, |len| len > MAX_POLICY_BYTES) {
        return Err(PolicyError::TooLarge { file: source.to_owned(), limit: MAX_POLICY_BYTES });
    }
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map(|s| line_column(text, s.start)).unzip();
        PolicyError::Syntax {
            file: source.to_owned(),
            line,
            column,
            message: e.to_string().trim_end().to_owned(),
        }
    })?;
    raw.grant
        .into_iter()
        .enumerate()
        .map(|(index, raw)| {
            validate_grant(raw).map_err(|(span, reason)| {
                let (line, column) = line_column(text, span.start);
                PolicyError::Invalid {
                    file: source.to_owned(),
                    line,
                    column,
                    grant: index.saturating_add(1),
                    reason,
                }
            })
        })
        .collect()
}

fn validate_grant(raw: Spanned<RawGrant>) -> Result<Grant, Fault> {
    let grant_span = raw.span();
    let raw = raw.into_inner();
    let identity = item(&raw.identity, |s: &str| IdentityPattern::new(s))?;
    let tenants = non_empty(&raw.tenants, "tenants", |s: &str| TenantPattern::new(s))?;
    let roles = non_empty(&raw.roles, "roles", |name: &str| name.parse::<Role>())?;
    let decryptor = roles.contains(&Role::Decryptor);
    if !decryptor {
        for (key, list) in
            [("classes", &raw.classes), ("masked", &raw.masked), ("purposes", &raw.purposes)]
        {
            if let Some(list) = list {
                return Err((
                    list.span(),
                    format!(
                        "{key} applies only to grants with role decryptor; here it would have no effect"
                    ),
                ));
            }
        }
    }
    let classes = optional(&raw.classes, |s: &str| ClassPattern::new(s))?;
    let masked = optional(&raw.masked, |s: &str| ClassPattern::new(s))?;
    let purposes = optional(&raw.purposes, |s: &str| PurposePattern::new(s))?;
    if decryptor && classes.is_empty() && masked.is_empty() {
        let span = raw.classes.as_ref().map_or_else(|| grant_span.clone(), Spanned::span);
        return Err((
            span,
            "a decryptor grant must list classes or masked (otherwise it discloses nothing)"
                .to_owned(),
        ));
    }
    if decryptor && purposes.is_empty() {
        let span = raw.purposes.as_ref().map_or(grant_span, Spanned::span);
        return Err((
            span,
            "a decryptor grant must list purposes (use [\"*\"] for any purpose)".to_owned(),
        ));
    }
    Ok(Grant { identity, tenants, roles, classes, masked, purposes })
}

fn item<T>(
    value: &Spanned<String>,
    parse: impl Fn(&str) -> Result<T, InvalidValue>,
) -> Result<T, Fault> {
    parse(value.get_ref()).map_err(|e| (value.span(), e.to_string()))
}

fn optional<T>(
    list: &Option<SpannedList>,
    parse: impl Fn(&str) -> Result<T, InvalidValue>,
) -> Result<Vec<T>, Fault> {
    list.iter().flat_map(|l| l.get_ref()).map(|v| item(v, &parse)).collect()
}

fn non_empty<T>(
    list: &SpannedList,
    key: &str,
    parse: impl Fn(&str) -> Result<T, InvalidValue>,
) -> Result<Vec<T>, Fault> {
    if list.get_ref().is_empty() {
        return Err((list.span(), format!("{key} must not be empty")));
    }
    list.get_ref().iter().map(|v| item(v, &parse)).collect()
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count().saturating_add(1);
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()).saturating_add(1);
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> PolicyError {
        match parse_grants(text, "p.toml") {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e,
        }
    }

    /// Asserts that `text` fails on `line` with a message containing `needle`.
    fn fails(text: &str, line: usize, needle: &str) {
        let e = error_of(text);
        let message = e.to_string();
        assert_eq!(e.line(), Some(line), "{message}");
        assert!(message.starts_with("p.toml: "), "{message}");
        assert!(message.contains(&format!("line {line}")), "{message}");
        assert!(message.contains(needle), "{message}");
    }

    const HEAD: &str = "# a comment\n\n[[grant]]\nidentity = \"spiffe://prod/ns/onc/sa/api\"\n";

    #[test]
    fn line_and_column() {
        assert_eq!(line_column("ab\ncdé\nx", 0), (1, 1));
        assert_eq!(line_column("ab\ncdé\nx", 3), (2, 1));
        assert_eq!(line_column("ab\ncdé\nx", 8), (3, 1));
        assert_eq!(line_column("ab\ncdé\nx", 7), (2, 4));
        assert_eq!(line_column("ab", 99), (1, 3));
    }

    #[test]
    fn unknown_role() {
        let text =
            format!("{HEAD}tenants = [\"onc\"]\nroles = [\"encryptor\",\n  \"decrypter\"]\n");
        fails(&text, 7, "invalid role \"decrypter\"");
        let e = error_of(&text);
        assert!(matches!(e, PolicyError::Invalid { column: 3, grant: 1, .. }), "{e:?}");
    }

    #[test]
    fn identity_errors() {
        let tail = "tenants = [\"onc\"]\nroles = [\"admin\"]\n";
        fails(&format!("[[grant]]\nidentity = \"\"\n{tail}"), 2, "must not be empty");
        fails(&format!("\n[[grant]]\nidentity = \"spiffe://*/api\"\n{tail}"), 3, "last character");
        fails(&format!("[[grant]]\nidentity = \"*\"\n{tail}"), 2, "every client");
    }

    #[test]
    fn tenant_errors() {
        fails(
            &format!("{HEAD}tenants = [\"onc\", \"On*c\"]\nroles = [\"admin\"]\n"),
            5,
            "tenant pattern",
        );
        fails(
            &format!("{HEAD}tenants = [\n\"onc\",\n\"onc*-x\"]\nroles = [\"admin\"]\n"),
            7,
            "\"onc*-x\"",
        );
        fails(
            &format!("{HEAD}tenants = []\nroles = [\"admin\"]\n"),
            5,
            "tenants must not be empty",
        );
    }

    #[test]
    fn role_list_errors() {
        fails(&format!("{HEAD}tenants = [\"*\"]\nroles = []\n"), 6, "roles must not be empty");
    }

    #[test]
    fn class_errors() {
        let text = format!(
            "{HEAD}tenants = [\"onc\"]\nroles = [\"decryptor\"]\nclasses = [\"phi.clinical\"]\nmasked = [\"phi*\"]\npurposes = [\"*\"]\n"
        );
        fails(&text, 8, "class pattern \"phi*\"");
        let text = format!(
            "{HEAD}tenants = [\"onc\"]\nroles = [\"decryptor\"]\nclasses = [\"phi..x\"]\npurposes = [\"*\"]\n"
        );
        fails(&text, 7, "class pattern");
    }

    #[test]
    fn decryptor_only_keys() {
        for key in ["classes", "masked", "purposes"] {
            let text =
                format!("{HEAD}tenants = [\"onc\"]\nroles = [\"encryptor\"]\n{key} = [\"*\"]\n");
            fails(&text, 7, &format!("{key} applies only to grants with role decryptor"));
        }
    }

    #[test]
    fn decryptor_needs_classes_and_purposes() {
        let text =
            format!("{HEAD}tenants = [\"onc\"]\nroles = [\"decryptor\"]\nclasses = [\"phi.*\"]\n");
        fails(&text, 3, "must list purposes");
        let text = format!(
            "{HEAD}tenants = [\"onc\"]\nroles = [\"decryptor\"]\nclasses = [\"phi.*\"]\npurposes = []\n"
        );
        fails(&text, 8, "must list purposes");
        let text = format!(
            "{HEAD}tenants = [\"onc\"]\nroles = [\"decryptor\"]\npurposes = [\"treatment\", \"Bad\"]\nclasses = [\"phi\"]\n"
        );
        fails(&text, 7, "invalid purpose \"Bad\"");
        let text =
            format!("{HEAD}tenants = [\"onc\"]\nroles = [\"decryptor\"]\npurposes = [\"*\"]\n");
        fails(&text, 3, "must list classes or masked");
        // Masked alone is a valid decryptor grant.
        let text = format!(
            "{HEAD}tenants = [\"onc\"]\nroles = [\"decryptor\"]\nmasked = [\"phi.*\"]\npurposes = [\"*\"]\n"
        );
        assert_eq!(parse_grants(&text, "p.toml").unwrap().len(), 1);
    }

    #[test]
    fn syntax_and_unknown_keys_keep_the_parser_message() {
        let e = error_of("[[grant]\n");
        assert!(matches!(e, PolicyError::Syntax { line: Some(1), .. }), "{e:?}");
        assert!(e.to_string().contains("line 1"), "{e}");
        let text = format!("{HEAD}tenants = [\"onc\"]\nroles = [\"admin\"]\ncolour = \"red\"\n");
        fails(&text, 7, "colour");
        fails(&format!("{HEAD}roles = [\"admin\"]\n"), 3, "tenants");
        fails(&format!("{HEAD}tenants = \"onc\"\nroles = [\"admin\"]\n"), 5, "");
        fails("[[grants]]\nidentity = \"x\"\n", 1, "grants");
    }

    #[test]
    fn duplicates_are_fine_and_empty_is_empty() {
        let text = format!("{HEAD}tenants = [\"onc\", \"onc\"]\nroles = [\"admin\", \"admin\"]\n");
        assert_eq!(parse_grants(&text, "p.toml").unwrap().len(), 1);
        assert!(parse_grants("", "p.toml").unwrap().is_empty());
        assert!(parse_grants("# nothing granted\n", "p.toml").unwrap().is_empty());
    }

    #[test]
    fn oversized_text_is_refused() {
        let text = " ".repeat(usize::try_from(MAX_POLICY_BYTES).unwrap() + 1);
        assert!(matches!(error_of(&text), PolicyError::TooLarge { .. }));
    }
}
