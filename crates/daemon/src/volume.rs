//! A volume as this node sees it, and the NBD sessions open on it.
//!
//! Every node knows every volume (its catalog entry); the nodes in
//! `meta.replicas` also hold a replica: an image and a Raft group. A
//! session's requests go to the group's leader: locally when this node
//! leads, otherwise forwarded over the peer transport, and retried on the
//! new leader when leadership moves, so a failover is a pause, not an
//! error. A write is acknowledged once its entry is committed (durable in
//! the Raft log of a majority) and applied.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, warn};
use trireme_nbd::{BlockDevice, DeviceError, DeviceResult, Errno};
use trireme_replica::{Segment, VolumeOp};
use trireme_storage::BlockStore;
use trireme_storage::uring::UringStore;
use trireme_transport::{ForwardReply, ForwardRequest, Transport, TransportError};

use crate::group::{GroupError, GroupHandle, GroupStatus};

/// What `volume.meta` holds (a checksummed state file).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeMeta {
    pub id: String,
    pub name: String,
    pub size_bytes: u64,
    pub replica_count: u32,
    pub created_at_unix_s: u64,
    /// The volume's Raft group id.
    pub group_id: u64,
    /// Nodes holding a replica.
    pub replicas: Vec<u64>,
    /// When a write is acknowledged (absent in metas written before the
    /// mode existed: those volumes are quorum-fsync).
    #[serde(default)]
    pub durability: Durability,
}

/// When a volume acknowledges a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Once a quorum of replicas holds it in its durable (fdatasynced) log:
    /// a host can die at any moment and no acknowledged write is lost.
    #[default]
    QuorumFsync,
    /// Once a quorum holds it, in memory or on disk (DRBD's protocol B): an
    /// acknowledged write is lost only if a quorum of hosts fails before
    /// its fdatasync, which is at most one group commit later. FLUSH and
    /// FUA writes wait for quorum fdatasync, so what a filesystem or
    /// database flushed is as safe as in quorum-fsync mode.
    QuorumReceipt,
}

impl Durability {
    pub const NAMES: [&'static str; 2] = ["quorum-fsync", "quorum-receipt"];

    pub fn as_str(self) -> &'static str {
        match self {
            Durability::QuorumFsync => "quorum-fsync",
            Durability::QuorumReceipt => "quorum-receipt",
        }
    }

    /// `""` is the default mode.
    pub fn parse(s: &str) -> Option<Durability> {
        match s {
            "" | "quorum-fsync" => Some(Durability::QuorumFsync),
            "quorum-receipt" => Some(Durability::QuorumReceipt),
            _ => None,
        }
    }
}

/// How long a request keeps looking for a leader before it fails with EIO.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(30);
/// One forwarded attempt; longer than any healthy request, shorter than
/// waiting out a leader that stopped answering.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// Retries while there is no leader back off from 20 ms to at most 200 ms:
/// an election takes 0.7-1.5 s, and a longer step would add most of itself
/// to every failover pause.
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(200);

/// Forwarded-request operation codes (ForwardRequest.op), defined with the protocol.
pub use trireme_transport::op as fwd_op;

/// Forwarded-reply codes (ForwardReply.errno) beyond the NBD errnos: one
/// per [`GroupError`] variant, so a forwarded request fails on the node
/// that forwarded it exactly as it would have on the leader.
pub mod fwd_code {
    pub const OK: u32 = 0;
    pub const NOT_LEADER: u32 = 1000;
    pub const RETRY: u32 = 1001;
    pub const FENCED: u32 = 1002;
    pub const FAILED: u32 = 1003;
    /// A write's outcome is unknown: not retried, EIO to the client.
    pub const INDETERMINATE: u32 = 1004;
    /// An epoch-at request for an index the replica does not cover.
    pub const NOT_COVERED: u32 = 1005;
}

