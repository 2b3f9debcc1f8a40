//! A seeded, deterministic simulation of one volume's Raft group: three
//! replicas, an in-memory network that drops, delays and reorders messages
//! and partitions nodes, and crashes that lose everything not yet persisted.
//!
//! Each simulated node is driven the way the daemon's replica driver
//! (crates/daemon/src/group.rs) drives it, so a change there must be
//! mirrored here:
//! - persist tasks go through an in-order log queue (the log writer) that a
//!   crash cuts short; its speed varies with the seed;
//! - every node ticks, except while it copies a snapshot;
//! - now and then a destage captures the cache up to the applied index and,
//!   a few rounds later, writes it to the node's image (which survives
//!   crashes), records the volume state (destaged index, epoch, attached
//!   node) and compacts the in-memory and durable logs (`start_destage`,
//!   `on_destaged`): the leader keeps what a lagging follower still needs,
//!   up to `MAX_RETAINED_ENTRIES`, and the durable log keeps one entry more
//!   than memory;
//! - a follower the leader compacted past gets a snapshot: its Ready is held
//!   while the volume is copied chunk by chunk, fuzzily, from the leader's
//!   image and cache once the leader has applied the snapshot index; then
//!   the epoch as of that index is asked of the leader, the volume state is
//!   recorded, `finish_install` is called and the held Ready is written
//!   with one stand-in entry at the snapshot point (`start_copy`,
//!   `copy_from_leader`, `on_installed`);
//! - a restart rebuilds the replica from what `triremed` would find on
//!   disk: the durable log (its first entry, once compacted, the snapshot
//!   point), the volume state and the image.
//!
//! Checked (DESIGN.md C1, C3, and the README's "Reads are linearizable"):
//! - every write acknowledged to a client is, at the end, in every replica's
//!   durable log at the index it was acknowledged at (unless compacted away
//!   after being destaged), and every replica's image plus cache holds, for
//!   every block, that write or a later one;
//! - all replicas' state machines agree byte for byte, and on the epoch;
//! - reads (ReadIndex on a random replica, leader or not, served once it
//!   has applied the confirmed index, over its image plus cache) return the
//!   latest write acknowledged before the read was issued, or a later one,
//!   and nothing older than what a read completed before returned: never a
//!   value no client proposed, never a fenced write, never zeroes once a
//!   write to the block was acknowledged;
//! - a write carrying a stale epoch never takes effect after a newer attach;
//! - a node always restarts from what it left on disk.
//!
//! Every write's data starts with its token (u64 LE), so a read tells which
//! write it returned. On failure the seed is printed; `SIM_SEED=n` replays
//! one seed.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use bytes::Bytes;
use trireme_replica::cache::Extent;
use trireme_replica::raft::eraftpb::{ConfState, Entry, HardState, Message, MessageType};
use trireme_replica::{
    ApplyError, EntryOp, ExtentData, Output, PersistTask, Replica, ReplicaConfig, Segment, VolumeOp, VolumeState,
};

const NODES: [u64; 3] = [1, 2, 3];
const BLOCK: u64 = 512;
const BLOCKS: u64 = 16;
/// Blocks copied per step of a snapshot copy; other work goes on between
/// steps, so the copy is fuzzy like the driver's 4 MiB chunks.
const COPY_CHUNK_BLOCKS: u64 = 4;
/// The driver's MAX_RETAINED_ENTRIES, scaled down so that a node down for a
/// while needs a snapshot.
const MAX_RETAINED_ENTRIES: u64 = 16;
/// A read whose ReadIndex is not confirmed within this many rounds (20
/// ticks, the driver's 2 s) is given up, as the driver does.
const READ_TIMEOUT_ROUNDS: u64 = 60;
/// A destage's image writes and volume state land within this many rounds.
const DESTAGE_MAX_ROUNDS: u64 = 3;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The data of the write with `token`: the token, then a filler byte.
fn payload(token: u64) -> Vec<u8> {
    let mut v = token.to_le_bytes().to_vec();
    v.resize(BLOCK as usize, (token % 251) as u8 + 1);
    v
}

/// What the raft log holds durably: exactly what was persisted.
#[derive(Default, Clone)]
struct DurableLog {
    hard_state: HardState,
    entries: Vec<Entry>,
}

impl DurableLog {
    fn append(&mut self, entries: &[Entry]) {
        if let Some(first) = entries.first() {
            // Raft may overwrite a suffix that a new leader replaced.
            self.entries.retain(|e| e.index < first.index);
            self.entries.extend_from_slice(entries);
        }
    }

