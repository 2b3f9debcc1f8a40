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
use raft::eraftpb::{ConfChange, ConfChangeV2, ConfState, Entry, EntryType, HardState, Message, Snapshot};
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

/// Why a proposal that reached the log did not take effect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The entry was written under an older writer epoch (fencing).
    #[error("fenced: entry epoch {entry_epoch} is older than the volume's epoch {current_epoch}")]
    Fenced { entry_epoch: u64, current_epoch: u64 },
    /// Another leader's entry took this proposal's log index; propose again.
    #[error("superseded by a newer leader's entry")]
    Superseded,
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
    /// A snapshot from the leader replaced this replica's log: (index,
    /// term). The state machine is reset; the driver must copy the volume
    /// as of at least that index (fuzzy copy, then the log's entries after
    /// it are replayed over it), call [`Replica::finish_install`], and only
    /// then persist `persist` (which carries the snapshot) and poll again.
    pub install: Option<(u64, u64)>,
}

/// The replicated volume state machine.
#[derive(Debug, Default)]
pub struct VolumeState {
    /// Current writer epoch; writes carrying an older one are refused.
    pub epoch: u64,
    /// Node the volume is attached to in this epoch (0: none yet).
    pub attached_node: u64,
    pub cache: WriteCache,
    pub applied_index: u64,
    /// (index, epoch, attached node) at each attach applied since the last
    /// restart or snapshot, the first being the state at that point: a
    /// snapshot's receiver asks the epoch as of the snapshot index.
    pub attach_history: Vec<(u64, u64, u64)>,
    /// A snapshot install is under way: no reads are served meanwhile.
    pub installing: bool,
}

impl VolumeState {
    /// Epoch and attached node as of `index` (which must not be older than
    /// the first history record; older answers the oldest known).
    pub fn epoch_at(&self, index: u64) -> (u64, u64) {
        self.attach_history
            .iter()
            .rev()
            .find(|(i, _, _)| *i <= index)
            .or(self.attach_history.first())
            .map(|(_, e, n)| (*e, *n))
            .unwrap_or((self.epoch, self.attached_node))
    }
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    term: u64,
    token: u64,
    /// Write bytes counted in `inflight_bytes` until it is resolved.
    bytes: u64,
}

pub struct Replica {
    id: u64,
    node: RawNode<MemStorage>,
    state: VolumeState,
    /// Our proposals in the log, by index.
    pending: BTreeMap<u64, Pending>,
    max_cache_bytes: u64,
    /// Write bytes proposed but not yet applied, counted against the cache bound.
    inflight_bytes: u64,
    role: (StateRole, u64),
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
    pub fn state(&self) -> &VolumeState {
        &self.state
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

    /// A message from a peer. Messages for another group or from an
    /// unknown peer are raft's to drop; errors are reported, never panics.
    pub fn step(&mut self, msg: Message) -> Result<(), ProposeError> {
        self.node.step(msg).map_err(|e| ProposeError::Raft(e.to_string()))
    }

    /// Proposes an operation under writer `epoch`; `token` comes back in a
    /// [`Completion`] once it is applied (or fails).
    pub fn propose(&mut self, token: u64, epoch: u64, op: VolumeOp) -> Result<(), ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NotLeader {
                leader_hint: self.leader_id(),
            });
        }
        if !matches!(op, VolumeOp::Attach { .. }) && epoch < self.state.epoch {
            return Err(ProposeError::StaleEpoch {
                epoch,
                current: self.state.epoch,
            });
        }
        let bytes = match &op {
            VolumeOp::Write { data, .. } => data.len() as u64,
            _ => 0,
        };
        let pending_bytes = self.state.cache.bytes() + self.inflight_bytes;
        if bytes > 0 && pending_bytes + bytes > self.max_cache_bytes {
            return Err(ProposeError::CacheFull {
                pending_bytes,
                max_bytes: self.max_cache_bytes,
            });
        }
        let data = EntryOp { epoch, op }.encode();
        let before = self.last_index();
        self.node
            .propose(Vec::new(), data)
            .map_err(|e| ProposeError::Raft(e.to_string()))?;
        let index = self.last_index();
        // A leader appends a proposal to its own log at once.
        assert_eq!(index, before + 1, "proposal did not land at the next log index");
        self.pending.insert(
            index,
            Pending {
                term: self.term(),
                token,
                bytes,
            },
        );
        self.inflight_bytes += bytes;
        Ok(())
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
            // The leader's state replaces ours; the driver fills it in.
            self.state.cache = WriteCache::new();
            self.state.applied_index = meta.index;
            self.state.installing = true;
            self.state.attach_history.clear();
            out.install = Some((meta.index, meta.term));
        }
        let committed = rd.take_committed_entries();
        self.apply(committed, &mut out);
        let entries = rd.take_entries();
        let hard_state = rd.hs().cloned();
        let messages_after = rd.take_persisted_messages();
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

    fn complete(&mut self, out: &mut Output, index: u64, term: u64, result: Result<u64, ApplyError>) {
        // Anything of ours below this index that was not resolved lost its slot.
        while let Some((&i, _)) = self.pending.first_key_value() {
            if i >= index {
                break;
            }
            if let Some((_, p)) = self.pending.pop_first() {
                self.inflight_bytes -= p.bytes;
                out.completions.push(Completion {
                    token: p.token,
                    result: Err(ApplyError::Superseded),
                });
            }
        }
        if let Some(p) = self.pending.remove(&index) {
            self.inflight_bytes -= p.bytes;
            // Same index, other term: another leader's entry replaced ours.
            let result = if p.term == term {
                result
            } else {
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
                        let result = self.apply_op(index, &entry.data);
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

    fn apply_op(&mut self, index: u64, data: &Bytes) -> Result<u64, ApplyError> {
        let entry = match EntryOp::decode(data) {
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
                self.state.attach_history.push((index, self.state.epoch, node_id));
                // Attaches are rare; a long history is still bounded.
                if self.state.attach_history.len() > 1024 {
                    self.state.attach_history.remove(1);
                }
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

    /// The image now durably holds everything up to `index`: forget those
    /// cache extents (and, later, compact the log up to here).
    pub fn on_destaged(&mut self, index: u64) {
        self.state.cache.mark_destaged(index.min(self.state.applied_index));
    }
}
