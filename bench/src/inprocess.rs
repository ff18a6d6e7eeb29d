//! The in-process reference: the same records encrypted and decrypted by
//! kms-core called directly, on as many OS threads as the cell's
//! concurrency — no HTTP, no request or answer around the records, no
//! sidecar or key service process. It is the ceiling of the sidecar's
//! path on these cores. Records go from JSON text to JSON text through
//! kms-core's text path (`TextWorkspace`), the fastest way kms-core has,
//! which is also the sidecar's.
//!
//! - `encrypt`: each record's text encrypted into a reused buffer, with
//!   DEKs issued in-process beforehand (untimed), as the sidecar's pool does;
//! - `decrypt-warm`: header parse + decrypt with the DEK at hand (a cache hit);
//! - `decrypt-cold`: the same plus the DEK unwrap (what the key service does);
//! - `rewrap`: unwrap under KEK v1, wrap under v2, write the new header;
//! - `datakeys`: issue 1,000 DEKs (fresh id and key, wrapped).

use std::cell::RefCell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use gateway::up::PATIENT_SCHEMA;
use kms_core::crypto::Aead;
use kms_core::record::{Disclosure, EncryptedText, SchemaKeys, TextWorkspace};
use kms_core::schema::{FieldSpec, Schema, SchemaSet};
use kms_core::{
    DekBinding, IssuedDek, Key256, RecordKeyId, SecretBuf, TenantId, unwrap_dek, wrap_dek,
};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::error::{BenchError, Result};
use crate::ours::DATAKEYS_BATCH;
use crate::report::{Cell, IN_PROCESS};
use crate::run::{CellId, Plan, cell_threads};

/// Records decrypted in-process (cycled).
const DECRYPT_SET: usize = 20_000;
/// Most DEKs issued ahead for one encrypt cell.
const MAX_PREISSUED: usize = 4_000_000;

struct World {
    tenant: TenantId,
    schema: std::sync::Arc<Schema>,
    keys: SchemaKeys,
    kek: Aead,
    kek2: Aead,
}

fn reveal(_: &FieldSpec) -> Disclosure {
    Disclosure::Reveal
}

fn err(e: impl std::fmt::Display) -> BenchError {
    BenchError(e.to_string())
}

impl World {
    fn new() -> Result<Self> {
        let tenant = TenantId::new(crate::stack::TENANT).map_err(err)?;
        let set = SchemaSet::from_toml(PATIENT_SCHEMA, "patient.toml").map_err(err)?;
        let schema = set.latest("patient").ok_or("no patient schema")?.clone();
        let keys = SchemaKeys::derive(&Key256::generate().map_err(err)?, &tenant, &schema);
        Ok(Self {
            tenant,
            schema,
            keys,
            kek: Aead::new(&Key256::generate().map_err(err)?),
            kek2: Aead::new(&Key256::generate().map_err(err)?),
        })
    }

    fn issue(&self, kek: &Aead, version: u32) -> std::result::Result<IssuedDek, String> {
        let id = RecordKeyId::generate().map_err(|e| e.to_string())?;
        let dek = Key256::generate().map_err(|e| e.to_string())?;
        let binding = DekBinding { tenant: &self.tenant, kek_version: version, record_key_id: &id };
        let wrapped = wrap_dek(kek, &binding, &dek).map_err(|e| e.to_string())?;
        Ok(IssuedDek::new(id, version, wrapped, dek))
    }

    /// Encrypts a record's text; the result is in the thread's buffer.
    fn encrypt(&self, record: &RawValue, dek: IssuedDek) -> std::result::Result<(), String> {
        with_workspace(|workspace, out| {
            workspace
                .encrypt(record, &self.tenant, &self.schema, &self.keys, dek, out)
                .map_err(|e| e.to_string())
        })
    }

