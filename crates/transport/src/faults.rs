//! Injected network faults (the `faults` feature): a rule table per
//! destination peer, consulted for every outgoing Raft message and every
//! outgoing unary call, so a test's nemesis can partition, slow down, lose
//! or duplicate traffic between real processes.
//!
//! Rules are outbound only. A two-way partition is a `drop` rule on both
//! nodes; a one-way partition a rule on one side; a bridge (1-2 and 2-3
//! connected, 1-3 not) a rule pair between 1 and 3.
//!
//! What a rule does:
//! - Raft messages (node heartbeats included, they ride the link as group
//!   0): `drop` loses every message, `loss_percent` each message
//!   independently; `delay_ms` holds each message back by that much plus
//!   up to 20% jitter, in order (a later message never overtakes an
//!   earlier one); `dup_percent` sends a message twice.
//! - Unary calls (forwarded I/O, catalog changes, snapshot copy reads):
//!   `drop` and a lost call fail at once as unreachable, the way a call
//!   fails when the network is down (not after the request timeout);
//!   `delay_ms` holds the call back before it goes, within its deadline;
//!   calls are never duplicated (gRPC over TCP does not duplicate a call).
//!
//! The link keeps its connection while messages are dropped: the loss is
//! silent, as on a real partition, and the peers notice it only through
//! missing heartbeats.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use crate::TransportError;
use crate::link::random_u64;

/// Largest `delay_ms` a rule may carry: one minute.
pub const MAX_DELAY_MS: u32 = 60_000;

/// What happens to traffic towards one peer. All zero/false: nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetRule {
    /// Everything is lost.
    pub drop: bool,
    /// Each message or call is lost with this probability (0-100).
    pub loss_percent: u32,
    /// Each message or call waits this long, plus up to 20% jitter.
    pub delay_ms: u32,
    /// Each message is sent twice with this probability (0-100).
    pub dup_percent: u32,
}

impl NetRule {
    /// True when the rule changes nothing (setting it removes the rule).
    pub fn is_clear(&self) -> bool {
        *self == NetRule::default()
    }

    fn validate(&self) -> Result<(), TransportError> {
        for (field, percent) in [("loss_percent", self.loss_percent), ("dup_percent", self.dup_percent)] {
            if percent > 100 {
                return Err(TransportError::FaultRule(format!("{field} {percent} is over 100")));
            }
        }
        if self.delay_ms > MAX_DELAY_MS {
            return Err(TransportError::FaultRule(format!(
                "delay_ms {} is over the limit of {MAX_DELAY_MS}",
                self.delay_ms
            )));
        }
        Ok(())
    }

    /// The delay of one message or call: `delay_ms` plus 0-20% jitter.
    fn delay(&self) -> Duration {
        if self.delay_ms == 0 {
            return Duration::ZERO;
        }
        let base_us = u64::from(self.delay_ms) * 1000;
        Duration::from_micros(base_us + random_u64() % (base_us / 5 + 1))
    }
}

fn chance(percent: u32) -> bool {
    percent > 0 && random_u64() % 100 < u64::from(percent)
}

/// Faults injected towards one peer so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InjectedFaults {
    /// Messages and calls lost to a `drop` rule.
    pub dropped: u64,
    /// Messages and calls lost to `loss_percent`.
    pub lost: u64,
    /// Messages and calls held back by `delay_ms`.
    pub delayed: u64,
    /// Messages sent twice.
    pub duplicated: u64,
}

#[derive(Default)]
struct Counters {
    dropped: AtomicU64,
    lost: AtomicU64,
    delayed: AtomicU64,
    duplicated: AtomicU64,
}

#[derive(Clone, Copy)]
enum Fault {
    Drop,
    Loss,
    Delay,
    Dup,
}

impl Fault {
    fn label(self) -> &'static str {
        match self {
            Fault::Drop => "drop",
            Fault::Loss => "loss",
            Fault::Delay => "delay",
            Fault::Dup => "dup",
        }
    }
}