pub fn group_error_to_reply(e: GroupError) -> ForwardReply {
    let (errno, leader_hint) = match &e {
        GroupError::NotLeader(h) => (fwd_code::NOT_LEADER, *h),
        GroupError::Retry(_) => (fwd_code::RETRY, 0),
        GroupError::Fenced(_) => (fwd_code::FENCED, 0),
        GroupError::Failed(_) => (fwd_code::FAILED, 0),
        GroupError::Indeterminate(_) => (fwd_code::INDETERMINATE, 0),
        GroupError::NotCovered(_) => (fwd_code::NOT_COVERED, 0),
    };
    // The variant travels as the code; the message is the inner text, so
    // the far side's error reads the same as the near side's.
    let message = match e {
        GroupError::NotLeader(_) => e.to_string(),
        GroupError::Retry(m)
        | GroupError::Fenced(m)
        | GroupError::Failed(m)
        | GroupError::Indeterminate(m)
        | GroupError::NotCovered(m) => m,
    };
    ForwardReply {
        errno,
        message,
        data: Bytes::new(),
        leader_hint,
    }
}

fn reply_to_result(r: ForwardReply) -> Result<Bytes, GroupError> {
    match r.errno {
        fwd_code::OK => Ok(r.data),
        fwd_code::NOT_LEADER => Err(GroupError::NotLeader(r.leader_hint)),
        fwd_code::FENCED => Err(GroupError::Fenced(r.message)),
        fwd_code::FAILED => Err(GroupError::Failed(r.message)),
        fwd_code::INDETERMINATE => Err(GroupError::Indeterminate(r.message)),
        fwd_code::NOT_COVERED => Err(GroupError::NotCovered(r.message)),
        _ => Err(GroupError::Retry(r.message)),
    }
}

pub struct LocalReplica {
    pub store: Arc<UringStore>,
    pub group: GroupHandle,
    pub dir: PathBuf,
}

pub struct Volume {
    /// Never changes; kept apart so requests need not copy the meta.
    name: String,
    meta: std::sync::Mutex<VolumeMeta>,
    /// Quorum-receipt mode (never changes).
    receipt: bool,
    size_bytes: AtomicU64,
    pub local: Option<LocalReplica>,
    node_id: u64,
    transport: Transport,
    open_sessions: AtomicU32,
    revoke: watch::Sender<bool>,
    /// Writes routed through this node and not yet answered: what decides
    /// whether a forwarded write whose outcome was lost may be retried.
    routed_writes: std::sync::Mutex<RoutedWrites>,
    routed_write_done: tokio::sync::Notify,
}

/// The writes in flight through `Volume::route`, with whether each overlaps
/// another one in flight (in either order), and which are in doubt.
///
/// A forwarded write that reached a leader which then died may have
/// committed. Sending it again applies it twice; that is harmless unless an
/// overlapping write lands between the two, which would make a reader see
/// the first value, then the other one, then the first again. So:
/// - a write whose outcome was lost while an overlapping write was in
///   flight through this node gets EIO (outcome unknown), not a retry;
/// - a write whose outcome was lost with no overlap is *in doubt* while it
///   is retried, and an overlapping write that arrives meanwhile waits
///   until it is answered before it is sent. Nothing from this node can
///   then land between the two copies. (The nemesis caught the retry of a
///   write committed by a leader that crashed landing after such a later
///   write, which had overtaken it.)
///
/// The lost copy itself cannot land after the retry: a leader that died
/// before committing it left it, at most, in the log of its successor,
/// which commits it before anything of its own term; one that was deposed
/// while it stalled can no longer commit it; one that was only slow queued
/// it in its group ahead of the retry. Writes through other nodes are not
/// seen here: only an unattached volume takes writes from several nodes at
/// once.
#[derive(Default)]
struct RoutedWrites {
    next_id: u64,
    inflight: std::collections::HashMap<u64, RoutedWrite>,
}

struct RoutedWrite {
    offset: u64,
    length: u64,
    /// Another write over these bytes was in flight at the same time.
    overlapped: bool,
    /// Its outcome was lost once and it is being retried.
    in_doubt: bool,
}

impl RoutedWrite {
    fn overlaps(&self, offset: u64, length: u64) -> bool {
        let end = offset.saturating_add(length.max(1));
        self.offset < end && offset < self.offset.saturating_add(self.length.max(1))
    }
}

