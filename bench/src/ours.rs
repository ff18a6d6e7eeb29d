//! keygate's scenarios, through the sidecar API (and, for `datakeys`, the
//! key service API over mTLS). The warm set is encrypted first, on a fresh
//! sidecar, and decrypted back, every record checked against its original
//! (its resident set with the DEK cache full is measured then), so the
//! decrypts run before encrypt's DEKs push it out of the cache:
//! - `encrypt`: records → `POST /v1/encrypt` (DEKs from the sidecar's pool);
//! - `decrypt-warm`: the warm set (encrypted just before, so every DEK is
//!   in the sidecar's cache) → `POST /v1/decrypt`; a cell during which
//!   the sidecar's `keygate_dek_cache_misses` rose fails the run;
//! - `decrypt-cold`: the same records through the sidecar without a DEK
//!   cache: every record's DEK is unwrapped by the key service;
//! - `rewrap`: after a KEK rotation, the warm set → `POST /v1/rewrap`
//!   (the key service unwraps under the old KEK, wraps under the new);
//! - `datakeys`: `POST /v1/tenants/{t}/datakeys` with `count = 1000`.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use crate::error::{Result, bail};
use crate::report::{Cell, KEYGATE};
use crate::run::{CellId, Plan, cell_async, pick, post};

/// Where keygate is and which processes to watch.
pub(crate) struct Keygate {
    /// The sidecar (with its DEK cache).
    pub(crate) sidecar: reqwest::Client,
    pub(crate) sidecar_pid: Option<u32>,
    /// A sidecar without a DEK cache, for decrypt-cold.
    pub(crate) cold: Option<reqwest::Client>,
    pub(crate) cold_pid: Option<u32>,
    /// The key service URL and an encryptor's mTLS client, for datakeys.
    pub(crate) key_service: Option<(String, reqwest::Client)>,
    pub(crate) key_service_pid: Option<u32>,
    pub(crate) tenant: String,
}

/// Rotates the tenant's KEK (between decrypt and rewrap), when we can.
pub(crate) type Rotate<'a> = Option<&'a crate::stack::Stack>;

const SIDECAR: &str = "http://localhost";
/// Scenarios in the order they run.
pub(crate) const SCENARIOS: [&str; 5] =
    ["encrypt", "decrypt-warm", "decrypt-cold", "rewrap", "datakeys"];
/// DEKs per datakeys request.
pub(crate) const DATAKEYS_BATCH: usize = 1_000;

impl Keygate {
    fn procs(&self, sidecar: Option<u32>) -> Vec<(&'static str, u32)> {
        let mut procs = Vec::new();
        if let Some(pid) = sidecar {
            procs.push(("sidecar", pid));
        }
        if let Some(pid) = self.key_service_pid {
            procs.push(("key_service", pid));
        }
        procs
    }

