//! The connections a listener holds open at once, and how many of them may
//! still be in their TLS handshake.
//!
//! Every connection takes a slot when it is accepted and gives it back
//! when it ends (`limits.max_connections`), so a flood costs an accept per
//! connection, not a task or a file descriptor held. Until its handshake is
//! done a connection is anyone's who reaches the port, so it also takes:
//!
//! - one of a smaller budget of handshakes (`limits.max_handshakes`), so
//!   that half-open handshakes, held until the handshake timeout, can
//!   never take the slots authenticated connections need;
//! - once half that budget is spent, one of its peer's handshakes
//!   (`limits.max_handshakes_per_peer`), so that one address cannot take
//!   the rest of the budget either. Below half, a peer's handshakes are not
//!   counted against it: a client opening its connection pool (dozens of
//!   handshakes at once from one address, or from many hosts behind one
//!   NAT) goes through while nothing is wrong, and no one address ever
//!   holds more than half the budget plus its share. A peer is an IPv4
//!   address, or an IPv6 /64 (what one host is usually given).
//!
//! A connection over any of these is closed as soon as it is accepted,
//! counted by [`Refusal`]. The budget and the peer's count are given back
//! when the handshake ends ([`Slot::handshake_done`]), the slot when the
//! connection does.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// At most one warning per reason this often while refusals go on (each
/// refusal is logged at debug level and counted).
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The caps of one listener.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotLimits {
    /// Connections open at once, from accept to close.
    pub(crate) connections: usize,
    /// Connections in their TLS handshake at once.
    pub(crate) handshakes: usize,
    /// Connections in their TLS handshake at once from one peer.
    pub(crate) handshakes_per_peer: usize,
}

/// Why a connection was closed as soon as it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Its peer already has its share of connections in their handshake.
    PeerHandshakes,
    /// The listener's budget of connections in their handshake is spent.
    Handshakes,
    /// Every connection slot is taken.
    Connections,
}

impl Refusal {
    /// Its name, as a metric label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::PeerHandshakes => "peer_handshakes",
            Self::Handshakes => "handshakes",
            Self::Connections => "connections",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::PeerHandshakes => 0,
            Self::Handshakes => 1,
            Self::Connections => 2,
        }
    }
}

/// How many connections are in their handshake, in all and by peer (an
/// entry goes when its count comes back to 0, so at most `handshakes`
/// entries).
#[derive(Debug, Default)]
struct InHandshake {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
}

type Peers = Arc<Mutex<InHandshake>>;

/// The connection slots and handshake budgets of one listener.
#[derive(Debug)]
pub(crate) struct ConnectionSlots {
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    /// Handshakes in flight from which each peer's are counted: half the
    /// budget.
    contended: usize,
    handshakes_per_peer: usize,
    peers: Peers,
    /// Connections refused, by [`Refusal::index`].
    refused: [AtomicU64; 3],
    /// When each kind of refusal was last warned about.
    warned: Mutex<[Option<Instant>; 3]>,
}

/// A connection's slot, held until the connection ends; and, until
/// [`Slot::handshake_done`], its handshake's place in the budgets.
#[derive(Debug)]
pub(crate) struct Slot {
    _connection: OwnedSemaphorePermit,
    handshake: Option<Handshake>,
}

/// A connection's place among those in their handshake.
#[derive(Debug)]
struct Handshake {
    _budget: OwnedSemaphorePermit,
    peers: Peers,
    peer: IpAddr,
}

