//! Reading a request body within its bounds, and what happens to the rest
//! of a body that is refused.
//!
//! An HTTP/1 server that answers before it has read the whole body, and
//! then closes, resets the connection: the kernel sends RST for the unread
//! bytes, and a client that writes its whole body before it reads (most
//! do) gets a broken pipe instead of the 413. So an oversized HTTP/1 body
//! is read on to its end and thrown away, within the same deadline and if
//! it is at most [`DRAIN_LIMIT`] bytes over the limit, before the 413 goes
//! out. HTTP/2 needs none of this: the stream is reset on its own and the
//! connection carries on. A request refused before its body is read at
//! all (rate limited, no identity) has it drained the same way
//! ([`refuse_unread`]), within the body limit.
//!
//! A declared length is a claim, not bytes: the buffer a body is read into
//! starts at [`FIRST_RESERVATION`] at most and grows as the bytes arrive,
//! so a client that declares the limit and then trickles costs what it
//! sent, not the limit.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Version, header};
use http_body_util::BodyExt;
use tokio::time::{Instant, timeout_at};

/// The most an oversized HTTP/1 body may exceed the limit and still be
/// read to its end (and thrown away) before the 413. A larger one (or one
/// past the deadline) has its connection closed after the 413, and the
/// client may see a reset instead; the bound keeps one refused request
/// from costing more than a few ordinary ones.
pub(super) const DRAIN_LIMIT: u64 = 64 * 1024 * 1024;

/// The most room a body's buffer gets before its bytes have arrived.
pub(super) const FIRST_RESERVATION: usize = 64 * 1024;

/// What reading a body came to.
#[derive(Debug)]
pub(super) enum BodyRead {
    /// The whole body, within the limit.
    Complete(Bytes),
    /// More than the limit (declared up front, or sent).
    TooLarge,
    /// The body had not ended by the deadline.
    TimedOut,
    /// The connection failed while the body was read.
    Failed,
}

/// Reads `body` whole if it is at most `max` bytes and ends by `deadline`.
/// `version` and `headers` are the request's: they tell whether an oversized
/// body must be drained (HTTP/1) and whether it has been sent at all (a
/// client waiting for `100 Continue` has not sent it, and gets its 413
/// without it).
pub(super) async fn read_within(
    mut body: Body,
    max: usize,
    deadline: Instant,
    version: Version,
    headers: &HeaderMap,
) -> BodyRead {
    let declared = declared_length(headers);
    let http1 = version < Version::HTTP_2;
    if let Some(length) = declared.filter(|length| *length > max as u64) {
        // A body that cannot be drained whole is not drained at all: the
        // connection is closed after the 413 straight away.
        let drainable = length - max as u64 <= DRAIN_LIMIT;
        if http1 && !waiting_to_send(headers) && drainable {
            discard(body, length, deadline).await;
        }
        return BodyRead::TooLarge;
    }
    // What the buffer may grow to at once: the declared length, else the limit.
    let expected = declared.map_or(max, |length| usize::try_from(length).unwrap_or(max));
    // The body is kept as it came while it is one chunk (no copy); from the
    // second chunk on, chunks are copied into one buffer, so that many tiny
    // chunks cost their bytes and not a buffer handle each.
    let mut first: Option<Bytes> = None;
    let mut joined: Vec<u8> = Vec::new();
    let mut kept = 0usize;
    loop {
        let frame = match timeout_at(deadline, body.frame()).await {
            Err(_) => return BodyRead::TimedOut,
            Ok(None) => {
                let whole = first.unwrap_or_else(|| Bytes::from(joined));
                return BodyRead::Complete(whole);
            }
            Ok(Some(Err(_))) => return BodyRead::Failed,
            Ok(Some(Ok(frame))) => frame,
        };
        // Trailers carry nothing a JSON API reads.
        let Ok(data) = frame.into_data() else { continue };
        kept = kept.saturating_add(data.len());
        if kept > max {
            break;
        }
        if kept == data.len() && joined.is_empty() {
            first = Some(data);
            continue;
        }
        make_room(&mut joined, first.as_ref().map_or(0, Bytes::len) + data.len(), expected);
        if let Some(held) = first.take() {
            joined.extend_from_slice(&held);
        }
        joined.extend_from_slice(&data);
    }
    drop((first, joined));
    if http1 {
        let past = (kept - max) as u64;
        discard(body, DRAIN_LIMIT.saturating_sub(past), deadline).await;
    }
    BodyRead::TooLarge
}

