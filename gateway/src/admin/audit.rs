//! `keygate admin audit verify|anchor|export`.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::Path;

use kms_core::TenantId;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Ctx;
use super::args::AuditCommand;
use super::audit_cursor::{Cursor, Position};
use super::client::{Client, decode, transport_error};
use super::error::AdminError;
use super::output::{Table, emit, or_dash, println, stdout_error};
use super::timefmt::rfc3339;
use crate::server::api::AuditHeads;

/// `GET /v1/audit/verify`.
#[derive(Debug, Deserialize)]
struct Verified {
    ok: bool,
    #[serde(default)]
    instances: Vec<InstanceReport>,
    #[serde(default)]
    first_break: Option<Break>,
}

#[derive(Debug, Deserialize)]
struct InstanceReport {
    instance: String,
    events: u64,
    checkpoints: u64,
    head_seq: i64,
    /// Absent from a key service older than this CLI.
    #[serde(default)]
    head_hash: Option<String>,
    #[serde(default)]
    last_checkpoint: Option<i64>,
    /// Anchors the chain passed through (`POST /v1/audit/verify`).
    #[serde(default)]
    anchors: u64,
}

impl Verified {
    /// Why the log did not verify, if it did not.
    fn broken(&self) -> Option<String> {
        if self.ok {
            return None;
        }
        Some(self.first_break.as_ref().map_or_else(
            || "the audit log did not verify".to_owned(),
            |b| {
                format!(
                    "audit chain of instance {} is broken at position {}: {}",
                    b.instance, b.position, b.reason
                )
            },
        ))
    }
}

/// Where a chain stood: one line of `audit anchor`, as `audit verify
/// --anchors` reads it back (other fields are ignored).
#[derive(Debug, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
struct AnchorLine {
    instance: String,
    seq: i64,
    hash: String,
}

/// Largest `--anchors` file read, in bytes (hourly anchors of a few
/// instances for years).
const MAX_ANCHORS_FILE_BYTES: u64 = 256 * 1024 * 1024;
/// Most anchors sent in one verification (the key service's limit).
const MAX_ANCHORS: usize = crate::server::api::VerifyRequest::MAX_ANCHORS;
/// Largest request body of anchors, in bytes: half the key service's
/// default body limit, whatever the instance names' lengths.
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Deserialize)]
struct Break {
    instance: String,
    position: i64,
    reason: String,
}

pub(crate) async fn run(ctx: &Ctx, command: AuditCommand) -> Result<(), AdminError> {
    let client = ctx.client()?;
    match command {
        AuditCommand::Verify { anchors } => verify(ctx, &client, anchors.as_deref()).await,
        AuditCommand::Anchor => anchor(&client).await,
        AuditCommand::Export { since, tenant, instance, page_size, cursor } => {
            let filters = Filters { since_ms: since, tenant: tenant.as_ref(), page_size };
            match cursor {
                None => export(&client, &filters, instance.as_deref(), 0).await.map(drop),
                Some(path) => {
                    export_from_cursor(&client, &filters, instance.as_deref(), &path).await
                }
            }
        }
    }
}

async fn verify(ctx: &Ctx, client: &Client, anchors: Option<&Path>) -> Result<(), AdminError> {
    let (answer, report, anchored) = match anchors {
        None => {
            let answer = client.get("/v1/audit/verify").await?;
            let report: Verified = decode(&answer, "audit verify")?;
            (answer, report, None)
        }
        Some(path) => {
            // Each request walks every chain once, through the anchors of
            // one part; a longer file takes several walks, and the first
            // that breaks is the answer (with several, `-o json` prints
            // the last answer).
            let anchors = read_anchors(path)?;
            let mut passed = 0;
            let mut last = None;
            for chunk in parts(&anchors, MAX_ANCHORS, MAX_REQUEST_BYTES) {
                let answer = client.post("/v1/audit/verify", &json!({ "anchors": chunk })).await?;
                let report: Verified = decode(&answer, "audit verify")?;
                passed += report.instances.iter().map(|i| i.anchors).sum::<u64>();
                let ok = report.ok;
                last = Some((answer, report));
                if !ok {
                    break;
                }
            }
            let (answer, report) = last.ok_or_else(|| AdminError::usage("no anchors"))?;
            (answer, report, Some(passed))
        }
    };
    let title = if report.ok {
        let through = anchored.map_or_else(String::new, |n| format!(", through {n} anchor(s)"));
        format!(
            "audit log verified: {} instance(s), every chain and checkpoint intact{through}",
            report.instances.len()
        )
    } else {
        "audit log BROKEN; instances verified before the break:".to_owned()
    };
    emit(ctx.output, &answer, Some(&title), || {
        let mut table =
            Table::new(&["INSTANCE", "EVENTS", "CHECKPOINTS", "HEAD_SEQ", "LAST_CHECKPOINT"]);
        for i in &report.instances {
            table.row(vec![
                i.instance.clone(),
                i.events.to_string(),
                i.checkpoints.to_string(),
                i.head_seq.to_string(),
                or_dash(i.last_checkpoint),
            ]);
        }
        table
    })?;
    match report.broken() {
        None => Ok(()),
        Some(why) => Err(AdminError::refused(why)),
    }
}