impl RoutedWrites {
    /// Registers a write; also returns whether it must wait behind one in
    /// doubt (see `behind_in_doubt`) before it is sent.
    fn register(&mut self, offset: u64, length: u64) -> (u64, bool) {
        self.next_id += 1;
        let id = self.next_id;
        let mut overlapped = false;
        let mut behind = false;
        // A write in doubt is not marked: this one waits for it, so they
        // are not in flight together.
        for w in self.inflight.values_mut() {
            if !w.overlaps(offset, length) {
                continue;
            }
            if w.in_doubt {
                behind = true;
            } else {
                w.overlapped = true;
                overlapped = true;
            }
        }
        self.inflight.insert(
            id,
            RoutedWrite {
                offset,
                length,
                overlapped,
                in_doubt: false,
            },
        );
        (id, behind)
    }

    fn overlapped(&self, id: u64) -> bool {
        self.inflight.get(&id).is_none_or(|w| w.overlapped)
    }

    /// The outcome of `id` was lost: true if it may be sent again (no
    /// overlapping write was in flight with it), and it is then in doubt.
    fn retry_after_loss(&mut self, id: u64) -> bool {
        if self.overlapped(id) {
            return false;
        }
        if let Some(w) = self.inflight.get_mut(&id) {
            w.in_doubt = true;
        }
        true
    }

    /// True while an earlier overlapping write is in doubt: `id` must not
    /// be sent before it is answered.
    fn behind_in_doubt(&self, id: u64) -> bool {
        let Some(me) = self.inflight.get(&id) else { return false };
        self.inflight
            .iter()
            .any(|(other, w)| *other < id && w.in_doubt && w.overlaps(me.offset, me.length))
    }
}

/// Unregisters a routed write however `route` returns.
struct RoutedWriteGuard<'a> {
    writes: &'a std::sync::Mutex<RoutedWrites>,
    /// Wakes writes waiting behind this one (see `behind_in_doubt`).
    done: &'a tokio::sync::Notify,
    id: u64,
}

impl Drop for RoutedWriteGuard<'_> {
    fn drop(&mut self) {
        self.writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .inflight
            .remove(&self.id);
        self.done.notify_waiters();
    }
}

impl Volume {
    pub fn new(meta: VolumeMeta, local: Option<LocalReplica>, node_id: u64, transport: Transport) -> Arc<Volume> {
        let (revoke, _) = watch::channel(false);
        Arc::new(Volume {
            name: meta.name.clone(),
            size_bytes: AtomicU64::new(meta.size_bytes),
            receipt: meta.durability == Durability::QuorumReceipt,
            meta: std::sync::Mutex::new(meta),
            local,
            node_id,
            transport,
            open_sessions: AtomicU32::new(0),
            revoke,
            routed_writes: std::sync::Mutex::new(RoutedWrites::default()),
            routed_write_done: tokio::sync::Notify::new(),
        })
    }

    pub fn meta(&self) -> VolumeMeta {
        self.meta.lock().expect("volume meta lock poisoned").clone()
    }