    /// Runs the selected scenarios; returns the cells and the sidecar's
    /// state once the warm set was encrypted.
    pub(crate) async fn run(
        &self,
        plan: &Plan,
        scenarios: &[String],
        records: &[Value],
        warm: &[Value],
        rotate: Rotate<'_>,
    ) -> Result<(Vec<Cell>, WarmState)> {
        let wants = |s: &str| scenarios.iter().any(|x| x == s);
        let mut cells = Vec::new();
        let needs_warm = ["decrypt-warm", "decrypt-cold", "rewrap"].iter().any(|s| wants(s));
        let mut state = WarmState::default();
        let mut encrypted = Vec::new();
        if needs_warm {
            eprintln!("encrypting the warm set: {} records", warm.len());
            encrypted = encrypt_all(&self.sidecar, &self.tenant, warm).await?;
            verify_round_trip(&self.sidecar, warm, &encrypted).await?;
            state.cached_deks = cache_entries(&self.sidecar).await;
            // Resident set with the cache full and no request in flight,
            // once the allocator has returned the warm set's garbage
            // (mimalloc purges freed memory after 1 s).
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            state.sidecar_rss_kib = self.sidecar_pid.map(|pid| crate::procstat::status_kib(pid).1);
            if let (Some(n), Some(kib)) = (state.cached_deks, state.sidecar_rss_kib) {
                eprintln!("sidecar: {n} DEKs cached, {:.1} MiB resident", kib as f64 / 1024.0);
            }
        }
        let decrypt_bodies: Vec<(usize, Arc<Vec<Bytes>>)> = if needs_warm {
            plan.batches.iter().map(|&b| (b, Arc::new(record_bodies(&encrypted, b)))).collect()
        } else {
            Vec::new()
        };
        drop(encrypted);

        let targets: [(&'static str, Option<&reqwest::Client>, Option<u32>, &str); 4] = [
            ("decrypt-warm", Some(&self.sidecar), self.sidecar_pid, "/v1/decrypt"),
            ("decrypt-cold", self.cold.as_ref(), self.cold_pid, "/v1/decrypt"),
            ("encrypt", None, None, ""),
            ("rewrap", Some(&self.sidecar), self.sidecar_pid, "/v1/rewrap"),
        ];
        for (scenario, client, pid, path) in targets {
            if scenario == "encrypt" {
                // After the decrypts: its DEKs go into the cache and would
                // push the warm set out.
                self.encrypt_cells(plan, scenarios, records, &mut cells).await?;
                continue;
            }
            if !wants(scenario) {
                continue;
            }
            let Some(client) = client else {
                eprintln!("skipping {scenario}: no sidecar without a DEK cache to send it to");
                continue;
            };
            if scenario == "rewrap" {
                match rotate {
                    Some(stack) => stack.rotate().await?,
                    None => eprintln!(
                        "rewrap: not rotating (attached stack); records stay on their version"
                    ),
                }
            }
            let warm = scenario == "decrypt-warm";
            for (batch, bodies) in &decrypt_bodies {
                let batch = *batch;
                for &concurrency in &plan.concurrency {
                    let id = CellId { system: KEYGATE, scenario, batch, concurrency };
                    let url = format!("{SIDECAR}{path}");
                    let misses_before = if warm {
                        sidecar_gauge(client, "keygate_dek_cache_misses").await
                    } else {
                        None
                    };
                    let (sender, bodies) = (client.clone(), bodies.clone());
                    let mut cell = cell_async(plan, id, &self.procs(pid), move |i| {
                        let (client, body, url) = (sender.clone(), pick(&bodies, i), url.clone());
                        async move { post(&client, &url, body, None).await.map(|_| batch as u64) }
                    })
                    .await;
                    if warm {
                        cell.dek_cache_misses = cache_misses_during(client, misses_before).await;
                        if let Some(misses) = cell.dek_cache_misses.filter(|m| *m > 0) {
                            eprintln!(
                                "ERROR decrypt-warm {batch} rec/req c={concurrency} was not warm: \
                                 {misses} DEK cache misses during the cell"
                            );
                        }
                    }
                    cells.push(cell);
                }
            }
        }

        if wants("datakeys") {
            match &self.key_service {
                Some((url, client)) => {
                    let url = format!("{url}/v1/tenants/{}/datakeys", self.tenant);
                    let body = Bytes::from(format!("{{\"count\":{DATAKEYS_BATCH}}}"));
                    for &concurrency in &plan.concurrency {
                        let id = CellId {
                            system: KEYGATE,
                            scenario: "datakeys",
                            batch: DATAKEYS_BATCH,
                            concurrency,
                        };
                        let (client, url, body) = (client.clone(), url.clone(), body.clone());
                        cells.push(
                            cell_async(plan, id, &self.procs(None), move |_| {
                                let (client, url, body) =
                                    (client.clone(), url.clone(), body.clone());
                                async move {
                                    post(&client, &url, body, None)
                                        .await
                                        .map(|_| DATAKEYS_BATCH as u64)
                                }
                            })
                            .await,
                        );
                    }
                }
                None => eprintln!("skipping datakeys: no key service to call"),
            }
        }
        Ok((cells, state))
    }

    async fn encrypt_cells(
        &self,
        plan: &Plan,
        scenarios: &[String],
        records: &[Value],
        cells: &mut Vec<Cell>,
    ) -> Result<()> {
        if scenarios.iter().any(|s| s == "encrypt") {
            for &batch in &plan.batches {
                let bodies = Arc::new(encrypt_bodies(&self.tenant, records, batch)?);
                for &concurrency in &plan.concurrency {
                    let id = CellId { system: KEYGATE, scenario: "encrypt", batch, concurrency };
                    let (client, bodies) = (self.sidecar.clone(), bodies.clone());
                    cells.push(
                        cell_async(plan, id, &self.procs(self.sidecar_pid), move |i| {
                            let (client, body) = (client.clone(), pick(&bodies, i));
                            async move {
                                post(&client, &format!("{SIDECAR}/v1/encrypt"), body, None)
                                    .await
                                    .map(|_| batch as u64)
                            }
                        })
                        .await,
                    );
                }
            }
        }

        Ok(())
    }
}

/// The sidecar once the warm set is encrypted.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct WarmState {
    /// DEKs in its cache.
    pub(crate) cached_deks: Option<u64>,
    /// Its resident set (KiB), idle.
    pub(crate) sidecar_rss_kib: Option<u64>,
}