/// Verifies the log, then prints one anchor line per chain with events.
async fn anchor(client: &Client) -> Result<(), AdminError> {
    let answer = client.get("/v1/audit/verify").await?;
    let report: Verified = decode(&answer, "audit verify")?;
    if let Some(why) = report.broken() {
        return Err(AdminError::refused(format!("no anchor taken: {why}")));
    }
    let taken_at = rfc3339(crate::audit_log::now_ms() / 1000);
    for i in report.instances.iter().filter(|i| i.head_seq >= 1) {
        let Some(hash) = &i.head_hash else {
            return Err(AdminError::refused(
                "the key service does not report chain heads; upgrade it to take anchors",
            ));
        };
        let line =
            json!({"instance": i.instance, "seq": i.head_seq, "hash": hash, "taken_at": taken_at});
        println(&line.to_string())?;
    }
    Ok(())
}

/// `anchors` in consecutive parts of at most `max_count` anchors and
/// (roughly, as JSON) `max_bytes` each; never an empty part, and an anchor
/// larger than `max_bytes` alone in one.
fn parts(anchors: &[AnchorLine], max_count: usize, max_bytes: usize) -> Vec<&[AnchorLine]> {
    // {"instance":"…","seq":…,"hash":"…"}, and a comma.
    let size = |a: &AnchorLine| a.instance.len() + a.hash.len() + 60;
    let mut parts = Vec::new();
    let mut rest = anchors;
    while !rest.is_empty() {
        let mut bytes = 0;
        let fitting = rest
            .iter()
            .take(max_count)
            .take_while(|a| {
                bytes += size(a);
                bytes <= max_bytes
            })
            .count();
        let Some((part, after)) = rest.split_at_checked(fitting.max(1)) else { break };
        parts.push(part);
        rest = after;
    }
    parts
}

/// The anchor lines of `path` (blank lines skipped), checked enough to
/// name the line of a mistake; the key service checks the rest.
fn read_anchors(path: &Path) -> Result<Vec<AnchorLine>, AdminError> {
    let shown = path.display();
    let fail = |reason: String| AdminError::usage(format!("--anchors {shown}: {reason}"));
    let file = std::fs::File::open(path).map_err(|e| fail(super::output::io_reason(&e)))?;
    let mut text = String::new();
    file.take(MAX_ANCHORS_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| fail(super::output::io_reason(&e)))?;
    if u64::try_from(text.len()).unwrap_or(u64::MAX) > MAX_ANCHORS_FILE_BYTES {
        return Err(fail(format!("larger than {MAX_ANCHORS_FILE_BYTES} bytes")));
    }
    // Sorted and without repeats: each distinct anchor is sent once.
    let mut anchors = std::collections::BTreeSet::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let anchor: AnchorLine = serde_json::from_str(line)
            .map_err(|e| fail(format!("line {}: not an anchor ({e})", n + 1)))?;
        anchors.insert(anchor);
    }
    if anchors.is_empty() {
        return Err(fail("no anchors in it".to_owned()));
    }
    Ok(anchors.into_iter().collect())
}

/// What `audit export` prints of what it reads.
struct Filters<'a> {
    since_ms: Option<i64>,
    tenant: Option<&'a TenantId>,
    page_size: u64,
}