    pub fn set_meta(&self, meta: VolumeMeta) {
        self.size_bytes.store(meta.size_bytes, Ordering::SeqCst);
        *self.meta.lock().expect("volume meta lock poisoned") = meta;
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::SeqCst)
    }

    pub fn open_sessions(&self) -> u32 {
        self.open_sessions.load(Ordering::SeqCst)
    }

    /// Bytes of this node's image actually allocated on disk.
    pub fn allocated_bytes(&self) -> u64 {
        self.local.as_ref().map(|l| l.store.allocated_bytes()).unwrap_or(0)
    }

    pub fn local_status(&self) -> Option<GroupStatus> {
        self.local.as_ref().map(|l| l.group.status())
    }

    /// Opens a session with the writer epoch current on this node.
    pub fn open_session(self: &Arc<Self>) -> (VolumeSession, watch::Receiver<bool>) {
        self.open_sessions.fetch_add(1, Ordering::SeqCst);
        let (epoch, attached) = self
            .local_status()
            .map(|s| (s.epoch, s.attached_node))
            .unwrap_or((0, 0));
        let (session_revoke, rx) = watch::channel(false);
        // Volume-wide revocation (delete) reaches every session too.
        let mut volume_revoked = self.revoke.subscribe();
        let tx = session_revoke.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = volume_revoked.wait_for(|v| *v) => if r.is_ok() { tx.send_replace(true); },
                _ = tx.closed() => {}
            }
        });
        let writer = attached == 0 || attached == self.node_id;
        (
            VolumeSession {
                volume: self.clone(),
                epoch,
                writer,
                revoke: session_revoke,
            },
            rx,
        )
    }

    pub fn revoke_sessions(&self) {
        self.revoke.send_replace(true);
    }

    /// The node to try first: the leader if this node knows it, else itself
    /// when it holds a replica, else the first replica.
    fn first_target(&self) -> u64 {
        if let Some(local) = &self.local {
            let leader = local.group.leader();
            return if leader != 0 { leader } else { self.node_id };
        }
        self.meta().replicas.first().copied().unwrap_or(self.node_id)
    }

    fn next_replica(&self, after: u64) -> u64 {
        let replicas = self.meta().replicas;
        let i = replicas.iter().position(|r| *r == after).map(|i| i + 1).unwrap_or(0);
        replicas.get(i % replicas.len().max(1)).copied().unwrap_or(self.node_id)
    }

    /// Runs one operation on the leader (or, for reads, on a replica that
    /// can prove freshness), retrying across leader changes until
    /// ROUTE_TIMEOUT.
    async fn route(&self, req: ForwardRequest) -> Result<Bytes, GroupError> {
        let deadline = Instant::now() + ROUTE_TIMEOUT;
        let mut target = self.first_target();
        let mut backoff = BACKOFF_MIN;
        let is_read = req.op == fwd_op::READ;
        let mutates = matches!(req.op, fwd_op::WRITE | fwd_op::WRITE_ZEROES | fwd_op::TRIM);
        let mut behind = false;
        let guard = mutates.then(|| {
            let (id, b) = self.routed().register(req.offset, req.length);
            behind = b;
            RoutedWriteGuard {
                writes: &self.routed_writes,
                done: &self.routed_write_done,
                id,
            }
        });
        if let Some(g) = guard.as_ref().filter(|_| behind) {
            self.wait_behind_in_doubt(g.id, deadline).await?;
        }
        // A lost outcome may be retried only without an overlapping write
        // in flight; the write is then in doubt until answered (see
        // RoutedWrites).
        let may_retry =
            |guard: &Option<RoutedWriteGuard<'_>>| guard.as_ref().is_none_or(|g| self.routed().retry_after_loss(g.id));
        loop {
            let local = target == self.node_id && self.local.is_some();
            // Reads are served by the local replica whenever there is one:
            // ReadIndex proves freshness through the leader. Not in
            // quorum-receipt mode: the leader may have acknowledged writes
            // that are not committed yet, which only it knows to wait for.
            let result = if local || (is_read && self.local.is_some() && !self.receipt) {
                self.execute_local(&req).await
            } else {
                // A leader that stopped answering (SIGSTOP, a partition)
                // must not hold the request past an election: give up on it
                // after one attempt's time and look for the new leader.
                match tokio::time::timeout(ATTEMPT_TIMEOUT, self.transport.forward(target, req.clone())).await {
                    Ok(Ok(reply)) => reply_to_result(reply),
                    // A write that may have reached the leader may also have
                    // committed: retrying it could apply it again, after an
                    // overlapping write (see RoutedWrites).
                    Ok(Err(e)) if mutates && !never_sent(&e) && !may_retry(&guard) => {
                        Err(GroupError::Indeterminate(format!(
                            "forwarding to node {target} failed after sending, with an overlapping write in flight: {e}"
                        )))
                    }
                    Ok(Err(e)) => {
                        Err(GroupError::NotLeader(0)).inspect_err(|_| debug!("forward to node {target}: {e}"))
                    }
                    Err(_) if mutates && !may_retry(&guard) => Err(GroupError::Indeterminate(format!(
                        "node {target} did not answer a forwarded write within {ATTEMPT_TIMEOUT:?}, \
                         with an overlapping write in flight"
                    ))),
                    Err(_) => Err(GroupError::NotLeader(0)),
                }
            };
            let wait = match result {
                Ok(data) => return Ok(data),
                // An indeterminate write may have taken effect: a retry
                // could apply it again, after a later write to its blocks.
                Err(e @ (GroupError::Fenced(_) | GroupError::Failed(_) | GroupError::Indeterminate(_))) => {
                    return Err(e);
                }
                Err(GroupError::NotLeader(hint)) if hint != 0 && hint != target => {
                    target = hint;
                    false
                }
                Err(GroupError::NotLeader(_)) => {
                    target = match self.local.as_ref().map(|l| l.group.leader()) {
                        Some(l) if l != 0 && l != target => l,
                        _ => self.next_replica(target),
                    };
                    true
                }
                Err(GroupError::Retry(_) | GroupError::NotCovered(_)) => true,
            };
            if Instant::now() >= deadline {
                return Err(GroupError::Failed(format!(
                    "volume {}: no leader answered within {ROUTE_TIMEOUT:?}",
                    self.meta().name
                )));
            }
            if wait {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    fn routed(&self) -> std::sync::MutexGuard<'_, RoutedWrites> {
        self.routed_writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits (until `deadline`) while an earlier overlapping write routed
    /// through this node is in doubt: see RoutedWrites.
    async fn wait_behind_in_doubt(&self, id: u64, deadline: Instant) -> Result<(), GroupError> {
        loop {
            let done = self.routed_write_done.notified();
            tokio::pin!(done);
            // Registered before the check, so a guard dropped in between
            // still wakes us.
            done.as_mut().enable();
            if !self.routed().behind_in_doubt(id) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline.into(), done).await.is_err() {
                return Err(GroupError::Failed(format!(
                    "volume {}: an overlapping write in doubt was not answered within {ROUTE_TIMEOUT:?}",
                    self.meta().name
                )));
            }
        }
    }

    /// Executes a (possibly forwarded) request against the local replica,
    /// without forwarding it further.
    pub async fn execute_local(&self, req: &ForwardRequest) -> Result<Bytes, GroupError> {
        let Some(local) = &self.local else {
            return Err(GroupError::NotLeader(0));
        };
        let group = &local.group;
        match req.op {
            fwd_op::READ | fwd_op::READ_LOCAL => {
                // For READ_LOCAL the epoch field carries the index the copy needs.
                let local_min = (req.op == fwd_op::READ_LOCAL).then_some(req.epoch);
                let segments = group.read(req.offset, req.length, local_min).await?;
                let data = materialize(&local.store, segments, req.length)
                    .await
                    .map_err(GroupError::Failed)?;
                if local_min.is_some() {
                    metrics::counter!("trireme_snapshot_sent_bytes_total", "volume" => req.volume.clone())
                        .increment(data.len() as u64);
                }
                Ok(data)
            }
            fwd_op::EPOCH_AT => {
                let (epoch, attached) = group.epoch_at(req.offset).await?;
                let json = serde_json::json!({"epoch": epoch, "attached": attached});
                Ok(Bytes::from(serde_json::to_vec(&json).unwrap_or_default()))
            }
            fwd_op::WRITE => {
                let op = VolumeOp::Write {
                    offset: req.offset,
                    data: req.data.clone(),
                };
                group.write(req.epoch, op, req.fua).await.map(|_| Bytes::new())
            }
            fwd_op::WRITE_ZEROES | fwd_op::TRIM => {
                let op = VolumeOp::Zero {
                    offset: req.offset,
                    length: req.length,
                };
                group.write(req.epoch, op, req.fua).await.map(|_| Bytes::new())
            }
            // Quorum-fsync: every acknowledged write is durable on a quorum
            // already. Quorum-receipt: wait until everything the leader
            // holds is.
            fwd_op::FLUSH if self.receipt => group.flush().await.map(|()| Bytes::new()),
            fwd_op::FLUSH => Ok(Bytes::new()),
            fwd_op::ATTACH => {
                let node = req.offset;
                group.write(0, VolumeOp::Attach { node_id: node }, true).await?;
                if self.meta().replicas.contains(&node) {
                    let _ = group.send(crate::group::GroupEvent::TransferLeader(node)).await;
                }
                Ok(Bytes::new())
            }
            fwd_op::STATUS => {
                let s = group.status();
                if s.role != "leader" {
                    return Err(GroupError::NotLeader(s.leader));
                }
                Ok(Bytes::from(status_json(&s)))
            }
            other => Err(GroupError::Failed(format!("unknown forwarded op {other}"))),
        }
    }

    fn request(&self, op: u32, epoch: u64, offset: u64, length: u64, data: Bytes) -> ForwardRequest {
        ForwardRequest {
            volume: self.name.clone(),
            epoch,
            op,
            offset,
            length,
            data,
            may_trim: true,
            fua: false,
        }
    }

    /// Commits a new writer epoch bound to `node` and moves leadership there.
    pub async fn attach(&self, node: u64) -> Result<(), GroupError> {
        self.route(self.request(fwd_op::ATTACH, 0, node, 0, Bytes::new()))
            .await
            .map(|_| ())
    }

    /// The leader's view of the group: the local replica's if it leads,
    /// else one round trip to the leader.
    pub async fn leader_view(&self) -> Option<GroupStatus> {
        match self.local_status() {
            Some(s) if s.role == "leader" => Some(s),
            _ => self.leader_status().await,
        }
    }

    /// The leader's view of the group (replica progress), from wherever it is.
    pub async fn leader_status(&self) -> Option<GroupStatus> {
        let req = self.request(fwd_op::STATUS, 0, 0, 0, Bytes::new());
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut target = self.first_target();
        while Instant::now() < deadline {
            let r = if target == self.node_id {
                self.execute_local(&req).await
            } else {
                match self.transport.forward(target, req.clone()).await {
                    Ok(reply) => reply_to_result(reply),
                    Err(_) => Err(GroupError::NotLeader(0)),
                }
            };
            match r {
                Ok(data) => return parse_status_json(&data),
                Err(GroupError::NotLeader(h)) if h != 0 => target = h,
                Err(_) => {
                    target = self.next_replica(target);
                    tokio::time::sleep(BACKOFF_MIN).await;
                }
            }
        }
        None
    }
}

pub fn status_json(s: &GroupStatus) -> Vec<u8> {
    let progress: Vec<serde_json::Value> = s
        .progress
        .iter()
        .map(|(id, m, st)| {
            let lag_bytes = s.lag_bytes.iter().find(|(i, _)| i == id).map(|(_, b)| *b).unwrap_or(0);
            let lag_s = s
                .lag_seconds
                .iter()
                .find(|(i, _)| i == id)
                .map(|(_, x)| *x)
                .unwrap_or(0.0);
            serde_json::json!({"node": id, "match": m, "state": st, "lag_bytes": lag_bytes, "lag_s": lag_s})
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "role": s.role, "leader": s.leader, "term": s.term, "commit": s.commit_index,
        "applied": s.applied_index, "last": s.last_index, "epoch": s.epoch,
        "attached": s.attached_node, "progress": progress,
        "rpo_exposure_s": s.rpo_exposure_s, "in_sync": s.replicas_in_sync,
        "failover_pause_s": s.failover_pause_s, "leader_changes": s.leader_changes,
        "hibernating": s.hibernating,
    }))
    .unwrap_or_default()
}