/// `/v1/encrypt` bodies: `record` for one record per request, `records`
/// otherwise, over every record (each body its own window).
fn encrypt_bodies(tenant: &str, records: &[Value], batch: usize) -> Result<Vec<Bytes>> {
    let head = format!("{{\"tenant\":{},\"schema\":\"patient\",", serde_json::to_string(tenant)?);
    let texts: Vec<String> =
        records.iter().map(serde_json::to_string).collect::<std::result::Result<_, _>>()?;
    Ok(bodies(&head, &texts, batch))
}

/// `/v1/decrypt` and `/v1/rewrap` bodies over already-serialized records.
fn record_bodies(records: &[String], batch: usize) -> Vec<Bytes> {
    bodies("{", records, batch)
}

fn bodies(head: &str, records: &[String], batch: usize) -> Vec<Bytes> {
    let batch = batch.max(1);
    records
        .chunks(batch)
        .filter(|chunk| chunk.len() == batch)
        .map(|chunk| {
            let mut body = String::with_capacity(
                head.len() + 16 + chunk.iter().map(|r| r.len() + 1).sum::<usize>(),
            );
            body.push_str(head);
            if batch == 1 {
                body.push_str("\"record\":");
                body.push_str(chunk.first().map_or("{}", String::as_str));
            } else {
                body.push_str("\"records\":[");
                body.push_str(&chunk.join(","));
                body.push(']');
            }
            body.push('}');
            Bytes::from(body)
        })
        .collect()
}

/// Encrypts `records` through the sidecar (untimed), 100 per request, a
/// few requests at a time; returns them encrypted, in order, as JSON text.
async fn encrypt_all(
    client: &reqwest::Client,
    tenant: &str,
    records: &[Value],
) -> Result<Vec<String>> {
    const PER_REQUEST: usize = 100;
    const PARALLEL: usize = 4;
    let head = format!("{{\"tenant\":{},\"schema\":\"patient\",", serde_json::to_string(tenant)?);
    let texts: Vec<String> =
        records.iter().map(serde_json::to_string).collect::<std::result::Result<_, _>>()?;
    let chunks: Vec<Bytes> = texts
        .chunks(PER_REQUEST)
        .map(|chunk| Bytes::from(format!("{head}\"records\":[{}]}}", chunk.join(","))))
        .collect();
    let chunks = Arc::new(chunks);
    let tasks: Vec<_> = (0..PARALLEL)
        .map(|worker| {
            let (client, chunks) = (client.clone(), chunks.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                for (i, body) in chunks.iter().enumerate().skip(worker).step_by(PARALLEL) {
                    let answer =
                        post(&client, &format!("{SIDECAR}/v1/encrypt"), body.clone(), None).await?;
                    let value: Value =
                        serde_json::from_slice(&answer).map_err(|e| e.to_string())?;
                    let records = value
                        .get("records")
                        .and_then(Value::as_array)
                        .ok_or("encrypt answered no records")?
                        .iter()
                        .map(Value::to_string)
                        .collect::<Vec<_>>();
                    out.push((i, records));
                }
                Ok::<_, String>(out)
            })
        })
        .collect();
    let mut parts = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok(part)) => parts.extend(part),
            Ok(Err(e)) => bail!("encrypting the warm set failed: {e}"),
            Err(e) => bail!("encrypting the warm set failed: {e}"),
        }
    }
    parts.sort_by_key(|(i, _)| *i);
    let out: Vec<String> = parts.into_iter().flat_map(|(_, records)| records).collect();
    if out.len() != records.len() {
        bail!("encrypted {} of {} records", out.len(), records.len());
    }
    Ok(out)
}

