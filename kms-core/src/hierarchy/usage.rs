//! Usage counters per KEK version, counted in memory on the hot path and
//! added to the keystore in batches (a flush per interval, not a write per
//! request).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::dek::KekVersion;
use crate::ids::TenantId;
use crate::store::UsageDelta;

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    issued: u64,
    unwraps: u64,
    last_unwrap_at: Option<i64>,
}

/// Counts not yet in the keystore.
#[derive(Debug, Default)]
pub(super) struct UsageMeter {
    pending: Mutex<HashMap<(TenantId, KekVersion, i64), Counts>>,
    /// Held from taking counts until they are stored, so a reader that
    /// flushes first never misses counts another flush has in flight.
    pub(super) flushing: tokio::sync::Mutex<()>,
}

impl UsageMeter {
    pub(super) fn issued(&self, tenant: &TenantId, version: KekVersion, count: usize, now: i64) {
        self.add(tenant, version, now, |c| c.issued = c.issued.saturating_add(as_u64(count)));
    }

    pub(super) fn unwrapped(&self, tenant: &TenantId, version: KekVersion, count: usize, now: i64) {
        if count == 0 {
            return;
        }
        self.add(tenant, version, now, |c| {
            c.unwraps = c.unwraps.saturating_add(as_u64(count));
            c.last_unwrap_at = Some(c.last_unwrap_at.map_or(now, |t| t.max(now)));
        });
    }

    fn add(&self, tenant: &TenantId, version: KekVersion, now: i64, f: impl FnOnce(&mut Counts)) {
        if let Ok(mut pending) = self.pending.lock() {
            f(pending.entry((tenant.clone(), version, now.div_euclid(3600))).or_default());
        }
    }

    /// Takes everything counted so far.
    pub(super) fn take(&self) -> Vec<UsageDelta> {
        let Ok(mut pending) = self.pending.lock() else { return Vec::new() };
        pending
            .drain()
            .map(|((tenant, version, hour), c)| UsageDelta {
                tenant,
                version,
                hour,
                issued: c.issued,
                unwraps: c.unwraps,
                last_unwrap_at: c.last_unwrap_at,
            })
            .collect()
    }

    /// Puts back counts that could not be stored, so a later flush adds them.
    pub(super) fn restore(&self, deltas: Vec<UsageDelta>) {
        for d in deltas {
            if let Ok(mut pending) = self.pending.lock() {
                let c = pending.entry((d.tenant, d.version, d.hour)).or_default();
                c.issued = c.issued.saturating_add(d.issued);
                c.unwraps = c.unwraps.saturating_add(d.unwraps);
                c.last_unwrap_at = c.last_unwrap_at.max(d.last_unwrap_at);
            }
        }
    }
}

fn as_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}
