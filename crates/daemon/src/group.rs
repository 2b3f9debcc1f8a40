//! The driver of one local replica: a tokio task that owns the sans-IO
//! [`Replica`] and does its I/O. It ticks it, feeds it peer messages and
//! client requests, hands its log writes to the node-wide log writer,
//! sends its messages, answers clients when their entries apply, serves
//! linearizable reads (ReadIndex), and destages the write-back cache to the
//! image.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};
use trireme_raftlog::GroupWrite;
use trireme_replica::raft::StateRole;
use trireme_replica::raft::eraftpb::{ConfState, Message, MessageType};
use trireme_replica::{
    ApplyError, ExtentData, Output, PersistTask, Proposal, ProposeError, Replica, Segment, VolumeOp, receipt_of,
};
use trireme_storage::uring::UringStore;
use trireme_storage::{BlockStore, ZeroMode};
use trireme_transport::Transport;

use crate::liveness::Liveness;
use crate::logwriter::{LogJob, LogWriter};
use crate::telemetry::{FollowerSample, GroupMetrics, GroupSample, IndexClock};

/// One Raft tick; elections take 10-20 ticks (1-2 s), heartbeats 2.
pub const TICK: Duration = Duration::from_millis(100);
/// A read waiting for its ReadIndex longer than this is retried by the caller.
const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests queued to a group before callers wait.
const EVENT_QUEUE: usize = 4096;
/// How long a group's last checkpoint at node shutdown may take.
pub const SHUTDOWN_CHECKPOINT: Duration = Duration::from_secs(20);
/// Writes parked while the cache is full, before more are refused.
const MAX_PARKED_WRITES: usize = 1024;
/// Writes that arrive together are proposed as one raft step of at most
/// about this many data bytes: raft's append message size
/// (`max_size_per_msg`), so each step goes to a follower as one message
/// (a step over it would hold its tail back until the follower answers).
const PROPOSE_BATCH_BYTES: usize = 1024 * 1024;
/// Destage once this much is cached, or at the next destage interval.
const DESTAGE_THRESHOLD_BYTES: u64 = 32 * 1024 * 1024;
const DESTAGE_INTERVAL: Duration = Duration::from_millis(500);

/// When a replica checkpoints (config `log.checkpoint_*`).
///
/// A destage writes the cache's extents into the image file and frees the
/// cache, but only a checkpoint makes the image durable (fdatasync), records
/// the point in volume.state and compacts the durable log below it. Between
/// checkpoints the log holds everything since the last one (a restart
/// replays it over the image, each entry a full overwrite of its range), and
/// the page cache absorbs overwrites of the same blocks and writes the rest
/// back sorted: under 4k random writes a checkpoint every 500 ms made about
/// three random device writes per client write. A checkpoint is due after
/// `interval`, after `log_bytes` of log, or when the node's log asks for it
/// (its purge wants this group's oldest files back).
#[derive(Debug, Clone, Copy)]
pub struct Checkpoints {
    pub interval: Duration,
    pub log_bytes: u64,
}
/// The leader's read lease: for this long after it asked a ReadIndex round
/// that a quorum then confirmed, the leader serves reads at its commit
/// index without another round (C2's "leader lease with check_quorum").
///
/// Why no other leader can commit anything before the lease ends: every
/// follower that confirmed the round heard the leader at or after the ask,
/// and from then on grants no (pre-)vote until one of
/// - its election timeout of 10 ticks passes with no word from the leader
///   (check_quorum's lease in raft: at least 900 ms),
/// - its node liveness has heard nothing from the leader's node for
///   [`crate::liveness::NODE_DOWN_AFTER`] (700 ms) and expires that lease,
/// - it restarts, after which it grants no vote for [`VOTE_HOLD_AFTER_START`],
/// - a leadership transfer forces a campaign, which the leader starts
///   itself, and which stops the lease for [`LEASE_HOLD_AFTER_TRANSFER`].
///
/// A confirming quorum meets every electing quorum, so a new leader exists
/// no sooner than 700 ms after the ask. The 200 ms margin is the clock
/// assumption: each node's monotonic clock may run up to ~30% slow or fast
/// against another's, and a process paused mid-read (SIGSTOP, a VM stall)
/// checked its lease before the pause, so its reply is still linearizable at
/// that instant.
pub const READ_LEASE: Duration = Duration::from_millis(500);
/// A replica grants no vote this soon after its group started: a restart
/// forgets when it last heard its leader, and a leader may still hold a
/// lease this replica's last acknowledgement confirmed.
const VOTE_HOLD_AFTER_START: Duration = Duration::from_millis(1000);
/// No read lease this long after a leadership transfer was asked: the
/// target's forced campaign may come late (a slow MsgTimeoutNow), after
/// raft gave up waiting for it (one election timeout).
const LEASE_HOLD_AFTER_TRANSFER: Duration = Duration::from_millis(3000);
/// A leader off the attached node hands leadership back at most this often
/// (see `return_leadership`).
const LEADER_RETURN_INTERVAL: Duration = Duration::from_secs(5);
/// Entries the leader keeps for a lagging follower before compacting past
/// it anyway (it then needs a snapshot).
const MAX_RETAINED_ENTRIES: u64 = 200_000;
/// Hibernation: an idle group stops ticking, so a thousand idle volumes
/// cost no timer wake-ups and no per-group heartbeats (node liveness stands
/// in for them). A leader hibernates after this many ticks with no client
/// request and every follower holding its whole log (a lagging or dead
/// follower keeps it awake: its RPO exposure must keep ageing in the
/// metrics, and the leader must keep trying to reach it)...
const LEADER_IDLE_TICKS: u32 = 30;
/// ...and a follower after this many ticks without a word from its leader
/// (more than the 2-tick heartbeat, less than the 10-tick election
/// timeout) while the leader's node is alive: its leader has hibernated.
const FOLLOWER_QUIET_TICKS: u32 = 4;

/// Why a request did not succeed here; the router decides what to do next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("not the leader (leader hint: node {0})")]
    NotLeader(u64),
    #[error("fenced: {0}")]
    Fenced(String),
    /// It did not take effect; trying again (here or elsewhere) is safe.
    #[error("retry: {0}")]
    Retry(String),
    #[error("{0}")]
    Failed(String),
    /// A write whose outcome is unknown: it may have taken effect, so it
    /// must not be retried (a retry could apply it twice, after a later
    /// write to the same blocks). The client gets an I/O error.
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    /// This replica cannot answer for that log index (an epoch-at request
    /// for an index its attach history and log do not cover); another
    /// replica may.
    #[error("not covered here: {0}")]
    NotCovered(String),
}

pub type Reply<T> = oneshot::Sender<Result<T, GroupError>>;

pub enum GroupEvent {
    Raft(Message),
    Write {
        epoch: u64,
        op: VolumeOp,
        /// The reply must wait for quorum fdatasync even in quorum-receipt mode.
        fua: bool,
        reply: Reply<u64>,
        /// The client request's tracing span, so its proposal and commit
        /// show up under it (disabled, and free, below debug level).
        span: tracing::Span,
    },
    Read {
        offset: u64,
        length: u64,
        reply: Reply<Vec<Segment>>,
    },
    /// Quorum-receipt mode, leader only: answered once everything in the
    /// leader's log is committed (durable on a quorum).
    Flush {
        reply: Reply<()>,
    },
    /// Read the applied state without ReadIndex, once it has applied at
    /// least `min_index`: only for snapshot copies.
    ReadLocal {
        offset: u64,
        length: u64,
        min_index: u64,
        reply: Reply<Vec<Segment>>,
    },
    /// Epoch and attached node as of a log index, for a snapshot receiver.
    EpochAt {
        index: u64,
        reply: Reply<(u64, u64)>,
    },
    /// The snapshot copy finished: the volume as of `index` is in the image.
    Installed {
        index: u64,
        result: Result<(u64, u64), String>,
    },
    TransferLeader(u64),
    Persisted(u64),
    Destaged {
        index: u64,
        /// The image was made durable and volume.state records `index`.
        checkpoint: bool,
        result: Result<(), String>,
    },
    /// The node's log wants this group's oldest entries gone: checkpoint at
    /// the next chance (see [`Checkpoints`]).
    Checkpoint,
    Unreachable(u64),
    /// Stop (the volume is being deleted).
    Stop,
    /// Stop after a last checkpoint, so a restart has no log to replay;
    /// answered once stopped. The node is shutting down.
    Shutdown(oneshot::Sender<()>),
}

/// What `volume info` and the router read about a group, refreshed by the driver.
#[derive(Debug, Clone, Default)]
pub struct GroupStatus {
    pub role: &'static str,
    pub leader: u64,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_index: u64,
    pub first_index: u64,
    pub epoch: u64,
    pub attached_node: u64,
    pub cache_bytes: u64,
    pub destaged_index: u64,
    /// (node, match index, state) as the leader sees it.
    pub progress: Vec<(u64, u64, &'static str)>,
    /// Bytes of log entries each follower is missing (leader only).
    pub lag_bytes: Vec<(u64, u64)>,
    /// Idle: not ticking until a request, a peer message or a node going
    /// down wakes it.
    pub hibernating: bool,
    /// Leader only: age of the oldest acknowledged write that some replica
    /// lacks (0: every replica holds every acknowledged write).
    pub rpo_exposure_s: f64,
    /// Leader only: replicas holding every acknowledged write.
    pub replicas_in_sync: u64,
    /// Leader only: per follower, age of the oldest acknowledged entry it lacks.
    pub lag_seconds: Vec<(u64, f64)>,
    /// The I/O pause of the last leader change this replica won.
    pub failover_pause_s: f64,
    /// Leader changes this replica has seen since it started.
    pub leader_changes: u64,
    /// A snapshot copy under way: (bytes copied, volume bytes).
    pub rebuild_progress: Option<(u64, u64)>,
    pub recovering: bool,
}

#[derive(Clone)]
pub struct GroupHandle {
    pub group_id: u64,
    tx: mpsc::Sender<GroupEvent>,
    status: Arc<Mutex<GroupStatus>>,
}

impl GroupHandle {
    pub fn status(&self) -> GroupStatus {
        self.status.lock().expect("group status lock poisoned").clone()
    }

