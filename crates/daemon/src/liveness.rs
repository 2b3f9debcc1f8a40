//! Node liveness: which peers this node has heard from lately. Every node
//! sends a small heartbeat to each peer on the Raft link (group 0, which
//! no volume uses); anything received from a peer counts as hearing it.
//!
//! It exists so idle Raft groups can hibernate (stop ticking and stop
//! sending per-group heartbeats): one heartbeat per node pair stands in for
//! a thousand groups' heartbeats, and a hibernating follower wakes and
//! campaigns as soon as its leader's node goes quiet. Safety never rests on
//! it: an elected leader still needs a quorum to commit or confirm a read.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use trireme_replica::raft::eraftpb::{Message, MessageType};
use trireme_transport::Transport;

/// How often a node heartbeats each peer.
pub const NODE_HEARTBEAT: Duration = Duration::from_millis(200);
/// A peer not heard from for this long is down: 3.5 heartbeats. Below the
/// Raft election timeout (1-2 s after the last heartbeat), so the follower
/// that campaigns on a dead leader's node (see the group driver) usually
/// does so before any randomized election timeout fires elsewhere and
/// splits the vote. A false "down" under load costs at most a failed
/// pre-vote or a needless leader change, never safety.
pub const NODE_DOWN_AFTER: Duration = Duration::from_millis(700);
/// Raft group id reserved for node heartbeats.
pub const NODE_GROUP: u64 = 0;

#[derive(Debug, Clone, Copy)]
struct Peer {
    last_heard: Option<Instant>,
    alive: bool,
}

pub struct Liveness {
    node_id: u64,
    peers: Mutex<BTreeMap<u64, Peer>>,
    /// Bumped whenever a peer goes down or comes back.
    changes: watch::Sender<u64>,
}

impl Liveness {
    /// Every peer starts down until heard from: a follower must not
    /// hibernate on the word of a leader it has not heard since starting.
    pub fn new(node_id: u64, peers: impl IntoIterator<Item = u64>) -> Liveness {
        let peers = peers
            .into_iter()
            .filter(|p| *p != node_id)
            .map(|p| {
                (
                    p,
                    Peer {
                        last_heard: None,
                        alive: false,
                    },
                )
            })
            .collect();
        Liveness {
            node_id,
            peers: Mutex::new(peers),
            changes: watch::channel(0).0,
        }
    }

    pub fn is_alive(&self, node: u64) -> bool {
        node == self.node_id || self.lock().get(&node).is_some_and(|p| p.alive)
    }

    /// When `node` was last heard from (None: never, or not a peer).
    pub fn last_heard(&self, node: u64) -> Option<Instant> {
        self.lock().get(&node).and_then(|p| p.last_heard)
    }

    /// Every peer and whether it is up, ascending.
    pub fn peers(&self) -> Vec<(u64, bool)> {
        self.lock().iter().map(|(id, p)| (*id, p.alive)).collect()
    }

    /// Peers currently down, ascending.
    pub fn down_peers(&self) -> Vec<u64> {
        self.lock()
            .iter()
            .filter(|(_, p)| !p.alive)
            .map(|(id, _)| *id)
            .collect()
    }

    /// A receiver that sees a change whenever a peer goes down or comes back.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn heard(&self, node: u64) {
        let came_back = {
            let mut peers = self.lock();
            let Some(p) = peers.get_mut(&node) else { return };
            p.last_heard = Some(Instant::now());
            !std::mem::replace(&mut p.alive, true)
        };
        if came_back {
            tracing::info!(node = self.node_id, peer = node, "peer node is up");
            self.changes.send_modify(|g| *g += 1);
        }
    }

    /// Marks peers not heard from within [`NODE_DOWN_AFTER`] as down.
    fn expire(&self, now: Instant) {
        let mut went_down = Vec::new();
        {
            let mut peers = self.lock();
            for (id, p) in peers.iter_mut() {
                let quiet = p.last_heard.is_none_or(|t| now.duration_since(t) > NODE_DOWN_AFTER);
                if p.alive && quiet {
                    p.alive = false;
                    went_down.push(*id);
                }
            }
        }
        if !went_down.is_empty() {
            tracing::warn!(node = self.node_id, peers = ?went_down, "peer node is down (not heard from)");
            self.changes.send_modify(|g| *g += 1);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Peer>> {
        self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Heartbeats every peer and expires silent ones, until the transport
    /// is dropped with the node.
    pub async fn run(self: std::sync::Arc<Self>, transport: Transport) {
        let peers: Vec<u64> = self.lock().keys().copied().collect();
        if peers.is_empty() {
            return;
        }
        let mut every = tokio::time::interval(NODE_HEARTBEAT);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            for &to in &peers {
                let m = Message {
                    msg_type: MessageType::MsgHeartbeat,
                    from: self.node_id,
                    to,
                    ..Default::default()
                };
                transport.send(to, NODE_GROUP, m);
            }
            self.expire(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_start_down_come_up_when_heard_and_expire() {
        let l = Liveness::new(1, [1, 2, 3]);
        let mut rx = l.subscribe();
        assert!(l.is_alive(1), "a node is always alive to itself");
        assert!(!l.is_alive(2));
        assert_eq!(l.down_peers(), vec![2, 3]);
        l.heard(2);
        assert!(l.is_alive(2));
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        l.heard(2);
        assert!(!rx.has_changed().unwrap(), "hearing a live peer again is no change");
        l.expire(Instant::now() + NODE_DOWN_AFTER + Duration::from_millis(1));
        assert!(!l.is_alive(2));
        assert!(rx.has_changed().unwrap());
        l.heard(9); // not a peer: ignored
        assert!(!l.is_alive(9));
    }
}
