//! One replica of one volume: a raft-rs `RawNode` and the volume state
//! machine (writer epoch, attached node, write-back cache), driven from
//! outside by ticks, peer messages, proposals and "persisted" notices.
//!
//! The Ready contract (raft-rs README, "Asynchronous Ready"): messages in
//! `Output::messages` go out at once; `Output::persist` must be made durable
//! in order, its `messages_after` sent only once it is (persist the vote
//! before sending it out), and then [`Replica::on_persisted`] called. The
//! leader's own fsync thus overlaps the followers'.

use std::collections::BTreeMap;

use bytes::Bytes;
use raft::eraftpb::{ConfChange, ConfChangeV2, ConfState, Entry, EntryType, HardState, Message, MessageType, Snapshot};
use raft::storage::MemStorage;
use raft::{RawNode, ReadState, StateRole};
use tracing::{error, warn};

use crate::cache::{ExtentData, Segment, WriteCache};
use crate::op::{EntryOp, VolumeOp};

#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// This replica's id in the group (the node id).
    pub id: u64,
    /// Ticks without a leader before a follower campaigns...
    pub election_tick: usize,
    /// ...randomised in [election_tick, max_election_tick). A simulator sets
    /// election_tick + 1 to keep raft's own randomness out of a seeded run.
    pub max_election_tick: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_tick: usize,
    /// Committed but not yet destaged bytes the cache may hold; proposals
    /// beyond it are refused with [`ProposeError::CacheFull`].
    pub max_cache_bytes: u64,
    /// Append messages in flight per follower (pipelining).
    pub max_inflight_msgs: usize,
}

impl ReplicaConfig {
    pub fn new(id: u64) -> ReplicaConfig {
        ReplicaConfig {
            id,
            election_tick: 10,
            max_election_tick: 20,
            heartbeat_tick: 2,
            max_cache_bytes: 256 * 1024 * 1024,
            max_inflight_msgs: 32,
        }
    }
}

/// One operation to propose: see [`Replica::propose_batch`].
#[derive(Debug, Clone)]
pub struct Proposal {
    /// Comes back in the operation's [`Completion`].
    pub token: u64,
    /// The writer epoch it was issued under.
    pub epoch: u64,
    pub op: VolumeOp,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader (leader hint: node {leader_hint})")]
    NotLeader { leader_hint: u64 },
    #[error("write-back cache full: {pending_bytes} bytes pending, limit {max_bytes}")]
    CacheFull { pending_bytes: u64, max_bytes: u64 },
    #[error("stale writer epoch {epoch}: the volume is at epoch {current}")]
    StaleEpoch { epoch: u64, current: u64 },
    #[error("raft refused the proposal: {0}")]
    Raft(String),
}

/// Why a proposal that reached the log did not take effect, or why its
/// proposer cannot tell whether it did.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The entry was written under an older writer epoch (fencing).
    #[error("fenced: entry epoch {entry_epoch} is older than the volume's epoch {current_epoch}")]
    Fenced { entry_epoch: u64, current_epoch: u64 },
    /// Another leader's entry took this proposal's log index: it did not
    /// take effect, and never will (an index holds one committed entry, and
    /// an entry never moves to another index), so proposing it again is
    /// safe. Reported only once the committed entry at the proposal's index
    /// is applied here and is not the proposal: an entry of another term
    /// (Log Matching: same index and term is the same entry), a new
    /// leader's empty entry, or a membership change.
    #[error("superseded by a newer leader's entry")]
    Superseded,
    /// Its outcome is unknown: a snapshot from the leader replaced this
    /// replica's log past the proposal's index, so the entry committed at
    /// that index (this proposal, or another leader's) is never applied
    /// here to compare. It may well have taken effect: it must not be
    /// proposed again (a retry could apply it twice, after a later write).
    #[error("outcome unknown: a snapshot from the leader replaced the log")]
    Unknown,
    /// The committed entry does not decode; every replica skips it alike.
    #[error("corrupt entry: {0}")]
    Corrupt(String),
}

/// A proposal's outcome, matched to the caller by its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub token: u64,
    /// The log index it was applied at.
    pub result: Result<u64, ApplyError>,
}

/// What must be made durable, in order, before `on_persisted(number)`.
#[derive(Debug, Default)]
pub struct PersistTask {
    pub number: u64,
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    pub snapshot: Option<Snapshot>,
    /// Messages that may only leave once this task is durable (votes,
    /// append acknowledgements).
    pub messages_after: Vec<Message>,
    /// False when raft allows the write to be lost in a crash (no entries,
    /// no snapshot, a HardState whose term and vote are unchanged): it may
    /// skip the fdatasync.
    pub must_sync: bool,
}

impl PersistTask {
    /// Bytes of entry data in this task, for batching decisions.
    pub fn entry_bytes(&self) -> usize {
        self.entries.iter().map(|e| e.data.len()).sum()
    }
}

#[derive(Debug, Default)]
pub struct Output {
    /// Send now.
    pub messages: Vec<Message>,
    pub persist: Option<PersistTask>,
    pub completions: Vec<Completion>,
    /// Confirmed read indexes: serve the read once `applied_index() >= index`.
    pub read_states: Vec<ReadState>,
    /// New (role, leader id) when either changed.
    pub role: Option<(StateRole, u64)>,
    /// A membership change was applied; persist it with the log.
    pub conf_state: Option<ConfState>,
    /// A snapshot from the leader replaced this replica's log. The state
    /// machine is reset; the driver must copy the volume as of at least its
    /// index (fuzzy copy, then the log's entries after it are replayed over
    /// it), call [`Replica::finish_install`], and only then persist
    /// `persist` (which carries the snapshot) and poll again. Our proposals
    /// the snapshot covers are resolved as [`ApplyError::Unknown`] in the
    /// same Output.
    pub install: Option<SnapshotInstall>,
}

/// A snapshot to install (see [`Output::install`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotInstall {
    pub index: u64,
    pub term: u64,
    /// Writer epoch and attached node as of `index`, as the leader that
    /// made the snapshot computed them from its committed log and stamped
    /// them on it; None from a leader that did not (an older version): the
    /// driver then asks the replicas ([`Replica::epoch_at`]).
    pub epoch: Option<(u64, u64)>,
}

/// Marks a snapshot's data as its epoch stamp: magic | epoch u64 | attached
/// node u64 | crc32c u32 over the rest (little endian).
const SNAPSHOT_EPOCH_MAGIC: &[u8; 8] = b"TRISNEP1";
const SNAPSHOT_EPOCH_BYTES: usize = 28;

/// The data a leader puts in a snapshot it sends: the epoch and attached
/// node as of the snapshot's index.
/// The (term, index) a receipt from [`Replica::receipt_for`] carries, if `m` is one.
pub fn receipt_of(m: &Message) -> Option<(u64, u64)> {
    (m.get_msg_type() == MessageType::MsgUnreachable).then_some((m.term, m.index))
}