/// Makes room in `buffer` for `more` bytes: [`FIRST_RESERVATION`] at
/// first, then doubling (so that the copies cost linear time), but not
/// past `expected` while that is enough.
fn make_room(buffer: &mut Vec<u8>, more: usize, expected: usize) {
    let needed = buffer.len().saturating_add(more);
    if needed <= buffer.capacity() {
        return;
    }
    let step = match buffer.capacity() {
        0 => FIRST_RESERVATION,
        capacity => capacity.saturating_mul(2),
    };
    let size = step.min(expected).max(needed);
    buffer.reserve_exact(size - buffer.len());
}

/// Drains the body of a request refused before it was read (on HTTP/1,
/// when sent, at most `max` bytes and until `deadline`), so the client
/// gets the refusal rather than a reset; the bytes are not kept. A body
/// declared over `max` is not drained: the connection closes after the
/// answer.
pub(super) async fn refuse_unread(
    body: Body,
    max: usize,
    deadline: Instant,
    version: Version,
    headers: &HeaderMap,
) {
    let within = declared_length(headers).is_none_or(|length| length <= max as u64);
    if version < Version::HTTP_2 && !waiting_to_send(headers) && within {
        discard(body, max as u64, deadline).await;
    }
}

/// The request's `Content-Length`, if it has a valid one.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Whether the client waits for `100 Continue` before it sends the body
/// (and so has sent nothing to drain).
fn waiting_to_send(headers: &HeaderMap) -> bool {
    headers.get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Reads and drops the rest of `body`: to its end, past `limit` bytes, the
/// deadline or an error, whichever comes first.
async fn discard(mut body: Body, limit: u64, deadline: Instant) {
    let mut dropped = 0u64;
    while dropped <= limit {
        match timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    dropped = dropped.saturating_add(data.len() as u64);
                }
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};
    use std::time::Duration;

    use axum::http::HeaderValue;
    use hyper::body::Frame;

    use super::*;

    /// A body of these chunks that counts those taken, and then ends or
    /// (`never_ends`) stays pending.
    struct Chunks {
        left: VecDeque<Bytes>,
        taken: Arc<AtomicUsize>,
        never_ends: bool,
    }

    impl hyper::body::Body for Chunks {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            match self.left.pop_front() {
                Some(chunk) => {
                    self.taken.fetch_add(1, Ordering::Relaxed);
                    Poll::Ready(Some(Ok(Frame::data(chunk))))
                }
                None if self.never_ends => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    fn body(chunks: &[&'static [u8]], never_ends: bool) -> (Body, Arc<AtomicUsize>) {
        let taken = Arc::new(AtomicUsize::new(0));
        let left = chunks.iter().map(|c| Bytes::from_static(c)).collect();
        (Body::new(Chunks { left, taken: taken.clone(), never_ends }), taken)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    async fn read(chunks: &[&'static [u8]], max: usize, version: Version) -> (BodyRead, usize) {
        let (body, taken) = body(chunks, false);
        let read = read_within(body, max, soon(), version, &HeaderMap::new()).await;
        (read, taken.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_read_whole() {
        let (got, _) = read(&[b"ab", b"cd", b"e"], 5, Version::HTTP_11).await;
        assert!(matches!(got, BodyRead::Complete(ref b) if b == "abcde"), "{got:?}");
        let (got, _) = read(&[b"abcde"], 5, Version::HTTP_11).await;
        assert!(matches!(got, BodyRead::Complete(ref b) if b == "abcde"), "{got:?}");
        let (got, _) = read(&[], 5, Version::HTTP_11).await;
        assert!(matches!(got, BodyRead::Complete(ref b) if b.is_empty()), "{got:?}");
    }

    #[tokio::test]
    async fn an_oversized_http1_body_is_read_to_its_end_and_http2_is_not() {
        let chunks: &[&[u8]] = &[b"abc", b"def", b"ghi", b"jkl"];
        let (got, taken) = read(chunks, 5, Version::HTTP_11).await;
        assert!(matches!(got, BodyRead::TooLarge), "{got:?}");
        assert_eq!(taken, 4, "drained");
        let (got, taken) = read(chunks, 5, Version::HTTP_2).await;
        assert!(matches!(got, BodyRead::TooLarge), "{got:?}");
        assert_eq!(taken, 2, "left for the stream reset");
    }

    #[tokio::test]
    async fn a_body_in_many_pieces_comes_out_whole() {
        let pieces: Vec<&'static [u8]> = vec![b"x"; 1000];
        for declared in [None, Some("1000")] {
            let (b, _) = body(&pieces, false);
            let mut headers = HeaderMap::new();
            if let Some(length) = declared {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static(length));
            }
            let got = read_within(b, 1000, soon(), Version::HTTP_11, &headers).await;
            let BodyRead::Complete(bytes) = got else { panic!("{got:?}") };
            assert_eq!(bytes, vec![b'x'; 1000]);
        }
    }

    #[tokio::test]
    async fn a_declared_length_too_far_over_is_not_drained() {
        let mut headers = HeaderMap::new();
        let over = (5 + DRAIN_LIMIT + 1).to_string();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_str(&over).unwrap());
        let (b, taken) = body(&[b"ab", b"cdef"], false);
        let got = read_within(b, 5, soon(), Version::HTTP_11, &headers).await;
        assert!(matches!(got, BodyRead::TooLarge), "{got:?}");
        assert_eq!(taken.load(Ordering::Relaxed), 0, "closed at once, not drained");
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_without_buffering() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("6"));
        for (version, drained) in [(Version::HTTP_11, 2), (Version::HTTP_2, 0)] {
            let (b, taken) = body(&[b"ab", b"cdef"], false);
            let got = read_within(b, 5, soon(), version, &headers).await;
            assert!(matches!(got, BodyRead::TooLarge), "{got:?}");
            assert_eq!(taken.load(Ordering::Relaxed), drained, "{version:?}");
        }
        // A client waiting for 100 Continue has sent nothing to drain.
        headers.insert(header::EXPECT, HeaderValue::from_static("100-Continue"));
        let (b, taken) = body(&[b"ab", b"cdef"], false);
        let got = read_within(b, 5, soon(), Version::HTTP_11, &headers).await;
        assert!(matches!(got, BodyRead::TooLarge), "{got:?}");
        assert_eq!(taken.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_declared_length_is_not_reserved_before_its_bytes_arrive() {
        // The limit declared, two small chunks sent: a small buffer.
        let mut buffer = Vec::new();
        make_room(&mut buffer, 20, 8 << 20);
        assert!((20..=FIRST_RESERVATION).contains(&buffer.capacity()), "{}", buffer.capacity());
        // It grows with what arrives, doubling, up to the declared length.
        buffer.resize(FIRST_RESERVATION, 0);
        make_room(&mut buffer, 1, 100_000);
        assert_eq!(buffer.capacity(), 100_000, "the declared length, not twice the buffer");
        buffer.resize(100_000, 0);
        make_room(&mut buffer, 10, 100_000);
        assert!(buffer.capacity() >= 100_010, "more than declared still fits");
        // A large chunk gets room for all of it at once.
        let mut buffer = Vec::new();
        make_room(&mut buffer, 1 << 20, 8 << 20);
        assert!(buffer.capacity() >= 1 << 20);
    }

    #[tokio::test]
    async fn a_refused_body_is_drained_within_the_limit_and_not_kept() {
        let mut headers = HeaderMap::new();
        let (b, taken) = body(&[b"ab", b"cd", b"ef"], false);
        refuse_unread(b, 6, soon(), Version::HTTP_11, &headers).await;
        assert_eq!(taken.load(Ordering::Relaxed), 3, "drained");
        let (b, taken) = body(&[b"ab", b"cd", b"ef"], false);
        refuse_unread(b, 6, soon(), Version::HTTP_2, &headers).await;
        assert_eq!(taken.load(Ordering::Relaxed), 0, "left for the stream reset");
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("7"));
        let (b, taken) = body(&[b"ab", b"cd", b"efg"], false);
        refuse_unread(b, 6, soon(), Version::HTTP_11, &headers).await;
        assert_eq!(taken.load(Ordering::Relaxed), 0, "declared over the limit: closed instead");
    }

    #[tokio::test]
    async fn draining_stops_at_its_limit() {
        let (b, taken) = body(&[b"abcd", b"efgh", b"ijkl", b"mnop"], false);
        discard(b, 6, soon()).await;
        assert_eq!(taken.load(Ordering::Relaxed), 2, "8 bytes dropped, past the limit of 6");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_does_not_end_times_out_and_so_does_its_drain() {
        let (b, _) = body(&[b"ab"], true);
        let got = read_within(b, 5, soon(), Version::HTTP_11, &HeaderMap::new()).await;
        assert!(matches!(got, BodyRead::TimedOut), "{got:?}");
        let (b, taken) = body(&[b"abcdef"], true);
        let got = read_within(b, 5, soon(), Version::HTTP_11, &HeaderMap::new()).await;
        assert!(matches!(got, BodyRead::TooLarge), "{got:?}");
        assert_eq!(taken.load(Ordering::Relaxed), 1);
    }
}