/// Streams `GET /v1/audit` to stdout as JSON lines, page by page to the
/// end: of one chain with `instance` (after its sequence number `from`),
/// else of every chain (each page resumes after the last line's instance
/// and sequence number). Returns the last line printed.
async fn export(
    client: &Client,
    filters: &Filters<'_>,
    instance: Option<&str>,
    from: i64,
) -> Result<Option<Line>, AdminError> {
    let page_size = filters.page_size;
    let mut after: i64 = from;
    let mut after_instance: Option<String> = None;
    let mut total: u64 = 0;
    let mut printed = None;
    loop {
        let mut query = vec![format!("limit={page_size}"), format!("after={after}")];
        if let Some(i) = &after_instance {
            query.push(format!("after_instance={}", query_value(i)));
        }
        if let Some(since) = filters.since_ms {
            query.push(format!("since_ms={since}"));
        }
        if let Some(t) = filters.tenant {
            query.push(format!("tenant={}", t.as_str()));
        }
        if let Some(i) = instance {
            query.push(format!("instance={}", query_value(i)));
        }
        let path = format!("/v1/audit?{}", query.join("&"));
        let response = client.send(Method::GET, &path, None).await?;
        let page = stream_lines(response).await?;
        total += page.lines;
        if page.last.is_some() {
            printed.clone_from(&page.last);
        }
        if page.lines < page_size {
            return Ok(printed);
        }
        // The cursor is (instance, seq); a full page that does not move it
        // forward would repeat itself: refused rather than looping.
        let before = (instance.or(after_instance.as_deref()).unwrap_or_default(), after);
        match page.last {
            Some(Line { instance: i, seq, .. }) if (i.as_str(), seq) > before => {
                after = seq;
                if instance.is_none() {
                    after_instance = Some(i);
                }
            }
            _ => {
                return Err(AdminError::refused(format!(
                    "the export stopped after {total} events: a full page did not end \
                     after the one before"
                )));
            }
        }
    }
}

/// `audit export --cursor`: each chain (or `instance`'s alone) from where
/// the cursor left it, then the cursor moved to where this run read to.
///
/// The key service prints only what passes the filters, so the lines do
/// not say how far it read; its chain heads, taken before reading, do.
/// Each chain is read through its head at least (every event up to the
/// head is stored by then, whatever its timestamp), and the cursor moves
/// to the head, or to the last line printed if that is further, and
/// keeps that event's hash. Events past the head are read again next
/// time; the filters leave out the same ones again.
async fn export_from_cursor(
    client: &Client,
    filters: &Filters<'_>,
    instance: Option<&str>,
    path: &Path,
) -> Result<(), AdminError> {
    let mut cursor = Cursor::open(path)?;
    let answer = client.get("/v1/audit/heads").await?;
    let heads: AuditHeads = decode(&answer, "audit heads")?;
    cursor.check(&heads.instances)?;
    confirm_chains(client, &cursor).await?;
    for head in heads.instances.iter().filter(|h| instance.is_none_or(|i| i == h.instance)) {
        let from = cursor.position(&head.instance);
        if from >= head.head_seq {
            continue;
        }
        match export(client, filters, Some(&head.instance), from).await? {
            Some(Line { seq, hash: Some(hash), .. }) if seq > head.head_seq => {
                cursor.advance(&head.instance, seq, &hash);
            }
            _ => cursor.advance(&head.instance, head.head_seq, &head.head_hash),
        }
    }
    sync_stdout()?;
    cursor.write()
}

/// Refuses a cursor whose chains were rewritten under it (a restored
/// keystore, a failover): the event at each place it read a chain to must
/// still be there, with the same hash. That one event is enough: its
/// chain hash covers every event before it.
async fn confirm_chains(client: &Client, cursor: &Cursor) -> Result<(), AdminError> {
    for (instance, read) in cursor.chains() {
        let path = format!(
            "/v1/audit?instance={}&after={}&limit=1",
            query_value(instance),
            read.seq.saturating_sub(1)
        );
        let response = client.send(Method::GET, &path, None).await?;
        let at = response.url().origin().ascii_serialization();
        let body =
            response.bytes().await.map_err(|e| transport_error("the key service", &at, &e))?;
        let found = match body.split(|b| *b == b'\n').find(|l| !l.is_empty()) {
            None => None,
            Some(line) => match parse_line(line) {
                Some(Line { instance: i, seq, hash: Some(hash) }) if i == instance => {
                    Some(Position { seq, hash })
                }
                _ => {
                    return Err(AdminError::unavailable(
                        "unexpected answer from the key service for GET /v1/audit",
                    ));
                }
            },
        };
        cursor.confirm(instance, found.as_ref())?;
    }
    Ok(())
}

