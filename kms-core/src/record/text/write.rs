//! Writing a scanned record back out: separators, member names and values
//! in document order, with members dropped or added on the way.

use super::scan::Span;
use crate::secret::SecretBuf;

/// Writes JSON text into `out` from the pieces of `text` and new values.
pub(super) struct Writer<'t, 'o> {
    text: &'t [u8],
    pub(super) out: &'o mut SecretBuf,
    /// Per open container: whether nothing was written in it yet.
    empty: &'o mut Vec<bool>,
    /// The name of the member whose value comes next.
    name: Option<Span>,
}

impl<'t, 'o> Writer<'t, 'o> {
    pub(super) fn new(text: &'t [u8], out: &'o mut SecretBuf, empty: &'o mut Vec<bool>) -> Self {
        empty.clear();
        Self { text, out, empty, name: None }
    }

    /// How many containers are open.
    pub(super) fn depth(&self) -> usize {
        self.empty.len()
    }

    pub(super) fn open(&mut self, bracket: u8) {
        self.begin();
        self.out.extend_from_slice(&[bracket]);
        self.empty.push(true);
    }

    pub(super) fn close(&mut self, bracket: u8) {
        self.empty.pop();
        self.out.extend_from_slice(&[bracket]);
    }

    /// The next value belongs to this member.
    pub(super) fn name(&mut self, name: Span) {
        self.name = Some(name);
    }

    /// The pending member's name, taken: its value is not written, so
    /// neither is it. `None` for an array element.
    pub(super) fn drop_member(&mut self) -> Option<Span> {
        self.name.take()
    }

    /// Starts a value: the separator, then the pending name and a colon.
    /// Returns the name written, if any.
    pub(super) fn begin(&mut self) -> Option<Span> {
        if let Some(empty) = self.empty.last_mut() {
            if !*empty {
                self.out.extend_from_slice(b",");
            }
            *empty = false;
        }
        let name = self.name.take()?;
        self.out.extend_from_slice(self.text.get(name.start..name.end).unwrap_or_default());
        self.out.extend_from_slice(b":");
        Some(name)
    }

    /// A value copied from the record.
    pub(super) fn raw(&mut self, span: Span) {
        self.begin();
        self.out.extend_from_slice(self.text.get(span.start..span.end).unwrap_or_default());
    }

    /// A value given as JSON text.
    pub(super) fn value(&mut self, json: &[u8]) {
        self.begin();
        self.out.extend_from_slice(json);
    }

    /// A member added to the innermost object: `"<name><suffix>":"<string>"`,
    /// where `name` is written as it is (a member name's text without its
    /// quotes, or a name that needs no escaping) and so are the suffix and
    /// the string.
    pub(super) fn added_member(&mut self, name: &[u8], suffix: &str, string: &[u8]) {
        self.begin();
        self.out.extend_from_slice(b"\"");
        self.out.extend_from_slice(name);
        self.out.extend_from_slice(suffix.as_bytes());
        self.out.extend_from_slice(b"\":\"");
        self.out.extend_from_slice(string);
        self.out.extend_from_slice(b"\"");
    }

    /// The record text of a span.
    pub(super) fn slice(&self, span: Span) -> &'t [u8] {
        self.text.get(span.start..span.end).unwrap_or_default()
    }
}
