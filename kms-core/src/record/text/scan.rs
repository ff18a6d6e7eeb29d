//! One pass over a record's JSON text that finds what the schema protects,
//! without building a tree.
//!
//! The pass follows only the members and elements that some schema path
//! can still reach (its "cursors"); every other value is skipped as a byte
//! span (strings by a vectorized search for `"` and `\`) and later copied
//! as it is. What it leaves is a flat list of [`Event`]s in document order
//! — enough to write the record back out with protected values replaced,
//! members added or members dropped — and the protected locations with
//! their concrete pointers, exactly as [`PathPattern::expand`] would name
//! them.
//!
//! Anything the tree path would treat in a way this pass does not
//! reproduce exactly is a [`Bail`]: a member name with an escape (the tree
//! compares unescaped names), a relevant member name that occurs twice in
//! one object (the tree keeps the last), a value of the wrong shape on a
//! schema path (the tree reports which), too many locations. The caller
//! then runs the tree path, which gives its answer or its error; nothing
//! here ever decides an error.
//!
//! [`PathPattern::expand`]: crate::pointer::PathPattern::expand

use crate::pointer::{MAX_POINTER_LEN, PatternToken};
use crate::record::{BLIND_INDEX_SUFFIX, HEADER_MEMBER, MAX_FIELDS};
use crate::schema::{FieldMode, Schema};

/// The record is not one this pass reproduces exactly: use the tree path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Bail;

pub(super) type Step<T> = Result<T, Bail>;

/// A byte range of the record text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Span {
    pub(super) start: usize,
    pub(super) end: usize,
}

/// What the pass saw, in document order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Event {
    /// `{` or `[` of a container some schema path goes into.
    Open(u8),
    /// Its `}` or `]`.
    Close(u8),
    /// A member name, with its quotes (no escapes in it).
    Name(Span),
    /// A value no schema path reaches: copied as it is.
    Raw(Span),
    /// A protected location (index into [`Scan::found`]).
    Found(usize),
    /// A `<name>_bidx` member beside a blind index path (index into
    /// [`Scan::siblings`]; decrypt only).
    Sibling(usize),
    /// The root's `_kg` member's value (decrypt only).
    Header(Span),
}

/// Where a concrete pointer lies in [`Scan::pointers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PointerSpan {
    start: usize,
    end: usize,
}

/// A protected location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Found {
    /// Concrete pointer, as the header lists it.
    pub(super) pointer: PointerSpan,
    /// Index of the schema field whose path matched.
    pub(super) field: usize,
    /// The value's text.
    pub(super) value: Span,
}

/// A member named like a blind index path's sibling (`<name>_bidx`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Sibling {
    /// Its concrete pointer (the location's pointer and the suffix).
    pub(super) pointer: PointerSpan,
    /// Its value's text.
    pub(super) value: Span,
}

/// Which direction the record is going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    /// Plain record: a root `_kg` or a `<name>_bidx` member beside a blind
    /// index path is the tree path's business (it refuses both).
    Encrypt,
    /// Encrypted record: both are noted.
    Decrypt,
}

/// The result of one pass (its buffers are reused from record to record).
#[derive(Debug, Default)]
pub(super) struct Scan {
    pub(super) events: Vec<Event>,
    pub(super) found: Vec<Found>,
    pub(super) siblings: Vec<Sibling>,
    /// Schema paths still possible at each level: (field index, tokens
    /// matched). A level's cursors are a range of this stack.
    cursors: Vec<(usize, usize)>,
    /// Names already seen in the objects being walked (to catch repeats).
    seen: Vec<Span>,
    /// The concrete pointer of the value being walked.
    pointer: String,
    /// The pointers of [`Self::found`] and [`Self::siblings`], one after
    /// another: one buffer reused from record to record, not a string
    /// allocated per location.
    pointers: String,
}

impl Scan {
    /// Walks `text` (one JSON value, known to be valid JSON) for `schema`.
    pub(super) fn run(&mut self, text: &str, schema: &Schema, direction: Direction) -> Step<()> {
        self.events.clear();
        self.found.clear();
        self.siblings.clear();
        self.cursors.clear();
        self.seen.clear();
        self.pointer.clear();
        self.pointers.clear();
        let r = Reader { text, pos: 0 };
        let mut walk = Walk { r, schema, direction, scan: self };
        walk.r.skip_ws();
        if walk.r.peek() != Some(b'{') {
            return Err(Bail); // not an object: the tree path says so
        }
        walk.scan.cursors.extend((0..schema.fields.len()).map(|field| (field, 0)));
        let root = walk.scan.cursors.len();
        walk.object(0, root, true)?;
        walk.r.skip_ws();
        if walk.r.pos != walk.r.text.len() {
            return Err(Bail);
        }
        Ok(())
    }