    /// Drops the entries below `index`.
    fn compact(&mut self, index: u64) {
        self.entries.retain(|e| e.index >= index);
    }
}

/// volume.state: the state machine as of the destaged index.
#[derive(Default, Clone, Copy, Debug)]
struct AppliedState {
    destaged_index: u64,
    epoch: u64,
    attached_node: u64,
}

/// A log write queued to the node's log writer; a crash loses the queue.
enum LogJob {
    Ready(PersistTask),
    /// The held Ready of a snapshot install, written after the copy (the
    /// driver's `on_installed`).
    Install {
        index: u64,
        term: u64,
        task: PersistTask,
        fix_applied: AppliedState,
    },
    /// Drop durable entries below this index (after a destage).
    Compact(u64),
}

/// A snapshot install under way: the Ready is held until the copy is done.
struct Install {
    index: u64,
    term: u64,
    task: Option<PersistTask>,
    /// Blocks copied so far.
    copied: u64,
}

struct Node {
    replica: Option<Replica>,
    log: DurableLog,
    applied: AppliedState,
    /// The volume image; it survives crashes, with whatever a destage or a
    /// snapshot copy had written of it.
    image: Vec<u8>,
    /// Log writes not yet durable ("fsync" in flight): a crash loses them.
    jobs: VecDeque<LogJob>,
    installing: Option<Install>,
    destaging: Option<Destage>,
}

/// A destage in flight: what it writes, and the volume state it records.
struct Destage {
    extents: Vec<(u64, Extent)>,
    applied: AppliedState,
    done_round: u64,
}

struct PendingRead {
    node: u64,
    block: u64,
    issued_round: u64,
    /// What it must not read older than.
    floor: Floor,
    /// The confirmed read index, once the ReadState is back.
    index: Option<u64>,
}

/// The oldest write a read of a block may return, as of when it was issued.
#[derive(Default, Debug, Clone, Copy)]
struct Floor {
    /// The latest write to the block acknowledged: (log index, token).
    acked: Option<(u64, u64)>,
    /// The newest write returned by a read of the block that completed.
    read: Option<u64>,
}

#[derive(Default, Debug, Clone, Copy)]
struct Stats {
    acked: usize,
    fenced: usize,
    reads_issued: usize,
    reads_checked: usize,
    reads_from_followers: usize,
    reads_expired: usize,
    destages: usize,
    /// Destages where the leader compacted past a lagging follower.
    compactions_past_follower: usize,
    snapshots_sent: usize,
    installs_started: usize,
    installs_finished: usize,
    restarts: usize,
    restarts_from_compacted_log: usize,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.acked += o.acked;
        self.fenced += o.fenced;
        self.reads_issued += o.reads_issued;
        self.reads_checked += o.reads_checked;
        self.reads_from_followers += o.reads_from_followers;
        self.reads_expired += o.reads_expired;
        self.destages += o.destages;
        self.compactions_past_follower += o.compactions_past_follower;
        self.snapshots_sent += o.snapshots_sent;
        self.installs_started += o.installs_started;
        self.installs_finished += o.installs_finished;
        self.restarts += o.restarts;
        self.restarts_from_compacted_log += o.restarts_from_compacted_log;
    }
}

struct Sim {
    seed: u64,
    /// How fast the log writer is: the chance, at each opportunity, that
    /// the next queued log write becomes durable.
    sync_percent: u64,
    rng: Rng,
    round: u64,
    nodes: BTreeMap<u64, Node>,
    network: Vec<(u64, Message)>,
    /// Nodes cut off from everyone.
    isolated: BTreeSet<u64>,
    next_token: u64,
    /// token -> block of writes in flight.
    inflight: HashMap<u64, u64>,
    /// token -> block of every write ever proposed.
    proposed: HashMap<u64, u64>,
    /// Acknowledged writes: (log index, block, token).
    acked: Vec<(u64, u64, u64)>,
    /// Tokens of writes refused as fenced.
    fenced: BTreeSet<u64>,
    /// block -> (log index, token) of the latest acknowledged write to it.
    latest_acked: BTreeMap<u64, (u64, u64)>,
    /// block -> token of the newest write a completed read returned.
    latest_read: BTreeMap<u64, u64>,
    /// Pending reads by token.
    reads: BTreeMap<u64, PendingRead>,
    epoch: u64,
    stats: Stats,
}

fn config(id: u64) -> ReplicaConfig {
    let mut c = ReplicaConfig::new(id);
    c.election_tick = 10;
    c.max_election_tick = 11;
    c.max_cache_bytes = 1 << 20;
    c
}

