//! Keeps record values out of error messages.
//!
//! serde's messages quote the offending value (`invalid type: string
//! "123-45-6789", expected u32`). For a decrypted record that value is
//! plaintext PHI, and error messages end up in logs, so every serde message
//! this crate keeps goes through [`serde_message`] first. Finding a value by
//! its quotes is not safe (a value may hold quotes and backticks of its own),
//! so a data error keeps only what serde writes from the type: the field
//! name of `missing field`, `unknown field` and `duplicate field` (schema, not
//! data, and what a caller needs to fix a type), the kind of value found
//! (`string`, `integer`, …) and what was expected. Anything else, including
//! every custom message, is replaced whole.

use serde_json::error::Category;

/// Messages whose only quoted text is a field name: one of the type's own,
/// or (`unknown field`) a member name of the record, never its value.
const FIELD_MESSAGES: [&str; 3] = ["missing field `", "unknown field `", "duplicate field `"];

/// Messages that quote a value before `, expected …` (serde's `invalid_type`,
/// `invalid_value`, `invalid_length` and `unknown_variant`).
const VALUE_MESSAGES: [&str; 4] =
    ["invalid type: ", "invalid value: ", "invalid length ", "unknown variant "];

/// The kinds of value serde and serde_json name before the value itself
/// (`string "…"`, `integer `5``, `null`, …), from serde's `Unexpected`.
const VALUE_KINDS: [&str; 17] = [
    "boolean",
    "integer",
    "floating point",
    "character",
    "string",
    "byte array",
    "null",
    "unit value",
    "Option value",
    "newtype struct",
    "sequence",
    "map",
    "enum",
    "unit variant",
    "newtype variant",
    "tuple variant",
    "struct variant",
];

/// What a data error says when serde's message cannot be kept.
const WITHHELD: &str =
    "a value does not fit the type (serde's message is withheld: it may quote the value)";

/// A serde_json error's message without record values, with its position.
pub(crate) fn serde_message(err: &serde_json::Error) -> String {
    let full = err.to_string();
    let position = format!(" at line {} column {}", err.line(), err.column());
    let (message, position) = match full.strip_suffix(&position) {
        Some(message) if err.line() != 0 => (message, position.as_str()),
        _ => (full.as_str(), ""),
    };
    let message = match err.classify() {
        // serde_json's own fixed texts (`expected value`, `EOF while
        // parsing a string`, …): they never quote the input.
        Category::Syntax | Category::Eof => message.to_owned(),
        Category::Data | Category::Io => redact_data(message),
    };
    format!("{message}{position}")
}

/// A data error's message (without position) reduced to what serde writes
/// from the type; see the module docs.
pub(crate) fn redact_data(message: &str) -> String {
    if let Some(kept) = field_message(message) {
        return kept;
    }
    for prefix in VALUE_MESSAGES {
        let Some(rest) = message.strip_prefix(prefix) else { continue };
        let category = prefix.trim_end_matches([':', ' ']);
        // `unknown variant `…`, there are no variants`: nothing to keep but that.
        if prefix == "unknown variant " && rest.ends_with(", there are no variants") {
            return format!("{category}, there are no variants");
        }
        // The value comes before the last `, expected `, so what follows
        // is the type's own text, whatever the value holds.
        let Some((found, expected)) = rest.rsplit_once(", expected ") else { break };
        let kind = VALUE_KINDS
            .iter()
            .find(|kind| found == **kind || found.starts_with(&format!("{kind} ")))
            .filter(|_| prefix != "unknown variant " && prefix != "invalid length ");
        return match kind {
            Some(kind) => format!("{category}: {kind}, expected {expected}"),
            None => format!("{category}, expected {expected}"),
        };
    }
    WITHHELD.to_owned()
}