fn parse_status_json(b: &[u8]) -> Option<GroupStatus> {
    let v: serde_json::Value = serde_json::from_slice(b).ok()?;
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    let mut s = GroupStatus {
        role: "leader",
        leader: n("leader"),
        term: n("term"),
        commit_index: n("commit"),
        applied_index: n("applied"),
        last_index: n("last"),
        epoch: n("epoch"),
        attached_node: n("attached"),
        rpo_exposure_s: v.get("rpo_exposure_s").and_then(|x| x.as_f64()).unwrap_or(0.0),
        replicas_in_sync: n("in_sync"),
        failover_pause_s: v.get("failover_pause_s").and_then(|x| x.as_f64()).unwrap_or(0.0),
        leader_changes: n("leader_changes"),
        hibernating: v.get("hibernating").and_then(|x| x.as_bool()).unwrap_or(false),
        ..GroupStatus::default()
    };
    for p in v.get("progress")?.as_array()? {
        let id = p.get("node")?.as_u64()?;
        let state = match p.get("state").and_then(|x| x.as_str()) {
            Some("replicate") => "replicate",
            Some("snapshot") => "snapshot",
            Some("inactive") => "inactive",
            _ => "probe",
        };
        s.progress.push((id, p.get("match")?.as_u64()?, state));
        s.lag_bytes
            .push((id, p.get("lag_bytes").and_then(|x| x.as_u64()).unwrap_or(0)));
        s.lag_seconds
            .push((id, p.get("lag_s").and_then(|x| x.as_f64()).unwrap_or(0.0)));
    }
    Some(s)
}

