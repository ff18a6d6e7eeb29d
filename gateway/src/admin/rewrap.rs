//! `keygate admin rewrap`: encrypted records (JSON lines) from stdin to
//! stdout through a sidecar's `POST /v1/rewrap`, in batches.
//!
//! Memory is bounded by one batch. Every line is checked before its batch
//! is sent (valid JSON, an object, a `_kg` header that parses, the expected
//! tenant); at the first bad line N the records read before it are still
//! rewrapped and written, then the command stops with `error: line N: …`
//! (exit 2). Output is written a whole batch at a time, so a run that
//! stops on an error ends on a complete line (one killed by a signal in
//! the middle of a large write may not: its exit status says so). Blank
//! lines are dropped.
//!
//! Records pass through as text, never parsed into values and printed
//! again: what the sidecar does not change (members it does not protect,
//! with their numbers as written, their order and spacing) comes out byte
//! for byte as it went in. A record already on the active version comes
//! out unchanged.

use std::borrow::Cow;
use std::io::Write;
use std::time::{Duration, Instant};

use kms_core::TenantId;
use kms_core::record::{HEADER_MEMBER, RecordHeader};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use super::args::RewrapArgs;
use super::client::{api_error, transport_error};
use super::error::AdminError;
use super::output::{io_reason, stdout_error};

/// Longest input line accepted (the sidecar's default body limit).
const MAX_LINE_BYTES: u64 = 16 * 1024 * 1024;
/// Timeout of one sidecar call.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// `POST /v1/rewrap` request.
#[derive(Serialize)]
struct RewrapBody<'a> {
    records: &'a [Box<RawValue>],
}

/// `POST /v1/rewrap` answer.
#[derive(Debug, Deserialize)]
struct Rewrapped {
    records: Vec<Box<RawValue>>,
    #[serde(default)]
    rewrapped: u64,
}

/// The sidecar endpoint and its credentials.
struct Sidecar {
    http: reqwest::Client,
    endpoint: String,
    shown: String,
    token: Option<SecretString>,
}

impl Sidecar {
    /// `unix:///path.sock` or `http://127.0.0.1:PORT` (loopback only: the
    /// API carries the bearer token and record keys).
    fn new(address: &str, token_file: Option<&std::path::Path>) -> Result<Self, AdminError> {
        // No proxy: the sidecar is on this host, and the token and records
        // go in clear over loopback; `HTTP_PROXY` must not send them away.
        let builder = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        let (builder, endpoint) = if let Some(path) = address.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(AdminError::usage("--sidecar unix://: give the socket path"));
            }
            (
                builder.unix_socket(std::path::PathBuf::from(path)),
                "http://localhost/v1/rewrap".to_owned(),
            )
        } else if address.starts_with("http://") {
            let url = reqwest::Url::parse(address)
                .map_err(|e| AdminError::usage(format!("--sidecar {address}: {e}")))?;
            let host = url.host_str().unwrap_or_default();
            let loopback = host.eq_ignore_ascii_case("localhost")
                || host
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback || !matches!(url.path(), "" | "/") || url.query().is_some() {
                return Err(AdminError::usage(format!(
                    "--sidecar {address}: use http://127.0.0.1:PORT (loopback only) or unix:///path.sock"
                )));
            }
            (builder, format!("{}/v1/rewrap", url.as_str().trim_end_matches('/')))
        } else {
            return Err(AdminError::usage(format!(
                "--sidecar {address}: use unix:///path/to/sidecar.sock or http://127.0.0.1:PORT"
            )));
        };
        let http = builder
            .build()
            .map_err(|e| AdminError::usage(format!("cannot set up the sidecar client: {e}")))?;
        let token = token_file.map(read_token).transpose()?;
        Ok(Self { http, endpoint, shown: address.to_owned(), token })
    }

    /// Rewraps one batch; `lines` names the input lines for errors, and
    /// `line_numbers` the line of each record.
    async fn rewrap(
        &self,
        records: &[Box<RawValue>],
        lines: &str,
        line_numbers: &[u64],
    ) -> Result<Rewrapped, AdminError> {
        let count = records.len();
        let body = serde_json::to_vec(&RewrapBody { records })
            .map_err(|e| AdminError::usage(format!("{lines}: cannot send the records: {e}")))?;
        let mut request =
            self.http.post(&self.endpoint).header(CONTENT_TYPE, "application/json").body(body);
        if let Some(token) = &self.token {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
                .map_err(|_| AdminError::usage("--token-file: not a valid bearer token"))?;
            value.set_sensitive(true);
            request = request.header(AUTHORIZATION, value);
        }
        let response =
            request.send().await.map_err(|e| transport_error("the sidecar", &self.shown, &e))?;
        if !response.status().is_success() {
            let e = api_error(response, "POST /v1/rewrap").await;
            let refused = match refused_line(&e.to_string(), line_numbers) {
                Some(line) => format!("{lines}: the sidecar refused line {line}"),
                None => format!("{lines}: the sidecar refused"),
            };
            return Err(e.context(refused));
        }
        let answer: Rewrapped = response.json().await.map_err(|e| {
            AdminError::unavailable(format!("{lines}: unexpected answer from the sidecar: {e}"))
        })?;
        if answer.records.len() != count {
            return Err(AdminError::unavailable(format!(
                "{lines}: the sidecar answered {} records for {count}",
                answer.records.len()
            )));
        }
        Ok(answer)
    }
}

