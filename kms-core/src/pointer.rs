//! JSON pointers (RFC 6901) and the schema's path patterns, which may use
//! `*` as a token meaning "every element of this array".

use std::fmt::{self, Write as _};

use serde_json::Value;

/// Longest pointer accepted anywhere (schema path or record header), in bytes.
pub const MAX_POINTER_LEN: usize = 1024;

/// A pointer or pattern was malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PointerError {
    /// The empty pointer (the whole document) cannot be a protected field.
    #[error("the empty pointer (the whole record) cannot be a field")]
    Root,
    /// It does not start with `/`.
    #[error("must start with '/'")]
    NoLeadingSlash,
    /// A `~` not followed by `0` or `1`.
    #[error("invalid escape: '~' must be followed by '0' or '1'")]
    BadEscape,
    /// Longer than [`MAX_POINTER_LEN`].
    #[error("longer than {MAX_POINTER_LEN} bytes")]
    TooLong,
}

/// Expanding a pattern over a record failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExpandError {
    /// A value on the path is not the array or object the pattern needs.
    #[error(
        "the value at {pointer} is not the array or object the schema's path {pattern} expects"
    )]
    ShapeMismatch {
        /// Where the unexpected value is.
        pointer: String,
        /// The pattern.
        pattern: String,
    },
    /// More locations than allowed, or a concrete pointer too long.
    #[error("too many protected locations, or a location's pointer is too long")]
    TooMany,
}

/// One token of a path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternToken {
    /// A member name, or an array index when applied to an array (RFC 6901).
    Key(String),
    /// `*`: every element of an array.
    AnyIndex,
}

/// A schema field path: a JSON pointer whose `*` tokens match every array
/// element. (A member literally named `*` therefore cannot be protected.)
#[derive(Clone, PartialEq, Eq)]
pub struct PathPattern {
    text: String,
    tokens: Vec<PatternToken>,
}