/// Turns a read's segments into bytes: cached extents as they are, holes
/// and zeroed ranges as zeroes, the rest from the image.
pub async fn materialize(store: &UringStore, segments: Vec<Segment>, length: u64) -> Result<Bytes, String> {
    if let [Segment::Cached { data, .. }] = segments.as_slice() {
        return Ok(data.clone());
    }
    if let [Segment::Image { offset, length }] = segments.as_slice() {
        return store.read(*offset, *length as usize).await.map_err(|e| e.to_string());
    }
    let mut out = BytesMut::with_capacity(length as usize);
    for s in segments {
        match s {
            Segment::Cached { data, .. } => out.extend_from_slice(&data),
            Segment::Zero { length, .. } => out.resize(out.len() + length as usize, 0),
            Segment::Image { offset, length } => {
                let data = store.read(offset, length as usize).await.map_err(|e| e.to_string())?;
                out.extend_from_slice(&data);
            }
        }
    }
    Ok(out.freeze())
}

/// One NBD session's handle on a volume.
pub struct VolumeSession {
    volume: Arc<Volume>,
    /// Writer epoch the session was opened under.
    epoch: u64,
    /// Whether this node may write (the volume is unattached or attached here).
    writer: bool,
    revoke: watch::Sender<bool>,
}

