//! One audited operation, before it is sealed into the chain.

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

use crate::dek::KekVersion;
use crate::ids::{RecordKeyId, TenantId};
use crate::store::AuditRow;

/// The key inside an event's `detail` object that carries its purpose of use.
///
/// The purpose lives in `detail` rather than in a column of its own, so the
/// version-1 table and the hashed row layout stay unchanged; it is covered
/// by the chain hash like every other column. SQL can still reach it with
/// `json_extract(detail, '$.purpose')`.
pub const PURPOSE_KEY: &str = "purpose";

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// It succeeded.
    Ok,
    /// Policy or authentication refused it.
    Denied,
    /// The request was malformed or named something that does not exist.
    Invalid,
    /// It failed inside keygate or a dependency (store, root provider).
    Error,
}

impl Outcome {
    /// Stable name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Denied => "denied",
            Self::Invalid => "invalid",
            Self::Error => "error",
        }
    }
}

impl FromStr for Outcome {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "ok" => Self::Ok,
            "denied" => Self::Denied,
            "invalid" => Self::Invalid,
            "error" => Self::Error,
            _ => return Err(()),
        })
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An audit event: who did what to which keys, and how it ended.
///
/// **Events never carry field values, keys, or digests of values** (a hash
/// of a low-entropy value such as a birth date or a diagnosis code is as
/// good as the value). `detail` is for counts, error codes, schema names,
/// field pointers (`/ssn`) and field classes; record key ids are random and
/// reveal nothing.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct AuditEvent {
    /// Unix milliseconds when the operation happened.
    pub ts_ms: i64,
    /// The identity that acted (certificate URI or DNS SAN).
    pub actor: String,
    /// What it did (`dek.issue`, `dek.unwrap`, `tenant.rotate`, …).
    pub action: String,
    /// Tenant concerned.
    pub tenant: Option<TenantId>,
    /// KEK version concerned.
    pub kek_version: Option<KekVersion>,
    /// Record key ids concerned.
    pub record_key_ids: Vec<RecordKeyId>,
    /// How it ended.
    pub outcome: Outcome,
    /// Declared purpose of use (a policy purpose name such as `treatment`),
    /// stored in `detail` under [`PURPOSE_KEY`].
    pub purpose: Option<String>,
    /// Further structured detail; never values (see the type's docs). A
    /// [`PURPOSE_KEY`] entry here is replaced by [`AuditEvent::purpose`].
    pub detail: Map<String, Value>,
}

/// A stored audit row does not decode into an [`AuditEvent`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit event {instance}#{seq} has a malformed {column} column")]
#[non_exhaustive]
pub struct MalformedEvent {
    /// Instance of the row.
    pub instance: String,
    /// Sequence number of the row.
    pub seq: i64,
    /// The column that does not decode.
    pub column: &'static str,
}

impl AuditEvent {
    /// An event with no tenant, version, record keys, purpose or detail.
    pub fn new(
        ts_ms: i64,
        actor: impl Into<String>,
        action: impl Into<String>,
        outcome: Outcome,
    ) -> Self {
        Self {
            ts_ms,
            actor: actor.into(),
            action: action.into(),
            tenant: None,
            kek_version: None,
            record_key_ids: Vec::new(),
            outcome,
            purpose: None,
            detail: Map::new(),
        }
    }