/// What becomes of one outgoing Raft message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Lost,
    /// Send `copies` (1 or 2) after `delay`.
    Send {
        copies: usize,
        delay: Duration,
    },
}

/// The node's rule table, shared by every sender task and unary call.
pub struct NetFaults {
    node_id: u64,
    rules: RwLock<BTreeMap<u64, NetRule>>,
    counters: BTreeMap<u64, Counters>,
}

impl std::fmt::Debug for NetFaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetFaults")
            .field("node_id", &self.node_id)
            .field("rules", &self.rules())
            .finish_non_exhaustive()
    }
}

impl NetFaults {
    pub(crate) fn new(node_id: u64, peers: impl IntoIterator<Item = u64>) -> NetFaults {
        NetFaults {
            node_id,
            rules: RwLock::new(BTreeMap::new()),
            counters: peers.into_iter().map(|p| (p, Counters::default())).collect(),
        }
    }

    /// Replaces the rule towards each of `peers` with `rule` (a clear rule
    /// removes it). Nothing changes unless every peer is a configured peer
    /// other than this node and the rule is in bounds.
    pub fn set(&self, peers: &[u64], rule: NetRule) -> Result<(), TransportError> {
        if peers.is_empty() {
            return Err(TransportError::FaultRule("no peer given".into()));
        }
        let known: BTreeSet<u64> = self.counters.keys().copied().collect();
        for &peer in peers {
            if peer == self.node_id {
                return Err(TransportError::FaultRule(format!(
                    "peer {peer} is this node; rules are for traffic to other nodes"
                )));
            }
            if !known.contains(&peer) {
                let list: Vec<String> = known.iter().map(u64::to_string).collect();
                return Err(TransportError::FaultRule(format!(
                    "peer {peer} is not a peer of node {} (its peers: {})",
                    self.node_id,
                    if list.is_empty() {
                        "none".to_string()
                    } else {
                        list.join(", ")
                    }
                )));
            }
        }
        rule.validate()?;
        let mut rules = self.rules.write().unwrap_or_else(PoisonError::into_inner);
        for &peer in peers {
            if rule.is_clear() {
                rules.remove(&peer);
            } else {
                rules.insert(peer, rule);
            }
        }
        Ok(())
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.rules.write().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// The rules in force, by ascending peer id.
    pub fn rules(&self) -> Vec<(u64, NetRule)> {
        self.rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(p, r)| (*p, *r))
            .collect()
    }

    /// Faults injected towards `peer` so far (None: not a peer).
    pub fn injected(&self, peer: u64) -> Option<InjectedFaults> {
        self.counters.get(&peer).map(|c| InjectedFaults {
            dropped: c.dropped.load(Ordering::Relaxed),
            lost: c.lost.load(Ordering::Relaxed),
            delayed: c.delayed.load(Ordering::Relaxed),
            duplicated: c.duplicated.load(Ordering::Relaxed),
        })
    }