impl Drop for VolumeSession {
    fn drop(&mut self) {
        self.volume.open_sessions.fetch_sub(1, Ordering::SeqCst);
    }
}

impl VolumeSession {
    fn to_device(&self, e: GroupError) -> DeviceError {
        match e {
            GroupError::Fenced(msg) => {
                // C3: this session's writer generation is over; close it.
                warn!(volume = %self.volume.meta().name, epoch = self.epoch, "session fenced: {msg}");
                self.revoke.send_replace(true);
                DeviceError::new(Errno::Perm, format!("fenced: {msg}"))
            }
            e @ GroupError::Indeterminate(_) => {
                // Honest: the write may or may not have taken effect.
                warn!(volume = %self.volume.meta().name, "write failed with EIO: {e}");
                DeviceError::new(Errno::Io, e.to_string())
            }
            other => DeviceError::new(Errno::Io, other.to_string()),
        }
    }

    fn check_writer(&self) -> DeviceResult<()> {
        if self.writer {
            return Ok(());
        }
        let attached = self.volume.local_status().map(|s| s.attached_node).unwrap_or(0);
        Err(DeviceError::new(
            Errno::Perm,
            format!("volume is attached to node {attached}; writes go through it"),
        ))
    }

    async fn write_op(&self, op: u32, offset: u64, length: u64, data: Bytes, fua: bool) -> DeviceResult<()> {
        self.check_writer()?;
        let mut req = self.volume.request(op, self.epoch, offset, length, data);
        req.fua = fua;
        self.volume.route(req).await.map(|_| ()).map_err(|e| self.to_device(e))
    }
}