    /// Sets the outcome.
    #[must_use]
    pub fn with_outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }

    /// Sets the tenant.
    #[must_use]
    pub fn with_tenant(mut self, tenant: TenantId) -> Self {
        self.tenant = Some(tenant);
        self
    }

    /// Sets the KEK version.
    #[must_use]
    pub fn with_kek_version(mut self, version: KekVersion) -> Self {
        self.kek_version = Some(version);
        self
    }

    /// Adds record key ids.
    #[must_use]
    pub fn with_record_key_ids(mut self, ids: impl IntoIterator<Item = RecordKeyId>) -> Self {
        self.record_key_ids.extend(ids);
        self
    }

    /// Sets the purpose of use.
    #[must_use]
    pub fn with_purpose(mut self, purpose: impl Into<String>) -> Self {
        self.purpose = Some(purpose.into());
        self
    }

    /// Adds one `detail` entry.
    #[must_use]
    pub fn with_detail(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.detail.insert(key.into(), value.into());
        self
    }

    /// The row for position `seq` of `instance`'s chain, with empty
    /// `prev_hash` and `hash` (the chain fills them in).
    pub(super) fn into_row(self, instance: &str, seq: i64) -> AuditRow {
        let Self {
            ts_ms,
            actor,
            action,
            tenant,
            kek_version,
            record_key_ids,
            outcome,
            purpose,
            mut detail,
        } = self;
        match purpose {
            Some(purpose) => detail.insert(PURPOSE_KEY.to_owned(), Value::String(purpose)),
            None => detail.remove(PURPOSE_KEY),
        };
        AuditRow {
            instance: instance.to_owned(),
            seq,
            ts_ms,
            actor,
            action,
            tenant: tenant.map(String::from),
            kek_version: kek_version.map(i64::from),
            record_key_ids: encode_record_key_ids(&record_key_ids),
            outcome: outcome.as_str().to_owned(),
            detail: Value::Object(detail).to_string(),
            prev_hash: Vec::new(),
            hash: Vec::new(),
        }
    }

    /// Decodes a stored row (for display and export); the inverse of
    /// sealing, up to `detail`'s key order. Checks nothing about the chain.
    pub fn from_row(row: &AuditRow) -> Result<Self, MalformedEvent> {
        let bad = |column| MalformedEvent { instance: row.instance.clone(), seq: row.seq, column };
        let tenant =
            row.tenant.clone().map(TenantId::new).transpose().map_err(|_| bad("tenant"))?;
        let kek_version = row
            .kek_version
            .map(KekVersion::try_from)
            .transpose()
            .map_err(|_| bad("kek_version"))?;
        let record_key_ids: Vec<RecordKeyId> =
            serde_json::from_str(&row.record_key_ids).map_err(|_| bad("record_key_ids"))?;
        let outcome = Outcome::from_str(&row.outcome).map_err(|()| bad("outcome"))?;
        let mut detail: Map<String, Value> =
            serde_json::from_str(&row.detail).map_err(|_| bad("detail"))?;
        let purpose = match detail.remove(PURPOSE_KEY) {
            None => None,
            Some(Value::String(purpose)) => Some(purpose),
            Some(_) => return Err(bad("detail")),
        };
        Ok(Self {
            ts_ms: row.ts_ms,
            actor: row.actor.clone(),
            action: row.action.clone(),
            tenant,
            kek_version,
            record_key_ids,
            outcome,
            purpose,
            detail,
        })
    }
}

/// `["<32 hex digits>", …]`: hex digits need no JSON escaping.
fn encode_record_key_ids(ids: &[RecordKeyId]) -> String {
    let mut out = String::with_capacity(2 + ids.len() * (2 * RecordKeyId::LEN + 3));
    let mut hex = [0; 2 * RecordKeyId::LEN];
    out.push('[');
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        out.push_str(id.hex_in(&mut hex));
        out.push('"');
    }
    out.push(']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> AuditEvent {
        AuditEvent::new(1_700_000_000_000, "spiffe://prod/ns/onc/sa/api", "dek.unwrap", Outcome::Ok)
            .with_tenant(TenantId::new("onc").unwrap())
            .with_kek_version(3)
            .with_record_key_ids([
                RecordKeyId::from_bytes([7; 16]),
                RecordKeyId::from_bytes([9; 16]),
            ])
            .with_purpose("treatment")
            .with_detail("fields", 6)
            .with_detail("error", Value::Null)
    }

    #[test]
    fn row_columns() {
        let row = event().into_row("ks-1", 4);
        assert_eq!((row.instance.as_str(), row.seq), ("ks-1", 4));
        assert_eq!(row.tenant.as_deref(), Some("onc"));
        assert_eq!(row.kek_version, Some(3));
        assert_eq!(
            row.record_key_ids,
            format!("[\"{}\",\"{}\"]", "07".repeat(16), "09".repeat(16))
        );
        assert_eq!(row.outcome, "ok");
        let detail: Value = serde_json::from_str(&row.detail).unwrap();
        assert_eq!(detail["purpose"], "treatment");
        assert_eq!(detail["fields"], 6);
        assert_eq!(
            AuditEvent::new(0, "a", "b", Outcome::Denied).into_row("i", 1).record_key_ids,
            "[]"
        );
    }

    #[test]
    fn rows_decode_back_into_events() {
        let event = event();
        assert_eq!(AuditEvent::from_row(&event.clone().into_row("ks-1", 1)).unwrap(), event);
        let plain = AuditEvent::new(5, "a", "b", Outcome::Error);
        assert_eq!(AuditEvent::from_row(&plain.clone().into_row("ks-1", 2)).unwrap(), plain);
    }

    #[test]
    fn the_purpose_field_is_the_only_source_of_purpose() {
        let mut event = event().with_detail(PURPOSE_KEY, "sneaky");
        event.purpose = None;
        let row = event.into_row("i", 1);
        assert!(!row.detail.contains("sneaky"));
        assert_eq!(AuditEvent::from_row(&row).unwrap().purpose, None);
    }

    #[test]
    fn malformed_columns_are_named() {
        let mut row = event().into_row("i", 1);
        row.outcome = "maybe".into();
        assert_eq!(AuditEvent::from_row(&row).unwrap_err().column, "outcome");
        let mut row = event().into_row("i", 1);
        row.record_key_ids = "[\"zz\"]".into();
        assert_eq!(AuditEvent::from_row(&row).unwrap_err().column, "record_key_ids");
        for outcome in [Outcome::Ok, Outcome::Denied, Outcome::Invalid, Outcome::Error] {
            assert_eq!(outcome.as_str().parse(), Ok(outcome));
        }
    }
}