    /// The pointer a location or sibling was found at.
    pub(super) fn pointer(&self, at: PointerSpan) -> &str {
        self.pointers.get(at.start..at.end).unwrap_or_default()
    }

    /// Keeps `pointer` (with `suffix`, if any) for a location or sibling.
    fn hold(&mut self, suffix: Option<&str>) -> PointerSpan {
        let start = self.pointers.len();
        self.pointers.push_str(&self.pointer);
        if let Some(name) = suffix {
            push_escaped(&mut self.pointers, name);
        }
        PointerSpan { start, end: self.pointers.len() }
    }
}

/// Schema paths through one object whose expected names a walk keeps on
/// the stack (more go to the heap).
const EXPECTED_ON_STACK: usize = 16;

/// A member name a cursor expects next.
#[derive(Clone, Copy)]
struct Expected<'s> {
    key: &'s [u8],
    field: usize,
    matched: usize,
    /// The key is a blind index path's last token: `<key>_bidx` is its
    /// sibling.
    sibling: bool,
}

impl Expected<'_> {
    const NONE: Self = Self { key: &[], field: 0, matched: 0, sibling: false };
}

/// Reads valid JSON text token by token.
struct Reader<'t> {
    text: &'t str,
    pos: usize,
}

struct Walk<'t, 's> {
    r: Reader<'t>,
    schema: &'s Schema,
    direction: Direction,
    scan: &'s mut Scan,
}

impl<'t> Reader<'t> {
    fn bytes(&self) -> &'t [u8] {
        self.text.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Step<()> {
        self.skip_ws();
        if self.peek() != Some(byte) {
            return Err(Bail);
        }
        self.pos += 1;
        Ok(())
    }

    /// After a member or element: `true` at the container's end (`close`,
    /// consumed), `false` at a comma (consumed).
    fn next_or_close(&mut self, close: u8) -> Step<bool> {
        self.skip_ws();
        match self.peek() {
            Some(b',') => {
                self.pos += 1;
                Ok(false)
            }
            Some(b) if b == close => {
                self.pos += 1;
                Ok(true)
            }
            _ => Err(Bail),
        }
    }

    /// A member name at `pos`, quotes included; a name with an escape is
    /// compared unescaped by the tree path, so it is not ours.
    fn name(&mut self) -> Step<Span> {
        let start = self.pos;
        if self.peek() != Some(b'"') {
            return Err(Bail);
        }
        let rest = self.bytes().get(start + 1..).ok_or(Bail)?;
        let at = memchr::memchr2(b'"', b'\\', rest).ok_or(Bail)?;
        if rest.get(at) != Some(&b'"') {
            return Err(Bail);
        }
        self.pos = start + 1 + at + 1;
        Ok(Span { start, end: self.pos })
    }

    /// Skips the value at `pos` (valid JSON), returning its span.
    fn skip_value(&mut self) -> Step<Span> {
        let start = self.pos;
        match self.peek().ok_or(Bail)? {
            b'"' => self.pos = string_end(self.bytes(), start)?,
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek().ok_or(Bail)? {
                        b'"' => {
                            self.pos = string_end(self.bytes(), self.pos)?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth = depth.checked_sub(1).ok_or(Bail)?;
                            if depth == 0 {
                                self.pos += 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                    self.pos += 1;
                }
            }
            _ => {
                while let Some(b) = self.peek() {
                    if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                        break;
                    }
                    self.pos += 1;
                }
            }
        }
        if self.pos == start {
            return Err(Bail);
        }
        Ok(Span { start, end: self.pos })
    }
}

impl Walk<'_, '_> {
    /// A value no schema path reaches: skipped, to be copied as it is.
    fn raw_value(&mut self) -> Step<()> {
        self.r.skip_ws();
        let span = self.r.skip_value()?;
        self.scan.events.push(Event::Raw(span));
        Ok(())
    }