impl PathPattern {
    /// Parses a pattern such as `/allergies/*/code`.
    pub fn parse(text: &str) -> Result<Self, PointerError> {
        let tokens = split(text)?
            .into_iter()
            .map(|t| if t == "*" { PatternToken::AnyIndex } else { PatternToken::Key(t) })
            .collect();
        Ok(Self { text: text.to_owned(), tokens })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parsed tokens.
    pub fn tokens(&self) -> &[PatternToken] {
        &self.tokens
    }

    /// The last token if it is a member name (needed for sibling members
    /// such as a blind index's `<name>_bidx`).
    pub fn last_key(&self) -> Option<&str> {
        match self.tokens.last() {
            Some(PatternToken::Key(k)) => Some(k),
            _ => None,
        }
    }

    /// Whether the two patterns can address the same location or one an
    /// ancestor of the other (so protecting both would be ambiguous).
    pub fn overlaps(&self, other: &Self) -> bool {
        self.tokens.iter().zip(&other.tokens).all(|(a, b)| tokens_may_coincide(a, b))
    }

    /// Appends to `out` the concrete pointer of every location in `root`
    /// this pattern matches, in document order.
    ///
    /// A missing member or a `null` on the way means "nothing to protect".
    /// A value of the wrong kind on the way (a string where the pattern
    /// needs an array or object) is an error, so protected data in an
    /// unexpected shape is never silently left in clear. Stops with
    /// [`ExpandError::TooMany`] once `out` would exceed `limit` entries.
    pub fn expand(
        &self,
        root: &Value,
        out: &mut Vec<String>,
        limit: usize,
    ) -> Result<(), ExpandError> {
        let mut prefix = String::new();
        expand_into(&self.tokens, root, &mut prefix, out, limit)
    }

    /// Whether a concrete pointer (already split into tokens) is matched.
    pub fn matches(&self, concrete: &[String]) -> bool {
        self.tokens.len() == concrete.len()
            && self.tokens.iter().zip(concrete).all(|(p, c)| match p {
                PatternToken::AnyIndex => array_index(c).is_some(),
                PatternToken::Key(k) => k == c,
            })
    }
}

impl fmt::Debug for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn tokens_may_coincide(a: &PatternToken, b: &PatternToken) -> bool {
    match (a, b) {
        (PatternToken::AnyIndex, PatternToken::AnyIndex) => true,
        (PatternToken::Key(k), PatternToken::AnyIndex)
        | (PatternToken::AnyIndex, PatternToken::Key(k)) => array_index(k).is_some(),
        (PatternToken::Key(x), PatternToken::Key(y)) => x == y,
    }
}

fn expand_into(
    tokens: &[PatternToken],
    value: &Value,
    prefix: &mut String,
    out: &mut Vec<String>,
    limit: usize,
) -> Result<(), ExpandError> {
    let Some((first, rest)) = tokens.split_first() else {
        if out.len() >= limit || prefix.len() > MAX_POINTER_LEN {
            return Err(ExpandError::TooMany);
        }
        out.push(prefix.clone());
        return Ok(());
    };
    let len = prefix.len();
    match (first, value) {
        (_, Value::Null) => {}
        (PatternToken::AnyIndex, Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                // Writing into a `String` cannot fail.
                let _ = write!(prefix, "/{i}");
                expand_into(rest, item, prefix, out, limit)?;
                prefix.truncate(len);
            }
        }
        (PatternToken::Key(key), Value::Object(map)) => {
            if let Some(child) = map.get(key) {
                push_escaped(prefix, key);
                expand_into(rest, child, prefix, out, limit)?;
                prefix.truncate(len);
            }
        }
        (PatternToken::Key(key), Value::Array(items)) if array_index(key).is_some() => {
            if let Some(child) = array_index(key).and_then(|i| items.get(i)) {
                prefix.push('/');
                prefix.push_str(key);
                expand_into(rest, child, prefix, out, limit)?;
                prefix.truncate(len);
            }
        }
        _ => {
            return Err(ExpandError::ShapeMismatch {
                pointer: if prefix.is_empty() { "/".to_owned() } else { prefix.clone() },
                pattern: tokens_to_string(tokens),
            });
        }
    }
    Ok(())
}

fn tokens_to_string(tokens: &[PatternToken]) -> String {
    let mut out = String::new();
    for t in tokens {
        match t {
            PatternToken::AnyIndex => out.push_str("/*"),
            PatternToken::Key(k) => push_escaped(&mut out, k),
        }
    }
    out
}

/// Whether two token lists (of equal length) can address the same location.
pub(crate) fn may_coincide(a: &[PatternToken], b: &[PatternToken]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| tokens_may_coincide(x, y))
}

/// Whether a token is an RFC 6901 array index (digits, no leading zero).
pub(crate) fn is_array_index(token: &str) -> bool {
    array_index(token).is_some()
}

/// RFC 6901 array index: `0` or digits without a leading zero.
fn array_index(token: &str) -> Option<usize> {
    let valid = token == "0"
        || (!token.is_empty()
            && !token.starts_with('0')
            && token.bytes().all(|b| b.is_ascii_digit()));
    if valid { token.parse().ok() } else { None }
}

fn push_escaped(out: &mut String, token: &str) {
    out.push('/');
    for c in token.chars() {
        match c {
            '~' => out.push_str("~0"),
            '/' => out.push_str("~1"),
            c => out.push(c),
        }
    }
}

/// Checks a non-empty JSON pointer the way [`split`] does (length,
/// leading slash, escapes), without allocating its tokens.
pub(crate) fn validate(text: &str) -> Result<(), PointerError> {
    if text.is_empty() {
        return Err(PointerError::Root);
    }
    if text.len() > MAX_POINTER_LEN {
        return Err(PointerError::TooLong);
    }
    let rest = text.strip_prefix('/').ok_or(PointerError::NoLeadingSlash)?;
    let mut bytes = rest.bytes();
    while let Some(b) = bytes.next() {
        if b == b'~' && !matches!(bytes.next(), Some(b'0' | b'1')) {
            return Err(PointerError::BadEscape);
        }
    }
    Ok(())
}