    /// The encrypted text of a record (untimed set-up).
    fn encrypted(
        &self,
        record: &RawValue,
        dek: IssuedDek,
    ) -> std::result::Result<Box<RawValue>, String> {
        let text = with_workspace(|workspace, out| {
            workspace
                .encrypt(record, &self.tenant, &self.schema, &self.keys, dek, out)
                .map_err(|e| e.to_string())?;
            Ok(String::from_utf8_lossy(out.as_slice()).into_owned())
        })?;
        RawValue::from_string(text).map_err(|e| e.to_string())
    }

    fn decrypt(
        &self,
        record: &RawValue,
        cold: bool,
        dek: &Key256,
    ) -> std::result::Result<(), String> {
        let parsed = EncryptedText::parse(record).map_err(|e| e.to_string())?;
        let unwrapped;
        let dek = if cold {
            let h = parsed.header();
            let binding = DekBinding {
                tenant: h.tenant(),
                kek_version: h.kek_version(),
                record_key_id: h.record_key_id(),
            };
            unwrapped =
                unwrap_dek(&self.kek, &binding, h.wrapped_dek()).map_err(|e| e.to_string())?;
            &unwrapped
        } else {
            dek
        };
        with_workspace(|workspace, out| {
            let reports = workspace
                .decrypt(parsed, dek, &self.schema, &self.keys, &reveal, out)
                .map_err(|e| e.to_string())?;
            std::hint::black_box(reports);
            Ok(())
        })
    }

    fn rewrap(&self, record: &RawValue) -> std::result::Result<(), String> {
        let parsed = EncryptedText::parse(record).map_err(|e| e.to_string())?;
        let h = parsed.header();
        let old = DekBinding {
            tenant: h.tenant(),
            kek_version: h.kek_version(),
            record_key_id: h.record_key_id(),
        };
        let dek = unwrap_dek(&self.kek, &old, h.wrapped_dek()).map_err(|e| e.to_string())?;
        let new = DekBinding { kek_version: 2, ..old };
        let wrapped = wrap_dek(&self.kek2, &new, &dek).map_err(|e| e.to_string())?;
        with_workspace(|_, out| parsed.write_rewrapped(2, wrapped, out).map_err(|e| e.to_string()))
    }
}

thread_local! {
    /// Each thread's reused buffers, as a sidecar request reuses them
    /// across its records.
    static WORKSPACE: RefCell<(TextWorkspace, SecretBuf)> =
        RefCell::new((TextWorkspace::default(), SecretBuf::with_capacity(64 * 1024)));
}

/// Runs `f` with this thread's workspace and an emptied output buffer.
fn with_workspace<T>(
    f: impl FnOnce(&mut TextWorkspace, &mut SecretBuf) -> std::result::Result<T, String>,
) -> std::result::Result<T, String> {
    WORKSPACE.with(|cell| {
        let mut guard = cell.borrow_mut();
        let (workspace, out) = &mut *guard;
        out.clear();
        f(workspace, out)
    })
}

/// Each record's JSON text (untimed set-up).
fn texts(records: &[Value]) -> Result<Vec<Box<RawValue>>> {
    records
        .iter()
        .map(|r| {
            let text = serde_json::to_string(r).map_err(err)?;
            RawValue::from_string(text).map_err(err)
        })
        .collect()
}