fn conf_state() -> ConfState {
    ConfState::from((NODES.to_vec(), vec![]))
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut nodes = BTreeMap::new();
        for id in NODES {
            let replica = Replica::new(&config(id), &NODES).expect("new replica");
            nodes.insert(
                id,
                Node {
                    replica: Some(replica),
                    log: DurableLog::default(),
                    applied: AppliedState::default(),
                    image: vec![0; (BLOCKS * BLOCK) as usize],
                    jobs: VecDeque::new(),
                    installing: None,
                    destaging: None,
                },
            );
        }
        Sim {
            seed,
            sync_percent: [70, 40, 20][(seed % 3) as usize],
            rng: Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
            round: 0,
            nodes,
            network: Vec::new(),
            isolated: BTreeSet::new(),
            next_token: 1,
            inflight: HashMap::new(),
            proposed: HashMap::new(),
            acked: Vec::new(),
            fenced: BTreeSet::new(),
            latest_acked: BTreeMap::new(),
            latest_read: BTreeMap::new(),
            reads: BTreeMap::new(),
            epoch: 0,
            stats: Stats::default(),
        }
    }

    fn node(&mut self, id: u64) -> &mut Node {
        self.nodes.get_mut(&id).expect("node exists")
    }

    fn replica_mut(&mut self, id: u64) -> Option<&mut Replica> {
        self.node(id).replica.as_mut()
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            self.network.push((m.to, m));
        }
    }

    /// Drains every replica's Output (none while it installs a snapshot,
    /// like the driver), persisting some log jobs at once and leaving others
    /// for later (an fsync still in flight); then serves the reads that are
    /// ready.
    fn pump(&mut self) {
        for id in NODES {
            loop {
                let node = self.node(id);
                if node.installing.is_some() {
                    break;
                }
                let Some(out) = node.replica.as_mut().and_then(|r| r.poll()) else {
                    break;
                };
                self.dispatch(id, out);
                self.sync_some(id);
            }
            self.sync_some(id);
        }
        self.serve_reads();
    }

    fn dispatch(&mut self, id: u64, out: Output) {
        let snapshot_to: Vec<u64> = out
            .messages
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
            .map(|m| m.to)
            .collect();
        self.send(out.messages);
        for to in snapshot_to {
            // The snapshot message carries only the point to copy from; it
            // is "sent" once queued (as in the driver).
            self.stats.snapshots_sent += 1;
            if let Some(r) = self.replica_mut(id) {
                r.report_snapshot(to, true);
            }
        }
        for c in out.completions {
            if let Some(block) = self.inflight.remove(&c.token) {
                match c.result {
                    Ok(index) => {
                        self.acked.push((index, block, c.token));
                        let latest = self.latest_acked.entry(block).or_insert((index, c.token));
                        if index > latest.0 {
                            *latest = (index, c.token);
                        }
                    }
                    Err(ApplyError::Fenced { .. }) => {
                        self.fenced.insert(c.token);
                    }
                    Err(_) => {}
                }
            }
        }
        for rs in out.read_states {
            if let Ok(b) = <[u8; 8]>::try_from(rs.request_ctx.as_slice())
                && let Some(p) = self.reads.get_mut(&u64::from_le_bytes(b))
                && p.node == id
            {
                p.index = Some(rs.index);
            }
        }
        let mut persist = out.persist;
        if let Some((index, term)) = out.install {
            // Hold the Ready's log write (it carries the snapshot) until the
            // volume is copied: see copy_step.
            self.stats.installs_started += 1;
            let task = persist.take();
            self.node(id).installing = Some(Install {
                index,
                term,
                task,
                copied: 0,
            });
        }
        if let Some(task) = persist {
            self.node(id).jobs.push_back(LogJob::Ready(task));
        }
    }

    /// The log writer makes some queued jobs durable, in order.
    fn sync_some(&mut self, id: u64) {
        let mut to_send = Vec::new();
        loop {
            if self.nodes[&id].jobs.is_empty() || !self.rng.chance(self.sync_percent) {
                break;
            }
            let node = self.node(id);
            let job = node.jobs.pop_front().expect("non-empty");
            let (number, messages_after) = match job {
                LogJob::Ready(task) => {
                    node.log.append(&task.entries);
                    if let Some(hs) = task.hard_state {
                        node.log.hard_state = hs;
                    }
                    (Some(task.number), task.messages_after)
                }
                LogJob::Install {
                    index,
                    term,
                    task,
                    fix_applied,
                } => {
                    node.applied = fix_applied;
                    // The durable log restarts at the snapshot point: one
                    // stand-in entry carrying its index and term, replacing
                    // everything the node had (Replica::restart).
                    let point = Entry {
                        index,
                        term,
                        ..Default::default()
                    };
                    let mut entries = vec![point];
                    entries.extend(task.entries.into_iter().filter(|e| e.index > index));
                    node.log.append(&entries);
                    node.log.compact(index);
                    if let Some(hs) = task.hard_state {
                        node.log.hard_state = hs;
                    }
                    (Some(task.number), task.messages_after)
                }
                LogJob::Compact(index) => {
                    node.log.compact(index);
                    (None, Vec::new())
                }
            };
            to_send.extend(messages_after);
            if let Some(number) = number
                && let Some(r) = node.replica.as_mut()
            {
                r.on_persisted(number);
            }
        }
        self.send(to_send);
    }

    fn deliver_some(&mut self) {
        let n = self.network.len();
        for _ in 0..n.min(8) {
            if self.network.is_empty() {
                break;
            }
            // Reordering: any queued message may go next.
            let i = self.rng.below(self.network.len() as u64) as usize;
            let (to, msg) = self.network.swap_remove(i);
            if self.rng.chance(5) || self.isolated.contains(&to) || self.isolated.contains(&msg.from) {
                continue;
            }
            if let Some(r) = self.replica_mut(to) {
                let _ = r.step(msg);
            }
        }
    }

    fn leader(&self) -> Option<u64> {
        NODES
            .into_iter()
            .find(|id| self.nodes[id].replica.as_ref().is_some_and(|r| r.is_leader()) && !self.isolated.contains(id))
    }

    fn propose_write(&mut self) {
        let Some(l) = self.leader() else { return };
        let block = self.rng.below(BLOCKS);
        let token = self.next_token;
        self.next_token += 1;
        // Now and then a client still on an old epoch tries to write.
        let epoch = if self.epoch > 0 && self.rng.chance(10) {
            self.epoch - 1
        } else {
            self.epoch
        };
        let data = Bytes::from(payload(token));
        let r = self.replica_mut(l).expect("leader is live");
        if r.propose(
            token,
            epoch,
            VolumeOp::Write {
                offset: block * BLOCK,
                data,
            },
        )
        .is_ok()
        {
            self.inflight.insert(token, block);
            self.proposed.insert(token, block);
        }
    }

    fn attach(&mut self) {
        let Some(l) = self.leader() else { return };
        let token = self.next_token;
        self.next_token += 1;
        let r = self.replica_mut(l).expect("leader is live");
        if r.propose(token, 0, VolumeOp::Attach { node_id: l }).is_ok() {
            // Clients move to the new epoch as soon as the attach is proposed;
            // until it commits, their writes race it, which fencing must sort out.
            self.epoch += 1;
        }
    }

    /// A client reads a random block through a random live replica (any
    /// role): ReadIndex first, the read itself once it has applied that.
    fn issue_read(&mut self) {
        let id = NODES[self.rng.below(3) as usize];
        let block = self.rng.below(BLOCKS);
        let node = &self.nodes[&id];
        // The driver refuses reads while installing or without a leader.
        let Some(r) = node.replica.as_ref() else { return };
        if node.installing.is_some() || r.leader_id() == 0 {
            return;
        }
        if !r.is_leader() {
            self.stats.reads_from_followers += 1;
        }
        let token = self.next_token;
        self.next_token += 1;
        let floor = self.floor(block);
        self.replica_mut(id).expect("live").read_index(token);
        self.stats.reads_issued += 1;
        self.reads.insert(
            token,
            PendingRead {
                node: id,
                block,
                issued_round: self.round,
                floor,
                index: None,
            },
        );
    }

    /// Serves each read whose index is confirmed and applied on its node;
    /// gives up reads whose index did not come back in time.
    fn serve_reads(&mut self) {
        let mut done = Vec::new();
        for (&token, p) in &self.reads {
            let node = &self.nodes[&p.node];
            let Some(r) = node.replica.as_ref() else {
                done.push((token, None));
                continue;
            };
            match p.index {
                None if self.round.saturating_sub(p.issued_round) > READ_TIMEOUT_ROUNDS => done.push((token, None)),
                Some(index) if node.installing.is_none() && r.applied_index() >= index => {
                    done.push((token, Some(Self::block_of(node, p.block))));
                }
                _ => {}
            }
        }
        for (token, data) in done {
            let p = self.reads.remove(&token).expect("pending read");
            match data {
                None => self.stats.reads_expired += 1,
                Some(data) => {
                    let what = format!(
                        "read {token} of block {} on node {} (issued in round {}, index {:?}, served in round {})",
                        p.block, p.node, p.issued_round, p.index, self.round
                    );
                    let token = self.check_block(&what, p.block, &data, p.floor);
                    if let Some(token) = token {
                        let newest = self.latest_read.entry(p.block).or_insert(token);
                        *newest = token.max(*newest);
                    }
                    self.stats.reads_checked += 1;
                }
            }
        }
    }

    fn floor(&self, block: u64) -> Floor {
        Floor {
            acked: self.latest_acked.get(&block).copied(),
            read: self.latest_read.get(&block).copied(),
        }
    }

    /// `data`, read from `block`, must be a write to that block no older
    /// than `floor` (zeroes only if there is no floor). Returns the token of
    /// the write read, if any.
    fn check_block(&self, what: &str, block: u64, data: &[u8], floor: Floor) -> Option<u64> {
        let seed = self.seed;
        if data.iter().all(|b| *b == 0) {
            if let Some((index, token)) = floor.acked {
                panic!(
                    "seed {seed}: {what}: reads zeroes, but write {token} (index {index}) to it was acknowledged before"
                );
            }
            if let Some(token) = floor.read {
                panic!(
                    "seed {seed}: {what}: reads zeroes, but a read that completed before this one was issued \
                     returned write {token}"
                );
            }
            return None;
        }
        let token = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
        let Some(&wblock) = self.proposed.get(&token) else {
            panic!("seed {seed}: {what}: returns token {token}, which no client proposed as a write");
        };
        assert_eq!(
            wblock, block,
            "seed {seed}: {what}: returns write {token}, which was to block {wblock}"
        );
        assert!(
            data == payload(token).as_slice(),
            "seed {seed}: {what}: returns a torn or mixed version of write {token}"
        );
        assert!(
            !self.fenced.contains(&token),
            "seed {seed}: {what}: returns write {token}, which was refused as fenced"
        );
        if let Some((findex, ftoken)) = floor.acked {
            // Committed writes take log order in proposal order (checked in
            // `check`), so a token compares like a log index; an
            // acknowledged one is compared by its index as well.
            let index = self.acked.iter().find(|(_, _, t)| *t == token).map(|(i, _, _)| *i);
            assert!(
                token >= ftoken && index.is_none_or(|i| i >= findex),
                "seed {seed}: {what}: stale: returns write {token} (index {index:?}), but write {ftoken} \
                 (index {findex}) was acknowledged before the read was issued"
            );
        }
        if let Some(rtoken) = floor.read {
            assert!(
                token >= rtoken,
                "seed {seed}: {what}: stale: returns write {token}, older than write {rtoken} that a read \
                 completed before this one was issued returned"
            );
        }
        Some(token)
    }

    /// A block as the node's state machine holds it: its cache over its image.
    fn block_of(node: &Node, block: u64) -> Vec<u8> {
        let r = node.replica.as_ref().expect("live replica");
        let mut out = Vec::with_capacity(BLOCK as usize);
        for s in r.read(block * BLOCK, BLOCK) {
            match s {
                Segment::Cached { data, .. } => out.extend_from_slice(&data),
                Segment::Zero { length, .. } => out.extend(std::iter::repeat_n(0u8, length as usize)),
                Segment::Image { offset, length } => {
                    out.extend_from_slice(&node.image[offset as usize..(offset + length) as usize])
                }
            }
        }
        out
    }

    /// Starts a destage like the driver's `start_destage`: the cache up to
    /// the applied index, and the state machine as of it, are captured now;
    /// the image writes and the volume state land a few rounds later
    /// (`finish_destage`).
    fn start_destage(&mut self, id: u64) {
        let done_round = self.round + 1 + self.rng.below(DESTAGE_MAX_ROUNDS);
        let node = self.node(id);
        if node.destaging.is_some() {
            return;
        }
        let Some(r) = node.replica.as_ref() else { return };
        let index = r.applied_index();
        let extents = r.state().cache.dirty_up_to(index);
        if extents.is_empty() {
            return;
        }
        let applied = AppliedState {
            destaged_index: index,
            epoch: r.state().epoch,
            attached_node: r.state().attached_node,
        };
        node.destaging = Some(Destage {
            extents,
            applied,
            done_round,
        });
    }

    fn write_extents(image: &mut [u8], extents: &[(u64, Extent)]) {
        for (offset, e) in extents {
            let range = *offset as usize..(offset + e.length) as usize;
            match &e.data {
                ExtentData::Data(d) => image[range].copy_from_slice(d),
                ExtentData::Zero => image[range].fill(0),
            }
        }
    }

    /// The destage's writes are durable: the image holds the extents, the
    /// volume state is recorded, and then (the driver's `on_destaged`) the
    /// cache forgets them and the logs are compacted; the leader keeps what
    /// a lagging follower needs, within a bound, and the durable log keeps
    /// one entry more than memory (the restart's snapshot point).
    fn finish_destage(&mut self, id: u64) {
        let node = self.node(id);
        let Some(d) = node.destaging.take() else { return };
        Self::write_extents(&mut node.image, &d.extents);
        node.applied = d.applied;
        let index = d.applied.destaged_index;
        if node.installing.is_some() {
            return;
        }
        let Some(r) = node.replica.as_mut() else { return };
        r.on_destaged(index);
        let mut compact_to = index + 1;
        let followers: Vec<u64> = if r.is_leader() {
            r.progress()
                .into_iter()
                .filter(|(peer, _, _)| *peer != id)
                .map(|(_, matched, _)| matched)
                .collect()
        } else {
            Vec::new()
        };
        for &matched in &followers {
            if index.saturating_sub(matched) < MAX_RETAINED_ENTRIES {
                // Keep the follower's match entry too: the next append needs
                // its term.
                compact_to = compact_to.min(matched.max(1));
            }
        }
        let first = r.compact(compact_to);
        node.jobs.push_back(LogJob::Compact(first.saturating_sub(1).max(1)));
        self.stats.destages += 1;
        if followers.iter().any(|m| m + 1 < first) {
            self.stats.compactions_past_follower += 1;
        }
    }

    /// One step of a snapshot copy: a chunk of blocks from the leader (as
    /// the installing node knows it), once the leader has applied the
    /// snapshot index; after the last chunk the epoch as of the snapshot
    /// index, the volume state, `finish_install`, and the held log write.
    fn copy_step(&mut self, id: u64) {
        let Some(inst) = self.nodes[&id].installing.as_ref() else {
            return;
        };
        let (index, copied) = (inst.index, inst.copied);
        if self.nodes[&id].destaging.is_some() {
            return;
        }
        let Some(r) = self.nodes[&id].replica.as_ref() else {
            return;
        };
        let src = r.leader_id();
        if src == 0 || src == id || self.isolated.contains(&id) || self.isolated.contains(&src) {
            return;
        }
        let source = &self.nodes[&src];
        let Some(sr) = source.replica.as_ref() else { return };
        // The driver's ReadLocal: retry until the source has applied the
        // snapshot index.
        if source.installing.is_some() || sr.applied_index() < index {
            return;
        }
        let end = (copied + COPY_CHUNK_BLOCKS).min(BLOCKS);
        let chunk: Vec<(u64, Vec<u8>)> = (copied..end).map(|b| (b, Self::block_of(source, b))).collect();
        let epoch_at = (end == BLOCKS).then(|| sr.state().epoch_at(index));
        let node = self.node(id);
        for (b, data) in chunk {
            node.image[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].copy_from_slice(&data);
        }
        let Some((epoch, attached_node)) = epoch_at else {
            node.installing.as_mut().expect("installing").copied = end;
            return;
        };
        let inst = node.installing.take().expect("installing");
        // copy_from_leader records the volume state, then on_installed
        // finishes the install and queues the held log write.
        let fix_applied = AppliedState {
            destaged_index: index,
            epoch,
            attached_node,
        };
        node.replica
            .as_mut()
            .expect("live")
            .finish_install(epoch, attached_node);
        if let Some(task) = inst.task {
            node.jobs.push_back(LogJob::Install {
                index,
                term: inst.term,
                task,
                fix_applied,
            });
        }
        self.stats.installs_finished += 1;
    }

    fn crash(&mut self, id: u64) {
        let node = self.node(id);
        node.replica = None;
        node.jobs.clear();
        node.installing = None;
        // A destage in flight may have written some of its extents to the
        // image, but not the volume state.
        if let Some(d) = self.node(id).destaging.take() {
            let written: Vec<(u64, Extent)> = d.extents.into_iter().filter(|_| self.rng.chance(50)).collect();
            Self::write_extents(&mut self.node(id).image, &written);
        }
        // Its clients' reads fail with it.
        let lost: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, p)| p.node == id)
            .map(|(t, _)| *t)
            .collect();
        for t in lost {
            self.reads.remove(&t);
        }
    }

    /// Restarts from what is on "disk": the durable log (whose first entry,
    /// once compacted, is the snapshot point), the volume state and image.
    fn restart(&mut self, id: u64) {
        let seed = self.seed;
        let node = self.node(id);
        let state = VolumeState {
            epoch: node.applied.epoch,
            attached_node: node.applied.attached_node,
            applied_index: node.applied.destaged_index,
            ..VolumeState::default()
        };
        let applied_fix = node.applied.destaged_index;
        let log = &node.log;
        let on_disk = format!(
            "volume state {:?}, durable log {:?}..={:?} (hard state commit {}, term {})",
            node.applied,
            log.entries.first().map(|e| e.index),
            log.entries.last().map(|e| e.index),
            log.hard_state.commit,
            log.hard_state.term
        );
        let compacted = log.entries.first().is_some_and(|e| e.index > 1);
        // raft panics on a state it cannot start from; say what was on disk.
        let restarted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut hs = log.hard_state.clone();
            if log.entries.last().is_some_and(|e| e.index >= applied_fix) {
                hs.commit = hs.commit.max(applied_fix);
            }
            Replica::restart(&config(id), hs, conf_state(), &log.entries, state)
        }));
        let r = match restarted {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("seed {seed}: node {id} does not restart from {on_disk}: {e}"),
            Err(_) => panic!("seed {seed}: node {id} panicked restarting from {on_disk} (raft's message above)"),
        };
        node.replica = Some(r);
        self.stats.restarts += 1;
        if compacted {
            self.stats.restarts_from_compacted_log += 1;
        }
    }

    /// Ticks every live replica except those copying a snapshot (the
    /// driver's `on_tick`).
    fn tick_all(&mut self, jitter: bool) {
        let seed = self.seed;
        for id in NODES {
            // Uneven ticking stands in for clock jitter.
            if jitter && !self.rng.chance(90) {
                continue;
            }
            let node = self.node(id);
            if node.installing.is_some() {
                continue;
            }
            // The install is not over until its log write is durable.
            let install = node.jobs.iter().find_map(|j| match j {
                LogJob::Install { index, .. } => Some(*index),
                _ => None,
            });
            let Some(r) = node.replica.as_mut() else { continue };
            if install.is_some() {
                continue;
            }
            let Some(index) = install else {
                r.tick();
                continue;
            };
            let ticked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.tick()));
            if ticked.is_err() {
                panic!(
                    "seed {seed}: node {id} panicked on a tick after copying the snapshot at index {index}, \
                     before its log write was durable (raft's message above)"
                );
            }
        }
    }

    /// The background work of every node: snapshot copies and destages.
    fn background(&mut self) {
        for id in NODES {
            if self.nodes[&id].installing.is_some() && self.rng.chance(50) {
                self.copy_step(id);
            }
            match &self.nodes[&id].destaging {
                Some(d) if d.done_round <= self.round => self.finish_destage(id),
                Some(_) => {}
                None if self.rng.chance(4) => self.start_destage(id),
                None => {}
            }
        }
    }

    fn step(&mut self) {
        if self.round.is_multiple_of(3) {
            self.tick_all(true);
        }
        if self.rng.chance(30) {
            self.propose_write();
        }
        if self.rng.chance(20) {
            self.issue_read();
        }
        if self.rng.chance(1) {
            self.attach();
        }
        let down: Vec<u64> = NODES
            .into_iter()
            .filter(|id| self.nodes[id].replica.is_none())
            .collect();
        if self.rng.chance(1) {
            // Faults, keeping at most one node crashed or isolated at a time.
            if let Some(&id) = down.first() {
                self.restart(id);
            } else if let Some(&id) = self.isolated.iter().next() {
                self.isolated.remove(&id);
            } else {
                let id = NODES[self.rng.below(3) as usize];
                if self.rng.chance(50) {
                    self.crash(id);
                } else {
                    self.isolated.insert(id);
                }
            }
        }
        self.background();
        self.pump();
        self.deliver_some();
        self.pump();
        self.round += 1;
    }

    fn heal_and_settle(&mut self) {
        let down: Vec<u64> = NODES
            .into_iter()
            .filter(|id| self.nodes[id].replica.is_none())
            .collect();
        for id in down {
            self.restart(id);
        }
        self.isolated.clear();
        for _ in 0..20_000u64 {
            if self.round.is_multiple_of(3) {
                self.tick_all(false);
            }
            self.background();
            self.pump();
            self.deliver_some();
            self.pump();
            self.round += 1;
            let applied: Vec<u64> = NODES
                .iter()
                .map(|id| self.nodes[id].replica.as_ref().map_or(0, |r| r.applied_index()))
                .collect();
            let commit = NODES
                .iter()
                .map(|id| self.nodes[id].replica.as_ref().map_or(0, |r| r.commit_index()))
                .max()
                .unwrap_or(0);
            let settled = self.nodes.values().all(|n| n.jobs.is_empty() && n.installing.is_none());
            if self.leader().is_some()
                && applied.iter().all(|a| *a == commit)
                && self.network.is_empty()
                && settled
                && self.reads.is_empty()
            {
                return;
            }
        }
        panic!("seed {}: the group did not converge after healing", self.seed);
    }

    fn check(&self) {
        let seed = self.seed;
        let live: Vec<&Node> = NODES.iter().map(|id| &self.nodes[id]).collect();
        assert!(
            live.iter().all(|n| n.replica.is_some()),
            "seed {seed}: all replicas should be live after healing"
        );
        // Committed writes take log order in proposal order: the token
        // comparison of reads relies on it.
        let mut by_index = self.acked.clone();
        by_index.sort_unstable();
        assert!(
            by_index.windows(2).all(|w| w[0].0 < w[1].0 && w[0].2 < w[1].2),
            "seed {seed}: acknowledged writes are not in proposal order in the log"
        );
        // C1: every acknowledged write sits in every durable log at its
        // index, unless that part of the log was compacted after a destage.
        for &(index, block, token) in &self.acked {
            for id in NODES {
                let log = &self.nodes[&id].log.entries;
                // Compacted away, or the stand-in entry of a snapshot point.
                if let Some(f) = log.first()
                    && (index < f.index || (index == f.index && f.data.is_empty()))
                {
                    continue;
                }
                let e = log
                    .iter()
                    .find(|e| e.index == index)
                    .unwrap_or_else(|| panic!("seed {seed}: node {id} lost acknowledged write at index {index}"));
                let op = EntryOp::decode(&e.data)
                    .unwrap_or_else(|err| panic!("seed {seed}: entry {index} on node {id} is corrupt: {err}"));
                match op.op {
                    VolumeOp::Write { offset, data } => {
                        assert_eq!(offset, block * BLOCK, "seed {seed}: index {index} holds another write");
                        assert!(
                            data == payload(token).as_slice(),
                            "seed {seed}: index {index} on node {id} holds other data"
                        );
                    }
                    other => panic!("seed {seed}: index {index} holds {other:?}, not the acknowledged write"),
                }
            }
        }
        // Every replica's state machine (image plus cache) holds the latest
        // acknowledged write of every block or a later one, and they agree.
        for block in 0..BLOCKS {
            let floor = self.floor(block);
            let first = Self::block_of(live[0], block);
            for (id, n) in NODES.iter().zip(&live) {
                let data = Self::block_of(n, block);
                self.check_block(
                    &format!("final state of block {block} on node {id}"),
                    block,
                    &data,
                    floor,
                );
                assert!(data == first, "seed {seed}: replicas disagree on block {block}");
            }
        }
        let epochs: Vec<u64> = live
            .iter()
            .map(|n| n.replica.as_ref().expect("live").state().epoch)
            .collect();
        assert!(
            epochs.windows(2).all(|w| w[0] == w[1]),
            "seed {seed}: replicas disagree on the epoch: {epochs:?}"
        );
    }
}