/// Flushes stdout and, when it is a file, syncs it: the cursor must not
/// move past lines that a crash could still lose.
fn sync_stdout() -> Result<(), AdminError> {
    let mut stdout = std::io::stdout();
    stdout.flush().map_err(stdout_error)?;
    let file = std::fs::File::from(stdout.as_fd().try_clone_to_owned().map_err(stdout_error)?);
    if file.metadata().is_ok_and(|m| m.is_file()) {
        file.sync_all().map_err(stdout_error)?;
    }
    Ok(())
}

/// `value` percent-encoded for a query string.
fn query_value(value: &str) -> String {
    let mut encoded = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    encoded
}

/// What one page of the export held.
struct Page {
    lines: u64,
    /// The last line.
    last: Option<Line>,
}

/// Where a line of the export is in its chain.
#[derive(Clone)]
struct Line {
    instance: String,
    seq: i64,
    /// Its chain hash, in hex.
    hash: Option<String>,
}

/// The place of a line of the export, if it is one.
fn parse_line(line: &[u8]) -> Option<Line> {
    let v = serde_json::from_slice::<Value>(line).ok()?;
    Some(Line {
        instance: v.get("instance")?.as_str()?.to_owned(),
        seq: v.get("seq")?.as_i64()?,
        hash: v.get("hash").and_then(Value::as_str).map(str::to_owned),
    })
}

/// Copies the body to stdout as it arrives, whole lines at a time.
async fn stream_lines(mut response: reqwest::Response) -> Result<Page, AdminError> {
    let at = response.url().origin().ascii_serialization();
    let mut stdout = std::io::stdout().lock();
    let mut pending: Vec<u8> = Vec::new();
    let mut last: Vec<u8> = Vec::new();
    let mut lines = 0u64;
    loop {
        let chunk =
            response.chunk().await.map_err(|e| transport_error("the key service", &at, &e))?;
        let finished = chunk.is_none();
        if let Some(chunk) = chunk {
            pending.extend_from_slice(&chunk);
        } else if !pending.is_empty() {
            pending.push(b'\n');
        }
        if let Some(end) = pending.iter().rposition(|b| *b == b'\n') {
            let complete: Vec<u8> = pending.drain(..=end).collect();
            for line in complete.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                stdout.write_all(line).map_err(stdout_error)?;
                stdout.write_all(b"\n").map_err(stdout_error)?;
                lines += 1;
                last.clear();
                last.extend_from_slice(line);
            }
        }
        if finished {
            break;
        }
    }
    stdout.flush().map_err(stdout_error)?;
    Ok(Page { lines, last: parse_line(&last) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_go_in_parts_bounded_by_count_and_size() {
        let anchor = |instance: &str, seq| AnchorLine {
            instance: instance.to_owned(),
            seq,
            hash: "0".repeat(64),
        };
        let many: Vec<AnchorLine> = (1..=10).map(|seq| anchor("ks-1", seq)).collect();
        let lens = |parts: Vec<&[AnchorLine]>| parts.iter().map(|p| p.len()).collect::<Vec<_>>();
        assert_eq!(lens(parts(&many, 4, usize::MAX)), [4, 4, 2]);
        assert_eq!(lens(parts(&many, 100, usize::MAX)), [10]);
        // 132 bytes each: three fit in 400.
        assert_eq!(lens(parts(&many, 100, 400)), [3, 3, 3, 1]);
        let long = [anchor(&"i".repeat(1024), 1), anchor("ks-1", 2)];
        assert_eq!(lens(parts(&long, 100, 400)), [1, 1], "a large anchor goes alone");
        assert!(parts(&[], 4, 400).is_empty());
    }
}
