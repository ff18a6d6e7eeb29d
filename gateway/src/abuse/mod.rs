//! Abuse limits: what a misbehaving or hostile client can cost the key
//! service and the sidecar.
//!
//! - **Key service**: a token bucket per mTLS identity ([`AbuseConfig`]
//!   `rate_per_sec`/`burst`); over it, 429 `rate_limited` with
//!   `Retry-After`, and other identities are unaffected.
//! - **Sidecar**: per connection, a token bucket and a cap on concurrent
//!   requests ([`SidecarAbuseConfig`]); over either, 429 `rate_limited`
//!   with `Retry-After`.
//! - **Slow clients** (slowloris): HTTP/1 request headers must arrive within
//!   `header_read_timeout_secs` (hyper closes the connection otherwise) and
//!   a JSON body within `body_read_timeout_secs` (408 `body_timeout`); a
//!   connection with no request in flight and no byte moving for
//!   `idle_timeout_secs` is closed (HTTP/1 and HTTP/2, and a client that
//!   never sends a byte).
//! - **Oversized bodies** get 413 `body_too_large`; on HTTP/1 the rest of
//!   the body is read and dropped first (up to a bound), so the client
//!   gets the answer rather than a reset connection.
//! - **Nesting**: JSON bodies nesting deeper than `max_json_depth` are
//!   refused with 400 `json_too_deep` before any parser recursion.
//! - Batch sizes are bounded where the batches are read (`limits.max_batch`
//!   at the key service, `limits.max_records` at the sidecar).
//! - **Keys in flight** at the key service: a shared pool, a share per
//!   identity, a bounded wait (503 `busy`) and a send deadline
//!   ([`KeyRoom`]).
//! - **Connections**: at most `limits.max_connections` open on each key
//!   service listener, of which at most `limits.max_handshakes` still in
//!   their TLS handshake, and once half of those are, at most
//!   `limits.max_handshakes_per_peer` from one address
//!   (`slots::ConnectionSlots`).

mod accept;
mod body;
mod bucket;
mod config;
mod depth;
mod idle;
mod keys;
mod layer;
mod sends;
mod slots;

pub(crate) use self::accept::AcceptBackoff;
pub use self::bucket::{KeyedBuckets, TokenBucket};
pub use self::config::{AbuseConfig, SidecarAbuseConfig};
pub(crate) use self::depth::after_string;
pub use self::depth::{exceeds_depth, nesting};
pub(crate) use self::idle::{Ended, OpenConnections, serve_http_with};
pub use self::keys::{KeyRoom, KeysHeld};
pub(crate) use self::layer::NO_IDENTITY;
pub use self::layer::{BodyBounds, ConnectionGuard, protect_key_service, protect_sidecar};
pub use self::sends::{PendingSend, SecretSends};
pub(crate) use self::slots::{ConnectionSlots, Refusal, SlotLimits};
