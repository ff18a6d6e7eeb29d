//! JSON nesting depth, measured on the raw bytes before any parser
//! recursion (serde_json's own limit is 128 and yields a generic syntax
//! error; ours answers `json_too_deep`).

/// Whether `body` opens more than `max` nested arrays or objects at some
/// point. Brackets inside strings do not count. Not a validator: malformed
/// JSON is left to the parser.
pub fn exceeds_depth(body: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
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