    /// The leader this replica knows of (0: none), without copying the rest
    /// of the status: the router asks on every request.
    pub fn leader(&self) -> u64 {
        self.status.lock().expect("group status lock poisoned").leader
    }

    /// Asks for a checkpoint without waiting; a full queue means the
    /// group is busy and checkpoints on its own bound soon anyway.
    pub fn request_checkpoint(&self) {
        let _ = self.tx.try_send(GroupEvent::Checkpoint);
    }

    pub async fn send(&self, ev: GroupEvent) -> Result<(), GroupError> {
        self.tx
            .send(ev)
            .await
            .map_err(|_| GroupError::Retry("replica stopped".into()))
    }

    /// For the transport's inbound path: never wait on a busy group (Raft retransmits).
    pub fn try_send(&self, ev: GroupEvent) {
        let _ = self.tx.try_send(ev);
    }

    pub async fn write(&self, epoch: u64, op: VolumeOp, fua: bool) -> Result<u64, GroupError> {
        let (reply, rx) = oneshot::channel();
        self.send(GroupEvent::Write {
            epoch,
            op,
            fua,
            reply,
            span: tracing::Span::current(),
        })
        .await?;
        // Once queued, the write may have been proposed before the replica
        // stopped without answering: its outcome is unknown.
        rx.await
            .map_err(|_| GroupError::Indeterminate("the replica stopped before the write's outcome was known".into()))?
    }

    /// Quorum-receipt mode: waits until every write this leader holds,
    /// acknowledged or not, is durable on a quorum.
    pub async fn flush(&self) -> Result<(), GroupError> {
        let (reply, rx) = oneshot::channel();
        self.send(GroupEvent::Flush { reply }).await?;
        rx.await.map_err(|_| GroupError::Retry("replica stopped".into()))?
    }

    /// Epoch and attached node as of log `index`, if this replica's attach
    /// history or log covers it (else `NotCovered`: ask another replica).
    pub async fn epoch_at(&self, index: u64) -> Result<(u64, u64), GroupError> {
        let (reply, rx) = oneshot::channel();
        self.send(GroupEvent::EpochAt { index, reply }).await?;
        rx.await.map_err(|_| GroupError::Retry("replica stopped".into()))?
    }

