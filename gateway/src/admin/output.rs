//! What the admin CLI prints: aligned tables for people, one JSON document
//! (or JSON lines, for exports) for scripts. Writes to stdout never panic:
//! a closed pipe is an error like any other.

use std::io::Write;

use serde_json::Value;

use super::error::AdminError;

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Human-readable text and aligned tables.
    Table,
    /// One JSON document (JSON lines for exports).
    Json,
}

/// A table with a header row; columns are padded to their widest cell.
#[derive(Debug)]
pub(crate) struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub(crate) fn new(headers: &[&'static str]) -> Self {
        Self { headers: headers.to_vec(), rows: Vec::new() }
    }

    /// Adds a row (missing cells print empty, extra cells are dropped).
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row, ending in a newline.
    pub(crate) fn render(&self) -> String {
        let clean = |s: &str| super::error::one_line(s);
        let rows: Vec<Vec<String>> =
            self.rows.iter().map(|r| r.iter().map(|c| clean(c)).collect()).collect();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut text = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = cells.next().unwrap_or("");
                if i > 0 {
                    text.push_str("  ");
                }
                text.push_str(cell);
                let pad = width.saturating_sub(cell.chars().count());
                text.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&mut self.headers.iter().copied());
        for row in &rows {
            line(&mut row.iter().map(String::as_str));
        }
        out
    }
}

/// Writes `text` to stdout and flushes.
pub(crate) fn print(text: &str) -> Result<(), AdminError> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).map_err(stdout_error)
}

/// Writes `text` and a newline to stdout.
pub(crate) fn println(text: &str) -> Result<(), AdminError> {
    print(&format!("{text}\n"))
}

/// Writes `value` as one pretty-printed JSON document.
pub(crate) fn print_json(value: &Value) -> Result<(), AdminError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| AdminError::unavailable(format!("cannot print the answer: {e}")))?;
    println(&text)
}

/// Prints `value` as JSON, or `table` (with `title` above it, if any).
pub(crate) fn emit(
    format: OutputFormat,
    value: &Value,
    title: Option<&str>,
    table: impl FnOnce() -> Table,
) -> Result<(), AdminError> {
    match format {
        OutputFormat::Json => print_json(value),
        OutputFormat::Table => {
            let mut text = title.map(|t| format!("{t}\n")).unwrap_or_default();
            text.push_str(&table().render());
            print(&text)
        }
    }
}

/// Prints `value` as JSON, or the line `text`.
pub(crate) fn emit_line(format: OutputFormat, value: &Value, text: &str) -> Result<(), AdminError> {
    match format {
        OutputFormat::Json => print_json(value),
        OutputFormat::Table => println(text),
    }
}

/// A failed write to stdout (most often a closed pipe).
pub(crate) fn stdout_error(e: std::io::Error) -> AdminError {
    AdminError::refused(format!("cannot write to stdout: {}", io_reason(&e)))
}

/// An I/O error's reason without the `(os error N)` suffix.
pub(crate) fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(at) => text.get(..at).unwrap_or(&text).to_owned(),
        None => text,
    }
}

/// A cell for an optional value.
pub(crate) fn or_dash<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let mut table = Table::new(&["VERSION", "STATE"]);
        table.row(vec!["1".into(), "decrypt_only".into()]);
        table.row(vec!["12".into(), "active\nx".into()]);
        assert_eq!(table.render(), "VERSION  STATE\n1        decrypt_only\n12       active x\n");
        assert_eq!(or_dash(None::<u32>), "-");
        assert_eq!(or_dash(Some(3)), "3");
    }
}