/// `missing field `ssn``, `unknown field `x``, `duplicate field `y``: the
/// name only, up to its closing backtick (the text after it is dropped).
fn field_message(message: &str) -> Option<String> {
    FIELD_MESSAGES.iter().find_map(|prefix| {
        let rest = message.strip_prefix(prefix)?;
        let (name, _) = rest.split_once('`')?;
        Some(format!("{prefix}{name}`"))
    })
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

    fn message_for_text(text: &str) -> String {
        serde_message(&serde_json::from_str::<Patient>(text).unwrap_err())
    }

    #[test]
    fn string_values_are_removed_even_with_escaped_quotes() {
        let m = message_for(
            json!({"ssn": "1", "age": "Jane \"JR\" Roe, 123-45-6789", "kind": "Inpatient"}),
        );
        assert!(!m.contains("Jane") && !m.contains("6789") && !m.contains("JR"), "{m}");
        assert_eq!(m, "invalid type: string, expected u32");
    }

    #[test]
    fn numbers_and_variants_are_removed() {
        let m = message_for(json!({"ssn": 123456789, "age": 51, "kind": "Inpatient"}));
        assert!(!m.contains("123456789"), "{m}");
        assert_eq!(m, "invalid type: integer, expected a string");
        let m = message_for(json!({"ssn": "1", "age": 51, "kind": "C50.9 neoplasm"}));
        assert_eq!(m, "unknown variant, expected `Inpatient`");
    }

    /// A value holding backticks and the message's own separators cannot
    /// end the quoted span early and leave the rest of itself shown.
    #[test]
    fn values_with_backticks_and_separators_are_removed_whole() {
        for value in [
            "Dx`: C50.9 breast",
            "Dx`, expected C50.9 breast",
            "`C50.9` breast`, there are no variants",
            "C50.9 \"breast\" `",
        ] {
            let m = message_for(json!({"ssn": "1", "age": 51, "kind": value}));
            assert!(!m.contains("C50.9") && !m.contains("breast"), "{value:?}: {m}");
            let m = message_for(json!({"ssn": "1", "age": value, "kind": "Inpatient"}));
            assert!(!m.contains("C50.9") && !m.contains("breast"), "{value:?}: {m}");
        }
        // serde's message from the issue, as it reaches the redaction.
        let m = redact_data(
            "unknown variant `Dx`: C50.9 breast`, expected one of `Inpatient`, `Outpatient`",
        );
        assert_eq!(m, "unknown variant, expected one of `Inpatient`, `Outpatient`");
        let m = redact_data("unknown variant `x`, expected C50.9`, there are no variants");
        assert_eq!(m, "unknown variant, there are no variants");
    }

    #[test]
    fn field_names_are_kept() {
        let m = message_for(json!({"age": 51, "kind": "Inpatient"}));
        assert_eq!(m, "missing field `ssn`");
        let m = message_for_text(r#"{"ssn": "1", "ssn": "2", "age": 51, "kind": "Inpatient"}"#);
        assert_eq!(m, "duplicate field `ssn` at line 1 column 18");
        assert_eq!(
            redact_data("unknown field `name`, expected one of `ssn`, `age`"),
            "unknown field `name`"
        );
    }

    #[test]
    fn custom_messages_are_withheld_whole() {
        assert_eq!(redact_data("bad date 1970-01-01 of birth"), WITHHELD);
        assert_eq!(redact_data("data did not match any variant of untagged enum X"), WITHHELD);
        assert_eq!(redact_data("invalid type: string \"123-45-6789\""), WITHHELD);
    }

    #[test]
    fn syntax_errors_and_positions_are_kept() {
        let m = message_for_text(r#"{"ssn": "123-45-6789", "age": 51,"#);
        assert_eq!(m, "EOF while parsing a value at line 1 column 33");
        let m = message_for_text(r#"{"ssn": "1", "age": "fifty-one", "kind": "Inpatient"}"#);
        assert_eq!(m, "invalid type: string, expected u32 at line 1 column 31");
    }
}