    /// `local_min_index`: read the applied state directly once it reaches
    /// that index (snapshot copies); None: a linearizable read.
    pub async fn read(
        &self,
        offset: u64,
        length: u64,
        local_min_index: Option<u64>,
    ) -> Result<Vec<Segment>, GroupError> {
        let (reply, rx) = oneshot::channel();
        let ev = match local_min_index {
            Some(min_index) => GroupEvent::ReadLocal {
                offset,
                length,
                min_index,
                reply,
            },
            None => GroupEvent::Read { offset, length, reply },
        };
        self.send(ev).await?;
        rx.await.map_err(|_| GroupError::Retry("replica stopped".into()))?
    }
}

/// A write (or attach) from this node's NBD server or router, as queued
/// for proposal or parked for room in the cache.
struct WriteRequest {
    epoch: u64,
    op: VolumeOp,
    fua: bool,
    reply: Reply<u64>,
    span: tracing::Span,
}

struct PendingWrite {
    /// None once acknowledged on quorum receipt.
    reply: Option<Reply<u64>>,
    proposed: Instant,
    span: tracing::Span,
    index: u64,
    /// May be acknowledged on quorum receipt, under this writer epoch.
    early_epoch: Option<u64>,
}

/// Where a driver's tokens start. A token is also a ReadIndex round's
/// context, which the leader keys its pending rounds by and which comes back
/// in heartbeat responses: one node's rounds must never share a context with
/// another's, or with its own before a restart (a late response to the old
/// round would confirm the new one). So the node id takes the top 16 bits and
/// the start time (nanoseconds, 32 bits of them) the next: a restart begins
/// far from where the last run was.
fn first_token(node_id: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    ((node_id & 0xffff) << 48) | ((nanos & 0xffff_ffff) << 16)
}

/// One ReadIndex round: the reads it confirms (none: a lease renewal), and,
/// if this replica led when it asked, when and in which term (a confirmed
/// round extends the lease from then).
#[derive(Default)]
struct ReadBatch {
    reads: Vec<u64>,
    lease_from: Option<(Instant, u64)>,
}

struct PendingRead {
    offset: u64,
    length: u64,
    reply: Reply<Vec<Segment>>,
    asked: Instant,
    /// Set once the ReadIndex is confirmed.
    index: Option<u64>,
    /// Quorum-receipt mode: writes acknowledged before the read arrived
    /// must be applied before it is served, committed or not yet.
    min_applied: u64,
}

/// A snapshot install under way.
struct Install {
    index: u64,
    term: u64,
    /// The epoch and attached node as of `index` the leader stamped on the
    /// snapshot (None: ask the replicas).
    epoch: Option<(u64, u64)>,
    persist: Option<PersistTask>,
    conf_state: Option<ConfState>,
    /// The copy waits for a destage in flight: its old extents must not
    /// land over copied blocks.
    copy_started: bool,
}

/// Chunk of a snapshot copy: big enough to stream, small enough to bound memory.
const COPY_CHUNK_BYTES: u64 = 4 * 1024 * 1024;

struct Driver {
    /// The install's log write (its Ready number) and the state to record
    /// once it is durable; no campaign before then.
    install_persist: Option<(u64, crate::catalog::AppliedState)>,
    /// Ready numbers handed to the log writer and not yet durable, oldest first.
    persisting: VecDeque<u64>,
    /// The newest Ready that had nothing to make durable (see
    /// [`Driver::persist_or_skip`]), waiting for an earlier one's write.
    persist_deferred: u64,
    /// The hard state of a skipped Ready, written with the next log write.
    hard_state_unwritten: Option<trireme_replica::raft::eraftpb::HardState>,
    /// Reads waiting for the next ReadIndex round, and the rounds asked:
    /// one round confirms every read that arrived before it was asked.
    unindexed: Vec<u64>,
    read_batches: HashMap<u64, ReadBatch>,
    /// The read lease (term, until): see [`READ_LEASE`].
    lease: Option<(u64, Instant)>,
    /// No lease before this (a leadership transfer was asked).
    lease_hold_until: Option<Instant>,
    /// When this driver started: no vote before [`VOTE_HOLD_AFTER_START`].
    started: Instant,
    installing: Option<Install>,
    /// Rebuilding after data loss: vote requests are ignored until the
    /// replica has applied what the leader had committed when it first
    /// heard from it (or installed a snapshot).
    recovering: bool,
    leader_commit_seen: u64,
    group_id: u64,
    volume: String,
    replica: Replica,
    store: Arc<UringStore>,
    /// volume.state: the state machine as of the destaged index.
    state_path: std::path::PathBuf,
    transport: Transport,
    log: LogWriter,
    tx: mpsc::Sender<GroupEvent>,
    status: Arc<Mutex<GroupStatus>>,
    next_token: u64,
    writes: HashMap<u64, PendingWrite>,
    parked: VecDeque<WriteRequest>,
    /// Writes taken from the queue in this turn of the loop, not yet
    /// proposed (see [`Driver::propose_queued`]), and their data bytes.
    proposing: Vec<WriteRequest>,
    proposing_bytes: usize,
    reads: BTreeMap<u64, PendingRead>,
    destaging: bool,
    /// The last checkpoint: the image durably holds everything up to here
    /// (volume.state says so), and the durable log starts at or below it.
    destaged_index: u64,
    /// Everything up to here is in the image file (maybe only in the page
    /// cache) and no longer in the write-back cache.
    written_index: u64,
    last_destage: Instant,
    last_checkpoint: Instant,
    /// Bytes of entries this replica has sent to its log, ever, and as of
    /// the start of the last checkpoint.
    logged_bytes: u64,
    checkpoint_logged_bytes: u64,
    checkpoint_requested: bool,
    checkpoints: Checkpoints,
    liveness: Arc<Liveness>,
    hibernating: bool,
    election_heard: bool,
    /// A leader whose node liveness reported down, until a new leader is known.
    dead_leader: Option<u64>,
    /// When this leader last handed leadership back to the attached node.
    last_leader_return: Option<Instant>,
    last_campaign: Option<Instant>,
    metrics: GroupMetrics,
    /// Leader only: when recent indexes were proposed (RPO and lag ages).
    clock: IndexClock,
    replica_count: u64,
    /// The leader as of the last turn, and the last non-zero one.
    known_leader: u64,
    previous_leader: u64,
    /// Last message from the current leader (failover pause estimate).
    last_leader_contact: Option<Instant>,
    failover_pause_s: f64,
    leader_changes: u64,
    /// Bytes copied by the snapshot copy under way.
    rebuild_copied: Arc<std::sync::atomic::AtomicU64>,
    /// Ticks since the last sign of activity (see `note_activity`).
    quiet_ticks: u32,
    receipt: ReceiptMode,
}

/// The leader's side of quorum-receipt mode (unused in quorum-fsync).
///
/// Why a write acknowledged on receipt is safe to acknowledge: a quorum
/// holds it, so any new leader must come from that quorum's logs (a voter
/// refuses a candidate whose log is behind its own, unstable entries
/// included) unless a quorum crashes first: the loss window DRBD's
/// protocol B has, at most one group commit wide. What it must not do is
/// acknowledge a write that the state machine would then refuse: so only
/// writes past `barrier` (every entry an earlier leader left, and every
/// attach this one proposed) are acknowledged early, once the barrier is
/// applied, and only under the epoch the state machine then holds.
#[derive(Default)]
struct ReceiptMode {
    on: bool,
    /// The term `received` belongs to.
    term: u64,
    /// Voter to the highest index it reported holding in `term`.
    received: HashMap<u64, u64>,
    barrier: u64,
    /// Highest index acknowledged on receipt: reads wait for it.
    acked: u64,
    /// Flushes waiting for the commit index to reach an index.
    flushes: Vec<(u64, Reply<()>)>,
}

/// Everything a replica's driver starts from.
pub struct GroupSetup {
    pub group_id: u64,
    pub volume: String,
    pub replica: Replica,
    pub destaged_index: u64,
    pub store: Arc<UringStore>,
    /// volume.state, written at each destage.
    pub state_path: std::path::PathBuf,
    pub transport: Transport,
    pub log: LogWriter,
    /// The replica lost its data and is being rebuilt: it must not vote
    /// until it has caught up.
    pub recovering: bool,
    pub liveness: Arc<Liveness>,
    /// Replicas the volume is configured with.
    pub replica_count: u64,
    /// Acknowledge writes on quorum receipt (see [`ReceiptMode`]).
    pub receipt_mode: bool,
    pub checkpoints: Checkpoints,
}

/// Starts the driver task of a local replica.
pub fn spawn(setup: GroupSetup) -> GroupHandle {
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    let status = Arc::new(Mutex::new(GroupStatus::default()));
    let group_id = setup.group_id;
    let setup_volume = setup.volume.clone();
    let setup_node_id = setup.replica.id();
    let driver = Driver {
        group_id,
        volume: setup.volume,
        replica: setup.replica,
        store: setup.store,
        state_path: setup.state_path,
        transport: setup.transport,
        log: setup.log,
        tx: tx.clone(),
        status: status.clone(),
        installing: None,
        install_persist: None,
        persisting: VecDeque::new(),
        persist_deferred: 0,
        hard_state_unwritten: None,
        unindexed: Vec::new(),
        read_batches: HashMap::new(),
        lease: None,
        lease_hold_until: None,
        started: Instant::now(),
        recovering: setup.recovering,
        leader_commit_seen: 0,
        next_token: first_token(setup_node_id),
        writes: HashMap::new(),
        parked: VecDeque::new(),
        proposing: Vec::new(),
        proposing_bytes: 0,
        reads: BTreeMap::new(),
        destaging: false,
        destaged_index: setup.destaged_index,
        written_index: setup.destaged_index,
        last_destage: Instant::now(),
        last_checkpoint: Instant::now(),
        logged_bytes: 0,
        checkpoint_logged_bytes: 0,
        checkpoint_requested: false,
        checkpoints: setup.checkpoints,
        liveness: setup.liveness,
        hibernating: false,
        election_heard: false,
        dead_leader: None,
        last_leader_return: None,
        last_campaign: None,
        metrics: GroupMetrics::new(&setup_volume),
        clock: IndexClock::default(),
        replica_count: setup.replica_count,
        known_leader: 0,
        previous_leader: 0,
        last_leader_contact: None,
        failover_pause_s: 0.0,
        leader_changes: 0,
        rebuild_copied: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        quiet_ticks: 0,
        receipt: ReceiptMode {
            on: setup.receipt_mode,
            ..ReceiptMode::default()
        },
    };
    tokio::spawn(driver.run(rx));
    GroupHandle { group_id, tx, status }
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::Receiver<GroupEvent>) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut node_changes = self.liveness.subscribe();
        loop {
            let was_hibernating = self.hibernating;
            tokio::select! {
                _ = ticker.tick(), if !self.hibernating => self.on_tick(),
                ev = rx.recv() => match ev {
                    None | Some(GroupEvent::Stop) => break,
                    Some(GroupEvent::Shutdown(done)) => return self.shut_down(&mut rx, done).await,
                    Some(ev) => self.handle(ev),
                },
                // A peer node went down or came back: a hibernating
                // follower may have lost its leader, and a hibernating
                // leader may have a follower to catch up.
                _ = node_changes.changed() => self.on_node_change(),
            }
            if !self.proposing.is_empty() {
                // A write woke this task, and the NBD connection that sent it
                // has usually parsed more: let those tasks queue theirs
                // first, so they go out in this step and this Ready (under
                // 4k QD32, 2 Readies per log write instead of 7).
                tokio::task::yield_now().await;
            }
            // Take whatever else is queued before polling, so one Ready
            // (one log write) covers a burst of proposals: group commit.
            for _ in 0..256 {
                match rx.try_recv() {
                    Ok(GroupEvent::Stop) => return self.stop(),
                    Ok(GroupEvent::Shutdown(done)) => return self.shut_down(&mut rx, done).await,
                    Ok(ev) => self.handle(ev),
                    Err(_) => break,
                }
            }
            self.drain_ready();
            if was_hibernating && !self.hibernating {
                // Tick a full period after waking, not at once.
                ticker.reset();
            }
        }
        self.stop();
    }

    fn on_node_change(&mut self) {
        if self.hibernating {
            self.wake("a peer node changed state");
        }
        // The leader's node is gone: rather than wait out a randomized
        // election timeout (1-2 s after its last heartbeat), the lowest-id
        // live voter campaigns at once. Only one does, so the survivors do
        // not split the vote; the others grant it (they are out of their
        // leader lease by the time liveness gives up on a node, 1 s). If
        // the leader is in fact alive and only cut off from us, pre-vote
        // fails against voters that still hear it.
        let leader = self.replica.leader_id();
        if leader == 0
            || self.replica.is_leader()
            || self.liveness.is_alive(leader)
            || self.recovering
            || self.installing.is_some()
            || self.install_persist.is_some()
        {
            return;
        }
        self.replica.expire_leader_lease();
        self.retry_unconfirmed_reads("read index not confirmed: the leader's node is down", |_| true);
        self.dead_leader = Some(leader);
        self.campaign_for_dead_leader();
    }

    /// Campaigns if the leader's node is down and this replica is the
    /// lowest-id live voter. Repeated from the tick (every few ticks) until
    /// someone leads: a voter whose own liveness noticed the death a moment
    /// later may have refused the first try.
    fn transfer_leadership(&mut self, to: u64) {
        if self.replica.is_leader() && to != self.replica.id() {
            // The target's campaign overrides every follower's leader
            // lease, so this leader's read lease ends now.
            self.lease = None;
            self.lease_hold_until = Some(Instant::now() + LEASE_HOLD_AFTER_TRANSFER);
            self.replica.transfer_leader(to);
        }
    }

    /// Leadership follows the consumer (DESIGN.md 7), not only at attach: a
    /// leader elected elsewhere (its predecessor's node restarted, or an
    /// election while the attached node was out of reach) hands leadership
    /// back to the attached node once that node is alive and its replica
    /// holds the whole log. Otherwise every write of the consumer takes an
    /// extra hop, here and back, for as long as this node stays up. At most
    /// once per [`LEADER_RETURN_INTERVAL`], so a node that cannot keep
    /// leadership is not handed it over and over.
    fn return_leadership(&mut self) {
        let attached = self.replica.state().attached_node;
        if !self.replica.is_leader()
            || self.replica.is_transferring()
            || attached == 0
            || attached == self.replica.id()
            || !self.liveness.is_alive(attached)
            || self
                .last_leader_return
                .is_some_and(|t| t.elapsed() < LEADER_RETURN_INTERVAL)
        {
            return;
        }
        let last = self.replica.last_index();
        if !self
            .replica
            .progress()
            .iter()
            .any(|(id, matched, _)| *id == attached && *matched == last)
        {
            return;
        }
        self.last_leader_return = Some(Instant::now());
        info!(group = self.group_id, volume = %self.volume, to = attached, "handing leadership back to the attached node");
        self.transfer_leadership(attached);
    }

    fn campaign_for_dead_leader(&mut self) {
        let Some(dead) = self.dead_leader else { return };
        let leader = self.replica.leader_id();
        if self.replica.is_leader() || (leader != 0 && leader != dead) || self.liveness.is_alive(dead) {
            self.dead_leader = None;
            return;
        }
        if self.last_campaign.is_some_and(|t| t.elapsed() < 3 * TICK) {
            return;
        }
        let me = self.replica.id();
        let first_live = self
            .replica
            .voters()
            .into_iter()
            .find(|v| *v != dead && self.liveness.is_alive(*v));
        if first_live == Some(me) {
            info!(group = self.group_id, volume = %self.volume, leader = dead, "leader's node is down; campaigning");
            self.last_campaign = Some(Instant::now());
            if let Err(e) = self.replica.campaign() {
                debug!(group = self.group_id, "campaign failed: {e}");
            }
        }
    }

    /// Answers the reads still waiting for their ReadIndex that `which`
    /// picks with Retry, and forgets rounds no read waits for any more.
    fn retry_unconfirmed_reads(&mut self, why: &str, which: impl Fn(&PendingRead) -> bool) {
        let giving_up: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.index.is_none() && which(r))
            .map(|(t, _)| *t)
            .collect();
        for t in giving_up {
            if let Some(r) = self.reads.remove(&t) {
                let _ = r.reply.send(Err(GroupError::Retry(why.to_string())));
            }
        }
        let reads = &self.reads;
        // A lease renewal (no reads) stays while it may still extend the
        // lease: this replica leads, and it was asked lately.
        let leading = self.replica.is_leader();
        self.read_batches.retain(|_, b| match b.reads.is_empty() {
            true => leading && b.lease_from.is_some_and(|(a, _)| a.elapsed() <= READ_INDEX_TIMEOUT),
            false => b.reads.iter().any(|t| reads.contains_key(t)),
        });
        self.unindexed.retain(|t| reads.contains_key(t));
    }

    fn wake(&mut self, why: &str) {
        self.quiet_ticks = 0;
        if self.hibernating {
            self.hibernating = false;
            debug!(group = self.group_id, volume = %self.volume, why, "waking from hibernation");
        }
    }

    /// Whether `ev` is a sign the group is in use. Heartbeat responses are
    /// not: they are the leader's own heartbeats coming back. A heartbeat
    /// is, for a follower: its leader is awake.
    /// An election heard of keeps a follower awake until a leader speaks:
    /// a candidate on a node that restarted faster than liveness noticed
    /// needs voters that tick out their leader lease.
    fn note_activity(&mut self, ev: &GroupEvent) {
        let active = match ev {
            GroupEvent::Raft(m) => {
                match m.get_msg_type() {
                    MessageType::MsgRequestVote | MessageType::MsgRequestPreVote => self.election_heard = true,
                    MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot => {
                        self.election_heard = false;
                        self.last_leader_contact = Some(Instant::now());
                    }
                    _ => {}
                }
                m.get_msg_type() != MessageType::MsgHeartbeatResponse
            }
            GroupEvent::Write { .. }
            | GroupEvent::Read { .. }
            | GroupEvent::Flush { .. }
            | GroupEvent::ReadLocal { .. }
            | GroupEvent::EpochAt { .. }
            | GroupEvent::Installed { .. }
            | GroupEvent::TransferLeader(_) => true,
            // The transport reports a down peer again at every failed
            // reconnect; that must not keep every group awake.
            GroupEvent::Unreachable(_)
            | GroupEvent::Persisted(_)
            | GroupEvent::Destaged { .. }
            | GroupEvent::Checkpoint
            | GroupEvent::Stop
            | GroupEvent::Shutdown(_) => false,
        };
        if active {
            self.wake("activity");
        }
    }

    /// Whether this group may stop ticking. Only ever true in a settled
    /// state: nothing in flight, everything applied and destaged, and (as
    /// leader) every follower holding the whole log, (as follower) a
    /// leader on a live node that has gone quiet.
    fn may_hibernate(&self) -> bool {
        let settled = self.writes.is_empty()
            && self.parked.is_empty()
            && self.receipt.flushes.is_empty()
            && self.reads.is_empty()
            && self.unindexed.is_empty()
            && self.read_batches.is_empty()
            && self.installing.is_none()
            && self.install_persist.is_none()
            && !self.destaging
            && !self.recovering
            && self.replica.state().cache.bytes() == 0
            && !self.image_unsynced()
            && self.replica.applied_index() == self.replica.commit_index();
        if !settled {
            return false;
        }
        if self.replica.is_leader() {
            let last = self.replica.last_index();
            self.quiet_ticks >= LEADER_IDLE_TICKS
                && self.replica.commit_index() == last
                && self.replica.progress().iter().all(|(_, matched, _)| *matched == last)
        } else {
            self.leader_hibernating()
        }
    }

    /// A follower's leader, on a live node, has gone quiet: it hibernated.
    /// Such a follower hibernates too once settled; until then (a destage
    /// or checkpoint still to finish) it ticks for them, but its election
    /// clock stands still as if it hibernated: a leader that hibernates
    /// first would otherwise lose its leadership to an election a second
    /// later, and with it the attached node its local writes. A dead
    /// leader's node is left by liveness (`on_node_change`).
    fn leader_hibernating(&self) -> bool {
        let leader = self.replica.leader_id();
        !self.replica.is_leader()
            && leader != 0
            && !self.election_heard
            && self.quiet_ticks >= FOLLOWER_QUIET_TICKS
            && self.liveness.is_alive(leader)
    }

    fn stop(&mut self) {
        info!(group = self.group_id, volume = %self.volume, "replica stopped");
    }

    /// A last checkpoint, then stop. Waits at most [`SHUTDOWN_CHECKPOINT`]:
    /// the log holds everything anyway, so a checkpoint cut short only
    /// costs the restart a replay. Whatever else arrives meanwhile is
    /// dropped (the node's NBD sessions are already closed).
    async fn shut_down(&mut self, rx: &mut mpsc::Receiver<GroupEvent>, done: oneshot::Sender<()>) {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_CHECKPOINT;
        loop {
            if !self.destaging {
                if self.replica.state().cache.bytes() == 0 && !self.image_unsynced() {
                    break;
                }
                self.checkpoint_now();
                if !self.destaging {
                    // Nothing it may destage now (a snapshot install).
                    break;
                }
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(GroupEvent::Destaged {
                    index,
                    checkpoint,
                    result,
                })) => self.on_destaged(index, checkpoint, result),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    warn!(group = self.group_id, volume = %self.volume, "no last checkpoint before stopping; a restart replays the log");
                    break;
                }
            }
        }
        self.stop();
        let _ = done.send(());
    }

    /// A log write that no Ready waits for (membership, destage point).
    /// Hands a Ready's log write to the log writer, unless the Ready only
    /// moved the commit index: then nothing in it must be durable (raft's
    /// `must_sync` is false: no entries, snapshot, term or vote), and with
    /// no earlier write of this group in flight it is acknowledged here,
    /// its messages sent at once. At queue depth 1 every commit on a leader
    /// was such a Ready, and each cost a log round: a wake-up of a log
    /// thread, a write, and a wake-up of this task for its Persisted. The
    /// commit index it carries rides with the group's next log write; one
    /// lost in a crash is learned again from the leader, and volume.state
    /// restores the part this replica destaged (catalog.rs).
    fn persist_or_skip(&mut self, task: PersistTask, conf_state: Option<ConfState>) {
        let nothing_durable =
            task.entries.is_empty() && task.snapshot.is_none() && !task.must_sync && conf_state.is_none();
        if nothing_durable && (self.persisting.is_empty() || task.messages_after.is_empty()) {
            if let Some(hs) = task.hard_state {
                self.hard_state_unwritten = Some(hs);
            }
            if self.persisting.is_empty() {
                self.transport.send_all(self.group_id, &task.messages_after);
                self.on_persisted(task.number);
            } else {
                // Acknowledged with the write in flight before it: raft takes
                // Ready numbers as "this one and all before it".
                self.persist_deferred = task.number;
            }
            return;
        }
        if let (Some(first), Some(last)) = (task.entries.first(), task.entries.last()) {
            debug!(
                group = self.group_id,
                number = task.number,
                first = first.index,
                last = last.index,
                "log write submitted"
            );
        }
        self.logged_bytes += task.entries.iter().map(|e| e.data.len() as u64).sum::<u64>();
        let must_sync = task.must_sync || conf_state.is_some();
        let write = GroupWrite {
            group: self.group_id,
            entries: task.entries,
            hard_state: task.hard_state,
            conf_state,
            ..GroupWrite::default()
        };
        self.submit_persist(write, task.number, task.messages_after, must_sync);
    }

    /// Queues the log write of Ready `number`, with the hard state of a
    /// skipped Ready if this one has none of its own (a newer one replaces it).
    fn submit_persist(&mut self, mut write: GroupWrite, number: u64, messages_after: Vec<Message>, must_sync: bool) {
        let unwritten = self.hard_state_unwritten.take();
        if write.hard_state.is_none() {
            write.hard_state = unwritten;
        }
        self.persisting.push_back(number);
        self.log.submit(LogJob {
            write,
            number: Some(number),
            messages_after,
            must_sync,
            notify: self.tx.clone(),
        });
    }

    fn log_write(&self, write: GroupWrite) {
        self.log.submit(LogJob {
            write,
            number: None,
            messages_after: Vec::new(),
            must_sync: true,
            notify: self.tx.clone(),
        });
    }

    fn token(&mut self) -> u64 {
        self.next_token = self.next_token.wrapping_add(1);
        self.next_token
    }

    fn handle(&mut self, ev: GroupEvent) {
        self.note_activity(&ev);
        if !matches!(ev, GroupEvent::Write { .. }) {
            // Whatever comes next (a flush, a read, a peer's message) sees
            // the writes that came before it already proposed.
            self.propose_queued();
        }
        match ev {
            GroupEvent::Raft(m) => {
                let mut m = m;
                if let Some((term, index)) = receipt_of(&m) {
                    self.on_receipt(m.from, term, index);
                    return;
                }
                // Quorum-receipt mode: what the leader's append held, to
                // report once it is in the log (before it is durable).
                let append = (self.receipt.on && m.get_msg_type() == MessageType::MsgAppend)
                    .then(|| m.entries.last().map(|e| (m.from, m.term, e.index, e.term)))
                    .flatten();
                if (self.installing.is_some() || self.install_persist.is_some())
                    && m.get_msg_type() == MessageType::MsgTimeoutNow
                {
                    // Same reason as in on_tick: no campaign mid-install.
                    return;
                }
                if matches!(
                    m.get_msg_type(),
                    MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
                ) && self.replica.leader_id() != 0
                    && !self.liveness.is_alive(self.replica.leader_id())
                {
                    self.replica.expire_leader_lease();
                }
                if matches!(
                    m.get_msg_type(),
                    MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
                ) && self.started.elapsed() < VOTE_HOLD_AFTER_START
                {
                    debug!(
                        group = self.group_id,
                        from = m.from,
                        "vote request ignored: started too recently (read lease)"
                    );
                    return;
                }
                if self.recovering {
                    match m.get_msg_type() {
                        MessageType::MsgRequestVote | MessageType::MsgRequestPreVote => return,
                        MessageType::MsgAppend => self.leader_commit_seen = self.leader_commit_seen.max(m.commit),
                        // The leader still believes this replica holds what it
                        // held before its data was lost; a heartbeat's commit
                        // past our log would trip raft's invariant check.
                        MessageType::MsgHeartbeat => m.commit = m.commit.min(self.replica.last_index()),
                        _ => {}
                    }
                }
                if let Err(e) = self.replica.step(m) {
                    debug!(group = self.group_id, "dropped a raft message: {e}");
                    return;
                }
                if let Some((leader, term, index, entry_term)) = append
                    && let Some(receipt) = self.replica.receipt_for(leader, term, index, entry_term)
                {
                    self.transport.send(leader, self.group_id, receipt);
                }
            }
            GroupEvent::Write {
                epoch,
                op,
                fua,
                reply,
                span,
            } => self.propose(WriteRequest {
                epoch,
                op,
                fua,
                reply,
                span,
            }),
            GroupEvent::Flush { reply } => {
                if !self.replica.is_leader() {
                    let _ = reply.send(Err(GroupError::NotLeader(self.replica.leader_id())));
                } else {
                    self.receipt.flushes.push((self.replica.last_index(), reply));
                }
            }
            GroupEvent::Read { offset, length, reply } => {
                // Only the leader knows which writes it acknowledged on
                // receipt and must apply before a read.
                if self.receipt.on && !self.replica.is_leader() {
                    let _ = reply.send(Err(GroupError::NotLeader(self.replica.leader_id())));
                    return;
                }
                if self.installing.is_some() {
                    let _ = reply.send(Err(GroupError::Retry("replica is installing a snapshot".into())));
                    return;
                }
                if self.replica.leader_id() == 0 {
                    let _ = reply.send(Err(GroupError::NotLeader(0)));
                    return;
                }
                let token = self.token();
                // Under the lease, the commit index is the read index. Else
                // the ReadIndex round is asked once for every read that
                // arrived in this turn of the loop (batched in drain_ready).
                let index = self.lease_read_index();
                match index {
                    Some(_) => self.metrics.lease_reads.increment(1),
                    None => self.unindexed.push(token),
                }
                self.reads.insert(
                    token,
                    PendingRead {
                        offset,
                        length,
                        reply,
                        asked: Instant::now(),
                        index,
                        min_applied: self.receipt.acked,
                    },
                );
            }
            GroupEvent::ReadLocal {
                offset,
                length,
                min_index,
                reply,
            } => {
                let r = if self.installing.is_some() || self.replica.applied_index() < min_index {
                    Err(GroupError::Retry(format!(
                        "applied index {} has not reached {min_index}",
                        self.replica.applied_index()
                    )))
                } else {
                    Ok(self.replica.read(offset, length))
                };
                let _ = reply.send(r);
            }
            GroupEvent::EpochAt { index, reply } => {
                // Never a guess: only what the attach history (from the last
                // restart or install point) and the committed log cover.
                let r = self.replica.epoch_at(index).ok_or_else(|| {
                    let st = self.replica.state();
                    GroupError::NotCovered(format!(
                        "node {} knows the epoch from index {} to {} (applied {}), not at {index}",
                        self.replica.id(),
                        st.attach_history.first().map_or(0, |r| r.0),
                        self.replica.commit_index(),
                        st.applied_index,
                    ))
                });
                let _ = reply.send(r);
            }
            GroupEvent::Installed { index, result } => self.on_installed(index, result),
            GroupEvent::TransferLeader(to) => self.transfer_leadership(to),
            GroupEvent::Persisted(number) => self.on_persisted(number),
            GroupEvent::Destaged {
                index,
                checkpoint,
                result,
            } => self.on_destaged(index, checkpoint, result),
            GroupEvent::Checkpoint => self.checkpoint_now(),
            GroupEvent::Unreachable(peer) => self.replica.report_unreachable(peer),
            GroupEvent::Stop | GroupEvent::Shutdown(_) => {}
        }
    }

    /// Queues a write for the next raft step (group commit into one append
    /// message per follower); a full batch is proposed at once.
    fn propose(&mut self, write: WriteRequest) {
        if let VolumeOp::Write { data, .. } = &write.op {
            self.proposing_bytes += data.len();
        }
        self.proposing.push(write);
        if self.proposing_bytes >= PROPOSE_BATCH_BYTES {
            self.propose_queued();
        }
    }

    /// Proposes the queued writes as one raft step.
    fn propose_queued(&mut self) {
        if self.proposing.is_empty() {
            return;
        }
        let writes = std::mem::take(&mut self.proposing);
        self.proposing_bytes = 0;
        let tokens: Vec<u64> = writes.iter().map(|_| self.token()).collect();
        let proposals = writes
            .iter()
            .zip(&tokens)
            .map(|(w, &token)| Proposal {
                token,
                epoch: w.epoch,
                op: w.op.clone(),
            })
            .collect();
        let results = self.replica.propose_batch(proposals);
        let now = Instant::now();
        for ((write, token), result) in writes.into_iter().zip(tokens).zip(results) {
            let WriteRequest {
                epoch,
                op,
                fua,
                reply,
                span,
            } = write;
            let attach = matches!(op, VolumeOp::Attach { .. });
            match result {
                Ok(index) => {
                    debug!(parent: &span, group = self.group_id, index, "proposed");
                    self.clock.record(index, now);
                    self.metrics.proposals.increment(1);
                    if attach {
                        self.receipt.barrier = self.receipt.barrier.max(index);
                    }
                    self.writes.insert(
                        token,
                        PendingWrite {
                            reply: Some(reply),
                            proposed: now,
                            span,
                            index,
                            early_epoch: (self.receipt.on && !fua && !attach).then_some(epoch),
                        },
                    );
                }
                Err(ProposeError::NotLeader { leader_hint }) => {
                    let _ = reply.send(Err(GroupError::NotLeader(leader_hint)));
                }
                Err(ProposeError::StaleEpoch { epoch, current }) => {
                    let _ = reply.send(Err(GroupError::Fenced(format!(
                        "writer epoch {epoch} is older than the volume's epoch {current}"
                    ))));
                }
                Err(ProposeError::CacheFull { .. }) => {
                    // Backpressure: park it until a destage frees room.
                    if self.parked.len() >= MAX_PARKED_WRITES {
                        let _ = reply.send(Err(GroupError::Retry("write-back cache full".into())));
                    } else {
                        self.parked.push_back(WriteRequest {
                            epoch,
                            op,
                            fua,
                            reply,
                            span,
                        });
                        self.start_destage();
                    }
                }
                Err(e @ ProposeError::Raft(_)) => {
                    let _ = reply.send(Err(GroupError::Retry(e.to_string())));
                }
            }
        }
    }

    /// A follower holds the leader's log up to `index` (quorum-receipt mode).
    fn on_receipt(&mut self, from: u64, term: u64, index: u64) {
        if !self.receipt.on || !self.replica.is_leader() || term != self.replica.term() || term != self.receipt.term {
            return;
        }
        let held = self.receipt.received.entry(from).or_default();
        *held = (*held).max(index);
    }

    /// Quorum-receipt mode: acknowledges the writes a quorum holds, and
    /// answers the flushes whose index is committed.
    fn ack_on_receipt(&mut self) {
        let commit = self.replica.commit_index();
        if !self.receipt.flushes.is_empty() {
            let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.receipt.flushes)
                .into_iter()
                .partition(|(i, _)| *i <= commit);
            self.receipt.flushes = waiting;
            for (_, reply) in done {
                let _ = reply.send(Ok(()));
            }
        }
        if !self.replica.is_leader()
            || self.receipt.term != self.replica.term()
            || self.replica.applied_index() < self.receipt.barrier
        {
            return;
        }
        let held = self.replica.quorum_received(&self.receipt.received);
        let epoch = self.replica.state().epoch;
        let barrier = self.receipt.barrier;
        let mut acked = self.receipt.acked;
        let mut count = 0;
        for w in self.writes.values_mut() {
            if w.index > barrier
                && w.index <= held
                && w.early_epoch == Some(epoch)
                && let Some(reply) = w.reply.take()
            {
                acked = acked.max(w.index);
                count += 1;
                let _ = reply.send(Ok(w.index));
            }
        }
        self.receipt.acked = acked;
        if count > 0 {
            self.metrics.receipt_acks.increment(count);
        }
    }

    fn on_tick(&mut self) {
        // No elections while a snapshot is being installed: raft would look
        // for entries below the snapshot that are already gone.
        if self.installing.is_none() && self.install_persist.is_none() && !self.leader_hibernating() {
            self.replica.tick();
        }
        self.campaign_for_dead_leader();
        self.return_leadership();
        let now = Instant::now();
        self.retry_unconfirmed_reads("read index not confirmed in time", |r| {
            now.duration_since(r.asked) > READ_INDEX_TIMEOUT
        });
        let cached = self.replica.state().cache.bytes();
        if (cached > 0 && (cached >= DESTAGE_THRESHOLD_BYTES || self.last_destage.elapsed() >= DESTAGE_INTERVAL))
            || (self.image_unsynced() && self.checkpoint_due())
        {
            self.start_destage();
        }
        self.quiet_ticks = self.quiet_ticks.saturating_add(1);
        if self.may_hibernate() {
            debug!(group = self.group_id, volume = %self.volume, "hibernating");
            self.hibernating = true;
            self.publish(true);
            return;
        }
        self.publish(true);
    }

    fn drain_ready(&mut self) {
        self.propose_queued();
        if !self.unindexed.is_empty() {
            let reads = std::mem::take(&mut self.unindexed);
            self.ask_read_index(reads);
        }
        if self.recovering
            && self.installing.is_none()
            && self.leader_commit_seen > 0
            && self.replica.applied_index() >= self.leader_commit_seen
        {
            info!(group = self.group_id, volume = %self.volume, "rebuilt from the log; voting again");
            self.recovering = false;
        }
        // During a snapshot install raft's next Ready must wait until the
        // volume is copied and the snapshot is persisted.
        while self.installing.is_none()
            && let Some(out) = self.replica.poll()
        {
            self.dispatch(out);
        }
        if self.receipt.on {
            self.ack_on_receipt();
        }
        self.serve_reads();
        if self.replica.state().cache.bytes() >= DESTAGE_THRESHOLD_BYTES {
            self.start_destage();
        }
        self.note_leader();
        self.publish(false);
    }

    /// Counts leader changes and, when this replica takes over from
    /// another, estimates the I/O pause: from when the old leader was last
    /// heard (in this group, or its node at all, whichever is later) to now.
    fn note_leader(&mut self) {
        let leader = self.replica.leader_id();
        if leader == self.known_leader {
            return;
        }
        self.known_leader = leader;
        self.lease = None;
        // Raft drops ReadIndex requests in flight to a leader that is gone;
        // their readers retry now rather than after READ_INDEX_TIMEOUT.
        self.retry_unconfirmed_reads("read index not confirmed: the leader changed", |_| true);
        if leader == 0 {
            return;
        }
        self.leader_changes += 1;
        self.metrics.leader_changes.increment(1);
        let old = std::mem::replace(&mut self.previous_leader, leader);
        if leader == self.replica.id() {
            let now = Instant::now();
            // Entries before this term are aged from now on.
            self.clock.record(self.replica.commit_index() + 1, now);
            if old != 0 && old != leader {
                let heard = [self.last_leader_contact, self.liveness.last_heard(old)]
                    .into_iter()
                    .flatten()
                    .max();
                if let Some(t) = heard {
                    self.failover_pause_s = now.saturating_duration_since(t).as_secs_f64();
                    self.metrics.failover_pause.set(self.failover_pause_s);
                    info!(group = self.group_id, volume = %self.volume, from = old, pause_ms = (self.failover_pause_s * 1000.0) as u64, "took over leadership");
                }
            }
        }
    }

    fn dispatch(&mut self, out: Output) {
        // One write per peer for the whole Ready.
        self.transport.send_all(self.group_id, &out.messages);
        for m in &out.messages {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                // The snapshot message only carries the point to copy from; the
                // follower pulls the data itself, so it is "sent" once queued.
                self.replica.report_snapshot(m.to, true);
                self.metrics.snapshot_sends.increment(1);
            }
        }
        let mut persist = out.persist;
        if let Some(inst) = out.install {
            let (index, term) = (inst.index, inst.term);
            info!(group = self.group_id, volume = %self.volume, index, term, stamped = inst.epoch.is_some(), "installing a snapshot from the leader");
            self.metrics.snapshot_receives.increment(1);
            // The Ready's log write (which carries the snapshot) is held
            // until the copy is done: see on_installed.
            self.installing = Some(Install {
                index,
                term,
                epoch: inst.epoch,
                persist: persist.take(),
                conf_state: out.conf_state.clone(),
                copy_started: false,
            });
            if !self.destaging {
                self.start_copy(index);
            }
        }
        if let Some(task) = persist {
            self.persist_or_skip(task, out.conf_state.clone());
        } else if let Some(cs) = out.conf_state.clone().filter(|_| self.installing.is_none()) {
            let write = GroupWrite {
                group: self.group_id,
                conf_state: Some(cs),
                ..GroupWrite::default()
            };
            self.log_write(write);
        }
        for c in out.completions {
            if let Some(PendingWrite {
                reply, proposed, span, ..
            }) = self.writes.remove(&c.token)
            {
                self.metrics.commit_duration.record(proposed.elapsed().as_secs_f64());
                debug!(parent: &span, group = self.group_id, result = ?c.result, "committed and applied");
                let r = match c.result {
                    Ok(index) => Ok(index),
                    Err(ApplyError::Fenced {
                        entry_epoch,
                        current_epoch,
                    }) => Err(GroupError::Fenced(format!(
                        "writer epoch {entry_epoch} is older than the volume's epoch {current_epoch}"
                    ))),
                    // It did not take effect: the router proposes it again.
                    Err(ApplyError::Superseded) => Err(GroupError::Retry("superseded by a new leader".into())),
                    // It may have taken effect: never retried; EIO.
                    Err(ApplyError::Unknown) => {
                        let why = "a snapshot from the leader replaced this replica's log past the write";
                        warn!(group = self.group_id, volume = %self.volume, "a write's outcome is unknown: {why}");
                        Err(GroupError::Indeterminate(why.into()))
                    }
                    Err(ApplyError::Corrupt(e)) => Err(GroupError::Failed(format!("corrupt entry: {e}"))),
                };
                #[cfg(feature = "failpoints")]
                crate::failpoints::crash_point(crate::failpoints::CRASH_AFTER_APPLY);
                match reply {
                    Some(reply) => {
                        let _ = reply.send(r);
                    }
                    // Acknowledged on receipt: the barrier rules make this a
                    // broken invariant, unless a quorum crashed meanwhile.
                    None => {
                        if let Err(e) = r {
                            error!(group = self.group_id, volume = %self.volume, "a write acknowledged on quorum receipt did not take effect: {e}");
                        }
                    }
                }
            }
        }
        for rs in out.read_states {
            let mut b = [0u8; 8];
            if rs.request_ctx.len() == 8 {
                b.copy_from_slice(&rs.request_ctx);
                let batch = self.read_batches.remove(&u64::from_le_bytes(b)).unwrap_or_default();
                if let Some((asked, term)) = batch.lease_from {
                    self.extend_lease(asked, term);
                }
                for t in batch.reads {
                    if let Some(r) = self.reads.get_mut(&t) {
                        r.index = Some(rs.index);
                    }
                }
            }
        }
        if let Some((role, leader)) = out.role {
            info!(group = self.group_id, volume = %self.volume, ?role, leader, term = self.replica.term(), "role changed");
            if matches!(role, StateRole::Candidate | StateRole::PreCandidate) {
                self.metrics.elections.increment(1);
            }
            if role == StateRole::Leader {
                // Entries an earlier leader left may change the epoch.
                self.receipt.barrier = self.replica.last_index();
                self.receipt.term = self.replica.term();
                self.receipt.received.clear();
            }
            if role != StateRole::Leader {
                for (_, reply) in self.receipt.flushes.drain(..) {
                    let _ = reply.send(Err(GroupError::NotLeader(leader)));
                }
                self.clock.clear();
                // Parked writes would wait for a destage that may never free
                // room here; let the router find the new leader.
                for WriteRequest { reply, .. } in self.parked.drain(..) {
                    let _ = reply.send(Err(GroupError::NotLeader(leader)));
                }
            }
        }
    }

    /// Asks one ReadIndex round for `reads` (none: a lease renewal).
    fn ask_read_index(&mut self, reads: Vec<u64>) {
        let batch = self.token();
        self.read_batches.insert(
            batch,
            ReadBatch {
                reads,
                // Before raft makes the round's heartbeats: every follower
                // that confirms it heard this leader after this instant.
                lease_from: self.replica.is_leader().then(|| (Instant::now(), self.replica.term())),
            },
        );
        self.replica.read_index(batch);
    }

    fn lease_allowed(&self, now: Instant) -> bool {
        self.replica.is_leader() && !self.replica.is_transferring() && self.lease_hold_until.is_none_or(|t| now >= t)
    }

    /// A round this leader asked at `asked`, in `term`, was confirmed.
    fn extend_lease(&mut self, asked: Instant, term: u64) {
        if term != self.replica.term() || !self.lease_allowed(Instant::now()) {
            return;
        }
        let until = asked + READ_LEASE;
        if self.lease.is_none_or(|(t, u)| t != term || u < until) {
            self.lease = Some((term, until));
        }
    }

    /// The read index under a valid lease (the commit index: the lease
    /// says no other leader has committed anything), else None. Renews the
    /// lease ahead of its end while reads keep coming.
    fn lease_read_index(&mut self) -> Option<u64> {
        let now = Instant::now();
        let (term, until) = self.lease?;
        if term != self.replica.term() || now >= until || !self.lease_allowed(now) {
            self.lease = None;
            return None;
        }
        // A renewal is a round with no reads; one at a time.
        if until - now < READ_LEASE / 2 && !self.read_batches.values().any(|b| b.reads.is_empty()) {
            self.ask_read_index(Vec::new());
        }
        Some(self.replica.commit_index())
    }

    fn serve_reads(&mut self) {
        // A snapshot install moves the applied index to the snapshot point
        // at once, while the volume is still being copied: a read served
        // now would see the old image without the cache. Pending reads
        // wait for the install to finish.
        if self.installing.is_some() || self.install_persist.is_some() {
            return;
        }
        let applied = self.replica.applied_index();
        let ready: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.index.is_some_and(|i| i.max(r.min_applied) <= applied))
            .map(|(t, _)| *t)
            .collect();
        for t in ready {
            if let Some(r) = self.reads.remove(&t) {
                let _ = r.reply.send(Ok(self.replica.read(r.offset, r.length)));
            }
        }
    }

    fn start_destage(&mut self) {
        if self.destaging || self.installing.is_some() || self.install_persist.is_some() {
            return;
        }
        let index = self.replica.applied_index();
        let extents = self.replica.state().cache.dirty_up_to(index);
        let checkpoint = self.checkpoint_due();
        if extents.is_empty() && !(checkpoint && self.image_unsynced()) {
            return;
        }
        self.destaging = true;
        self.last_destage = Instant::now();
        if checkpoint {
            self.checkpoint_requested = false;
            self.checkpoint_started();
        }
        let store = self.store.clone();
        let tx = self.tx.clone();
        let applied = crate::catalog::AppliedState {
            destaged_index: index,
            epoch: self.replica.state().epoch,
            attached_node: self.replica.state().attached_node,
        };
        let state_path = self.state_path.clone();
        tokio::spawn(async move {
            let result = async {
                // Extents are disjoint, so the zeroed ones may go before
                // the data in one batch.
                let mut data = Vec::with_capacity(extents.len());
                for (offset, e) in extents {
                    match e.data {
                        ExtentData::Data(d) => data.push((offset, d)),
                        ExtentData::Zero => match store.write_zeroes(offset, e.length, ZeroMode::Punch).await {
                            Err(trireme_storage::StorageError::Unsupported(_)) => {
                                data.push((offset, bytes::Bytes::from(vec![0u8; e.length as usize])));
                                Ok(())
                            }
                            r => r,
                        }
                        .map_err(|e| e.to_string())?,
                    }
                }
                store.write_many(data).await.map_err(|e| e.to_string())?;
                // The image now holds writes that volume.state does not
                // account for: a restart must replay them from the log.
                #[cfg(feature = "failpoints")]
                crate::failpoints::crash_point(crate::failpoints::CRASH_DESTAGE_AFTER_IMAGE_WRITE);
                if !checkpoint {
                    return Ok(());
                }
                // Every earlier destage's writes are done (one at a time),
                // so this makes all of them durable too.
                store.sync().await.map_err(|e| e.to_string())?;
                // The state machine as of `index` must be durable before the
                // log below it may be compacted away.
                tokio::task::spawn_blocking(move || crate::catalog::write_applied_state(&state_path, &applied))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            }
            .await;
            let _ = tx
                .send(GroupEvent::Destaged {
                    index,
                    checkpoint,
                    result,
                })
                .await;
        });
    }

    /// Fuzzy copy: read the volume from the leader, once it has applied at
    /// least `index`, chunk by chunk while writes go on; the entries after
    /// `index` are replayed over the copy afterwards, and each is a full
    /// overwrite of its range, so the result is exact.
    fn start_copy(&mut self, index: u64) {
        if let Some(i) = self.installing.as_mut() {
            i.copy_started = true;
        }
        let transport = self.transport.clone();
        let store = self.store.clone();
        let tx = self.tx.clone();
        let volume = self.volume.clone();
        let leader = self.replica.leader_id();
        let stamped = self.installing.as_ref().and_then(|i| i.epoch);
        // Whom to ask the epoch as of `index` if the snapshot was not
        // stamped: the leader first, then the other replicas.
        let me = self.replica.id();
        let replicas: Vec<u64> = std::iter::once(leader)
            .chain(self.replica.voters())
            .filter(|n| *n != 0 && *n != me)
            .fold(Vec::new(), |mut v, n| {
                if !v.contains(&n) {
                    v.push(n);
                }
                v
            });
        let group = self.group_id;
        let copied = self.rebuild_copied.clone();
        copied.store(0, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            let started = Instant::now();
            let epoch = match stamped {
                Some(e) => Ok(e),
                None => ask_epoch_at(&transport, &volume, index, &replicas).await,
            };
            let result = match epoch {
                Ok(epoch) => copy_from_leader(&transport, leader, &volume, index, &store, &copied)
                    .await
                    .map(|()| epoch),
                Err(e) => Err(e),
            };
            match &result {
                Ok(_) => {
                    info!(group, volume = %volume, index, elapsed_ms = started.elapsed().as_millis() as u64, "snapshot copied")
                }
                Err(e) => warn!(group, volume = %volume, index, "snapshot copy failed, retrying: {e}"),
            }
            if result.is_err() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let _ = tx.send(GroupEvent::Installed { index, result }).await;
        });
    }

    fn on_installed(&mut self, index: u64, result: Result<(u64, u64), String>) {
        let Some(install) = self.installing.take_if(|i| i.index == index) else {
            return;
        };
        let (epoch, attached) = match result {
            Ok(v) => v,
            Err(_) => {
                // Try again: the leader may have moved or been busy.
                self.installing = Some(install);
                self.start_copy(index);
                return;
            }
        };
        self.replica.finish_install(epoch, attached);
        if self.recovering {
            info!(group = self.group_id, volume = %self.volume, "rebuilt from a snapshot; voting again");
            self.recovering = false;
        }
        self.destaged_index = index;
        self.written_index = index;
        self.checkpoint_started();
        if let Some(task) = install.persist {
            // The durable log restarts at the snapshot point: one stand-in
            // entry carrying its index and term (see Replica::restart),
            // replacing everything this replica had.
            // The stand-in entry carries the epoch and attached node as of
            // the point, so they are durable in the same write as the log
            // (volume.state follows once it is: see on_persisted_install).
            let point = trireme_replica::raft::eraftpb::Entry {
                index: install.index,
                term: install.term,
                data: crate::catalog::snapshot_point_data(epoch, attached).into(),
                ..Default::default()
            };
            let mut entries = vec![point];
            entries.extend(task.entries.into_iter().filter(|e| e.index > install.index));
            let write = GroupWrite {
                group: self.group_id,
                entries,
                hard_state: task.hard_state,
                conf_state: install.conf_state,
                destaged_index: Some(index),
                compact_to: Some(install.index),
            };
            self.install_persist = Some((
                task.number,
                crate::catalog::AppliedState {
                    destaged_index: index,
                    epoch,
                    attached_node: attached,
                },
            ));
            self.submit_persist(write, task.number, task.messages_after, true);
        }
    }

    /// The install's log write is durable: raft may go on, and volume.state
    /// may now say the image holds the snapshot point.
    fn on_persisted(&mut self, number: u64) {
        while self.persisting.front().is_some_and(|&n| n <= number) {
            self.persisting.pop_front();
        }
        // A skipped Ready after this write, and before the next one in
        // flight, is durable with it.
        let number =
            if self.persist_deferred > number && self.persisting.front().is_none_or(|&n| self.persist_deferred < n) {
                self.persist_deferred
            } else {
                number
            };
        debug!(group = self.group_id, number, "log write durable");
        self.replica.on_persisted(number);
        if let Some((n, state)) = self.install_persist
            && number >= n
        {
            self.install_persist = None;
            let path = self.state_path.clone();
            let volume = self.volume.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = crate::catalog::write_applied_state(&path, &state) {
                    // The log's snapshot point records the state too, and a
                    // restart reads it from there; but a disk that fails a
                    // small write fails the next destage too.
                    crate::error::exit_on_disk_error(
                        "state_write",
                        &format!(
                            "writing volume.state of volume {volume} after a snapshot install failed, stopping the node: {e}"
                        ),
                    );
                }
            });
        }
    }

    /// The image file holds writes its last fdatasync did not cover.
    fn image_unsynced(&self) -> bool {
        self.written_index > self.destaged_index
    }

    /// Checkpoints at the next destage, starting one now if none runs.
    fn checkpoint_now(&mut self) {
        self.checkpoint_requested = true;
        self.start_destage();
    }

    /// Restarts the checkpoint bounds (interval and log bytes) from here.
    fn checkpoint_started(&mut self) {
        self.last_checkpoint = Instant::now();
        self.checkpoint_logged_bytes = self.logged_bytes;
    }

    /// Whether the next destage should also be a checkpoint (see
    /// [`Checkpoints`]).
    fn checkpoint_due(&self) -> bool {
        self.checkpoint_requested
            || self.last_checkpoint.elapsed() >= self.checkpoints.interval
            || self.logged_bytes - self.checkpoint_logged_bytes >= self.checkpoints.log_bytes
    }

    fn on_destaged(&mut self, index: u64, checkpoint: bool, result: Result<(), String>) {
        self.destaging = false;
        if let Err(e) = result {
            // A retry would rewrite the same extents, but after a failed
            // fdatasync the image can no longer be trusted to hold what an
            // earlier one made durable: stop, as for the log (README: crash
            // rather than limp on). Nothing was compacted; the log still
            // holds every entry, and the other replicas carry the volume.
            self.metrics.destage_errors.increment(1);
            crate::error::exit_on_disk_error(
                "destage",
                &format!(
                    "destage of volume {} (group {}) up to index {index} failed, stopping the node: {e}",
                    self.volume, self.group_id
                ),
            );
        }
        if let Some(install) = &self.installing {
            // The snapshot replaces what this destage was about: no
            // compaction (the log is about to restart at the snapshot point),
            // and the held-back copy may start now.
            if !install.copy_started {
                let at = install.index;
                self.start_copy(at);
            }
            return;
        }
        self.replica.on_destaged(index);
        self.written_index = self.written_index.max(index);
        // Keep the log a lagging follower still needs, within a bound.
        let mut compact_to = index + 1;
        if self.replica.is_leader() {
            for (id, matched, _) in self.replica.progress() {
                if id != self.replica.id() && index.saturating_sub(matched) < MAX_RETAINED_ENTRIES {
                    // Keep the follower's match entry too: the next append
                    // needs its term.
                    compact_to = compact_to.min(matched.max(1));
                }
            }
        }
        // Memory follows the image file; the durable log follows only the
        // checkpoints, since a restart replays it from the last one.
        let compact_to = self.replica.compact(compact_to);
        if checkpoint {
            self.metrics.checkpoints.increment(1);
            self.destaged_index = index;
            let write = GroupWrite {
                group: self.group_id,
                destaged_index: Some(index),
                // One entry more than in memory: after a restart it is the
                // snapshot point whose term raft needs (Replica::restart).
                compact_to: Some(compact_to.min(index + 1).saturating_sub(1).max(1)),
                ..GroupWrite::default()
            };
            self.log_write(write);
        } else if self.checkpoint_due() {
            // Due while this destage ran (a request, or the log's bound).
            self.start_destage();
        }
        // Room again: retry parked writes in order.
        let parked: Vec<_> = self.parked.drain(..).collect();
        for write in parked {
            self.propose(write);
        }
    }

    /// `with_lag`: also re-measure each follower's lag in bytes, a scan of
    /// the log kept to the tick rather than every turn of the loop.
    fn publish(&mut self, with_lag: bool) {
        let last = self.replica.last_index();
        let progress = self.replica.progress();
        let st = self.replica.state();
        let mut s = self.status.lock().expect("group status lock poisoned");
        s.role = if self.replica.is_leader() {
            "leader"
        } else if self.replica.leader_id() == 0 {
            "candidate"
        } else {
            "follower"
        };
        s.leader = self.replica.leader_id();
        s.term = self.replica.term();
        s.commit_index = self.replica.commit_index();
        s.applied_index = st.applied_index;
        s.last_index = last;
        s.first_index = self.replica.first_index();
        s.epoch = st.epoch;
        s.attached_node = st.attached_node;
        s.cache_bytes = st.cache.bytes();
        s.destaged_index = self.destaged_index;
        s.progress = progress;
        s.hibernating = self.hibernating;
        s.failover_pause_s = self.failover_pause_s;
        s.leader_changes = self.leader_changes;
        s.recovering = self.recovering;
        if !with_lag {
            return;
        }
        // Lags, RPO exposure and gauges at tick rate (and on hibernating),
        // not on every turn of the request path.
        let commit = s.commit_index;
        let now = Instant::now();
        let age_of_first_missing = |matched: u64| {
            if matched >= commit {
                0.0
            } else {
                self.clock.age_s(matched + 1, now)
            }
        };
        // RPO: the slowest replica's first missing acknowledged entry.
        let min_match = s.progress.iter().map(|(_, m, _)| *m).min().unwrap_or(commit);
        let rpo_exposure_s = age_of_first_missing(min_match);
        let replicas_in_sync = s.progress.iter().filter(|(_, m, _)| *m >= commit).count() as u64;
        s.lag_seconds = s
            .progress
            .iter()
            .map(|(id, m, _)| (*id, age_of_first_missing(*m)))
            .collect();
        s.lag_bytes = s
            .progress
            .iter()
            .map(|(id, matched, _)| (*id, self.replica.entry_bytes_between(*matched, last)))
            .collect();
        s.rpo_exposure_s = rpo_exposure_s;
        s.replicas_in_sync = replicas_in_sync;
        s.rebuild_progress = self.installing.as_ref().map(|_| {
            (
                self.rebuild_copied.load(std::sync::atomic::Ordering::Relaxed),
                self.store.len_bytes().unwrap_or(0),
            )
        });
        if self.replica.is_leader() {
            self.clock.prune(min_match);
        }
        // Gauges at tick rate (and on hibernating), not every turn.
        let followers: Vec<FollowerSample> = if self.replica.is_leader() {
            s.progress
                .iter()
                .filter(|(id, _, _)| *id != self.replica.id())
                .map(|(id, m, pst)| FollowerSample {
                    node: *id,
                    lag_entries: last.saturating_sub(*m),
                    lag_bytes: s.lag_bytes.iter().find(|(i, _)| i == id).map(|(_, b)| *b).unwrap_or(0),
                    lag_seconds: s
                        .lag_seconds
                        .iter()
                        .find(|(i, _)| i == id)
                        .map(|(_, x)| *x)
                        .unwrap_or(0.0),
                    state: if !self.liveness.is_alive(*id) || *pst == "inactive" {
                        "down"
                    } else {
                        match *pst {
                            "replicate" => "replicating",
                            "snapshot" => "snapshot",
                            _ => "probing",
                        }
                    },
                })
                .collect()
        } else {
            Vec::new()
        };
        let sample = GroupSample {
            term: s.term,
            leader: s.leader,
            is_leader: self.replica.is_leader(),
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            rpo_exposure_s,
            replicas_in_sync,
            replicas: self.replica_count,
            cache_dirty_bytes: s.cache_bytes,
            cache_limit_bytes: self.replica.max_cache_bytes(),
            destage_lag_entries: s.applied_index.saturating_sub(self.written_index),
            checkpoint_lag_entries: s.applied_index.saturating_sub(self.destaged_index),
            checkpoint_lag_bytes: self.logged_bytes - self.checkpoint_logged_bytes,
            hibernating: self.hibernating,
            followers: &followers,
        };
        drop(s);
        self.metrics.publish(&sample);
    }
}