fn run(seed: u64, rounds: u64) -> Stats {
    let mut sim = Sim::new(seed);
    for _ in 0..rounds {
        sim.step();
    }
    sim.heal_and_settle();
    sim.check();
    sim.stats.acked = sim.acked.len();
    sim.stats.fenced = sim.fenced.len();
    sim.stats
}

#[test]
fn no_acknowledged_write_is_lost_and_no_read_is_stale() {
    let seeds: Vec<u64> = match std::env::var("SIM_SEED") {
        Ok(s) => vec![s.parse().expect("SIM_SEED must be a number")],
        Err(_) => (1..=100).collect(),
    };
    let replay = seeds.len() == 1;
    let mut total = Stats::default();
    for seed in seeds {
        let result = std::panic::catch_unwind(|| run(seed, 3000));
        match result {
            Ok(stats) => total.add(&stats),
            Err(e) => {
                eprintln!("simulation failed with seed {seed}; replay with SIM_SEED={seed}");
                std::panic::resume_unwind(e);
            }
        }
    }
    eprintln!("{total:?}");
    if replay {
        return;
    }
    // The run must have done real work for its checks to mean anything.
    assert!(total.acked > 1000, "only {} writes were acknowledged", total.acked);
    assert!(total.fenced > 0, "no stale-epoch write was ever fenced");
    assert!(
        total.reads_checked > 1000,
        "only {} reads were checked",
        total.reads_checked
    );
    assert!(
        total.reads_from_followers > 100,
        "only {} reads went through followers",
        total.reads_from_followers
    );
    assert!(total.installs_finished > 0, "no snapshot was ever installed");
    assert!(
        total.restarts_from_compacted_log > 0,
        "no node ever restarted from a compacted log"
    );
}