/// Runs the reference's side of the selected scenarios.
pub(crate) fn run(
    plan: &Plan,
    scenarios: &[String],
    records: &[Value],
    warm: &[Value],
) -> Result<Vec<Cell>> {
    let wants = |s: &str| scenarios.iter().any(|x| x.as_str() == s);
    let world = World::new()?;
    let mut cells = Vec::new();
    if records.is_empty() {
        return Ok(cells);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let records = texts(records)?;
    let records = records.as_slice();
    let seconds = (plan.duration + plan.warmup).as_secs_f64();

    if wants("encrypt") {
        // Single-thread rate, to issue enough DEKs ahead for each cell.
        let sample = 500.min(records.len() * 4);
        let started = Instant::now();
        for i in 0..sample {
            let dek = world.issue(&world.kek, 1)?;
            world.encrypt(records.get(i % records.len()).ok_or("no record")?, dek)?;
        }
        let per_second = sample as f64 / started.elapsed().as_secs_f64().max(1e-9);
        for &batch in &plan.batches {
            for &concurrency in &plan.concurrency {
                // Generously: the calibration ran on a shared machine and
                // may have been slowed; a cell that still runs out stops
                // early (its rate stays right).
                let wanted = per_second * seconds * concurrency.min(cores) as f64 * 4.0;
                let needed = (wanted as usize + 2 * batch * concurrency).min(MAX_PREISSUED);
                let chunks: Vec<Mutex<Option<Vec<IssuedDek>>>> = (0..needed.div_ceil(batch))
                    .map(|_| {
                        (0..batch)
                            .map(|_| world.issue(&world.kek, 1))
                            .collect::<std::result::Result<Vec<_>, _>>()
                            .map(|v| Mutex::new(Some(v)))
                    })
                    .collect::<std::result::Result<_, _>>()?;
                let next = AtomicUsize::new(0);
                let id = CellId { system: IN_PROCESS, scenario: "encrypt", batch, concurrency };
                let op = |i: u64| {
                    let Some(chunk) = chunks
                        .get(next.fetch_add(1, Ordering::Relaxed))
                        .and_then(|m| m.lock().ok()?.take())
                    else {
                        return Ok(0); // every DEK issued ahead is used: the cell ends
                    };
                    let start = usize::try_from(i).unwrap_or(0).wrapping_mul(batch);
                    for (k, dek) in chunk.into_iter().enumerate() {
                        let record = records.get((start + k) % records.len()).ok_or("no record")?;
                        world.encrypt(record, dek)?;
                    }
                    Ok(batch as u64)
                };
                cells.push(cell_threads(plan, id, &op));
            }
        }
    }

    let decrypting = ["decrypt-warm", "decrypt-cold", "rewrap"].iter().any(|s| wants(s));
    if decrypting {
        let set = warm.get(..warm.len().min(DECRYPT_SET)).unwrap_or(warm);
        let set = texts(set)?;
        let encrypted: Vec<(Box<RawValue>, Key256)> = set
            .iter()
            .map(|r| {
                let dek = world.issue(&world.kek, 1)?;
                let copy = dek.dek().duplicate();
                Ok((world.encrypted(r, dek)?, copy))
            })
            .collect::<std::result::Result<_, String>>()?;
        for scenario in ["decrypt-warm", "decrypt-cold", "rewrap"] {
            if !wants(scenario) {
                continue;
            }
            for &batch in &plan.batches {
                for &concurrency in &plan.concurrency {
                    let id = CellId { system: IN_PROCESS, scenario, batch, concurrency };
                    let op = |i: u64| {
                        let start = usize::try_from(i).unwrap_or(0).wrapping_mul(batch);
                        for k in 0..batch {
                            let (record, dek) =
                                encrypted.get((start + k) % encrypted.len()).ok_or("no record")?;
                            match scenario {
                                "rewrap" => world.rewrap(record)?,
                                _ => world.decrypt(record, scenario == "decrypt-cold", dek)?,
                            }
                        }
                        Ok(batch as u64)
                    };
                    cells.push(cell_threads(plan, id, &op));
                }
            }
        }
    }

    if wants("datakeys") {
        for &concurrency in &plan.concurrency {
            let id = CellId {
                system: IN_PROCESS,
                scenario: "datakeys",
                batch: DATAKEYS_BATCH,
                concurrency,
            };
            let op = |_| {
                for _ in 0..DATAKEYS_BATCH {
                    std::hint::black_box(world.issue(&world.kek, 1)?);
                }
                Ok(DATAKEYS_BATCH as u64)
            };
            cells.push(cell_threads(plan, id, &op));
        }
    }
    Ok(cells)
}
