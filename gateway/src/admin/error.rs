//! The admin CLI's one error type and its exit codes.
//!
//! Every failure becomes one line on stderr (`error: …`) and one of three
//! exit codes, so scripts can tell "the service said no" from "I typed it
//! wrong" from "the service is not there".

use std::process::ExitCode;

/// Why a command failed, which decides its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// 1: the key service refused (a 4xx answer), or a check found a
    /// problem (a broken audit chain, a failing compliance rule).
    Refused,
    /// 2: bad usage or bad input (arguments, profile, files, JSON lines).
    Usage,
    /// 3: the key service or sidecar cannot be reached or cannot serve
    /// (connection or TLS failure, timeout, a 5xx answer).
    Unavailable,
}

impl Failure {
    /// The process exit code.
    pub(crate) fn code(self) -> u8 {
        match self {
            Failure::Refused => 1,
            Failure::Usage => 2,
            Failure::Unavailable => 3,
        }
    }
}

/// A failed admin command: what kind of failure, and a message that holds
/// no secret (never key material, PINs, tokens or private keys).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub(crate) struct AdminError {
    failure: Failure,
    message: String,
}

impl AdminError {
    /// The key service refused, or a check failed (exit 1).
    pub(crate) fn refused(message: impl Into<String>) -> Self {
        Self { failure: Failure::Refused, message: message.into() }
    }

    /// Bad usage or input (exit 2).
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Self { failure: Failure::Usage, message: message.into() }
    }

    /// The service cannot be reached or cannot serve (exit 3).
    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Self { failure: Failure::Unavailable, message: message.into() }
    }

    /// What kind of failure this is.
    pub(crate) fn failure(&self) -> Failure {
        self.failure
    }

    /// The same failure with `context` in front of the message.
    pub(crate) fn context(self, context: impl std::fmt::Display) -> Self {
        Self { failure: self.failure, message: format!("{context}: {}", self.message) }
    }

    /// Prints `error: …` on one line of stderr and returns the exit code.
    pub(crate) fn report(&self) -> ExitCode {
        eprintln!("error: {}", one_line(&self.message));
        ExitCode::from(self.failure().code())
    }
}

/// `text` on one line: line breaks and other control characters become
/// spaces, runs of whitespace collapse.
pub(crate) fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split(|c: char| c.is_whitespace() || c.is_control()) {
        if word.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// A TOML parser error as one line: `line L, column C: message`, without
/// the quoted source line the parser's `Display` adds (the file may hold
/// values that must not be echoed).
pub(crate) fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = one_line(e.message());
    // Errors found after buffering (e.g. inside a tagged table) carry no
    // span; an unknown key can still be found by its name.
    let offset = e.span().map(|s| s.start).or_else(|| unknown_key_offset(text, &message));
    match offset {
        Some(offset) => {
            let (line, column) = line_column(text, offset);
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

/// Where the key named in "unknown field `KEY`" is defined in `text`.
fn unknown_key_offset(text: &str, message: &str) -> Option<usize> {
    let key = message.split_once("unknown field `")?.1.split_once('`')?.0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let indent = line.len() - line.trim_start().len();
        let rest = line.trim_start().strip_prefix(key).map(str::trim_start);
        if rest.is_some_and(|r| r.starts_with('=')) {
            return Some(offset + indent);
        }
        offset += line.len();
    }
    None
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count().saturating_add(1);
    let column = before.rsplit('\n').next().unwrap_or_default().chars().count().saturating_add(1);
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_become_one_line() {
        assert_eq!(one_line("a\n  b\r\n\tc  "), "a b c");
        assert_eq!(one_line(""), "");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(AdminError::refused("x").failure().code(), 1);
        assert_eq!(AdminError::usage("x").failure().code(), 2);
        assert_eq!(AdminError::unavailable("x").failure().code(), 3);
        assert_eq!(AdminError::usage("b").context("a").to_string(), "a: b");
    }

    #[test]
    fn toml_errors_name_the_line_and_hide_the_source() {
        let text = "url = \"x\"\npin = \"1234\"\n";
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Only {
            url: String,
        }
        let e = toml::from_str::<Only>(text).unwrap_err();
        let line = toml_error(text, &e);
        assert!(line.starts_with("line 2, column 1: "), "{line}");
        assert!(!line.contains("1234"), "{line}");
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
    }
}