    fn tokens(&self, field: usize) -> Step<&[PatternToken]> {
        self.schema.fields.get(field).map(|f| f.path.tokens()).ok_or(Bail)
    }

    /// The value at `pos` for the cursors `from..to` of the stack.
    fn value(&mut self, from: usize, to: usize) -> Step<()> {
        if from == to {
            return self.raw_value();
        }
        self.r.skip_ws();
        let mut complete = None;
        for &(field, matched) in self.scan.cursors.get(from..to).ok_or(Bail)? {
            if matched == self.tokens(field)?.len() {
                complete = Some(field);
            }
        }
        if let Some(field) = complete {
            // A schema never has a path that is a prefix of another, so a
            // location is reached by exactly one cursor.
            if to - from != 1 {
                return Err(Bail);
            }
            if self.scan.found.len() >= MAX_FIELDS || self.scan.pointer.len() > MAX_POINTER_LEN {
                return Err(Bail);
            }
            let value = self.r.skip_value()?;
            self.scan.events.push(Event::Found(self.scan.found.len()));
            let pointer = self.scan.hold(None);
            self.scan.found.push(Found { pointer, field, value });
            return Ok(());
        }
        match self.r.peek() {
            Some(b'{') => self.object(from, to, false),
            Some(b'[') => self.array(from, to),
            // A null on the way protects nothing.
            Some(b'n') => self.raw_value(),
            // Any other value where a path needs an object or an array is
            // a shape error, which the tree path reports.
            _ => Err(Bail),
        }
    }

    fn object(&mut self, from: usize, to: usize, root: bool) -> Step<()> {
        // What each cursor expects next, fetched from the schema once per
        // object rather than once per member: a member name is compared
        // with these without going through the schema's fields, paths and
        // tokens each time (that pointer chase was most of this walk).
        let mut on_stack = [Expected::NONE; EXPECTED_ON_STACK];
        let mut on_heap = Vec::new();
        let expected = match on_stack.get_mut(..to - from) {
            Some(expected) => expected,
            None => {
                on_heap.resize(to - from, Expected::NONE);
                on_heap.as_mut_slice()
            }
        };
        for (slot, i) in expected.iter_mut().zip(from..to) {
            let &(field, matched) = self.scan.cursors.get(i).ok_or(Bail)?;
            let spec = self.schema.fields.get(field).ok_or(Bail)?;
            let tokens = spec.path.tokens();
            // `*` over an object, even an empty one, is a shape error in
            // the tree path.
            let Some(PatternToken::Key(key)) = tokens.get(matched) else {
                return Err(Bail);
            };
            *slot = Expected {
                key: key.as_bytes(),
                field,
                matched,
                sibling: spec.mode == FieldMode::BlindIndex && matched + 1 == tokens.len(),
            };
        }
        self.r.pos += 1; // '{'
        self.scan.events.push(Event::Open(b'{'));
        let seen_base = self.scan.seen.len();
        self.r.skip_ws();
        if self.r.peek() == Some(b'}') {
            self.r.pos += 1;
            self.scan.events.push(Event::Close(b'}'));
            return Ok(());
        }
        loop {
            self.r.skip_ws();
            let name = self.r.name()?;
            self.r.expect(b':')?;
            let unquoted = self.r.text.get(name.start + 1..name.end - 1).ok_or(Bail)?;
            let bytes = unquoted.as_bytes();
            let children = self.scan.cursors.len();
            let mut sibling = false;
            for e in expected.iter() {
                let key = e.key;
                // Lengths and first bytes settle most pairs without a
                // call to memcmp.
                if key.len() == bytes.len() && key.first() == bytes.first() && key == bytes {
                    self.scan.cursors.push((e.field, e.matched + 1));
                } else if e.sibling
                    && bytes.len() == key.len() + BLIND_INDEX_SUFFIX.len()
                    && is_sibling(bytes, key)
                {
                    sibling = true;
                }
            }
            let header = root && bytes == HEADER_MEMBER.as_bytes();
            let relevant = self.scan.cursors.len() > children || sibling || header;
            if relevant {
                // The tree keeps the last of repeated members; this pass
                // would see both.
                let seen = self.scan.seen.get(seen_base..).ok_or(Bail)?;
                if seen.iter().any(|s| self.r.bytes().get(s.start..s.end) == Some(bytes)) {
                    return Err(Bail);
                }
                self.scan.seen.push(Span { start: name.start + 1, end: name.end - 1 });
            }
            self.scan.events.push(Event::Name(name));
            if self.scan.cursors.len() > children {
                if sibling || header {
                    return Err(Bail);
                }
                let len = self.scan.pointer.len();
                push_escaped(&mut self.scan.pointer, unquoted);
                let result = self.value(children, self.scan.cursors.len());
                self.scan.pointer.truncate(len);
                self.scan.cursors.truncate(children);
                result?;
            } else if sibling || header {
                if self.direction == Direction::Encrypt {
                    return Err(Bail);
                }
                self.r.skip_ws();
                let value = self.r.skip_value()?;
                if header {
                    self.scan.events.push(Event::Header(value));
                } else {
                    let pointer = self.scan.hold(Some(unquoted));
                    self.scan.events.push(Event::Sibling(self.scan.siblings.len()));
                    self.scan.siblings.push(Sibling { pointer, value });
                }
            } else {
                self.raw_value()?;
            }
            if self.r.next_or_close(b'}')? {
                break;
            }
        }
        self.scan.seen.truncate(seen_base);
        self.scan.events.push(Event::Close(b'}'));
        Ok(())
    }