/// A member name as it appears unescaped (`~1` → `/`, `~0` → `~`).
pub(crate) fn unescape_token(token: &str) -> std::borrow::Cow<'_, str> {
    if token.contains('~') {
        std::borrow::Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
    } else {
        std::borrow::Cow::Borrowed(token)
    }
}

/// The value at a concrete pointer (`""` is the whole document), like
/// `serde_json::Value::pointer` but without allocating: that one copies
/// every token into a new `String` to unescape it, and records are looked
/// into several times per protected field.
pub(crate) fn get<'v>(mut value: &'v Value, pointer: &str) -> Option<&'v Value> {
    if pointer.is_empty() {
        return Some(value);
    }
    for token in pointer.strip_prefix('/')?.split('/') {
        value = match value {
            Value::Object(map) => map.get(unescape_token(token).as_ref())?,
            Value::Array(items) => items.get(array_index(token)?)?,
            _ => return None,
        };
    }
    Some(value)
}

/// [`get`], mutably.
pub(crate) fn get_mut<'v>(mut value: &'v mut Value, pointer: &str) -> Option<&'v mut Value> {
    if pointer.is_empty() {
        return Some(value);
    }
    for token in pointer.strip_prefix('/')?.split('/') {
        value = match value {
            Value::Object(map) => map.get_mut(unescape_token(token).as_ref())?,
            Value::Array(items) => items.get_mut(array_index(token)?)?,
            _ => return None,
        };
    }
    Some(value)
}

/// Splits and unescapes a non-empty JSON pointer into its tokens.
pub(crate) fn split(text: &str) -> Result<Vec<String>, PointerError> {
    if text.is_empty() {
        return Err(PointerError::Root);
    }
    if text.len() > MAX_POINTER_LEN {
        return Err(PointerError::TooLong);
    }
    let rest = text.strip_prefix('/').ok_or(PointerError::NoLeadingSlash)?;
    rest.split('/').map(unescape).collect()
}