impl ConnectionSlots {
    /// Slots and budgets as `limits` says (each at least 1).
    pub(crate) fn new(limits: SlotLimits) -> Self {
        let budget = |n: usize| n.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            connections: Arc::new(Semaphore::new(budget(limits.connections))),
            handshakes: Arc::new(Semaphore::new(budget(limits.handshakes))),
            contended: budget(limits.handshakes) / 2,
            handshakes_per_peer: limits.handshakes_per_peer.max(1),
            peers: Peers::default(),
            refused: Default::default(),
            warned: Mutex::default(),
        }
    }

    /// A slot for a new connection from `peer`, in its handshake; or why
    /// not (counted, and warned about now and then): close it at once.
    pub(crate) fn take(&self, peer: IpAddr) -> Result<Slot, Refusal> {
        let peer = peer_of(peer);
        let taken = {
            let mut peers = lock(&self.peers);
            let open = peers.by_peer.get(&peer).copied().unwrap_or(0);
            let taken = if peers.total >= self.contended && open >= self.handshakes_per_peer {
                Err(Refusal::PeerHandshakes)
            } else {
                self.handshakes
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| Refusal::Handshakes)
                    .and_then(|budget| {
                        let connection = self
                            .connections
                            .clone()
                            .try_acquire_owned()
                            .map_err(|_| Refusal::Connections)?;
                        Ok((connection, budget))
                    })
            };
            if taken.is_ok() {
                peers.total = peers.total.saturating_add(1);
                peers.by_peer.insert(peer, open.saturating_add(1));
            }
            taken
        };
        match taken {
            Ok((connection, budget)) => Ok(Slot {
                _connection: connection,
                handshake: Some(Handshake { _budget: budget, peers: self.peers.clone(), peer }),
            }),
            Err(refusal) => {
                self.refused(refusal, peer);
                Err(refusal)
            }
        }
    }

    /// How many connections were refused for `refusal`.
    #[cfg(test)]
    pub(crate) fn refusals(&self, refusal: Refusal) -> u64 {
        self.refused.get(refusal.index()).map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// How many connections are still in their handshake, and from how
    /// many peers.
    #[cfg(test)]
    fn in_handshake(&self) -> (usize, usize) {
        let peers = lock(&self.peers);
        (peers.total, peers.by_peer.len())
    }

    fn refused(&self, refusal: Refusal, peer: IpAddr) {
        let index = refusal.index();
        let refused = self
            .refused
            .get(index)
            .map_or(0, |n| n.fetch_add(1, Ordering::Relaxed))
            .saturating_add(1);
        tracing::debug!(peer = %peer, reason = refusal.as_str(), "connection closed at accept");
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        let Some(last) = warned.get_mut(index) else { return };
        if last.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            *last = Some(Instant::now());
            let why = match refusal {
                Refusal::PeerHandshakes => "a peer has too many connections in their TLS handshake",
                Refusal::Handshakes => "too many connections are in their TLS handshake",
                Refusal::Connections => "every connection slot is taken",
            };
            tracing::warn!(peer = %peer, refused, "{why}: closing new connections at once");
        }
    }
}

impl Slot {
    /// The handshake is over (or there was none): the connection keeps its
    /// slot and gives back its place in the handshake budgets.
    pub(crate) fn handshake_done(&mut self) {
        self.handshake = None;
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        let mut peers = lock(&self.peers);
        peers.total = peers.total.saturating_sub(1);
        if let Some(open) = peers.by_peer.get_mut(&self.peer) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                peers.by_peer.remove(&self.peer);
            }
        }
    }
}

/// The peer `ip` counts as: itself if IPv4 (an IPv4-mapped IPv6 address
/// too), its /64 if IPv6.
fn peer_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