    fn array(&mut self, from: usize, to: usize) -> Step<()> {
        // A member name that is not an index, over an array, is a shape
        // error in the tree path.
        for i in from..to {
            let &(field, matched) = self.scan.cursors.get(i).ok_or(Bail)?;
            match self.tokens(field)?.get(matched) {
                Some(PatternToken::Key(key)) if array_index(key.as_bytes()).is_none() => {
                    return Err(Bail);
                }
                None => return Err(Bail),
                _ => {}
            }
        }
        self.r.pos += 1; // '['
        self.scan.events.push(Event::Open(b'['));
        self.r.skip_ws();
        if self.r.peek() == Some(b']') {
            self.r.pos += 1;
            self.scan.events.push(Event::Close(b']'));
            return Ok(());
        }
        let mut index = 0usize;
        loop {
            let children = self.scan.cursors.len();
            for i in from..to {
                let &(field, matched) = self.scan.cursors.get(i).ok_or(Bail)?;
                let advance = match self.tokens(field)?.get(matched) {
                    Some(PatternToken::AnyIndex) => true,
                    Some(PatternToken::Key(key)) => array_index(key.as_bytes()) == Some(index),
                    None => false,
                };
                if advance {
                    self.scan.cursors.push((field, matched + 1));
                }
            }
            if self.scan.cursors.len() > children {
                let len = self.scan.pointer.len();
                self.scan.pointer.push('/');
                self.scan.pointer.push_str(itoa(index, &mut [0; 20]));
                let result = self.value(children, self.scan.cursors.len());
                self.scan.pointer.truncate(len);
                self.scan.cursors.truncate(children);
                result?;
            } else {
                self.raw_value()?;
            }
            if self.r.next_or_close(b']')? {
                break;
            }
            index += 1;
        }
        self.scan.events.push(Event::Close(b']'));
        Ok(())
    }
}

/// The value of the root object's member `name`, if it has one, found
/// without looking into any value. Bails if the text is not an object,
/// if a root member name has an escape (it might spell `name`) or if
/// `name` occurs twice.
///
/// In a text without a backslash, a member named `name` spells `name`
/// literally: two vectorized searches first count its occurrences (up to
/// two). None, and there is no such member, without reading the text's
/// structure; one, and the first root member of that name is the only
/// one, so the walk stops there. So `text` must be valid JSON, as a
/// `RawValue`'s text is by construction.
pub(super) fn root_member(text: &str, name: &str) -> Step<Option<Span>> {
    let mut r = Reader { text, pos: 0 };
    r.skip_ws();
    if r.peek() != Some(b'{') {
        return Err(Bail);
    }
    let bytes = text.as_bytes();
    // Not counted where a backslash could spell `name` some other way.
    let spelled = match memchr::memchr(b'\\', bytes) {
        None if !name.is_empty() => Some(memchr::memmem::find_iter(bytes, name).take(2).count()),
        _ => None,
    };
    if spelled == Some(0) {
        return Ok(None);
    }
    let only_one = spelled == Some(1);
    r.pos += 1;
    r.skip_ws();
    if r.peek() == Some(b'}') {
        return Ok(None);
    }
    let mut found = None;
    loop {
        r.skip_ws();
        let member = r.name()?;
        r.expect(b':')?;
        r.skip_ws();
        let value = r.skip_value()?;
        if r.text.get(member.start + 1..member.end - 1) == Some(name) {
            if found.is_some() {
                return Err(Bail);
            }
            if only_one {
                return Ok(Some(value));
            }
            found = Some(value);
        }
        if r.next_or_close(b'}')? {
            return Ok(found);
        }
    }
}