    fn rule(&self, peer: u64) -> Option<NetRule> {
        self.rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&peer)
            .copied()
    }

    fn count(&self, peer: u64, fault: Fault) {
        if let Some(c) = self.counters.get(&peer) {
            let n = match fault {
                Fault::Drop => &c.dropped,
                Fault::Loss => &c.lost,
                Fault::Delay => &c.delayed,
                Fault::Dup => &c.duplicated,
            };
            n.fetch_add(1, Ordering::Relaxed);
        }
        metrics::counter!("trireme_transport_injected_faults_total", "peer" => peer.to_string(), "fault" => fault.label())
            .increment(1);
    }

    /// Decides the fate of one outgoing Raft message to `peer`.
    pub(crate) fn on_message(&self, peer: u64) -> Verdict {
        let Some(rule) = self.rule(peer) else {
            return Verdict::Send {
                copies: 1,
                delay: Duration::ZERO,
            };
        };
        if rule.drop {
            self.count(peer, Fault::Drop);
            return Verdict::Lost;
        }
        if chance(rule.loss_percent) {
            self.count(peer, Fault::Loss);
            return Verdict::Lost;
        }
        let delay = rule.delay();
        if !delay.is_zero() {
            self.count(peer, Fault::Delay);
        }
        let copies = if chance(rule.dup_percent) {
            self.count(peer, Fault::Dup);
            2
        } else {
            1
        };
        Verdict::Send { copies, delay }
    }

    /// Decides the fate of one unary call to `peer`: how long to hold it
    /// back, or the error it fails with at once.
    pub(crate) fn on_call(&self, peer: u64) -> Result<Duration, TransportError> {
        let Some(rule) = self.rule(peer) else {
            return Ok(Duration::ZERO);
        };
        let lost = if rule.drop {
            self.count(peer, Fault::Drop);
            "every call to it is dropped"
        } else if chance(rule.loss_percent) {
            self.count(peer, Fault::Loss);
            "this call was lost"
        } else {
            let delay = rule.delay();
            if !delay.is_zero() {
                self.count(peer, Fault::Delay);
            }
            return Ok(delay);
        };
        Err(TransportError::Unreachable {
            peer,
            message: format!("injected network fault: {lost}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn faults() -> Arc<NetFaults> {
        Arc::new(NetFaults::new(1, [2, 3]))
    }

    #[test]
    fn rules_are_validated_before_anything_changes() {
        let f = faults();
        let drop = NetRule {
            drop: true,
            ..NetRule::default()
        };
        let e = f.set(&[2, 1], drop).unwrap_err().to_string();
        assert!(e.contains("peer 1 is this node"), "{e}");
        let e = f.set(&[9], drop).unwrap_err().to_string();
        assert!(e.contains("peer 9 is not a peer of node 1 (its peers: 2, 3)"), "{e}");
        let e = f
            .set(
                &[2],
                NetRule {
                    loss_percent: 101,
                    ..NetRule::default()
                },
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("loss_percent 101 is over 100"), "{e}");
        let e = f
            .set(
                &[2],
                NetRule {
                    delay_ms: MAX_DELAY_MS + 1,
                    ..NetRule::default()
                },
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("delay_ms 60001"), "{e}");
        assert!(f.set(&[], drop).is_err());
        assert!(f.rules().is_empty(), "a refused set changes nothing");

        f.set(&[2, 3], drop).unwrap();
        assert_eq!(f.rules(), vec![(2, drop), (3, drop)]);
        f.set(&[3], NetRule::default()).unwrap();
        assert_eq!(f.rules(), vec![(2, drop)], "a clear rule removes it");
        f.clear();
        assert!(f.rules().is_empty());
    }

    #[test]
    fn unary_calls_fail_at_once_when_dropped_and_wait_when_delayed() {
        let f = faults();
        assert_eq!(f.on_call(2).unwrap(), Duration::ZERO);
        f.set(
            &[2],
            NetRule {
                drop: true,
                ..NetRule::default()
            },
        )
        .unwrap();
        let e = f.on_call(2).unwrap_err();
        assert!(matches!(e, TransportError::Unreachable { peer: 2, .. }), "{e}");
        f.set(
            &[2],
            NetRule {
                delay_ms: 100,
                ..NetRule::default()
            },
        )
        .unwrap();
        let d = f.on_call(2).unwrap();
        assert!(
            d >= Duration::from_millis(100) && d <= Duration::from_millis(120),
            "{d:?}"
        );
        assert_eq!(f.on_call(3).unwrap(), Duration::ZERO, "rules are per peer");
        let n = f.injected(2).unwrap();
        assert_eq!((n.dropped, n.delayed), (1, 1));
    }

    #[test]
    fn loss_percent_loses_about_that_share() {
        let f = faults();
        f.set(
            &[2],
            NetRule {
                loss_percent: 30,
                ..NetRule::default()
            },
        )
        .unwrap();
        let lost = (0..2000).filter(|_| f.on_message(2) == Verdict::Lost).count();
        assert!((400..800).contains(&lost), "{lost} of 2000 lost at 30%");
        assert_eq!(f.injected(2).unwrap().lost, lost as u64);
    }
}