/// The input line of the record a sidecar's refusal names (its message
/// starts `records[i]: ` when a request of several records fails for one).
fn refused_line(message: &str, line_numbers: &[u64]) -> Option<u64> {
    let (index, _) = message.strip_prefix("records[")?.split_once(']')?;
    line_numbers.get(index.parse::<usize>().ok()?).copied()
}

fn read_token(path: &std::path::Path) -> Result<SecretString, AdminError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        AdminError::usage(format!("--token-file {}: {}", path.display(), io_reason(&e)))
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(AdminError::usage(format!("--token-file {}: empty", path.display())));
    }
    Ok(SecretString::from(token.to_owned()))
}

/// Counts, printed to stderr at most once a second and at the end.
struct Progress {
    read: u64,
    rewrapped: u64,
    unchanged: u64,
    every: Option<Duration>,
    last: Instant,
}

impl Progress {
    fn line(&self) -> String {
        format!(
            "{} records read, {} rewrapped, {} unchanged",
            self.read, self.rewrapped, self.unchanged
        )
    }

    fn tick(&mut self) {
        if self.every.is_some_and(|every| self.last.elapsed() >= every) {
            eprintln!("rewrap: {}", self.line());
            self.last = Instant::now();
        }
    }
}

pub(crate) async fn run(args: &RewrapArgs) -> Result<(), AdminError> {
    let sidecar = Sidecar::new(&args.sidecar, args.token_file.as_deref())?;
    let batch_size = usize::try_from(args.batch).unwrap_or(100).max(1);
    let mut input = BufReader::new(tokio::io::stdin());
    let mut buf = Vec::new();
    let mut line_no: u64 = 0;
    let every = (args.progress_every > 0).then(|| Duration::from_secs(args.progress_every));
    let mut progress =
        Progress { read: 0, rewrapped: 0, unchanged: 0, every, last: Instant::now() };
    loop {
        let mut batch = Vec::with_capacity(batch_size);
        let mut numbers = Vec::with_capacity(batch_size);
        let (mut first, mut last) = (0u64, 0u64);
        let mut stop = None;
        let mut eof = false;
        while batch.len() < batch_size {
            buf.clear();
            let read =
                (&mut input).take(MAX_LINE_BYTES + 1).read_until(b'\n', &mut buf).await.map_err(
                    |e| AdminError::usage(format!("cannot read stdin: {}", io_reason(&e))),
                );
            match read {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    stop = Some(e);
                    break;
                }
            }
            line_no += 1;
            match parse_line(&buf, line_no, &args.tenant) {
                Ok(None) => {}
                Ok(Some(record)) => {
                    if batch.is_empty() {
                        first = line_no;
                    }
                    last = line_no;
                    batch.push(record);
                    numbers.push(line_no);
                }
                Err(e) => {
                    stop = Some(e);
                    break;
                }
            }
        }
        if !batch.is_empty() {
            let lines = if first == last {
                format!("line {first}")
            } else {
                format!("lines {first}-{last}")
            };
            let count = u64::try_from(batch.len()).unwrap_or(u64::MAX);
            let answer = sidecar.rewrap(&batch, &lines, &numbers).await?;
            write_batch(&answer.records)?;
            progress.read += count;
            progress.rewrapped += answer.rewrapped.min(count);
            progress.unchanged += count - answer.rewrapped.min(count);
            progress.tick();
        }
        if let Some(e) = stop {
            return Err(e);
        }
        if eof {
            break;
        }
    }
    eprintln!("rewrap: done: {}", progress.line());
    Ok(())
}

/// The record header of a record, read without reading the rest into
/// values.
#[derive(Deserialize)]
struct Envelope<'a> {
    /// [`HEADER_MEMBER`].
    #[serde(rename = "_kg", borrow, default)]
    header: Option<Cow<'a, str>>,
}

/// serde_json's message without its position ("… at line 1 column 9").
fn reason(e: &serde_json::Error) -> String {
    let text = e.to_string();
    text.split(" at line ").next().unwrap_or(&text).to_owned()
}

