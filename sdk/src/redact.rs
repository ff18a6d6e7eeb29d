//! Keeps record values out of error messages.
//!
//! serde's messages quote the offending value (`invalid type: string
//! "123-45-6789", expected u32`). For a decrypted record that value is
//! plaintext PHI, and error messages end up in logs, so every serde message
//! this crate keeps goes through [`redact`] first: quoted values become `…`,
//! field names (`missing field `ssn``) stay, because they are what a caller
//! needs to fix a type and are schema, not data.

/// `message` with every quoted value replaced by `…`.
pub(crate) fn redact(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        match c {
            // A string value, printed with `{:?}`: skip to the unescaped close.
            '"' => {
                out.push_str("\"…\"");
                let mut escaped = false;
                for c in chars.by_ref() {
                    match (escaped, c) {
                        (true, _) => escaped = false,
                        (false, '\\') => escaped = true,
                        (false, '"') => break,
                        (false, _) => {}
                    }
                }
            }
            // A number, character, variant or field name.
            '`' => {
                let inner: String = chars.by_ref().take_while(|&c| c != '`').collect();
                if out.ends_with("field ") {
                    out.push('`');
                    out.push_str(&inner);
                    out.push('`');
                } else {
                    out.push_str("`…`");
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// A serde_json error's message, redacted.
pub(crate) fn serde_message(err: &serde_json::Error) -> String {
    redact(&err.to_string())
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Patient {
        ssn: String,
        age: u32,
        kind: Kind,
    }

    #[derive(Debug, Deserialize)]
    enum Kind {
        Inpatient,
    }

    fn message_for(value: serde_json::Value) -> String {
        serde_message(&serde_json::from_value::<Patient>(value).unwrap_err())
    }

    #[test]
    fn string_values_are_removed_even_with_escaped_quotes() {
        let m = message_for(
            json!({"ssn": "1", "age": "Jane \"JR\" Roe, 123-45-6789", "kind": "Inpatient"}),
        );
        assert!(!m.contains("Jane") && !m.contains("6789") && !m.contains("JR"), "{m}");
        assert!(m.contains("invalid type: string") && m.contains("expected u32"), "{m}");
    }

    #[test]
    fn numbers_and_variants_are_removed() {
        let m = message_for(json!({"ssn": 123456789, "age": 51, "kind": "Inpatient"}));
        assert!(!m.contains("123456789"), "{m}");
        let m = message_for(json!({"ssn": "1", "age": 51, "kind": "C50.9 neoplasm"}));
        assert!(!m.contains("C50.9"), "{m}");
    }

    #[test]
    fn field_names_are_kept() {
        let m = message_for(json!({"age": 51, "kind": "Inpatient"}));
        assert_eq!(m, "missing field `ssn`");
    }

    #[test]
    fn text_outside_quotes_is_unchanged() {
        assert_eq!(redact("no quotes at line 1 column 2"), "no quotes at line 1 column 2");
        assert_eq!(redact(r#"a "b" c `d` e"#), "a \"…\" c `…` e");
    }
}