pub fn encode_snapshot_epoch(epoch: u64, attached_node: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(SNAPSHOT_EPOCH_BYTES);
    v.extend_from_slice(SNAPSHOT_EPOCH_MAGIC);
    v.extend_from_slice(&epoch.to_le_bytes());
    v.extend_from_slice(&attached_node.to_le_bytes());
    let crc = crc32c::crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

/// (epoch, attached node) if `data` is a valid epoch stamp.
pub fn decode_snapshot_epoch(data: &[u8]) -> Option<(u64, u64)> {
    if data.len() != SNAPSHOT_EPOCH_BYTES || &data[..8] != SNAPSHOT_EPOCH_MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(data[24..28].try_into().ok()?);
    if crc32c::crc32c(&data[..24]) != crc {
        return None;
    }
    let epoch = u64::from_le_bytes(data[8..16].try_into().ok()?);
    let attached = u64::from_le_bytes(data[16..24].try_into().ok()?);
    Some((epoch, attached))
}

/// Attach records kept in [`VolumeState::attach_history`]; attaches are
/// rare, so this reaches far back.
pub const MAX_ATTACH_HISTORY: usize = 1024;

/// The replicated volume state machine.
#[derive(Debug, Default)]
pub struct VolumeState {
    /// Current writer epoch; writes carrying an older one are refused.
    pub epoch: u64,
    /// Node the volume is attached to in this epoch (0: none yet).
    pub attached_node: u64,
    pub cache: WriteCache,
    pub applied_index: u64,
    /// (index, epoch, attached node) from which the epoch and attached
    /// node were these: the state at the last restart or snapshot install,
    /// then one record per attach applied since, ascending, at most
    /// [`MAX_ATTACH_HISTORY`] (the oldest go first). It answers
    /// [`VolumeState::epoch_at`] for the indexes from its first record to
    /// the applied index, and for no others.
    pub attach_history: Vec<(u64, u64, u64)>,
    /// A snapshot install is under way: no reads are served meanwhile.
    pub installing: bool,
}

impl VolumeState {
    /// Epoch and attached node as of applied `index`, if the attach history
    /// covers it: None before its first record (the state then is not known
    /// here: a restart or snapshot install point, or a record dropped from
    /// the bounded history), past the applied index (an attach may come
    /// before it), and during a snapshot install. Never a guess.
    pub fn epoch_at(&self, index: u64) -> Option<(u64, u64)> {
        if self.installing || index > self.applied_index {
            return None;
        }
        let first = self.attach_history.first()?;
        if index < first.0 {
            return None;
        }
        self.attach_history
            .iter()
            .rev()
            .find(|(i, _, _)| *i <= index)
            .map(|(_, e, n)| (*e, *n))
    }

    /// Records an attach applied at `index`, keeping the history bounded:
    /// dropping the oldest record moves the first covered index up to the
    /// next one (whose record holds from there on).
    fn record_attach(&mut self, index: u64) {
        self.attach_history.push((index, self.epoch, self.attached_node));
        if self.attach_history.len() > MAX_ATTACH_HISTORY {
            self.attach_history.remove(0);
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    token: u64,
    /// Write bytes counted in `inflight_bytes` until it is resolved.
    bytes: u64,
    /// Where the encoded entry lives in memory: the buffer this replica
    /// built and checksummed (see [`Replica::apply`]).
    data: (usize, usize),
}

pub struct Replica {
    id: u64,
    node: RawNode<MemStorage>,
    state: VolumeState,
    /// Our proposals in the log, by (index, term). Two of ours can share an
    /// index: a proposal of an older term whose entry a new leader truncated
    /// away, and ours of this term at the same index (the old one may still
    /// be committed by a later leader that holds it: the entry committed at
    /// the index decides, see `complete`).
    pending: BTreeMap<(u64, u64), Pending>,
    max_cache_bytes: u64,
    /// Write bytes proposed but not yet applied, counted against the cache bound.
    inflight_bytes: u64,
    role: (StateRole, u64),
    /// Entries applied without verifying their checksum (see `built_here`).
    entries_trusted: u64,
}

fn raft_config(c: &ReplicaConfig, applied: u64) -> raft::Config {
    raft::Config {
        id: c.id,
        election_tick: c.election_tick,
        min_election_tick: c.election_tick,
        max_election_tick: c.max_election_tick,
        heartbeat_tick: c.heartbeat_tick,
        applied,
        // 1 MiB appends, at most max_inflight_msgs in flight per follower:
        // a catching-up follower gets a steady stream, not a flood that
        // crowds out heartbeats on the same connection.
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: c.max_inflight_msgs,
        check_quorum: true,
        pre_vote: true,
        skip_bcast_commit: true,
        ..Default::default()
    }
}

impl Replica {
    /// A brand-new replica of a group whose voters are `voters`.
    pub fn new(config: &ReplicaConfig, voters: &[u64]) -> Result<Replica, ProposeError> {
        let storage = MemStorage::new_with_conf_state(ConfState::from((voters.to_vec(), vec![])));
        Self::with_storage(config, storage, VolumeState::default())
    }

    /// Restarts from what the durable log held: hard state, membership,
    /// entries (after the last compaction) and the state machine as of
    /// `state.applied_index` (entries after it are applied again).
    pub fn restart(
        config: &ReplicaConfig,
        hard_state: HardState,
        conf_state: ConfState,
        entries: &[Entry],
        state: VolumeState,
    ) -> Result<Replica, ProposeError> {
        let storage = MemStorage::new();
        {
            let mut core = storage.wl();
            let mut entries = entries;
            // A compacted log starts later than 1: its first entry stands in
            // as the snapshot point, which gives raft the term of the entry
            // before the first one it can read (the durable log keeps that
            // one extra entry for exactly this).
            if let Some(first) = entries.first().filter(|e| e.index > 1) {
                let mut snap = Snapshot::default();
                snap.mut_metadata().index = first.index;
                snap.mut_metadata().term = first.term;
                snap.mut_metadata().set_conf_state(conf_state.clone());
                core.apply_snapshot(snap)
                    .map_err(|e| ProposeError::Raft(e.to_string()))?;
                entries = &entries[1..];
            }
            core.set_conf_state(conf_state);
            core.append(entries).map_err(|e| ProposeError::Raft(e.to_string()))?;
            core.set_hardstate(hard_state);
        }
        Self::with_storage(config, storage, state)
    }

    fn with_storage(
        config: &ReplicaConfig,
        storage: MemStorage,
        mut state: VolumeState,
    ) -> Result<Replica, ProposeError> {
        if state.attach_history.is_empty() {
            state
                .attach_history
                .push((state.applied_index, state.epoch, state.attached_node));
        }
        let rc = raft_config(config, state.applied_index);
        rc.validate().map_err(|e| ProposeError::Raft(e.to_string()))?;
        let node = RawNode::new(&rc, storage, &crate::raft_logger(config.id))
            .map_err(|e| ProposeError::Raft(e.to_string()))?;
        Ok(Replica {
            id: config.id,
            node,
            state,
            pending: BTreeMap::new(),
            max_cache_bytes: config.max_cache_bytes,
            inflight_bytes: 0,
            role: (StateRole::Follower, 0),
            entries_trusted: 0,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }
    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }
    pub fn leader_id(&self) -> u64 {
        self.node.raft.leader_id
    }
    pub fn term(&self) -> u64 {
        self.node.raft.term
    }
    /// A leadership transfer is under way: its target may campaign past
    /// every follower's leader lease (raft's forced campaign).
    pub fn is_transferring(&self) -> bool {
        self.node.raft.lead_transferee.is_some()
    }
    pub fn state(&self) -> &VolumeState {
        &self.state
    }

    /// Epoch and attached node as of committed `index`: from the attach
    /// history up to the applied index ([`VolumeState::epoch_at`]), and past
    /// it from the applied state plus the attaches the log holds up to
    /// `index` (the log is never compacted past the applied index, and
    /// committed entries are the same on every replica). None when neither
    /// covers `index`, or it is not known to be committed here.
    pub fn epoch_at(&self, index: u64) -> Option<(u64, u64)> {
        let applied = self.state.applied_index;
        if self.state.installing || index <= applied {
            return self.state.epoch_at(index);
        }
        if index > self.commit_index() || index > self.last_index() {
            return None;
        }
        let ctx = raft::GetEntriesContext::empty(false);
        let entries = self
            .node
            .raft
            .raft_log
            .slice(applied + 1, index + 1, None::<u64>, ctx)
            .ok()?;
        if entries.len() as u64 != index - applied {
            return None;
        }
        let mut at = (self.state.epoch, self.state.attached_node);
        for e in &entries {
            // As apply_op: an attach that decodes starts the next epoch. An
            // attach entry is a bare header; nothing longer needs decoding.
            if e.get_entry_type() == EntryType::EntryNormal
                && e.data.len() == crate::op::HEADER_BYTES
                && let Ok(EntryOp {
                    op: VolumeOp::Attach { node_id },
                    ..
                }) = EntryOp::decode(&e.data)
            {
                at = (at.0 + 1, node_id);
            }
        }
        Some(at)
    }

    /// Stamps each snapshot this leader sends with the epoch and attached
    /// node as of its index, which its receiver needs and which only a
    /// replica whose history or log covers that index can tell: this one
    /// can, as the snapshot index is the commit index it recorded at its
    /// last Ready (raft-rs' MemStorage::snapshot), at or past the applied
    /// index, and the log holds everything after the applied index. A
    /// snapshot passed on as received (raft's unstable snapshot) keeps its
    /// stamp.
    fn stamp_snapshots(&self, messages: &mut [Message]) {
        for m in messages.iter_mut() {
            if m.get_msg_type() != MessageType::MsgSnapshot || decode_snapshot_epoch(&m.get_snapshot().data).is_some() {
                continue;
            }
            let index = m.get_snapshot().get_metadata().index;
            match self.epoch_at(index) {
                Some((epoch, attached)) => m.mut_snapshot().data = encode_snapshot_epoch(epoch, attached).into(),
                None => warn!(
                    replica = self.id,
                    index,
                    applied = self.state.applied_index,
                    "cannot stamp the snapshot with its epoch; the receiver will ask the replicas"
                ),
            }
        }
    }

    /// Entries applied from the buffer this replica built for them, whose
    /// checksum was not verified again (see `built_here`).
    pub fn entries_trusted(&self) -> u64 {
        self.entries_trusted
    }

    pub fn applied_index(&self) -> u64 {
        self.state.applied_index
    }
    /// The write-back cache's bound.
    pub fn max_cache_bytes(&self) -> u64 {
        self.max_cache_bytes
    }
    pub fn commit_index(&self) -> u64 {
        self.node.raft.raft_log.committed
    }
    pub fn last_index(&self) -> u64 {
        self.node.raft.raft_log.last_index()
    }
    /// Per-replica replication progress as the leader sees it (empty
    /// elsewhere): (id, match index, "probe" | "replicate" | "snapshot" |
    /// "inactive").
    pub fn progress(&self) -> Vec<(u64, u64, &'static str)> {
        if !self.is_leader() {
            return Vec::new();
        }
        let mut v: Vec<(u64, u64, &'static str)> = self
            .node
            .raft
            .prs()
            .iter()
            .map(|(id, pr)| {
                let state = match pr.state {
                    // Probing a replica that has not answered lately: it is gone,
                    // not merely behind (check_quorum maintains recent_active).
                    raft::ProgressState::Probe if !pr.recent_active && *id != self.id => "inactive",
                    raft::ProgressState::Probe => "probe",
                    raft::ProgressState::Replicate => "replicate",
                    raft::ProgressState::Snapshot => "snapshot",
                };
                (*id, pr.matched, state)
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// Bytes of entry data in (from, to], for lag reporting; scans at most
    /// `MAX_LAG_SCAN` entries and extrapolates beyond.
    pub fn entry_bytes_between(&self, from: u64, to: u64) -> u64 {
        use raft::Storage as _;
        const MAX_LAG_SCAN: u64 = 4096;
        if to <= from {
            return 0;
        }
        // Entries not yet handed to storage are not readable from it.
        let to = to.min(self.node.store().last_index().unwrap_or(0));
        let low = (from + 1).max(self.first_index());
        if low > to {
            return 0;
        }
        let high = to.min(low + MAX_LAG_SCAN - 1);
        let ctx = raft::GetEntriesContext::empty(false);
        match self.node.store().entries(low, high + 1, None, ctx) {
            Ok(entries) if !entries.is_empty() => {
                let scanned: u64 = entries.iter().map(|e| e.data.len() as u64).sum();
                scanned * (to - low + 1) / entries.len() as u64
            }
            _ => 0,
        }
    }

    /// First index still in the in-memory log (after compaction).
    pub fn first_index(&self) -> u64 {
        self.node.raft.raft_log.first_index()
    }

    /// The transport lost its stream to `peer`: raft stops pipelining to it.
    pub fn report_unreachable(&mut self, peer: u64) {
        self.node.report_unreachable(peer);
    }

    /// Drops log entries below `index` from memory once the image and the
    /// durable log no longer need them (never past what is applied).
    pub fn compact(&mut self, index: u64) -> u64 {
        use raft::Storage as _;
        // MemStorage answers last_index from its entries, so the last one
        // must stay; raft asks the term of the applied (committed) entry and
        // of a follower's match entry, so those stay too.
        let last = self.node.store().last_index().unwrap_or(0);
        let index = index.min(self.state.applied_index).min(last);
        if index > self.first_index()
            && let Err(e) = self.node.mut_store().wl().compact(index)
        {
            warn!(replica = self.id, index, "compacting the in-memory log failed: {e}");
        }
        self.first_index()
    }

    pub fn tick(&mut self) {
        self.node.tick();
    }

    /// The leader's node is known dead: stop honouring its lease, so this
    /// replica grants (pre-)votes at once instead of after a full election
    /// timeout of its own ticks (a hibernating follower has not been
    /// ticking). Safety does not rest on leases here: reads use ReadIndex.
    pub fn expire_leader_lease(&mut self) {
        let raft = &mut self.node.raft;
        if raft.state != StateRole::Leader {
            raft.election_elapsed = raft.election_elapsed.max(raft.election_timeout());
        }
    }

    /// The group's voters, ascending.
    pub fn voters(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.node.raft.prs().conf().voters().ids().iter().collect();
        v.sort_unstable();
        v
    }

    pub fn campaign(&mut self) -> Result<(), ProposeError> {
        self.node.campaign().map_err(|e| ProposeError::Raft(e.to_string()))
    }

    pub fn transfer_leader(&mut self, to: u64) {
        self.node.transfer_leader(to);
    }

    /// In quorum-receipt mode: once an append from `leader` in `term`,
    /// whose last entry was (`index`, `entry_term`), has been stepped, the
    /// receipt to send back if this replica's log now holds that entry
    /// (durable or not). None if the append was not accepted.
    ///
    /// On the wire a receipt is a `MsgUnreachable`: raft-rs only ever raises
    /// that type locally, so no real Raft message can be taken for one.
    pub fn receipt_for(&self, leader: u64, term: u64, index: u64, entry_term: u64) -> Option<Message> {
        let raft = &self.node.raft;
        if raft.term != term || raft.leader_id != leader || raft.raft_log.term(index).ok()? != entry_term {
            return None;
        }
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgUnreachable);
        m.from = self.id;
        m.to = leader;
        m.term = term;
        m.index = index;
        Some(m)
    }

    /// The highest index a quorum of voters holds, durable or not, given
    /// the receipts of the leader's current term (`received`: voter id to
    /// index). The leader holds its whole log. 0 unless leader.
    pub fn quorum_received(&self, received: &std::collections::HashMap<u64, u64>) -> u64 {
        if !self.is_leader() {
            return 0;
        }
        let last = self.last_index();
        let mut held: Vec<u64> = self
            .voters()
            .into_iter()
            .map(|id| {
                if id == self.id {
                    last
                } else {
                    received.get(&id).copied().unwrap_or(0)
                }
            })
            .collect();
        held.sort_unstable_by(|a, b| b.cmp(a));
        held.get(held.len() / 2).copied().unwrap_or(0)
    }

    /// A message from a peer. Messages for another group or from an
    /// unknown peer are raft's to drop; errors are reported, never panics.
    pub fn step(&mut self, msg: Message) -> Result<(), ProposeError> {
        self.node.step(msg).map_err(|e| ProposeError::Raft(e.to_string()))
    }

    /// Proposes an operation under writer `epoch`; `token` comes back in a
    /// [`Completion`] once it is applied (or fails).
    pub fn propose(&mut self, token: u64, epoch: u64, op: VolumeOp) -> Result<(), ProposeError> {
        let mut results = self.propose_batch(vec![Proposal { token, epoch, op }]);
        results
            .pop()
            .unwrap_or(Err(ProposeError::Raft("empty proposal batch".into())))
            .map(|_| ())
    }

    /// Proposes several operations as one raft step, so that followers get
    /// them in one append message (and answer it once) instead of one
    /// message per operation. Each result, in order, is the log index an
    /// operation was proposed at, or why it was refused; accepted ones take
    /// consecutive indexes in the order given. A caller keeps each step's total near raft's
    /// message size (1 MiB): raft sends a step's entries in one message of
    /// at most that size, and holds the rest until the follower answers.
    pub fn propose_batch(&mut self, batch: Vec<Proposal>) -> Vec<Result<u64, ProposeError>> {
        if !self.is_leader() {
            let leader_hint = self.leader_id();
            return batch
                .iter()
                .map(|_| Err(ProposeError::NotLeader { leader_hint }))
                .collect();
        }
        let mut results = Vec::with_capacity(batch.len());
        let mut entries = Vec::with_capacity(batch.len());
        let mut accepted = Vec::with_capacity(batch.len());
        let mut added_bytes = 0;
        for Proposal { token, epoch, op } in batch {
            if !matches!(op, VolumeOp::Attach { .. }) && epoch < self.state.epoch {
                results.push(Err(ProposeError::StaleEpoch {
                    epoch,
                    current: self.state.epoch,
                }));
                continue;
            }
            let bytes = match &op {
                VolumeOp::Write { data, .. } => data.len() as u64,
                _ => 0,
            };
            let pending_bytes = self.state.cache.bytes() + self.inflight_bytes + added_bytes;
            if bytes > 0 && pending_bytes + bytes > self.max_cache_bytes {
                results.push(Err(ProposeError::CacheFull {
                    pending_bytes,
                    max_bytes: self.max_cache_bytes,
                }));
                continue;
            }
            added_bytes += bytes;
            let data = Bytes::from(EntryOp { epoch, op }.encode());
            accepted.push((results.len(), token, bytes, (data.as_ptr() as usize, data.len())));
            results.push(Ok(0));
            entries.push(Entry {
                data,
                ..Entry::default()
            });
        }
        if entries.is_empty() {
            return results;
        }
        let count = entries.len() as u64;
        let before = self.last_index();
        // What RawNode::propose builds, with every entry in one message.
        let mut msg = Message::default();
        msg.set_msg_type(MessageType::MsgPropose);
        msg.from = self.id;
        msg.set_entries(entries.into());
        if let Err(e) = self.node.step(msg) {
            let e = ProposeError::Raft(e.to_string());
            for (at, ..) in accepted {
                results[at] = Err(e.clone());
            }
            return results;
        }
        // A leader appends a proposal to its own log at once.
        assert_eq!(
            self.last_index(),
            before + count,
            "proposals did not land at the next log indexes"
        );
        let term = self.term();
        for (index, (at, token, bytes, data)) in (before + 1..).zip(accepted) {
            results[at] = Ok(index);
            self.pending.insert((index, term), Pending { token, bytes, data });
            self.inflight_bytes += bytes;
        }
        results
    }

    /// Asks the leader to confirm it still leads (ReadIndex); the answer
    /// comes back in `Output::read_states` with `token` as its context.
    pub fn read_index(&mut self, token: u64) {
        self.node.read_index(token.to_le_bytes().to_vec());
    }

    /// Reads a range of the state machine: cached extents, zeroes, and the
    /// ranges to fetch from the image. Call only once `applied_index()` has
    /// reached a confirmed read index.
    pub fn read(&self, offset: u64, length: u64) -> Vec<Segment> {
        // Mid-install the cache is empty and the image half copied: a read
        // here would return old data. The driver must hold reads back.
        assert!(
            !self.state.installing,
            "replica {}: read during a snapshot install",
            self.id
        );
        self.state.cache.read(offset, length)
    }

    /// Everything the replica wants done, if anything.
    pub fn poll(&mut self) -> Option<Output> {
        if !self.node.has_ready() {
            return None;
        }
        let mut rd = self.node.ready();
        let mut out = Output {
            messages: rd.take_messages(),
            ..Output::default()
        };
        self.stamp_snapshots(&mut out.messages);
        if let Some(ss) = rd.ss() {
            let role = (ss.raft_state, ss.leader_id);
            if role != self.role {
                self.role = role;
                out.role = Some(role);
            }
        }
        out.read_states = rd.take_read_states();
        let snapshot = rd.snapshot().clone();
        if !snapshot.is_empty() {
            let meta = snapshot.get_metadata();
            // Our proposals up to the snapshot index will never be applied
            // here: the entry committed at each such index (ours, or another
            // leader's) is inside the snapshot. Their outcome is unknown,
            // and settled now rather than when the next entry applies.
            let later = self.pending.split_off(&(meta.index + 1, 0));
            for (_, p) in std::mem::replace(&mut self.pending, later) {
                self.inflight_bytes -= p.bytes;
                out.completions.push(Completion {
                    token: p.token,
                    result: Err(ApplyError::Unknown),
                });
            }
            // The leader's state replaces ours; the driver fills it in.
            self.state.cache = WriteCache::new();
            self.state.applied_index = meta.index;
            self.state.installing = true;
            self.state.attach_history.clear();
            out.install = Some(SnapshotInstall {
                index: meta.index,
                term: meta.term,
                epoch: decode_snapshot_epoch(&snapshot.data),
            });
        }
        let committed = rd.take_committed_entries();
        self.apply(committed, &mut out);
        let entries = rd.take_entries();
        let hard_state = rd.hs().cloned();
        let mut messages_after = rd.take_persisted_messages();
        self.stamp_snapshots(&mut messages_after);
        {
            // raft must be able to read these back before advance_append_async;
            // durability is the driver's, acknowledged through on_persisted.
            let mut core = self.node.mut_store().wl();
            if !snapshot.is_empty()
                && let Err(e) = core.apply_snapshot(snapshot.clone())
            {
                error!(replica = self.id, "applying a snapshot to the log failed: {e}");
            }
            if let Err(e) = core.append(&entries) {
                // Appending what raft itself produced cannot fail unless the
                // log is inconsistent: a broken invariant.
                panic!("replica {}: appending ready entries failed: {e}", self.id);
            }
            if let Some(hs) = &hard_state {
                core.set_hardstate(hs.clone());
            }
        }
        let snapshot = (!snapshot.is_empty()).then_some(snapshot);
        if !entries.is_empty() || hard_state.is_some() || snapshot.is_some() || !messages_after.is_empty() {
            out.persist = Some(PersistTask {
                number: rd.number(),
                entries,
                hard_state,
                snapshot,
                messages_after,
                must_sync: rd.must_sync(),
            });
        }
        self.node.advance_append_async(rd);
        self.sync_applied();
        Some(out)
    }

    /// The volume was copied as of the installed snapshot's index, whose
    /// epoch and attached node were these.
    pub fn finish_install(&mut self, epoch: u64, attached_node: u64) {
        self.state.epoch = epoch;
        self.state.attached_node = attached_node;
        self.state.attach_history = vec![(self.state.applied_index, epoch, attached_node)];
        self.state.installing = false;
    }

    /// The leader handed a snapshot message to the transport (`ok`), or
    /// could not; raft resumes probing the follower either way.
    pub fn report_snapshot(&mut self, peer: u64, ok: bool) {
        let status = if ok {
            raft::SnapshotStatus::Finish
        } else {
            raft::SnapshotStatus::Failure
        };
        self.node.report_snapshot(peer, status);
    }

    /// The persist task numbered `number` (and every one before it) is durable.
    pub fn on_persisted(&mut self, number: u64) {
        self.node.on_persist_ready(number);
        // A restored snapshot counts as applied only once it is persisted.
        self.sync_applied();
    }

    /// Tells raft how far the state machine has applied, within what raft
    /// allows: never past what is committed and persisted locally.
    fn sync_applied(&mut self) {
        let log = &self.node.raft.raft_log;
        let limit = log.committed.min(log.persisted);
        let applied = self.state.applied_index.min(limit);
        if applied > log.applied {
            self.node.advance_apply_to(applied);
        }
    }

    /// The committed entry (`index`, `term`) was applied with `result`:
    /// resolves our proposals at that index.
    fn complete(&mut self, out: &mut Output, index: u64, term: u64, result: Result<u64, ApplyError>) {
        while let Some((&(i, t), _)) = self.pending.first_key_value() {
            if i > index {
                break;
            }
            let Some((_, p)) = self.pending.pop_first() else { break };
            self.inflight_bytes -= p.bytes;
            let result = if i < index {
                // An index we never applied: a snapshot resolves the ones it
                // skips, so this is not expected; what was committed there
                // is not known here, so neither is the outcome.
                warn!(
                    replica = self.id,
                    index = i,
                    "a proposal's index was never applied here"
                );
                Err(ApplyError::Unknown)
            } else if t == term {
                // Same index and term: this is our entry (Log Matching).
                result.clone()
            } else {
                // Another entry is committed at our index: ours never will be.
                Err(ApplyError::Superseded)
            };
            out.completions.push(Completion { token: p.token, result });
        }
    }

    fn apply(&mut self, entries: Vec<Entry>, out: &mut Output) {
        for entry in entries {
            let index = entry.index;
            let term = entry.term;
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    if entry.data.is_empty() {
                        // A new leader's empty entry.
                        self.complete(out, index, term, Err(ApplyError::Superseded));
                    } else {
                        // Entry data is already `Bytes`: the payload is shared, not copied.
                        let result = self.apply_op(index, &entry.data, self.built_here(index, term, &entry.data));
                        self.complete(out, index, term, result);
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.apply_conf_change(&entry, out);
                    self.complete(out, index, term, Err(ApplyError::Superseded));
                }
            }
            self.state.applied_index = index;
        }
    }

    /// True when `data` is the very buffer this replica encoded (and
    /// checksummed) for its own proposal at (index, term), never since
    /// written or read back: its checksum has nothing to catch yet. An entry
    /// that came from a peer or from disk lives in another buffer, so it is
    /// always verified. Checking a just-built 1 MiB entry again, cold in
    /// memory, cost the leader ~4% of its CPU under 1M writes.
    fn built_here(&self, index: u64, term: u64, data: &Bytes) -> bool {
        self.pending
            .get(&(index, term))
            .is_some_and(|p| p.data == (data.as_ptr() as usize, data.len()))
    }

    fn apply_op(&mut self, index: u64, data: &Bytes, built_here: bool) -> Result<u64, ApplyError> {
        let decoded = if built_here {
            self.entries_trusted += 1;
            EntryOp::decode_own(data)
        } else {
            EntryOp::decode(data)
        };
        let entry = match decoded {
            Ok(e) => e,
            Err(e) => {
                // Deterministic on every replica: skip it, never guess.
                error!(
                    replica = self.id,
                    index, "skipping a committed entry that does not decode: {e}"
                );
                return Err(ApplyError::Corrupt(e.to_string()));
            }
        };
        match entry.op {
            VolumeOp::Attach { node_id } => {
                self.state.epoch += 1;
                self.state.attached_node = node_id;
                self.state.record_attach(index);
                Ok(index)
            }
            _ if entry.epoch < self.state.epoch => Err(ApplyError::Fenced {
                entry_epoch: entry.epoch,
                current_epoch: self.state.epoch,
            }),
            VolumeOp::Write { offset, data } => {
                let length = data.len() as u64;
                self.state.cache.insert(offset, length, ExtentData::Data(data), index);
                Ok(index)
            }
            VolumeOp::Zero { offset, length } => {
                self.state.cache.insert(offset, length, ExtentData::Zero, index);
                Ok(index)
            }
        }
    }

    fn apply_conf_change(&mut self, entry: &Entry, out: &mut Output) {
        use protobuf::Message as _;
        let applied = if entry.get_entry_type() == EntryType::EntryConfChange {
            ConfChange::parse_from_bytes(&entry.data)
                .map_err(|e| e.to_string())
                .and_then(|cc| self.node.apply_conf_change(&cc).map_err(|e| e.to_string()))
        } else {
            ConfChangeV2::parse_from_bytes(&entry.data)
                .map_err(|e| e.to_string())
                .and_then(|cc| self.node.apply_conf_change(&cc).map_err(|e| e.to_string()))
        };
        match applied {
            Ok(cs) => {
                self.node.mut_store().wl().set_conf_state(cs.clone());
                out.conf_state = Some(cs);
            }
            Err(e) => warn!(
                replica = self.id,
                index = entry.index,
                "membership change not applied: {e}"
            ),
        }
    }

    /// The image file now holds everything up to `index` (durably only once
    /// a checkpoint syncs it; until then the log holds it too): forget
    /// those cache extents.
    pub fn on_destaged(&mut self, index: u64) {
        self.state.cache.mark_destaged(index.min(self.state.applied_index));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// A few replicas wired together in memory: every Ready is handled as
    /// the daemon's driver does, at once, except that links can be cut and
    /// a node's log writes held back (a slow disk).
    struct Cluster {
        nodes: BTreeMap<u64, Replica>,
        net: Vec<Message>,
        /// Links that drop what is sent over them: (from, to).
        cut: BTreeSet<(u64, u64)>,
        /// Nodes whose log writes are not acknowledged until released.
        slow_disk: BTreeSet<u64>,
        held: BTreeMap<u64, Vec<(u64, Vec<Message>)>>,
        completions: Vec<Completion>,
        /// Each install, and the tokens completed in the same Output.
        installs: Vec<(u64, SnapshotInstall, Vec<u64>)>,
        next_token: u64,
    }

    fn config(id: u64) -> ReplicaConfig {
        let mut c = ReplicaConfig::new(id);
        c.max_election_tick = c.election_tick + 1;
        c
    }

    impl Cluster {
        fn new(n: u64) -> Cluster {
            let ids: Vec<u64> = (1..=n).collect();
            let nodes = ids
                .iter()
                .map(|&id| (id, Replica::new(&config(id), &ids).expect("new replica")))
                .collect();
            Cluster {
                nodes,
                net: Vec::new(),
                cut: BTreeSet::new(),
                slow_disk: BTreeSet::new(),
                held: BTreeMap::new(),
                completions: Vec::new(),
                installs: Vec::new(),
                next_token: 100,
            }
        }

        fn r(&mut self, id: u64) -> &mut Replica {
            self.nodes.get_mut(&id).expect("node")
        }

        fn isolate(&mut self, id: u64) {
            for &other in self.nodes.keys() {
                if other != id {
                    self.cut.insert((id, other));
                    self.cut.insert((other, id));
                }
            }
        }

        fn send(&mut self, from: u64, msgs: Vec<Message>) {
            for m in msgs {
                if !self.cut.contains(&(from, m.to)) {
                    self.net.push(m);
                }
            }
        }

        fn handle(&mut self, id: u64, out: Output) {
            let snapshot_to: Vec<u64> = out
                .messages
                .iter()
                .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
                .map(|m| m.to)
                .collect();
            self.send(id, out.messages);
            for to in snapshot_to {
                self.r(id).report_snapshot(to, true);
            }
            let tokens: Vec<u64> = out.completions.iter().map(|c| c.token).collect();
            self.completions.extend(out.completions);
            if let Some(inst) = out.install {
                self.installs.push((id, inst, tokens));
                let (epoch, attached) = inst.epoch.expect("the leader stamps its snapshots");
                self.r(id).finish_install(epoch, attached);
            }
            if let Some(task) = out.persist {
                if self.slow_disk.contains(&id) {
                    self.held
                        .entry(id)
                        .or_default()
                        .push((task.number, task.messages_after));
                } else {
                    self.r(id).on_persisted(task.number);
                    self.send(id, task.messages_after);
                }
            }
        }

        /// Runs until nothing is left to do.
        fn pump(&mut self) {
            loop {
                let mut busy = false;
                for id in self.nodes.keys().copied().collect::<Vec<_>>() {
                    while let Some(out) = self.r(id).poll() {
                        busy = true;
                        self.handle(id, out);
                    }
                }
                for m in std::mem::take(&mut self.net) {
                    busy = true;
                    let _ = self.r(m.to).step(m);
                }
                if !busy {
                    return;
                }
            }
        }

        /// The slow disk of `id` catches up.
        fn release(&mut self, id: u64) {
            self.slow_disk.remove(&id);
            for (number, msgs) in self.held.remove(&id).unwrap_or_default() {
                self.r(id).on_persisted(number);
                self.send(id, msgs);
            }
            self.pump();
        }

        /// `id` campaigns, the others out of their leader lease.
        fn elect(&mut self, id: u64) {
            for r in self.nodes.values_mut() {
                r.expire_leader_lease();
            }
            self.r(id).campaign().expect("campaign");
            self.pump();
            assert!(self.r(id).is_leader(), "node {id} did not win its election");
        }

        /// A round of heartbeats from `id`.
        fn heartbeat(&mut self, id: u64) {
            for _ in 0..self.r(id).node.raft.heartbeat_timeout() {
                self.r(id).tick();
            }
            self.pump();
        }

        fn propose(&mut self, id: u64, op: VolumeOp) -> u64 {
            let token = self.next_token;
            self.next_token += 1;
            let epoch = self.r(id).state().epoch;
            self.r(id).propose(token, epoch, op).expect("propose");
            token
        }

        fn write(&mut self, id: u64, offset: u64) -> u64 {
            let data = Bytes::from(vec![offset as u8 + 1; 512]);
            self.propose(id, VolumeOp::Write { offset, data })
        }

        fn outcomes(&self, token: u64) -> Vec<Result<u64, ApplyError>> {
            self.completions
                .iter()
                .filter(|c| c.token == token)
                .map(|c| c.result.clone())
                .collect()
        }
    }

    /// Quorum-receipt mode's building blocks: a follower's receipt counts
    /// an append before it is durable, and only for what its log holds.
    #[test]
    fn receipts_count_appends_before_they_are_durable() {
        let mut c = Cluster::new(3);
        c.elect(1);
        c.slow_disk.insert(2);
        c.slow_disk.insert(3);
        let w = c.write(1, 0);
        c.pump();
        let (index, term) = (c.r(1).last_index(), c.r(1).term());
        assert!(c.r(1).commit_index() < index, "committed before a follower's fsync");
        assert!(c.outcomes(w).is_empty());
        let mut received = std::collections::HashMap::new();
        assert!(
            c.r(1).quorum_received(&received) < index,
            "the leader alone is no quorum"
        );
        let receipt = c
            .r(2)
            .receipt_for(1, term, index, term)
            .expect("node 2 holds the entry");
        assert_eq!((receipt.from, receipt.to), (2, 1));
        assert_eq!(receipt_of(&receipt), Some((term, index)));
        // Not for entries it lacks, another term, or another leader.
        assert!(c.r(2).receipt_for(1, term, index + 1, term).is_none());
        assert!(c.r(2).receipt_for(1, term + 1, index, term).is_none());
        assert!(c.r(2).receipt_for(3, term, index, term).is_none());
        received.insert(2, index);
        assert_eq!(c.r(1).quorum_received(&received), index);
        // Followers do not count receipts, and real messages are not receipts.
        assert_eq!(c.r(2).quorum_received(&received), 0);
        let mut append = Message::default();
        append.set_msg_type(MessageType::MsgAppend);
        assert_eq!(receipt_of(&append), None);
        // Durability still comes from the fsync: the write commits once node 2's is done.
        c.release(2);
        assert_eq!(c.outcomes(w), vec![Ok(index)]);
    }

    /// The leader applies the entries it built itself without checking
    /// their checksums again; the followers' entries come from a peer, and
    /// each is verified. A new leader's older entries came from a peer too.
    #[test]
    fn only_the_proposer_skips_verifying_its_own_entries() {
        let mut c = Cluster::new(3);
        c.elect(1);
        let writes = [c.write(1, 0), c.write(1, 4096)];
        c.pump();
        for w in writes {
            assert!(matches!(c.outcomes(w)[..], [Ok(_)]), "write {w}: {:?}", c.outcomes(w));
        }
        assert_eq!(c.r(1).entries_trusted(), 2);
        // The followers learn the commit with the leader's next message.
        c.heartbeat(1);
        for id in [2, 3] {
            assert_eq!(c.r(id).applied_index(), c.r(1).applied_index());
            assert_eq!(c.r(id).entries_trusted(), 0, "node {id} trusted a peer's entry");
            assert_eq!(c.r(id).read(0, 8192), c.r(1).read(0, 8192));
        }
        c.elect(2);
        let w = c.write(2, 8192);
        c.pump();
        assert!(matches!(c.outcomes(w)[..], [Ok(_)]));
        assert_eq!(c.r(2).entries_trusted(), 1, "only its own proposal");
    }

    /// Writes proposed together reach each follower in one append message,
    /// at consecutive indexes in the order given, and a refused one (here a
    /// stale writer epoch) neither blocks nor reorders the others. A commit
    /// is not broadcast on its own: followers learn it with the leader's
    /// next message, at the latest its next heartbeat.
    #[test]
    fn writes_proposed_together_go_to_each_follower_in_one_message() {
        let mut c = Cluster::new(3);
        c.elect(1);
        c.propose(1, VolumeOp::Attach { node_id: 1 });
        c.pump();
        let epoch = c.r(1).state().epoch;
        assert!(epoch > 0);
        let write = |token, epoch, offset: u64| Proposal {
            token,
            epoch,
            op: VolumeOp::Write {
                offset,
                data: Bytes::from(vec![token as u8; 512]),
            },
        };
        let before = c.r(1).last_index();
        let results = c.r(1).propose_batch(vec![
            write(101, epoch, 0),
            write(102, epoch - 1, 512),
            write(103, epoch, 1024),
            write(104, epoch, 0),
        ]);
        assert_eq!(
            results,
            vec![
                Ok(before + 1),
                Err(ProposeError::StaleEpoch {
                    epoch: epoch - 1,
                    current: epoch
                }),
                Ok(before + 2),
                Ok(before + 3),
            ]
        );
        while let Some(out) = c.r(1).poll() {
            c.handle(1, out);
        }
        for to in [2, 3] {
            let appends: Vec<Vec<u64>> = c
                .net
                .iter()
                .filter(|m| m.to == to && m.get_msg_type() == MessageType::MsgAppend)
                .map(|m| m.entries.iter().map(|e| e.index).collect())
                .collect();
            assert_eq!(appends, vec![vec![before + 1, before + 2, before + 3]], "to node {to}");
        }
        c.pump();
        assert_eq!(c.outcomes(101), vec![Ok(before + 1)]);
        assert_eq!(c.outcomes(103), vec![Ok(before + 2)]);
        assert_eq!(c.outcomes(104), vec![Ok(before + 3)]);
        assert!(c.outcomes(102).is_empty(), "a refused write has no outcome");
        // The later write to offset 0 wins.
        assert_eq!(
            c.r(1).read(0, 512),
            vec![Segment::Cached {
                offset: 0,
                data: Bytes::from(vec![104u8; 512])
            }]
        );
        for id in [2, 3] {
            assert!(
                c.r(id).commit_index() < before + 3,
                "node {id}: commit broadcast on its own"
            );
        }
        c.heartbeat(1);
        for id in [2, 3] {
            assert_eq!(c.r(id).applied_index(), before + 3, "node {id}");
            assert_eq!(c.r(id).read(0, 1536), c.r(1).read(0, 1536));
        }
    }

    /// Seeds 4 and 20 of the simulation: a deposed leader's write commits
    /// under the next leader, and the deposed leader learns of it only
    /// through a snapshot. It must not call the write superseded (the
    /// daemon would propose it again), but unknown, as soon as the
    /// snapshot arrives.
    #[test]
    fn a_pending_proposal_a_snapshot_covers_completes_as_unknown() {
        let mut c = Cluster::new(3);
        c.elect(1);
        let w = c.write(1, 0);
        c.pump();
        assert_eq!(c.outcomes(w), vec![Ok(c.r(1).last_index())]);
        // Node 1's write reaches the others, their answers do not reach it.
        c.cut.insert((2, 1));
        c.cut.insert((3, 1));
        let lost = c.write(1, 512);
        c.pump();
        let index = c.r(1).last_index();
        assert!(c.outcomes(lost).is_empty());
        assert_eq!(c.r(2).last_index(), index);
        // Node 2 takes over; its first entry commits node 1's write.
        c.elect(2);
        for i in 0..4 {
            c.write(2, 1024 * (i + 1));
        }
        c.pump();
        let applied = c.r(2).applied_index();
        assert!(applied > index + 1);
        c.r(2).on_destaged(applied);
        assert_eq!(c.r(2).compact(applied), applied);
        // Node 1 hears of it again: the log it needs is gone, so a snapshot.
        c.cut.clear();
        c.heartbeat(2);
        assert_eq!(c.installs.len(), 1, "node 1 should have installed a snapshot");
        let (node, inst, ref settled) = c.installs[0];
        assert_eq!(node, 1);
        assert!(inst.index > index);
        assert_eq!(settled, &vec![lost], "settled as soon as the snapshot is seen");
        assert_eq!(c.outcomes(lost), vec![Err(ApplyError::Unknown)]);
        assert_eq!(c.r(1).inflight_bytes, 0);
        assert!(c.r(1).pending.is_empty());
        // And it never completes again as the log moves on.
        c.write(2, 0);
        c.pump();
        c.heartbeat(2);
        assert_eq!(c.outcomes(lost), vec![Err(ApplyError::Unknown)]);
        assert_eq!(c.r(1).applied_index(), c.r(2).applied_index());
    }

    /// A deposed leader's proposals whose entries a new leader truncated
    /// away are superseded once other entries commit at their indexes,
    /// even when it leads again and proposes at one of those indexes
    /// (two pending proposals at one index).
    #[test]
    fn truncated_proposals_are_superseded_and_none_is_lost() {
        let mut c = Cluster::new(3);
        c.elect(1);
        c.write(1, 0);
        c.pump();
        // Three writes only node 1 has.
        c.isolate(1);
        let old: Vec<u64> = (0..3).map(|i| c.write(1, 512 * i)).collect();
        c.pump();
        let first_old = c.r(1).last_index() - 2;
        c.elect(2);
        assert_eq!(c.r(2).last_index(), first_old);
        c.cut.clear();
        c.heartbeat(2);
        assert_eq!(c.r(1).last_index(), first_old, "node 1's tail is replaced");
        c.elect(1);
        let new = c.write(1, 4096);
        c.pump();
        assert_eq!(c.r(1).last_index(), first_old + 2, "proposed where an old one was");
        for t in &old {
            assert_eq!(c.outcomes(*t), vec![Err(ApplyError::Superseded)], "token {t}");
        }
        assert_eq!(c.outcomes(new), vec![Ok(first_old + 2)]);
        assert_eq!(c.r(1).inflight_bytes, 0);
    }

    /// Seed 234 of the simulation: the epoch a snapshot's receiver installs
    /// with is the one as of the snapshot index, which the leader stamps on
    /// the snapshot, even when that index is past what it has applied (its
    /// own disk lags while the followers commit).
    #[test]
    fn the_snapshot_carries_the_epoch_as_of_its_index() {
        let mut c = Cluster::new(5);
        c.elect(1);
        c.propose(1, VolumeOp::Attach { node_id: 1 });
        c.write(1, 0);
        c.pump();
        assert_eq!(c.r(1).state().epoch, 1);
        c.isolate(5);
        for i in 0..4 {
            c.write(1, 512 * i);
        }
        c.pump();
        let applied = c.r(1).applied_index();
        c.r(1).on_destaged(applied);
        c.r(1).compact(applied);
        // The leader's disk stalls; nodes 2-4 commit an attach without it.
        c.slow_disk.insert(1);
        c.propose(1, VolumeOp::Attach { node_id: 3 });
        c.write(1, 0);
        c.pump();
        let commit = c.r(1).commit_index();
        assert!(commit > applied + 1);
        assert_eq!(c.r(1).applied_index(), applied);
        assert_eq!(c.r(1).state().epoch_at(commit), None, "not applied there yet");
        assert_eq!(c.r(1).epoch_at(commit), Some((2, 3)), "from the log");
        assert_eq!(c.r(1).epoch_at(commit + 1), None, "not committed");
        // Node 5 comes back: it needs a snapshot.
        c.cut.clear();
        c.heartbeat(1);
        assert_eq!(c.installs.len(), 1, "node 5 should have installed a snapshot");
        let (node, inst, _) = c.installs[0];
        assert_eq!((node, inst.index), (5, commit));
        assert_eq!(inst.epoch, Some((2, 3)));
        assert_eq!(c.r(5).state().epoch, 2);
        assert_eq!(c.r(5).state().epoch_at(commit), Some((2, 3)));
        assert_eq!(c.r(5).state().epoch_at(commit - 1), None, "before its install point");
        c.release(1);
        c.write(1, 0);
        c.pump();
        let epochs: Vec<u64> = c.nodes.values().map(|r| r.state().epoch).collect();
        assert_eq!(epochs, vec![2; 5]);
    }

    #[test]
    fn snapshot_epoch_stamps_round_trip_and_damage_is_refused() {
        let good = encode_snapshot_epoch(7, 3);
        assert_eq!(decode_snapshot_epoch(&good), Some((7, 3)));
        assert_eq!(decode_snapshot_epoch(&[]), None);
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            assert_eq!(decode_snapshot_epoch(&bad), None, "flip in byte {i}");
        }
        assert_eq!(decode_snapshot_epoch(&good[..good.len() - 1]), None);
    }

    #[test]
    fn epoch_at_answers_only_what_its_history_covers() {
        let mut s = VolumeState {
            epoch: 4,
            attached_node: 2,
            applied_index: 20,
            attach_history: vec![(10, 3, 1), (15, 4, 2)],
            ..VolumeState::default()
        };
        assert_eq!(s.epoch_at(9), None, "before the first record: not known here");
        assert_eq!(s.epoch_at(10), Some((3, 1)));
        assert_eq!(s.epoch_at(14), Some((3, 1)));
        assert_eq!(s.epoch_at(15), Some((4, 2)));
        assert_eq!(s.epoch_at(20), Some((4, 2)));
        assert_eq!(s.epoch_at(21), None, "past the applied index: an attach may come");
        s.installing = true;
        assert_eq!(s.epoch_at(15), None, "mid-install");
        s.installing = false;
        // The bound drops the oldest records, and their coverage with them.
        for i in 0..MAX_ATTACH_HISTORY as u64 {
            s.applied_index = 21 + i;
            s.epoch += 1;
            s.record_attach(21 + i);
        }
        assert_eq!(s.attach_history.len(), MAX_ATTACH_HISTORY);
        assert_eq!(s.epoch_at(10), None);
        assert_eq!(s.epoch_at(20), None);
        assert_eq!(s.epoch_at(21), Some((5, 2)));
        assert_eq!(s.epoch_at(s.applied_index), Some((s.epoch, 2)));
    }

    /// A restart (from the volume state recorded at a destage) knows the
    /// epoch from its restart point on, and nothing before it; a history
    /// handed over in the volume state is kept.
    #[test]
    fn a_restarted_replica_refuses_indexes_before_its_history() {
        let point = Entry {
            index: 10,
            term: 2,
            ..Default::default()
        };
        let hs = HardState {
            term: 2,
            commit: 10,
            ..Default::default()
        };
        let cs = ConfState::from((vec![1, 2, 3], vec![]));
        let state = |history: Vec<(u64, u64, u64)>| VolumeState {
            epoch: 3,
            attached_node: 2,
            applied_index: 10,
            attach_history: history,
            ..VolumeState::default()
        };
        let r = Replica::restart(
            &config(1),
            hs.clone(),
            cs.clone(),
            std::slice::from_ref(&point),
            state(Vec::new()),
        )
        .expect("restart");
        assert_eq!(r.state().attach_history, vec![(10, 3, 2)]);
        assert_eq!(r.epoch_at(9), None);
        assert_eq!(r.epoch_at(10), Some((3, 2)));
        assert_eq!(r.epoch_at(11), None);
        let r = Replica::restart(&config(1), hs, cs, &[point], state(vec![(4, 2, 1), (8, 3, 2)])).expect("restart");
        assert_eq!(r.epoch_at(3), None);
        assert_eq!(r.epoch_at(5), Some((2, 1)));
        assert_eq!(r.epoch_at(10), Some((3, 2)));
    }
}