/// One input line → a record to send, as its text, `None` for a blank
/// line.
fn parse_line(
    bytes: &[u8],
    line: u64,
    tenant: &TenantId,
) -> Result<Option<Box<RawValue>>, AdminError> {
    let bad = |why: String| AdminError::usage(format!("line {line}: {why}"));
    let content = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if u64::try_from(content.len()).unwrap_or(u64::MAX) > MAX_LINE_BYTES {
        return Err(bad(format!("longer than {MAX_LINE_BYTES} bytes")));
    }
    if content.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let record: Box<RawValue> = serde_json::from_slice(content)
        .map_err(|e| bad(format!("not valid JSON: {} (column {})", reason(&e), e.column())))?;
    if !record.get().starts_with('{') {
        return Err(bad("not a JSON object".to_owned()));
    }
    let envelope: Envelope<'_> = serde_json::from_str(record.get())
        .map_err(|e| bad(format!("the {HEADER_MEMBER} header: {}", reason(&e))))?;
    let Some(header) = envelope.header else {
        return Err(bad(format!("not an encrypted record (no {HEADER_MEMBER} header)")));
    };
    let header = RecordHeader::parse(&header)
        .map_err(|e| bad(format!("the {HEADER_MEMBER} header: {e}")))?;
    if header.tenant() != tenant {
        return Err(bad(format!("the record belongs to tenant {}, not {tenant}", header.tenant())));
    }
    Ok(Some(record))
}

/// Writes a batch as JSON lines, each record's text as the sidecar gave
/// it, in one write, then flushes.
fn write_batch(records: &[Box<RawValue>]) -> Result<(), AdminError> {
    let mut text = Vec::new();
    for record in records {
        // JSON lines: a record over several lines would split in two.
        if record.get().contains('\n') {
            return Err(AdminError::unavailable("the sidecar answered a record of several lines"));
        }
        text.extend_from_slice(record.get().as_bytes());
        text.push(b'\n');
    }
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&text).and_then(|()| stdout.flush()).map_err(stdout_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_checked_before_sending() {
        let onc = TenantId::new("onc").unwrap();
        assert_eq!(HEADER_MEMBER, "_kg", "the member `Envelope` reads");
        assert!(parse_line(b"  \n", 3, &onc).unwrap().is_none());
        let e = parse_line(b"{not json\n", 7, &onc).unwrap_err().to_string();
        assert!(e.starts_with("line 7: not valid JSON"), "{e}");
        assert!(!e.contains("at line 1"), "{e}");
        let e = parse_line(b"[1]\n", 8, &onc).unwrap_err().to_string();
        assert_eq!(e, "line 8: not a JSON object");
        let e = parse_line(b"{\"a\":1}\n", 9, &onc).unwrap_err().to_string();
        assert!(e.contains("line 9: not an encrypted record"), "{e}");
        let e = parse_line(b"{\"_kg\":\"kg1h:AAAA\"}\n", 10, &onc).unwrap_err().to_string();
        assert!(e.starts_with("line 10: the _kg header"), "{e}");
        let e = parse_line(b"{\"_kg\":1}\n", 11, &onc).unwrap_err().to_string();
        assert!(e.starts_with("line 11: the _kg header: invalid type"), "{e}");
        let twice = b"{\"_kg\":\"kg1h:AAAA\",\"_kg\":\"kg1h:AAAA\"}\n";
        let e = parse_line(twice, 12, &onc).unwrap_err().to_string();
        assert!(e.starts_with("line 12: the _kg header: duplicate field"), "{e}");
        // The longest line is accepted with its newline; one byte more is not.
        let mut long = vec![b' '; usize::try_from(MAX_LINE_BYTES).unwrap()];
        long.push(b'\n');
        assert!(parse_line(&long, 13, &onc).unwrap().is_none());
        long.insert(0, b' ');
        let e = parse_line(&long, 14, &onc).unwrap_err().to_string();
        assert!(e.contains("longer than"), "{e}");
    }

    #[test]
    fn sidecar_addresses() {
        assert!(Sidecar::new("unix:///run/keygate/sidecar.sock", None).is_ok());
        assert!(Sidecar::new("http://127.0.0.1:8080", None).is_ok());
        assert!(Sidecar::new("http://localhost:8080/", None).is_ok());
        for bad in ["unix://", "http://10.0.0.1:80", "https://127.0.0.1", "tcp://x", "/run/x.sock"]
        {
            let e = Sidecar::new(bad, None).err().unwrap();
            assert_eq!(e.failure(), super::super::error::Failure::Usage, "{bad}");
        }
    }
}
