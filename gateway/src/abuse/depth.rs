//! JSON nesting depth, measured on the raw bytes before any parser
//! recursion (serde_json's own limit is 128 and yields a generic syntax
//! error; ours answers `json_too_deep`).

/// Whether `body` opens more than `max` nested arrays or objects at some
/// point. Brackets inside strings do not count. Not a validator: malformed
/// JSON is left to the parser.
pub fn exceeds_depth(body: &[u8], max: usize) -> bool {
    nesting(body, max) > max
}

/// How many arrays and objects `body` opens inside one another at most,
/// counting no further than `max + 1` (the scan stops there). Brackets
/// inside strings do not count.
pub fn nesting(body: &[u8], max: usize) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut rest = body;
    while let Some((&byte, tail)) = rest.split_first() {
        rest = tail;
        match byte {
            b'"' => rest = after_string(rest),
            b'[' | b'{' => {
                depth += 1;
                if depth > deepest {
                    deepest = depth;
                    if deepest > max {
                        break;
                    }
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// What follows the string whose opening quote was just read; empty if it
/// is never closed. Most of a record's bytes are inside strings (keys,
/// base64 tokens), so they are skipped by a vectorized search for the only
/// two bytes that matter there: a byte-at-a-time scan was 7 % of the
/// sidecar's batch decrypt profile.
pub(crate) fn after_string(mut rest: &[u8]) -> &[u8] {
    while let Some(at) = memchr::memchr2(b'"', b'\\', rest) {
        let after = rest.get(at + 1..).unwrap_or_default();
        if rest.get(at) == Some(&b'"') {
            return after;
        }
        // A backslash: the byte after it is escaped, whatever it is.
        rest = after.get(1..).unwrap_or_default();
    }
    &[]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(n: usize) -> String {
        format!("{}1{}", "[".repeat(n), "]".repeat(n))
    }

    #[test]
    fn counts_arrays_and_objects() {
        assert!(!exceeds_depth(b"1", 0));
        assert!(exceeds_depth(b"[]", 0));
        assert!(!exceeds_depth(nested(64).as_bytes(), 64));
        assert!(exceeds_depth(nested(65).as_bytes(), 64));
        assert!(!exceeds_depth(br#"{"a":{"b":[1,{"c":2}]}}"#, 4));
        assert!(exceeds_depth(br#"{"a":{"b":[1,{"c":2}]}}"#, 3));
        // Siblings do not add up.
        assert!(!exceeds_depth(b"[[1],[2],[3],[4]]", 2));
    }

    #[test]
    fn brackets_in_strings_do_not_count() {
        let text = format!(r#"{{"a":"{}","b":"\"[[[","c":"\\"}}"#, "[".repeat(500));
        assert!(!exceeds_depth(text.as_bytes(), 1));
        assert!(exceeds_depth(br#"{"a":"\\",[[]]}"#, 2));
    }

    /// The definition, one byte at a time.
    fn exceeds_depth_bytewise(body: &[u8], max: usize) -> bool {
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for &byte in body {
            if in_string {
                if escaped {
                    escaped = false;
                } else if byte == b'\\' {
                    escaped = true;
                } else if byte == b'"' {
                    in_string = false;
                }
                continue;
            }
            match byte {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > max {
                        return true;
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        false
    }

    #[test]
    fn agrees_with_the_bytewise_definition() {
        // Seeded xorshift over the bytes that matter (and a filler), long
        // runs included, so escapes, unclosed strings and quotes right
        // after backslashes all occur many times.
        const ALPHABET: &[u8] = br#"[]{}"\a "#;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut exceeded = 0;
        for case in 0..20_000 {
            let len = usize::try_from(next() % 64).unwrap();
            let body: Vec<u8> = (0..len)
                .map(|_| ALPHABET[usize::try_from(next()).unwrap() % ALPHABET.len()])
                .collect();
            let max = case % 5;
            let expected = exceeds_depth_bytewise(&body, max);
            exceeded += usize::from(expected);
            assert_eq!(exceeds_depth(&body, max), expected, "{:?} max {max}", body.escape_ascii());
        }
        // Both answers occur, so the comparison means something.
        assert!((1_000..19_000).contains(&exceeded), "{exceeded}");
    }

    #[test]
    fn agrees_with_serde_json_on_nesting() {
        for n in [1, 10, 63, 64, 65, 127] {
            let text = nested(n);
            let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert!(parsed.is_array());
            assert_eq!(exceeds_depth(text.as_bytes(), 64), n > 64, "{n}");
        }
    }
}