fn unescape(token: &str) -> Result<String, PointerError> {
    let mut out = String::with_capacity(token.len());
    let mut chars = token.chars();
    while let Some(c) = chars.next() {
        if c == '~' {
            match chars.next() {
                Some('0') => out.push('~'),
                Some('1') => out.push('/'),
                _ => return Err(PointerError::BadEscape),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn expand(pattern: &str, doc: &Value) -> Vec<String> {
        let mut out = Vec::new();
        PathPattern::parse(pattern).unwrap().expand(doc, &mut out, 1000).unwrap();
        out
    }

    #[test]
    fn get_agrees_with_serde_json() {
        let mut doc = json!({
            "a": {"b/c": 1, "m~n": [10, {"x": "y"}], "": 3},
            "list": [0, 1, 2],
            "n": null
        });
        for p in [
            "",
            "/a",
            "/a/b~1c",
            "/a/m~0n",
            "/a/m~0n/1/x",
            "/a/",
            "/list/0",
            "/list/2",
            "/list/3",
            "/list/01",
            "/list/-1",
            "/list/+1",
            "/list/x",
            "/n",
            "/n/x",
            "/missing",
            "a",
            "/a/b/c",
            "/a/b~1c/d",
        ] {
            assert_eq!(get(&doc, p), doc.pointer(p), "{p:?}");
        }
        *get_mut(&mut doc, "/a/m~0n/1/x").unwrap() = json!("z");
        assert_eq!(doc["a"]["m~n"][1]["x"], "z");
        assert!(get_mut(&mut doc, "/list/9").is_none());
    }

    #[test]
    fn wrong_shapes_are_errors_and_null_is_nothing() {
        let p = |s| PathPattern::parse(s).unwrap();
        let mut out = Vec::new();
        for (pattern, doc) in [
            ("/a/*", json!({"a": "penicillin"})),
            ("/a/*", json!({"a": {"0": "x"}})),
            ("/a/b", json!({"a": "scalar"})),
            ("/a/b", json!({"a": [1]})),
            ("/a/*/b", json!({"a": [{"b": 1}, "x"]})),
        ] {
            let err = p(pattern).expand(&doc, &mut out, 1000).unwrap_err();
            assert!(matches!(err, ExpandError::ShapeMismatch { .. }), "{pattern} {doc}");
        }
        out.clear();
        assert!(p("/a/*").expand(&json!({"a": null}), &mut out, 1000).is_ok());
        assert!(out.is_empty());
        let big = json!({"a": (0..50).collect::<Vec<_>>()});
        assert_eq!(p("/a/*").expand(&big, &mut out, 10), Err(ExpandError::TooMany));
    }

    #[test]
    fn expands_wildcards_and_escapes() {
        let doc = json!({
            "a/b": 1, "t~": 2,
            "list": [{"x": 1}, {"y": 2}, {"x": 3}],
            "nested": [[1, 2], [3]]
        });
        let mut out = Vec::new();
        assert!(
            PathPattern::parse("/list/01").unwrap().expand(&doc, &mut out, 10).is_err(),
            "leading zero is not an index"
        );
        assert_eq!(expand("/a~1b", &doc), ["/a~1b"]);
        assert_eq!(expand("/t~0", &doc), ["/t~0"]);
        assert_eq!(expand("/list/*/x", &doc), ["/list/0/x", "/list/2/x"]);
        assert_eq!(expand("/list/1", &doc), ["/list/1"]);
        assert_eq!(expand("/nested/*/*", &doc), ["/nested/0/0", "/nested/0/1", "/nested/1/0"]);
        assert!(expand("/missing", &doc).is_empty());
        assert!(expand("/list/*/y/deeper", &json!({"list": [{"x": 1}]})).is_empty());
        // Every expansion resolves with serde_json's own RFC 6901 lookup.
        for p in expand("/list/*/x", &doc) {
            assert!(doc.pointer(&p).is_some());
        }
    }

    #[test]
    fn validate_agrees_with_split() {
        for text in ["", "/", "/a", "a", "/a~", "/a~2", "/a~0b~1c", "/~01", "//", "/a/~"] {
            assert_eq!(validate(text), split(text).map(|_| ()), "{text:?}");
        }
        assert_eq!(
            validate(&format!("/{}", "a".repeat(MAX_POINTER_LEN))),
            Err(PointerError::TooLong)
        );
        assert_eq!(unescape_token("a~1b~0c"), "a/b~c");
        assert!(matches!(unescape_token("plain"), std::borrow::Cow::Borrowed("plain")));
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(PathPattern::parse(""), Err(PointerError::Root));
        assert_eq!(PathPattern::parse("a"), Err(PointerError::NoLeadingSlash));
        assert_eq!(PathPattern::parse("/a~2"), Err(PointerError::BadEscape));
        assert_eq!(PathPattern::parse("/a~"), Err(PointerError::BadEscape));
        assert_eq!(
            PathPattern::parse(&format!("/{}", "a".repeat(1024))),
            Err(PointerError::TooLong)
        );
    }

    #[test]
    fn overlap() {
        let p = |s| PathPattern::parse(s).unwrap();
        assert!(p("/a").overlaps(&p("/a/b")));
        assert!(p("/a/*").overlaps(&p("/a/3/b")));
        assert!(!p("/a/*").overlaps(&p("/a/x")));
        assert!(!p("/a").overlaps(&p("/b")));
        assert!(p("/a/*/c").overlaps(&p("/a/*/c")));
    }

    #[test]
    fn matches_concrete() {
        let p = PathPattern::parse("/a/*/b").unwrap();
        assert!(p.matches(&split("/a/0/b").unwrap()));
        assert!(!p.matches(&split("/a/x/b").unwrap()));
        assert!(!p.matches(&split("/a/0").unwrap()));
    }
}