/// How long a snapshot's receiver asks the replicas for the epoch as of an
/// unstamped snapshot's index before it gives the install another go.
const EPOCH_AT_TIMEOUT: Duration = Duration::from_secs(30);

/// The epoch and attached node as of `index`, for a snapshot its leader did
/// not stamp with them (a version before the stamp): asked of `replicas` in
/// turn (the leader first), with backoff. Each answers only if its attach
/// history (from its last restart or install point) or its committed log
/// covers `index`, never with a guess; one that cannot says so
/// (`fwd_code::NOT_COVERED`) and the next is asked.
async fn ask_epoch_at(transport: &Transport, volume: &str, index: u64, replicas: &[u64]) -> Result<(u64, u64), String> {
    use crate::volume::{fwd_code, fwd_op};
    use trireme_transport::ForwardRequest;
    let deadline = Instant::now() + EPOCH_AT_TIMEOUT;
    let mut backoff = Duration::from_millis(20);
    let mut why = Vec::new();
    loop {
        why.clear();
        for &node in replicas {
            let req = ForwardRequest {
                volume: volume.to_string(),
                epoch: index,
                op: fwd_op::EPOCH_AT,
                offset: index,
                length: 0,
                data: bytes::Bytes::new(),
                may_trim: true,
                fua: false,
            };
            match tokio::time::timeout(Duration::from_secs(3), transport.forward(node, req)).await {
                Ok(Ok(r)) if r.errno == fwd_code::OK => {
                    let v: serde_json::Value = serde_json::from_slice(&r.data)
                        .map_err(|e| format!("node {node}'s epoch at {index} does not parse: {e}"))?;
                    let field = |k: &str| {
                        v.get(k)
                            .and_then(|x| x.as_u64())
                            .ok_or_else(|| format!("node {node}'s epoch at {index} lacks \"{k}\""))
                    };
                    return Ok((field("epoch")?, field("attached")?));
                }
                Ok(Ok(r)) => why.push(format!("node {node}: {}", r.message)),
                Ok(Err(e)) => why.push(format!("node {node}: {e}")),
                Err(_) => why.push(format!("node {node}: no answer")),
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no replica could tell the epoch as of snapshot index {index}: {}",
                why.join("; ")
            ));
        }
        debug!(
            volume,
            index,
            "epoch at the snapshot index not known yet: {}",
            why.join("; ")
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Copies the whole volume from `leader` as of at least `index` into the
/// local image.
async fn copy_from_leader(
    transport: &Transport,
    leader: u64,
    volume: &str,
    index: u64,
    store: &UringStore,
    copied: &std::sync::atomic::AtomicU64,
) -> Result<(), String> {
    let received_bytes = metrics::counter!("trireme_snapshot_received_bytes_total", "volume" => volume.to_string());
    use crate::volume::{fwd_code, fwd_op};
    use trireme_transport::ForwardRequest;
    if leader == 0 {
        return Err("no leader known to copy from".into());
    }
    let size = store.len_bytes().map_err(|e| e.to_string())?;
    let request = |op: u32, offset: u64, length: u64| ForwardRequest {
        volume: volume.to_string(),
        epoch: index,
        op,
        offset,
        length,
        data: bytes::Bytes::new(),
        may_trim: true,
        fua: false,
    };
    let mut offset = 0;
    while offset < size {
        let length = COPY_CHUNK_BYTES.min(size - offset);
        let mut tries = 0;
        let data = loop {
            let reply = transport
                .forward(leader, request(fwd_op::READ_LOCAL, offset, length))
                .await;
            match reply {
                Ok(r) if r.errno == fwd_code::OK => break r.data,
                Ok(r) if r.errno == fwd_code::RETRY && tries < 100 => {
                    // The leader has not applied up to the snapshot point yet.
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(r) => {
                    return Err(format!(
                        "leader {leader} refused the copy at offset {offset}: {}",
                        r.message
                    ));
                }
                Err(e) => return Err(format!("copying from leader {leader} at offset {offset}: {e}")),
            }
        };
        if data.len() as u64 != length {
            return Err(format!(
                "leader returned {} of {length} bytes at offset {offset}",
                data.len()
            ));
        }
        let r = if data.iter().all(|b| *b == 0) {
            match store.write_zeroes(offset, length, ZeroMode::Punch).await {
                Err(trireme_storage::StorageError::Unsupported(_)) => store.write(offset, data).await,
                r => r,
            }
        } else {
            store.write(offset, data).await
        };
        // Network trouble is retried (the caller starts the copy over); a
        // disk that fails is not, as in a destage.
        if let Err(e) = r {
            crate::error::exit_on_disk_error(
                "snapshot_copy",
                &format!("snapshot copy of volume {volume} at offset {offset} failed, stopping the node: {e}"),
            );
        }
        offset += length;
        copied.store(offset, std::sync::atomic::Ordering::Relaxed);
        received_bytes.increment(length);
        #[cfg(feature = "failpoints")]
        if offset < size {
            crate::failpoints::crash_point(crate::failpoints::CRASH_SNAPSHOT_MID_COPY);
        }
    }
    if let Err(e) = store.sync().await {
        crate::error::exit_on_disk_error(
            "snapshot_copy",
            &format!("snapshot copy of volume {volume}: syncing the image failed, stopping the node: {e}"),
        );
    }
    Ok(())
}