/// The value of the root object's last member, if that member is `name`
/// and its value a string whose bytes all satisfy `plain` (which must
/// refuse `"` and `\`): found from the end, without reading the rest of
/// the record. keygate writes the header member last, so this finds it in
/// the records it wrote while reading a few hundred bytes fewer than
/// [`root_member`].
///
/// `text` must be valid JSON, as a `RawValue`'s text is by construction.
/// Then a match is exact: the value's quotes are real delimiters (nothing
/// between them is a quote or an escape, and a colon precedes the first),
/// the string before the colon is a member name that starts after a `,`
/// or `{`, and only whitespace separates the value from the root's
/// closing brace. It does not show that `name` occurs only once: a caller
/// that needs that must check it (the walk does).
pub(super) fn last_string_member(
    text: &str,
    name: &str,
    plain: impl Fn(u8) -> bool,
) -> Option<Span> {
    let bytes = text.as_bytes();
    let before_ws = |mut at: usize| {
        while at > 0 && matches!(bytes.get(at - 1), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            at -= 1;
        }
        at
    };
    // `at` is an exclusive end throughout: the byte looked at is `at - 1`.
    let mut at = before_ws(bytes.len());
    let closing =
        |at: usize, byte: u8| (bytes.get(at.checked_sub(1)?) == Some(&byte)).then(|| at - 1);
    at = before_ws(closing(at, b'}')?);
    let end = at;
    at = closing(at, b'"')?;
    while at > 0 && bytes.get(at - 1).copied().is_some_and(&plain) {
        at -= 1;
    }
    let start = closing(at, b'"')?;
    at = before_ws(closing(before_ws(start), b':')?);
    let quoted = at.checked_sub(name.len() + 2)?;
    let member = bytes.get(quoted..at)?;
    if member.first() != Some(&b'"')
        || member.last() != Some(&b'"')
        || member.get(1..member.len() - 1) != Some(name.as_bytes())
    {
        return None;
    }
    closing(before_ws(quoted), b',').or_else(|| closing(before_ws(quoted), b'{'))?;
    Some(Span { start, end })
}

/// The position after the string whose opening quote is at `start`.
pub(super) fn string_end(text: &[u8], start: usize) -> Step<usize> {
    let mut at = start + 1;
    loop {
        let rest = text.get(at..).ok_or(Bail)?;
        let found = memchr::memchr2(b'"', b'\\', rest).ok_or(Bail)?;
        at += found;
        if text.get(at) == Some(&b'"') {
            return Ok(at + 1);
        }
        at += 2; // a backslash and the byte it escapes
    }
}

/// Whether `name` is `key` followed by the blind index suffix.
fn is_sibling(name: &[u8], key: &[u8]) -> bool {
    name.strip_prefix(key) == Some(BLIND_INDEX_SUFFIX.as_bytes())
}

/// RFC 6901 array index: `0` or digits without a leading zero.
fn array_index(token: &[u8]) -> Option<usize> {
    match token {
        [b'0'] => Some(0),
        [b'1'..=b'9', rest @ ..] if rest.iter().all(u8::is_ascii_digit) => {
            std::str::from_utf8(token).ok()?.parse().ok()
        }
        _ => None,
    }
}

/// `/` and the member name, escaped as a pointer token (`~` → `~0`,
/// `/` → `~1`).
fn push_escaped(pointer: &mut String, name: &str) {
    pointer.push('/');
    if !name.bytes().any(|b| b == b'~' || b == b'/') {
        pointer.push_str(name);
        return;
    }
    for c in name.chars() {
        match c {
            '~' => pointer.push_str("~0"),
            '/' => pointer.push_str("~1"),
            c => pointer.push(c),
        }
    }
}