/// Decrypts every record of the warm set back (untimed; 100 per request,
/// four requests at a time, every DEK a cache hit) and checks each equals
/// its original (except the pseudonym, which is irreversible by design).
async fn verify_round_trip(
    client: &reqwest::Client,
    plain: &[Value],
    encrypted: &[String],
) -> Result<()> {
    const PER_REQUEST: usize = 100;
    if plain.len() != encrypted.len() {
        bail!("{} records encrypted for {} in the warm set", encrypted.len(), plain.len());
    }
    let chunks: Vec<(usize, &[Value], &[String])> = plain
        .chunks(PER_REQUEST)
        .zip(encrypted.chunks(PER_REQUEST))
        .enumerate()
        .map(|(i, (p, e))| (i * PER_REQUEST, p, e))
        .collect();
    let worker = |first: usize| {
        let chunks = &chunks;
        async move {
            for &(offset, plain, encrypted) in chunks.iter().skip(first).step_by(4) {
                verify_chunk(client, offset, plain, encrypted).await?;
            }
            Ok::<_, crate::error::BenchError>(())
        }
    };
    let (a, b, c, d) = tokio::join!(worker(0), worker(1), worker(2), worker(3));
    a.and(b).and(c).and(d)
}

/// One request of [`verify_round_trip`]: `encrypted` are the records from
/// `offset` on.
async fn verify_chunk(
    client: &reqwest::Client,
    offset: usize,
    plain: &[Value],
    encrypted: &[String],
) -> Result<()> {
    let body = Bytes::from(format!("{{\"records\":[{}]}}", encrypted.join(",")));
    let answer = post(client, &format!("{SIDECAR}/v1/decrypt"), body, None).await?;
    let value: Value = serde_json::from_slice(&answer)?;
    let records =
        value.get("records").and_then(Value::as_array).ok_or("decrypt answered no records")?;
    if records.len() != plain.len() {
        bail!("decrypt answered {} of {} records", records.len(), plain.len());
    }
    for (i, (got, want)) in records.iter().zip(plain).enumerate() {
        if !same_but_pseudonym(got, want) {
            bail!("round trip through the sidecar changed warm record {}", offset + i);
        }
    }
    Ok(())
}

/// Whether two records are equal but for `patient_id` (the pseudonym).
fn same_but_pseudonym(a: &Value, b: &Value) -> bool {
    let (mut a, mut b) = (a.clone(), b.clone());
    for v in [&mut a, &mut b] {
        if let Some(map) = v.as_object_mut() {
            map.remove("patient_id");
        }
    }
    a == b
}

/// The sidecar's DEK cache misses since `before` (None if unreadable).
async fn cache_misses_during(client: &reqwest::Client, before: Option<u64>) -> Option<u64> {
    let after = sidecar_gauge(client, "keygate_dek_cache_misses").await;
    let misses = after.zip(before).map(|(after, before)| after.saturating_sub(before));
    if misses.is_none() {
        eprintln!("warning: could not read keygate_dek_cache_misses: decrypt-warm not checked");
    }
    misses
}

/// `keygate_dek_cache_entries` from the sidecar's metrics.
async fn cache_entries(client: &reqwest::Client) -> Option<u64> {
    sidecar_gauge(client, "keygate_dek_cache_entries").await
}

/// A gauge (`name value`) from the sidecar's metrics.
async fn sidecar_gauge(client: &reqwest::Client, name: &str) -> Option<u64> {
    let text = client.get(format!("{SIDECAR}/metrics")).send().await.ok()?.text().await.ok()?;
    gauge(&text, name)
}

/// `name`'s value in a Prometheus text exposition.
fn gauge(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_are_read_by_their_whole_name() {
        let text = "# HELP keygate_dek_cache_misses DEK cache misses\n\
                    # TYPE keygate_dek_cache_misses gauge\n\
                    keygate_dek_cache_misses_total 9\n\
                    keygate_dek_cache_misses 42\n\
                    keygate_dek_cache_entries 100000\n";
        assert_eq!(gauge(text, "keygate_dek_cache_misses"), Some(42));
        assert_eq!(gauge(text, "keygate_dek_cache_entries"), Some(100_000));
        assert_eq!(gauge(text, "keygate_dek_cache_hits"), None);
    }

    #[test]
    fn the_round_trip_ignores_only_the_pseudonym() {
        let want = serde_json::json!({"patient_id": "P-1", "ssn": "123", "mrn": "M"});
        let got = serde_json::json!({"patient_id": "kgp:XYZ", "ssn": "123", "mrn": "M"});
        assert!(same_but_pseudonym(&got, &want));
        let changed = serde_json::json!({"patient_id": "kgp:XYZ", "ssn": "124", "mrn": "M"});
        assert!(!same_but_pseudonym(&changed, &want));
    }
}