impl BlockDevice for VolumeSession {
    async fn read(&self, offset: u64, length: u32) -> DeviceResult<Bytes> {
        let req = self
            .volume
            .request(fwd_op::READ, self.epoch, offset, u64::from(length), Bytes::new());
        let data = self.volume.route(req).await.map_err(|e| self.to_device(e))?;
        if data.len() != length as usize {
            return Err(DeviceError::new(
                Errno::Io,
                format!("read returned {} of {length} bytes", data.len()),
            ));
        }
        Ok(data)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceResult<()> {
        // FUA matters only in quorum-receipt mode: otherwise every write is
        // acknowledged once durable on a quorum.
        let length = data.len() as u64;
        self.write_op(fwd_op::WRITE, offset, length, data, fua).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        _may_trim: bool,
        _fast_only: bool,
        fua: bool,
    ) -> DeviceResult<()> {
        // A zero entry is a few bytes in the log whatever the range: always fast.
        self.write_op(fwd_op::WRITE_ZEROES, offset, u64::from(length), Bytes::new(), fua)
            .await
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> DeviceResult<()> {
        self.write_op(fwd_op::TRIM, offset, u64::from(length), Bytes::new(), fua)
            .await
    }

    async fn flush(&self) -> DeviceResult<()> {
        // Quorum-fsync: every acknowledged write, on any session of any
        // node, is already committed to a quorum's durable logs.
        if !self.volume.receipt {
            return Ok(());
        }
        let req = self.volume.request(fwd_op::FLUSH, self.epoch, 0, 0, Bytes::new());
        self.volume.route(req).await.map(|_| ()).map_err(|e| self.to_device(e))
    }
}

/// True if a forward failed before the request could reach the peer: no
/// connection (refused, or an injected drop), an unknown peer, or a request
/// over the size bound. Anything else may have been delivered.
fn never_sent(e: &TransportError) -> bool {
    match e {
        TransportError::UnknownPeer(_) | TransportError::TooLarge { .. } | TransportError::Config(_) => true,
        TransportError::Unreachable { message, .. } => {
            let m = message.to_ascii_lowercase();
            m.contains("connect") || m.contains("injected")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_overlapping_routed_writes_lose_their_retry() {
        let mut w = RoutedWrites::default();
        let a = w.register(0, 4096).0;
        let b = w.register(8192, 4096).0;
        assert!(!w.overlapped(a) && !w.overlapped(b), "disjoint writes may be retried");
        let c = w.register(4095, 2).0;
        assert!(w.overlapped(a) && w.overlapped(c), "an overlap marks both writes");
        assert!(!w.overlapped(b));
        w.inflight.remove(&a);
        assert!(w.overlapped(a), "an unknown write is never retried");
        // A zero-length range (a flush-sized request) still occupies its offset.
        let d = w.register(8192, 0).0;
        assert!(w.overlapped(d) && w.overlapped(b));
    }

    #[test]
    fn a_write_in_doubt_holds_back_overlapping_writes_until_answered() {
        let mut w = RoutedWrites::default();
        let a = w.register(0, 4096).0;
        // Its outcome was lost with nothing overlapping: retried, in doubt.
        assert!(!w.overlapped(a));
        w.retry_after_loss(a);
        let b = w.register(2048, 4096).0;
        let c = w.register(8192, 4096).0;
        assert!(w.behind_in_doubt(b), "an overlapping write waits for the retry");
        assert!(!w.behind_in_doubt(c), "a disjoint one does not");
        assert!(!w.behind_in_doubt(a));
        assert!(
            !w.overlapped(a) && !w.overlapped(b),
            "a write that waits is not in flight with it: neither loses its retry"
        );
        w.inflight.remove(&a);
        assert!(!w.behind_in_doubt(b), "answered: the waiting write goes");
        // Two writes in flight together: a lost outcome is not retried.
        let d = w.register(2048, 1).0;
        assert!(w.overlapped(b) && w.overlapped(d));
    }

    /// A forwarded request fails on the forwarding node as it failed on the
    /// leader: above all, an indeterminate write stays indeterminate (the
    /// router must not retry it).
    #[test]
    fn every_group_error_survives_forwarding() {
        for e in [
            GroupError::NotLeader(3),
            GroupError::Fenced("writer epoch 1 is older than the volume's epoch 2".into()),
            GroupError::Retry("write-back cache full".into()),
            GroupError::Failed("corrupt entry".into()),
            GroupError::Indeterminate("a snapshot from the leader replaced this replica's log".into()),
            GroupError::NotCovered("node 2 knows the epoch from index 9".into()),
        ] {
            assert_eq!(reply_to_result(group_error_to_reply(e.clone())), Err(e));
        }
    }
}