/// Decimal text of `n` in `buf`.
fn itoa(mut n: usize, buf: &mut [u8; 20]) -> &str {
    let mut at = buf.len();
    loop {
        at -= 1;
        if let Some(slot) = buf.get_mut(at) {
            *slot = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || at == 0 {
            break;
        }
    }
    std::str::from_utf8(buf.get(at..).unwrap_or_default()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::super::is_header_byte;
    use super::*;

    fn last(text: &str) -> Option<&str> {
        last_string_member(text, "_kg", is_header_byte).map(|s| &text[s.start..s.end])
    }

    #[test]
    fn the_last_member_is_found_from_the_end() {
        assert_eq!(last(r#"{"a":1,"_kg":"kg1h:AB-_9"}"#), Some(r#""kg1h:AB-_9""#));
        assert_eq!(last(r#"{"_kg":"x"}"#), Some(r#""x""#));
        assert_eq!(last(r#"{"_kg":""}"#), Some(r#""""#));
        assert_eq!(last("{\"a\":[1,{}] ,\r\n \"_kg\" \t:\n \"h\" \n}\t "), Some(r#""h""#));
        // Whatever comes first: checking it is the walk's job.
        assert_eq!(last(r#"{"_kg":"a","_kg":"b"}"#), Some(r#""b""#));
    }

    #[test]
    fn anything_else_is_left_to_the_forward_scan() {
        for text in [
            // Not last, not the name, not a plain string.
            r#"{"_kg":"h","a":1}"#,
            r#"{"a":1,"kg":"h"}"#,
            r#"{"a":1,"__kg":"h"}"#,
            r#"{"a":1,"\u005fkg":"h"}"#,
            r#"{"a":1,"_kg":1}"#,
            r#"{"a":1,"_kg":"h\"x"}"#,
            r#"{"a":1,"_kg":"h\\"}"#,
            r#"{"a":1,"_kg":"h.x"}"#,
            r#"{"a":1,"_kg":{"b":"h"}}"#,
            // The tail of a longer string, or of a nested value.
            r#"{"a":"x\",\"_kg\":\"h"}"#,
            r#"{"a":"\"_kg\":\"h"}"#,
            r#"{"a":{"_kg":"h"}}"#,
            r#"["_kg","h"]"#,
            r#""_kg:h}""#,
            // Truncated or empty text.
            "",
            "}",
            "\"}",
            r#"":"h"}"#,
            r#""_kg":"h"}"#,
        ] {
            assert_eq!(last(text), None, "{text}");
        }
    }

    fn root(text: &str) -> Step<Option<&str>> {
        root_member(text, "_kg").map(|found| found.map(|s| &text[s.start..s.end]))
    }

    #[test]
    fn a_root_member_is_found_with_or_without_the_shortcuts() {
        let cases: [(&str, Step<Option<&str>>); 13] = [
            // No `_kg` and no backslash: answered before any walk.
            (r#"{"a":1,"b":{"c":"kg"}}"#, Ok(None)),
            (r#" {}"#, Ok(None)),
            // Spelled once: the walk stops at it, or finds it is not a root member.
            (r#"{"_kg":"h","a":[1,2]}"#, Ok(Some(r#""h""#))),
            (r#"{"a":1, "_kg" : {"b":2}, "c":3}"#, Ok(Some(r#"{"b":2}"#))),
            (r#"{"a":"_kg"}"#, Ok(None)),
            (r#"{"a":{"_kg":"h"}}"#, Ok(None)),
            // Spelled twice: the whole walk.
            (r#"{"a":{"_kg":"x"},"_kg":"h"}"#, Ok(Some(r#""h""#))),
            (r#"{"_kg":"h","b":"_kg"}"#, Ok(Some(r#""h""#))),
            (r#"{"_kg":"h","b":1,"_kg":"i"}"#, Err(Bail)),
            // A backslash anywhere: the whole walk, which bails on an escaped name.
            (r#"{"a":"\n","_kg":"h"}"#, Ok(Some(r#""h""#))),
            (r#"{"\u005fkg":"h"}"#, Err(Bail)),
            (r#"{"_kg":"h","\u005fkg":"i"}"#, Err(Bail)),
            // Not an object.
            (r#"["_kg"]"#, Err(Bail)),
        ];
        for (text, expected) in cases {
            assert_eq!(root(text), expected, "{text}");
        }
    }
}