fn lock(peers: &Peers) -> std::sync::MutexGuard<'_, InHandshake> {
    peers.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn slots(connections: usize, handshakes: usize, handshakes_per_peer: usize) -> ConnectionSlots {
        ConnectionSlots::new(SlotLimits { connections, handshakes, handshakes_per_peer })
    }

    #[test]
    fn slots_are_taken_given_back_and_refusals_counted() {
        let slots = slots(2, 2, 2);
        let first = slots.take(ip("10.0.0.1")).unwrap();
        let _second = slots.take(ip("10.0.0.2")).unwrap();
        assert_eq!(slots.take(ip("10.0.0.3")).unwrap_err(), Refusal::Handshakes);
        drop(first);
        assert!(slots.take(ip("10.0.0.3")).is_ok());
        assert_eq!(slots.refusals(Refusal::Handshakes), 1);
    }

    #[test]
    fn stalled_handshakes_leave_the_slots_of_authenticated_connections() {
        let slots = slots(10, 4, 2);
        // Three clients finish their handshakes and keep their connections.
        let mut authenticated: Vec<Slot> = (1..=3)
            .map(|n| {
                let mut slot = slots.take(ip(&format!("10.0.0.{n}"))).unwrap();
                slot.handshake_done();
                slot
            })
            .collect();
        assert_eq!(slots.in_handshake(), (0, 0));
        // One address opens handshakes and never finishes them: it gets
        // two (while the budget is less than half spent), is then held to
        // its share of two, and the rest are closed at once.
        let stalled: Vec<Slot> =
            (0..50).filter_map(|_| slots.take(ip("192.0.2.66")).ok()).collect();
        assert_eq!(stalled.len(), 2);
        assert_eq!(slots.refusals(Refusal::PeerHandshakes), 48);
        // An IPv6 host is one peer across its /64, and an IPv4-mapped
        // address is its IPv4 address.
        let v6: Vec<Slot> = ["2001:db8::1", "2001:db8::2:1", "2001:db8::3"]
            .iter()
            .filter_map(|a| slots.take(ip(a)).ok())
            .collect();
        assert_eq!(v6.len(), 2);
        assert_eq!(
            slots.take(ip("::ffff:192.0.2.66")).unwrap_err(),
            Refusal::PeerHandshakes,
            "the same peer as 192.0.2.66"
        );
        assert_eq!(slots.refusals(Refusal::PeerHandshakes), 50);
        // Many addresses together spend the handshake budget, not the
        // connection slots: another client's handshake waits for room…
        assert_eq!(slots.in_handshake(), (4, 2));
        assert_eq!(slots.take(ip("10.0.0.9")).unwrap_err(), Refusal::Handshakes);
        // …and a handshake that ends (finished, failed or timed out)
        // makes room for the next one at once.
        drop(stalled);
        let mut fourth = slots.take(ip("10.0.0.9")).unwrap();
        fourth.handshake_done();
        authenticated.push(fourth);
        assert_eq!(slots.in_handshake(), (2, 1));
        // The authenticated connections kept their slots all along, and
        // the connection cap still holds: 4 authenticated + 2 handshakes
        // in flight + 4 more fill the 10.
        let more: Vec<Slot> = (1..=5)
            .filter_map(|n| {
                let mut slot = slots.take(ip(&format!("10.0.1.{n}"))).ok()?;
                slot.handshake_done();
                Some(slot)
            })
            .collect();
        assert_eq!(more.len(), 4);
        assert_eq!(slots.refusals(Refusal::Connections), 1);
        drop((authenticated, more, v6));
        assert_eq!(slots.in_handshake(), (0, 0), "no peer is kept without a handshake");
    }

    #[test]
    fn a_burst_from_one_address_goes_through_while_the_budget_is_not_half_spent() {
        let slots = slots(100, 16, 2);
        // A client opening its pool: 8 handshakes at once, half the
        // budget, before its own share counts…
        let pool: Vec<Slot> = (0..8).filter_map(|_| slots.take(ip("10.0.0.1")).ok()).collect();
        assert_eq!(pool.len(), 8);
        // …then it is held to that share (which it is over), and so is
        // everyone else, who still finds room.
        assert_eq!(slots.take(ip("10.0.0.1")).unwrap_err(), Refusal::PeerHandshakes);
        let others: Vec<Slot> = (0..3).filter_map(|_| slots.take(ip("10.0.0.2")).ok()).collect();
        assert_eq!(others.len(), 2);
        assert_eq!(slots.in_handshake(), (10, 2));
        // Its handshakes done, the next burst goes through again.
        drop((pool, others));
        let again: Vec<Slot> = (0..8).filter_map(|_| slots.take(ip("10.0.0.1")).ok()).collect();
        assert_eq!(again.len(), 8);
    }
}
