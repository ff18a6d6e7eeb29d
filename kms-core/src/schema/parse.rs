//! The TOML schema file format and its validation.

use serde::Deserialize;

use super::{BlindIndexSpec, FieldMode, FieldSpec, Mask, Normalizer, Schema};
use crate::ids::Name;
use crate::pointer::{PathPattern, PatternToken, is_array_index, may_coincide};

/// The member name reserved for the record header.
pub const HEADER_MEMBER: &str = "_kg";
/// Suffix of the sibling member that carries a blind index.
pub const BLIND_INDEX_SUFFIX: &str = "_bidx";

/// A schema file could not be used. Every variant names where the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// Not valid TOML, or a key of the wrong type or an unknown key.
    #[error("{file}: {message}")]
    Syntax {
        /// File name.
        file: String,
        /// The parser's message (with line and column).
        message: String,
    },
    /// Well-formed but not a valid schema.
    #[error("{file}: schema {schema}{}: {reason}", field.as_ref().map(|f| format!(", field {f}")).unwrap_or_default())]
    Invalid {
        /// File name.
        file: String,
        /// Schema name (and version, where known).
        schema: String,
        /// The field's path, when a single field is at fault.
        field: Option<String>,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    schema: Vec<RawSchema>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchema {
    name: String,
    version: u32,
    #[serde(default)]
    fields: Vec<RawField>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    path: String,
    mode: String,
    class: String,
    mask: Option<String>,
    bits: Option<u32>,
    normalize: Option<OneOrMany>,
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

pub(super) fn parse_file(text: &str, source: &str) -> Result<Vec<Schema>, SchemaError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| SchemaError::Syntax {
        file: source.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    raw.schema.into_iter().map(|s| validate_schema(s, source)).collect()
}

fn validate_schema(raw: RawSchema, source: &str) -> Result<Schema, SchemaError> {
    let label = format!("{} v{}", raw.name, raw.version);
    let err = |field: Option<&str>, reason: String| SchemaError::Invalid {
        file: source.to_owned(),
        schema: label.clone(),
        field: field.map(str::to_owned),
        reason,
    };
    let name = Name::new(raw.name.clone()).map_err(|e| err(None, e.to_string()))?;
    if raw.version == 0 {
        return Err(err(None, "version must be 1 or more".to_owned()));
    }
    if raw.fields.is_empty() {
        return Err(err(None, "lists no fields".to_owned()));
    }
    let mut fields: Vec<FieldSpec> = Vec::with_capacity(raw.fields.len());
    for f in raw.fields {
        let spec = validate_field(f, &name).map_err(|(path, reason)| err(Some(&path), reason))?;
        for earlier in &fields {
            if earlier.path == spec.path {
                return Err(err(Some(spec.path.as_str()), "duplicate path".to_owned()));
            }
            if earlier.path.overlaps(&spec.path) {
                return Err(err(
                    Some(spec.path.as_str()),
                    format!("overlaps {} (one would contain the other)", earlier.path),
                ));
            }
            for (a, b) in [(earlier, &spec), (&spec, earlier)] {
                if is_blind_index_sibling(a, b) {
                    return Err(err(
                        Some(b.path.as_str()),
                        format!("collides with the blind index member of {}", a.path),
                    ));
                }
            }
        }
        fields.push(spec);
    }
    Ok(Schema { name, version: raw.version, fields })
}

/// Whether `b` can address `a`'s `<name>_bidx` sibling, or anything
/// inside it (encryption writes the sibling as a string, so a path through
/// it would find a string where it expects a container, and the record
/// could not be decrypted).
fn is_blind_index_sibling(a: &FieldSpec, b: &FieldSpec) -> bool {
    let Some(name) = a.path.last_key().filter(|_| a.blind_index.is_some()) else {
        return false;
    };
    let sibling = format!("{name}{BLIND_INDEX_SUFFIX}");
    let Some((_, a_parent)) = a.path.tokens().split_last() else {
        return false;
    };
    let b_tokens = b.path.tokens();
    let (Some(b_parent), Some(b_at)) =
        (b_tokens.get(..a_parent.len()), b_tokens.get(a_parent.len()))
    else {
        return false;
    };
    matches!(b_at, PatternToken::Key(k) if *k == sibling) && may_coincide(a_parent, b_parent)
}

fn validate_field(f: RawField, schema: &Name) -> Result<FieldSpec, (String, String)> {
    let path_text = f.path.clone();
    let fail = |reason: String| (path_text.clone(), reason);
    let path = PathPattern::parse(&f.path).map_err(|e| fail(format!("bad path: {e}")))?;
    if matches!(path.tokens().first(), Some(PatternToken::Key(k)) if k == HEADER_MEMBER) {
        return Err(fail(format!("{HEADER_MEMBER} is reserved for the record header")));
    }
    let mode = match f.mode.as_str() {
        "randomized" => FieldMode::Randomized,
        "deterministic" => FieldMode::Deterministic,
        "blind_index" => FieldMode::BlindIndex,
        "pseudonym" => FieldMode::Pseudonym,
        other => {
            return Err(fail(format!(
                "unknown mode {other:?} (expected randomized, deterministic, blind_index or pseudonym)"
            )));
        }
    };
    if !valid_class(&f.class) {
        return Err(fail(format!(
            "bad class {:?}: dot-separated lowercase words such as phi.identifier",
            f.class
        )));
    }
    let mask = f.mask.as_deref().map(parse_mask).transpose().map_err(fail)?;
    if mask.is_some() && mode == FieldMode::Pseudonym {
        return Err(fail("a pseudonym is never decrypted, so it cannot have a mask".to_owned()));
    }
    let blind_index = match (mode, f.bits, f.normalize) {
        (FieldMode::BlindIndex, bits, normalize) => {
            let bits = bits.unwrap_or(32);
            if !(8..=256).contains(&bits) {
                return Err(fail(format!("bits = {bits} is out of range (8 to 256)")));
            }
            if path.last_key().is_none_or(is_array_index) {
                return Err(fail(
                    "a blind index path must end in a member name that is not an array index \
                     (its index is stored beside it, in the same object)"
                        .to_owned(),
                ));
            }
            let normalize = match normalize {
                None => vec![Normalizer::Exact],
                Some(OneOrMany::One(n)) => vec![parse_normalizer(&n).map_err(fail)?],
                Some(OneOrMany::Many(list)) => list
                    .iter()
                    .map(|n| parse_normalizer(n))
                    .collect::<Result<_, _>>()
                    .map_err(fail)?,
            };
            Some(BlindIndexSpec { bits: u16::try_from(bits).unwrap_or(256), normalize })
        }
        (_, Some(_), _) | (_, _, Some(_)) => {
            return Err(fail("bits and normalize apply only to mode = \"blind_index\"".to_owned()));
        }
        _ => None,
    };
    let namespace = match (mode, f.namespace) {
        (FieldMode::Pseudonym, None) => Some(schema.clone()),
        (FieldMode::Pseudonym, Some(ns)) => Some(Name::new(ns).map_err(|e| fail(e.to_string()))?),
        (_, Some(_)) => {
            return Err(fail("namespace applies only to mode = \"pseudonym\"".to_owned()));
        }
        (_, None) => None,
    };
    Ok(FieldSpec { path, mode, class: f.class, mask, blind_index, namespace })
}

fn valid_class(class: &str) -> bool {
    !class.is_empty()
        && class.len() <= 128
        && class.split('.').all(|part| {
            !part.is_empty() && part.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
        })
}

fn parse_mask(name: &str) -> Result<Mask, String> {
    match name {
        "last4" => Ok(Mask::Last4),
        "email" => Ok(Mask::Email),
        "year" => Ok(Mask::Year),
        "redact" => Ok(Mask::Redact),
        other => Err(format!("unknown mask {other:?} (expected last4, email, year or redact)")),
    }
}

fn parse_normalizer(name: &str) -> Result<Normalizer, String> {
    match name {
        "exact" => Ok(Normalizer::Exact),
        "lowercase" => Ok(Normalizer::Lowercase),
        "trim" => Ok(Normalizer::Trim),
        "digits" => Ok(Normalizer::Digits),
        other => {
            Err(format!("unknown normalizer {other:?} (expected exact, lowercase, trim or digits)"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::SchemaSet;
    use super::*;

    const PATIENT: &str = r#"
[[schema]]
name = "patient"
version = 1
fields = [
  { path = "/ssn",        mode = "randomized", class = "phi.identifier", mask = "last4" },
  { path = "/mrn",        mode = "deterministic", class = "phi.identifier" },
  { path = "/email",      mode = "blind_index", bits = 32, normalize = "lowercase", class = "pii.contact" },
  { path = "/diagnosis",  mode = "randomized", class = "phi.clinical" },
  { path = "/patient_id", mode = "pseudonym", class = "pii.identifier" },
  { path = "/allergies/*", mode = "randomized", class = "phi.clinical" },
]
"#;

    fn one_field(field: &str) -> String {
        format!("[[schema]]\nname = \"s\"\nversion = 1\nfields = [ {field} ]\n")
    }

    fn error_of(field: &str) -> String {
        match SchemaSet::from_toml(&one_field(field), "t.toml") {
            Ok(_) => panic!("accepted: {field}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_the_design_example() {
        let set = SchemaSet::from_toml(PATIENT, "patient.toml").unwrap();
        let s = set.latest("patient").unwrap();
        assert_eq!(s.fields.len(), 6);
        assert_eq!(s.fields[2].blind_index.as_ref().unwrap().bits, 32);
        assert_eq!(s.fields[4].namespace.as_ref().unwrap().as_str(), "patient");
        assert_eq!(s.fields[0].mask, Some(Mask::Last4));
    }

    #[test]
    fn errors_name_schema_and_field() {
        let e = error_of(r#"{ path = "/a", mode = "scrambled", class = "phi" }"#);
        assert!(e.contains("schema s v1, field /a") && e.contains("unknown mode"), "{e}");
        let e = error_of(r#"{ path = "/a", mode = "blind_index", bits = 300, class = "phi" }"#);
        assert!(e.contains("field /a") && e.contains("bits = 300"), "{e}");
        let e = error_of(r#"{ path = "/a", mode = "blind_index", bits = 4, class = "phi" }"#);
        assert!(e.contains("out of range"), "{e}");
        let e = error_of(r#"{ path = "a", mode = "randomized", class = "phi" }"#);
        assert!(e.contains("field a") && e.contains("bad path"), "{e}");
        let e = error_of(
            r#"{ path = "/a", mode = "randomized", class = "phi" }, { path = "/a", mode = "deterministic", class = "phi" }"#,
        );
        assert!(e.contains("duplicate path"), "{e}");
        let e = error_of(
            r#"{ path = "/a", mode = "randomized", class = "phi" }, { path = "/a/b", mode = "randomized", class = "phi" }"#,
        );
        assert!(e.contains("field /a/b") && e.contains("overlaps /a"), "{e}");
        let e = error_of(
            r#"{ path = "/e", mode = "blind_index", class = "phi" }, { path = "/e_bidx", mode = "randomized", class = "phi" }"#,
        );
        assert!(e.contains("blind index member"), "{e}");
        let e = error_of(r#"{ path = "/_kg", mode = "randomized", class = "phi" }"#);
        assert!(e.contains("reserved"), "{e}");
        let e = error_of(r#"{ path = "/a/*", mode = "blind_index", class = "phi" }"#);
        assert!(e.contains("member name"), "{e}");
        let e = error_of(r#"{ path = "/codes/0", mode = "blind_index", class = "phi" }"#);
        assert!(e.contains("not an array index"), "{e}");
        let e = error_of(
            r#"{ path = "/l/*/e", mode = "blind_index", class = "phi" }, { path = "/l/0/e_bidx", mode = "randomized", class = "phi" }"#,
        );
        assert!(e.contains("blind index member"), "{e}");
        // Through the sibling, in either order of declaration.
        let e = error_of(
            r#"{ path = "/email", mode = "blind_index", class = "phi" }, { path = "/email_bidx/x", mode = "randomized", class = "phi" }"#,
        );
        assert!(e.contains("field /email_bidx/x") && e.contains("blind index member"), "{e}");
        let e = error_of(
            r#"{ path = "/l/0/e_bidx/*/v", mode = "randomized", class = "phi" }, { path = "/l/*/e", mode = "blind_index", class = "phi" }"#,
        );
        assert!(e.contains("blind index member"), "{e}");
        // A path beside the sibling, or above it, is fine.
        for fine in [
            r#"{ path = "/email", mode = "blind_index", class = "phi" }, { path = "/email_bidy/x", mode = "randomized", class = "phi" }"#,
            r#"{ path = "/p/email", mode = "blind_index", class = "phi" }, { path = "/q/email_bidx/x", mode = "randomized", class = "phi" }"#,
        ] {
            assert!(SchemaSet::from_toml(&one_field(fine), "t.toml").is_ok(), "{fine}");
        }
        let e = error_of(r#"{ path = "/a", mode = "randomized", class = "PHI!" }"#);
        assert!(e.contains("bad class"), "{e}");
        let e = error_of(r#"{ path = "/a", mode = "randomized", class = "phi", mask = "blur" }"#);
        assert!(e.contains("unknown mask"), "{e}");
        let e = error_of(r#"{ path = "/a", mode = "randomized", class = "phi", bits = 16 }"#);
        assert!(e.contains("only to mode"), "{e}");
        let e = error_of(r#"{ path = "/a", mode = "pseudonym", class = "phi", mask = "last4" }"#);
        assert!(e.contains("cannot have a mask"), "{e}");
        let e = error_of(
            r#"{ path = "/a", mode = "blind_index", class = "phi", normalize = ["trim", "soundex"] }"#,
        );
        assert!(e.contains("unknown normalizer"), "{e}");
    }

    #[test]
    fn syntax_errors_and_unknown_keys() {
        let e = SchemaSet::from_toml("[[schema]\n", "x.toml").unwrap_err().to_string();
        assert!(e.starts_with("x.toml:"), "{e}");
        let e = SchemaSet::from_toml(
            &one_field(r#"{ path = "/a", mode = "randomized", class = "phi", colour = "red" }"#),
            "y.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn duplicate_schema_versions_are_refused_and_latest_wins() {
        let two = format!("{PATIENT}{}", PATIENT.replace("version = 1", "version = 2"));
        let set = SchemaSet::from_toml(&two, "p.toml").unwrap();
        assert_eq!(set.latest("patient").unwrap().version, 2);
        assert_eq!(set.get("patient", 1).unwrap().version, 1);
        assert!(SchemaSet::from_toml(&format!("{PATIENT}{PATIENT}"), "p.toml").is_err());
    }
}
