//! One simulated group: N replicas, each driven the way the daemon's replica
//! driver (crates/daemon/src/group.rs) drives it, their disks, the network,
//! the clients, and the nemesis. Everything follows from the seed.
//!
//! The driver, as modelled here (a change there must be mirrored here):
//! - log writes go to the node's log writer (disk.rs): batched, synced or
//!   not, acknowledged in order; a crash keeps synced batches and a prefix
//!   of the rest; messages that must wait for a write leave only once it
//!   is acknowledged;
//! - every node ticks at its own clock rate, except while it copies a
//!   snapshot or its install's log write is not yet durable;
//! - now and then a destage captures the cache up to the applied index and,
//!   a few rounds later, writes it to the node's image (which survives
//!   crashes), records the volume state (destaged index, epoch, attached
//!   node) and compacts the in-memory and durable logs (`start_destage`,
//!   `on_destaged`): the leader keeps what a lagging follower still needs,
//!   up to `MAX_RETAINED_ENTRIES`, and the durable log keeps one entry more
//!   than memory;
//! - a follower the leader compacted past gets a snapshot, stamped by the
//!   leader that made it with the epoch and attached node as of its index
//!   (`Replica::poll`); the follower's proposals up to that index complete
//!   as `ApplyError::Unknown`, which the driver answers as an I/O error
//!   without retrying; the follower's Ready is held while the volume is
//!   copied chunk by chunk, fuzzily, from the leader's image and cache once
//!   the leader has applied the snapshot index; then (the epoch from the
//!   stamp, or, for an unstamped snapshot, asked of the leader and then the
//!   other replicas, none of which guesses: `Replica::epoch_at`) the volume
//!   state is recorded, `finish_install` is called and the held Ready is
//!   written with one stand-in entry at the snapshot point (`start_copy`,
//!   `copy_from_leader`, `ask_epoch_at`, `on_installed`);
//! - a restart rebuilds the replica from what `triremed` would find on
//!   disk: the durable log (its first entry, once compacted, the snapshot
//!   point), the volume state and the image.
//!
//! Clients write random blocks through a node that believes it leads (with
//! a stale epoch now and then), attach (new epoch), and read random blocks
//! through any running replica (ReadIndex, served once applied, over image
//! plus cache). A write's reply reaches its client a little later, and
//! never if the node dies first.
//!
//! The nemesis, per round with seeded rates: crashes (a node dies; its log
//! writer's unsynced tail is decided in disk.rs; a destage in flight leaves
//! some of its sectors written), fsync errors (the node stops at its next
//! synced log write), pauses (the node does nothing, not even tick, and
//! then goes on with what queued up), all restarted or resumed after a
//! seeded while, at most a minority of nodes at a time; and partitions of
//! four kinds (net.rs), one at a time, healed after a seeded while. Clock
//! rates differ per node (0.7x to 1.3x). In a tenth of the seeds the
//! leaders send their snapshots unstamped, as a version before the stamp
//! did, so the receivers' fallback (asking the replicas) is exercised too.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use trireme_replica::cache::Extent;
use trireme_replica::raft::StateRole;
use trireme_replica::raft::eraftpb::{ConfState, MessageType};
use trireme_replica::{
    ApplyError, Completion, EntryOp, ExtentData, Output, ProposeError, Replica, ReplicaConfig, Segment, VolumeOp,
    VolumeState,
};

use crate::disk::{AppliedState, DurableLog, Job, LogWriter, WriterStep};
use crate::history::{History, ReadRec, WriteOutcome};
use crate::net::{NetFaults, Network, Partition};
use crate::rng::Rng;
use crate::stats::Stats;

pub const BLOCK: u64 = 512;
pub const BLOCKS: u64 = 16;
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
/// One tick every this many rounds at the nominal clock rate (per mille).
const ROUNDS_PER_TICK: u64 = 3;
const NOMINAL_RATE: u64 = 1000;
/// A write's reply reaches its client within this many rounds.
const MAX_REPLY_ROUNDS: u64 = 2;
/// The settled group must converge within this many rounds.
const SETTLE_ROUNDS: u64 = 20_000;

/// The data of the write with `token`: the token, then a filler byte.
pub fn payload(token: u64) -> Vec<u8> {
    let mut v = token.to_le_bytes().to_vec();
    v.resize(BLOCK as usize, (token % 251) as u8 + 1);
    v
}

/// What varies from seed to seed besides the schedule itself.
#[derive(Debug, Clone)]
pub struct Params {
    pub nodes: usize,
    /// How fast the log writer is: the chance, at each opportunity, that the
    /// synced batch being written becomes durable.
    pub sync_percent: u64,
    pub net: NetFaults,
    /// Rates of new faults per round, in basis points.
    pub crash_bp: u64,
    pub fsync_error_bp: u64,
    pub pause_bp: u64,
    pub partition_bp: u64,
    /// Each node's clock rate, per mille of nominal.
    pub clock_rates: Vec<u64>,
    /// Leaders send their snapshots unstamped, as a version before the
    /// stamp did (a rolling upgrade): the receivers ask the replicas.
    pub unstamped_snapshots: bool,
}

impl Params {
    pub fn for_seed(seed: u64) -> Params {
        let mut rng = Rng::new(seed ^ 0x00c0_ffee_d00d_f00d);
        let nodes = if rng.chance(25) { 5 } else { 3 };
        Params {
            nodes,
            sync_percent: rng.pick(&[70, 40, 20]),
            net: NetFaults {
                drop_percent: rng.range(0, 8),
                dup_percent: rng.range(0, 4),
                delay_percent: rng.range(5, 30),
                long_delay_bp: rng.range(0, 30),
            },
            crash_bp: rng.range(20, 80),
            fsync_error_bp: rng.range(5, 30),
            pause_bp: rng.range(10, 50),
            partition_bp: rng.range(20, 80),
            clock_rates: (0..nodes).map(|_| rng.range(700, 1300)).collect(),
            unstamped_snapshots: rng.chance(10),
        }
    }
}

/// A snapshot install under way: the Ready is held until the copy is done.
struct Install {
    index: u64,
    term: u64,
    /// The epoch and attached node as of `index`: stamped on the snapshot,
    /// or asked of the replicas.
    epoch: Option<(u64, u64)>,
    stamped: bool,
    task: Option<trireme_replica::PersistTask>,
    /// Blocks copied so far.
    copied: u64,
}

/// A destage in flight: what it writes, and the volume state it records.
struct Destage {
    extents: Vec<(u64, Extent)>,
    applied: AppliedState,
    done_round: u64,
}

struct Node {
    replica: Option<Replica>,
    log: DurableLog,
    applied: AppliedState,
    /// The volume image; it survives crashes, with whatever a destage or a
    /// snapshot copy had written of it.
    image: Vec<u8>,
    writer: LogWriter,
    installing: Option<Install>,
    destaging: Option<Destage>,
    clock_rate: u64,
    clock: u64,
    /// Paused (SIGSTOP) until this round.
    paused_until: Option<u64>,
    /// Dead until this round, then restarted.
    down_until: Option<u64>,
}

impl Node {
    fn running(&self) -> bool {
        self.replica.is_some() && self.paused_until.is_none()
    }
}

struct PendingRead {
    node: u64,
    block: u64,
    issued_round: u64,
    /// History event number of the invocation.
    invoke: u64,
    from_follower: bool,
    /// What it must not read older than.
    floor: Floor,
    /// The confirmed read index, once the ReadState is back.
    index: Option<u64>,
}

/// The oldest write a read of a block may return, as of when it was issued:
/// the fast pre-check of C2, with a precise message.
#[derive(Default, Debug, Clone, Copy)]
struct Floor {
    /// The latest write to the block acknowledged: (log index, token).
    acked: Option<(u64, u64)>,
    /// The newest write returned by a read of the block that completed.
    read: Option<u64>,
}

enum Death {
    Crash,
    FsyncError { kept: bool },
}

pub struct Sim {
    pub seed: u64,
    pub params: Params,
    rng: Rng,
    pub round: u64,
    ids: Vec<u64>,
    nodes: BTreeMap<u64, Node>,
    net: Network,
    faults_on: bool,
    next_token: u64,
    /// Writes whose reply the client has not got: token -> (block, node).
    inflight: BTreeMap<u64, (u64, u64)>,
    /// Replies on their way to clients: (round due, node, completion).
    replies: Vec<(u64, u64, Completion)>,
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
    pub stats: Stats,
    pub history: History,
    /// Events, kept when replaying one seed.
    pub trace: Option<Vec<String>>,
    /// Every attach applied anywhere: index -> (epoch, attached node).
    attaches: BTreeMap<u64, (u64, u64)>,
}

fn config(id: u64) -> ReplicaConfig {
    let mut c = ReplicaConfig::new(id);
    c.election_tick = 10;
    c.max_election_tick = 11;
    c.max_cache_bytes = 1 << 20;
    c
}

impl Sim {
    pub fn new(seed: u64, verbose: bool) -> Sim {
        let params = Params::for_seed(seed);
        let ids: Vec<u64> = (1..=params.nodes as u64).collect();
        let mut nodes = BTreeMap::new();
        for (i, &id) in ids.iter().enumerate() {
            let replica = Replica::new(&config(id), &ids).expect("new replica");
            nodes.insert(
                id,
                Node {
                    replica: Some(replica),
                    log: DurableLog::default(),
                    applied: AppliedState::default(),
                    image: vec![0; (BLOCKS * BLOCK) as usize],
                    writer: LogWriter::default(),
                    installing: None,
                    destaging: None,
                    clock_rate: params.clock_rates[i],
                    clock: 0,
                    paused_until: None,
                    down_until: None,
                },
            );
        }
        let mut stats = Stats {
            seeds: 1,
            ..Stats::default()
        };
        if params.nodes == 5 {
            stats.groups_of_5 = 1;
        } else {
            stats.groups_of_3 = 1;
        }
        stats.unstamped_snapshot_groups = u64::from(params.unstamped_snapshots);
        stats.skewed_clocks = params
            .clock_rates
            .iter()
            .filter(|r| r.abs_diff(NOMINAL_RATE) > 100)
            .count() as u64;
        let net = Network::new(&ids, params.net);
        let trace = verbose.then(|| vec![format!("parameters: {params:?}")]);
        Sim {
            seed,
            params,
            rng: Rng::new(seed),
            round: 0,
            ids,
            nodes,
            net,
            faults_on: true,
            next_token: 1,
            inflight: BTreeMap::new(),
            replies: Vec::new(),
            proposed: HashMap::new(),
            acked: Vec::new(),
            fenced: BTreeSet::new(),
            latest_acked: BTreeMap::new(),
            latest_read: BTreeMap::new(),
            reads: BTreeMap::new(),
            epoch: 0,
            stats,
            history: History::default(),
            trace,
            attaches: BTreeMap::new(),
        }
    }

    /// The whole run: `rounds` of faults and clients, then healing, settling
    /// and the checks.
    pub fn run(&mut self, rounds: u64) {
        for _ in 0..rounds {
            self.step();
        }
        self.heal_and_settle();
        self.check();
        self.finish_stats();
    }

    fn note(&mut self, f: impl FnOnce() -> String) {
        if let Some(t) = self.trace.as_mut() {
            t.push(format!("round {:>5}: {}", self.round, f()));
        }
    }

    fn node(&mut self, id: u64) -> &mut Node {
        self.nodes.get_mut(&id).expect("node exists")
    }

    fn replica_mut(&mut self, id: u64) -> Option<&mut Replica> {
        self.node(id).replica.as_mut()
    }

    fn running(&self, id: u64) -> bool {
        self.nodes[&id].running()
    }

    fn send(&mut self, from: u64, msgs: Vec<trireme_replica::raft::eraftpb::Message>) {
        for m in msgs {
            self.net.send(from, m, self.round, &mut self.rng);
        }
    }

    /// Drains every running replica's Output (none while it installs a
    /// snapshot, like the driver), giving its log writer a chance after
    /// each; then serves the reads that are ready.
    fn pump(&mut self) {
        for id in self.ids.clone() {
            if !self.running(id) {
                continue;
            }
            loop {
                let node = self.node(id);
                if node.installing.is_some() {
                    break;
                }
                let Some(out) = node.replica.as_mut().and_then(|r| r.poll()) else {
                    break;
                };
                self.harvest_attaches(id);
                self.dispatch(id, out);
                self.sync_some(id);
            }
            self.sync_some(id);
        }
        self.serve_reads();
    }

    /// Records the attaches the node applied: the ground truth of the
    /// epoch at every index.
    fn harvest_attaches(&mut self, id: u64) {
        let Some(r) = self.nodes[&id].replica.as_ref() else {
            return;
        };
        // The first record is the state at a restart or snapshot point.
        for &(index, epoch, node) in r.state().attach_history.iter().skip(1) {
            let seen = *self.attaches.entry(index).or_insert((epoch, node));
            assert_eq!(
                seen,
                (epoch, node),
                "seed {}: replicas disagree on the epoch and attached node after the attach at index {index}: \
                 node {id} has {:?}, another replica had {seen:?}",
                self.seed,
                (epoch, node)
            );
        }
    }

    /// The epoch and attached node as of `index`, from every attach applied.
    fn epoch_truth(&self, index: u64) -> (u64, u64) {
        self.attaches.range(..=index).next_back().map_or((0, 0), |(_, v)| *v)
    }

    fn dispatch(&mut self, id: u64, out: Output) {
        if let Some((role, leader)) = out.role {
            if role == StateRole::Leader {
                self.stats.leaders_elected += 1;
            }
            let term = self.nodes[&id].replica.as_ref().map_or(0, |r| r.term());
            self.note(|| format!("node {id}: {role:?} (leader {leader}, term {term})"));
        }
        let mut messages = out.messages;
        let snapshot_to: Vec<u64> = messages
            .iter_mut()
            .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
            .map(|m| {
                if self.params.unstamped_snapshots {
                    m.mut_snapshot().data = Default::default();
                }
                m.to
            })
            .collect();
        self.send(id, messages);
        for to in snapshot_to {
            // The snapshot message carries only the point to copy from; it
            // is "sent" once queued (as in the driver).
            self.stats.snapshots_sent += 1;
            if let Some(r) = self.replica_mut(id) {
                r.report_snapshot(to, true);
            }
        }
        for c in out.completions {
            if self.inflight.contains_key(&c.token) {
                let due = self.round + self.rng.range(0, MAX_REPLY_ROUNDS);
                self.replies.push((due, id, c));
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
        if let Some(inst) = out.install {
            // Hold the Ready's log write (it carries the snapshot) until the
            // volume is copied: see copy_step.
            self.stats.installs_started += 1;
            let (index, term, epoch) = (inst.index, inst.term, inst.epoch);
            self.note(|| {
                format!("node {id}: installing a snapshot at index {index} (term {term}, stamped epoch {epoch:?})")
            });
            let task = persist.take();
            self.node(id).installing = Some(Install {
                index,
                term,
                epoch,
                stamped: epoch.is_some(),
                task,
                copied: 0,
            });
        }
        if let Some(task) = persist {
            self.node(id).writer.submit(Job::Ready(task));
        }
    }

    /// The client side of replies that arrived: the history records the
    /// write's outcome as the client learns it.
    fn deliver_replies(&mut self) {
        let round = self.round;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.replies)
            .into_iter()
            .partition(|(at, _, _)| *at <= round);
        self.replies = later;
        for (_, _, c) in due {
            let Some((block, _)) = self.inflight.remove(&c.token) else {
                continue;
            };
            let outcome = match c.result {
                Ok(index) => {
                    self.acked.push((index, block, c.token));
                    let latest = self.latest_acked.entry(block).or_insert((index, c.token));
                    if index > latest.0 {
                        *latest = (index, c.token);
                    }
                    WriteOutcome::Acked(index)
                }
                Err(ApplyError::Fenced { .. }) => {
                    self.fenced.insert(c.token);
                    self.stats.writes_fenced += 1;
                    WriteOutcome::Failed("fenced")
                }
                Err(ApplyError::Superseded) => {
                    self.stats.writes_superseded += 1;
                    WriteOutcome::Failed("superseded")
                }
                // The driver answers EIO and does not retry: the write took
                // effect before this reply, or never.
                Err(ApplyError::Unknown) => {
                    self.stats.writes_indeterminate += 1;
                    WriteOutcome::Indeterminate
                }
                Err(ApplyError::Corrupt(_)) => WriteOutcome::Failed("corrupt"),
            };
            self.note(|| format!("write {} to block {block}: {outcome:?}", c.token));
            self.history.complete_write(c.token, outcome, round);
        }
    }

    /// The log writer makes progress; acknowledged jobs are reported to the
    /// replica and release the messages that waited for them.
    fn sync_some(&mut self, id: u64) {
        let sync_percent = self.params.sync_percent;
        loop {
            let Sim { nodes, rng, .. } = self;
            let node = nodes.get_mut(&id).expect("node exists");
            if !node.running() {
                return;
            }
            match node.writer.step(rng, sync_percent, &mut node.log, &mut node.applied) {
                WriterStep::Idle | WriterStep::Busy => return,
                WriterStep::FsyncFailed => {
                    let kept = self.rng.chance(50);
                    self.kill(id, Death::FsyncError { kept });
                    return;
                }
                WriterStep::Wrote(acks) => {
                    let mut to_send = Vec::new();
                    for ack in acks {
                        to_send.extend(ack.messages_after);
                        if let Some(n) = ack.number
                            && let Some(r) = node.replica.as_mut()
                        {
                            r.on_persisted(n);
                        }
                    }
                    self.send(id, to_send);
                }
            }
        }
    }

    fn deliver_some(&mut self) {
        let paused: Vec<u64> = self
            .ids
            .iter()
            .copied()
            .filter(|id| self.nodes[id].paused_until.is_some())
            .collect();
        let max = 4 * self.ids.len();
        let packets = self
            .net
            .deliver(self.round, max, &mut self.rng, |to| !paused.contains(&to));
        for p in packets {
            if let Some(r) = self.replica_mut(p.to) {
                let _ = r.step(p.msg);
            }
        }
    }

    /// Running nodes that believe they lead (during a partition, perhaps
    /// more than one).
    fn leaders(&self) -> Vec<u64> {
        self.ids
            .iter()
            .copied()
            .filter(|id| self.running(*id) && self.nodes[id].replica.as_ref().is_some_and(|r| r.is_leader()))
            .collect()
    }

    fn propose_write(&mut self) {
        let leaders = self.leaders();
        if leaders.is_empty() {
            return;
        }
        let l = self.rng.pick(&leaders);
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
        let result = r.propose(
            token,
            epoch,
            VolumeOp::Write {
                offset: block * BLOCK,
                data,
            },
        );
        match result {
            Ok(()) => {
                self.inflight.insert(token, (block, l));
                self.proposed.insert(token, block);
                self.history.invoke_write(token, block, l, self.round);
                self.stats.writes_proposed += 1;
            }
            Err(ProposeError::StaleEpoch { .. }) => self.stats.writes_refused_stale += 1,
            Err(_) => {}
        }
    }

    fn attach(&mut self) {
        let leaders = self.leaders();
        if leaders.is_empty() {
            return;
        }
        let l = self.rng.pick(&leaders);
        let token = self.next_token;
        self.next_token += 1;
        let r = self.replica_mut(l).expect("leader is live");
        if r.propose(token, 0, VolumeOp::Attach { node_id: l }).is_ok() {
            // Clients move to the new epoch as soon as the attach is proposed;
            // until it commits, their writes race it, which fencing must sort out.
            self.epoch += 1;
            self.stats.attaches += 1;
        }
    }

    /// A client reads a random block through a random running replica (any
    /// role): ReadIndex first, the read itself once it has applied that.
    fn issue_read(&mut self) {
        let id = self.rng.pick(&self.ids);
        let block = self.rng.below(BLOCKS);
        let node = &self.nodes[&id];
        // The driver refuses reads while installing or without a leader.
        if !node.running() {
            return;
        }
        let Some(r) = node.replica.as_ref() else { return };
        if node.installing.is_some() || r.leader_id() == 0 {
            return;
        }
        let from_follower = !r.is_leader();
        let token = self.next_token;
        self.next_token += 1;
        let floor = self.floor(block);
        self.replica_mut(id).expect("live").read_index(token);
        self.stats.reads_issued += 1;
        let invoke = self.history.now();
        self.reads.insert(
            token,
            PendingRead {
                node: id,
                block,
                issued_round: self.round,
                invoke,
                from_follower,
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
            if node.paused_until.is_some() {
                continue;
            }
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
            let Some(data) = data else {
                self.stats.reads_expired += 1;
                continue;
            };
            let what = format!(
                "read {token} of block {} via node {} (issued in round {}, read index {:?}, served in round {})",
                p.block, p.node, p.issued_round, p.index, self.round
            );
            let value = self.check_block(&what, p.block, &data, p.floor);
            if let Some(token) = value {
                let newest = self.latest_read.entry(p.block).or_insert(token);
                *newest = token.max(*newest);
            }
            let complete = self.history.now();
            self.history.reads.push(ReadRec {
                block: p.block,
                node: p.node,
                invoke: p.invoke,
                invoke_round: p.issued_round,
                complete,
                complete_round: self.round,
                value: value.unwrap_or(0),
                index: p.index,
                final_read: false,
            });
            self.stats.reads_checked += 1;
            if p.from_follower {
                self.stats.reads_from_followers += 1;
            }
        }
    }

    fn floor(&self, block: u64) -> Floor {
        Floor {
            acked: self.latest_acked.get(&block).copied(),
            read: self.latest_read.get(&block).copied(),
        }
    }

    /// The fast pre-check of C2: `data`, read from `block`, must be a write
    /// to that block no older than `floor` (zeroes only if there is no
    /// floor). Returns the token of the write read, if any.
    fn check_block(&self, what: &str, block: u64, data: &[u8], floor: Floor) -> Option<u64> {
        let seed = self.seed;
        if data.iter().all(|b| *b == 0) {
            if let Some((index, token)) = floor.acked {
                panic!(
                    "C2: seed {seed}: {what}: reads zeroes, but write {token} (index {index}) to it was acknowledged before"
                );
            }
            if let Some(token) = floor.read {
                panic!(
                    "C2: seed {seed}: {what}: reads zeroes, but a read that completed before this one was issued \
                     returned write {token}"
                );
            }
            return None;
        }
        let token = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
        let Some(&wblock) = self.proposed.get(&token) else {
            panic!("C2: seed {seed}: {what}: returns token {token}, which no client proposed as a write");
        };
        assert_eq!(
            wblock, block,
            "C2: seed {seed}: {what}: returns write {token}, which was to block {wblock}"
        );
        assert!(
            data == payload(token).as_slice(),
            "C2: seed {seed}: {what}: returns a torn or mixed version of write {token}"
        );
        assert!(
            !self.fenced.contains(&token),
            "C2: seed {seed}: {what}: returns write {token}, which was refused as fenced"
        );
        if let Some((findex, ftoken)) = floor.acked {
            // Committed writes take log order in proposal order (checked in
            // `check`), so a token compares like a log index; an
            // acknowledged one is compared by its index as well.
            let index = self.acked.iter().find(|(_, _, t)| *t == token).map(|(i, _, _)| *i);
            assert!(
                token >= ftoken && index.is_none_or(|i| i >= findex),
                "C2: seed {seed}: {what}: stale: returns write {token} (index {index:?}), but write {ftoken} \
                 (index {findex}) was acknowledged before the read was issued"
            );
        }
        if let Some(rtoken) = floor.read {
            assert!(
                token >= rtoken,
                "C2: seed {seed}: {what}: stale: returns write {token}, older than write {rtoken} that a read \
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
        if node.destaging.is_some() || node.installing.is_some() || node.writer.install_pending().is_some() {
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
        node.writer.submit(Job::Compact(first.saturating_sub(1).max(1)));
        self.note(|| format!("node {id}: destaged to index {index}, log compacted to {first}"));
        self.stats.destages += 1;
        if followers.iter().any(|m| m + 1 < first) {
            self.stats.compactions_past_follower += 1;
        }
    }

    /// One step of a snapshot copy: for a snapshot that came unstamped, the
    /// epoch as of its index is asked first (`ask_epoch_at`); then a chunk
    /// of blocks from the leader (as the installing node knows it), once
    /// the leader has applied the snapshot index; after the last chunk the
    /// volume state, `finish_install`, and the held log write. The copy goes
    /// over the network: both links must be up.
    fn copy_step(&mut self, id: u64) {
        let Some(inst) = self.nodes[&id].installing.as_ref() else {
            return;
        };
        let (index, copied, epoch) = (inst.index, inst.copied, inst.epoch);
        if self.nodes[&id].destaging.is_some() {
            return;
        }
        let Some(r) = self.nodes[&id].replica.as_ref() else {
            return;
        };
        let src = r.leader_id();
        if src == 0 || src == id || !self.net.link_up(id, src) || !self.net.link_up(src, id) || !self.running(src) {
            return;
        }
        if epoch.is_none() {
            let Some(answer) = self.ask_epoch_at(id, src, index) else {
                return;
            };
            self.stats.installs_epoch_asked += 1;
            self.node(id).installing.as_mut().expect("installing").epoch = Some(answer);
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
        let node = self.node(id);
        for (b, data) in chunk {
            node.image[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].copy_from_slice(&data);
        }
        node.installing.as_mut().expect("installing").copied = end;
        if end < BLOCKS {
            return;
        }
        let Some((epoch, attached_node)) = epoch else {
            unreachable!("the epoch is known before the copy starts");
        };
        let stamped = self.nodes[&id].installing.as_ref().is_some_and(|i| i.stamped);
        if stamped {
            self.stats.installs_epoch_stamped += 1;
        }
        let truth = self.epoch_truth(index);
        assert_eq!(
            (epoch, attached_node),
            truth,
            "seed {}: node {id} installs the snapshot at index {index} with epoch and attached node \
             {:?} (stamped on the snapshot: {}), but the attaches applied make them {truth:?} there",
            self.seed,
            (epoch, attached_node),
            stamped,
        );
        let node = self.node(id);
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
            node.writer.submit(Job::Install {
                index,
                term: inst.term,
                task,
                fix_applied,
            });
        }
        self.stats.installs_finished += 1;
        self.note(|| format!("node {id}: snapshot at index {index} copied from node {src}"));
    }

    /// The driver's `ask_epoch_at` for a snapshot that came unstamped: the
    /// leader first, then the other replicas, over the network; each
    /// answers only if its history or log covers `index` (never a guess).
    fn ask_epoch_at(&self, id: u64, leader: u64, index: u64) -> Option<(u64, u64)> {
        let others = self.ids.iter().copied().filter(|n| *n != id && *n != leader);
        for n in std::iter::once(leader).chain(others) {
            if !self.running(n) || !self.net.link_up(id, n) || !self.net.link_up(n, id) {
                continue;
            }
            if let Some(answer) = self.nodes[&n].replica.as_ref().and_then(|r| r.epoch_at(index)) {
                return Some(answer);
            }
        }
        None
    }

    /// The node dies: of its log writer's work, what disk.rs decides
    /// survives; a destage in flight may have written some of its extents
    /// to the image, but not the volume state; its clients' reads fail and
    /// replies not yet sent are lost (those writes stay indeterminate).
    fn kill(&mut self, id: u64, death: Death) {
        let down = self.rng.range(10, 600);
        let failed_sync_kept = match death {
            Death::Crash => None,
            Death::FsyncError { kept } => Some(kept),
        };
        let Sim { nodes, rng, .. } = self;
        let node = nodes.get_mut(&id).expect("node exists");
        let loss = node
            .writer
            .crash(rng, failed_sync_kept, &mut node.log, &mut node.applied);
        node.replica = None;
        node.installing = None;
        node.paused_until = None;
        node.down_until = Some(self.round + down);
        if let Some(d) = node.destaging.take() {
            let written: Vec<(u64, Extent)> = d.extents.into_iter().filter(|_| rng.chance(50)).collect();
            Self::write_extents(&mut node.image, &written);
            self.stats.destages_torn += 1;
        }
        match death {
            Death::Crash => self.stats.crashes += 1,
            Death::FsyncError { kept } => {
                self.stats.fsync_errors += 1;
                if kept {
                    self.stats.fsync_errors_kept += 1;
                } else {
                    self.stats.fsync_errors_lost += 1;
                }
            }
        }
        self.stats.torn_tails += u64::from(loss.torn_tail);
        self.stats.tails_kept += u64::from(loss.tail_kept);
        self.stats.unsynced_batches_lost += loss.unsynced_lost as u64;
        self.stats.queued_jobs_lost += loss.queued_lost as u64;
        let what = match death {
            Death::Crash => "crashes".to_string(),
            Death::FsyncError { kept } => {
                format!(
                    "fsync fails, node stops (failed batch {})",
                    if kept { "on disk" } else { "lost" }
                )
            }
        };
        self.note(|| format!("node {id} {what}: {loss:?}; down for {down} rounds"));
        self.reads.retain(|_, p| p.node != id);
        self.replies.retain(|(_, node, _)| *node != id);
        self.inflight.retain(|_, (_, node)| *node != id);
    }

    /// Restarts from what is on "disk": the durable log (whose first entry,
    /// once compacted, is the snapshot point), the volume state and image.
    fn restart(&mut self, id: u64) {
        let seed = self.seed;
        let voters = ConfState::from((self.ids.clone(), vec![]));
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
            Replica::restart(&config(id), hs, voters, &log.entries, state)
        }));
        let r = match restarted {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("seed {seed}: node {id} does not restart from {on_disk}: {e}"),
            Err(_) => panic!("seed {seed}: node {id} panicked restarting from {on_disk} (raft's message above)"),
        };
        node.replica = Some(r);
        node.down_until = None;
        node.clock = 0;
        self.stats.restarts += 1;
        if compacted {
            self.stats.restarts_from_compacted_log += 1;
        }
        self.note(|| format!("node {id} restarts from {on_disk}"));
    }

    /// Ticks every running replica at its own clock rate, except those
    /// copying a snapshot or whose install is not yet durable (the driver's
    /// `on_tick`).
    fn tick_all(&mut self) {
        for id in self.ids.clone() {
            let node = self.node(id);
            if !node.running() {
                continue;
            }
            node.clock += node.clock_rate;
            while node.clock >= ROUNDS_PER_TICK * NOMINAL_RATE {
                node.clock -= ROUNDS_PER_TICK * NOMINAL_RATE;
                if node.installing.is_some() || node.writer.install_pending().is_some() {
                    continue;
                }
                if let Some(r) = node.replica.as_mut() {
                    r.tick();
                }
            }
        }
    }

    /// The background work of every running node: snapshot copies and
    /// destages.
    fn background(&mut self) {
        for id in self.ids.clone() {
            if !self.running(id) {
                continue;
            }
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

    /// Ends faults whose time is up and starts new ones.
    fn nemesis(&mut self) {
        for id in self.ids.clone() {
            let node = &self.nodes[&id];
            if node.down_until.is_some_and(|r| r <= self.round) {
                self.restart(id);
            }
            if self.nodes[&id].paused_until.is_some_and(|r| r <= self.round) {
                self.node(id).paused_until = None;
                self.note(|| format!("node {id} resumes"));
            }
        }
        if self.net.partition.as_ref().is_some_and(|(_, heal)| *heal <= self.round) {
            self.net.heal();
            self.note(|| "partition healed".to_string());
        }
        // Crash-type faults: at most a minority of nodes at a time.
        let faulty = |n: &Node| n.replica.is_none() || n.paused_until.is_some() || n.writer.fail_next_sync;
        let healthy: Vec<u64> = self.ids.iter().copied().filter(|id| !faulty(&self.nodes[id])).collect();
        let budget = (self.ids.len() - 1) / 2;
        if self.ids.len() - healthy.len() < budget {
            if self.rng.chance_bp(self.params.crash_bp) {
                let id = self.rng.pick(&healthy);
                self.kill(id, Death::Crash);
            } else if self.rng.chance_bp(self.params.fsync_error_bp) {
                let id = self.rng.pick(&healthy);
                self.node(id).writer.fail_next_sync = true;
                self.note(|| format!("node {id}: its next fdatasync will fail"));
            } else if self.rng.chance_bp(self.params.pause_bp) {
                let id = self.rng.pick(&healthy);
                let until = self.round + self.rng.range(10, 400);
                self.node(id).paused_until = Some(until);
                self.stats.pauses += 1;
                self.note(|| format!("node {id} pauses until round {until}"));
            }
        }
        if self.net.partition.is_none() && self.rng.chance_bp(self.params.partition_bp) {
            let p = Partition::random(&mut self.rng, &self.ids);
            let heal = self.round + self.rng.range(20, 600);
            match p {
                Partition::Isolate(_) => self.stats.partitions_isolate += 1,
                Partition::OneWay { .. } => self.stats.partitions_one_way += 1,
                Partition::Bridge { .. } => self.stats.partitions_bridge += 1,
                Partition::Split { .. } => self.stats.partitions_split += 1,
            }
            self.note(|| format!("partition {p:?} until round {heal}"));
            self.net.partition(p, heal);
        }
    }

    fn step(&mut self) {
        if self.faults_on {
            self.nemesis();
        }
        self.tick_all();
        if self.faults_on {
            if self.rng.chance(30) {
                self.propose_write();
            }
            if self.rng.chance(20) {
                self.issue_read();
            }
            if self.rng.chance(1) {
                self.attach();
            }
        }
        self.background();
        self.pump();
        self.deliver_some();
        self.pump();
        self.deliver_replies();
        self.round += 1;
    }

    fn heal_and_settle(&mut self) {
        self.faults_on = false;
        self.net.faults_on = false;
        self.net.heal();
        self.note(|| "healing everything; no more faults or clients".to_string());
        for id in self.ids.clone() {
            if self.nodes[&id].replica.is_none() {
                self.restart(id);
            }
            let node = self.node(id);
            node.paused_until = None;
            node.writer.fail_next_sync = false;
        }
        for _ in 0..SETTLE_ROUNDS {
            self.step();
            let applied: Vec<u64> = self
                .nodes
                .values()
                .map(|n| n.replica.as_ref().map_or(0, |r| r.applied_index()))
                .collect();
            let commit = self
                .nodes
                .values()
                .map(|n| n.replica.as_ref().map_or(0, |r| r.commit_index()))
                .max()
                .unwrap_or(0);
            let settled = self
                .nodes
                .values()
                .all(|n| n.writer.is_idle() && n.installing.is_none());
            if !self.leaders().is_empty()
                && applied.iter().all(|a| *a == commit)
                && self.net.is_empty()
                && settled
                && self.reads.is_empty()
                && self.replies.is_empty()
            {
                return;
            }
        }
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|(id, n)| {
                let r = n.replica.as_ref().expect("live");
                format!(
                    "node {id}: leader {} term {} commit {} applied {} installing {:?} log writer idle {}",
                    r.leader_id(),
                    r.term(),
                    r.commit_index(),
                    r.applied_index(),
                    n.installing.as_ref().map(|i| (i.index, i.copied)),
                    n.writer.is_idle()
                )
            })
            .collect();
        panic!(
            "seed {}: the group did not converge after healing: {}; {} reads pending",
            self.seed,
            nodes.join("; "),
            self.reads.len()
        );
    }

    /// C1 over the durable logs, agreement of the state machines, final
    /// reads into the history, then C2 over the whole history.
    fn check(&mut self) {
        let seed = self.seed;
        assert!(
            self.nodes.values().all(|n| n.replica.is_some()),
            "seed {seed}: all replicas should be live after healing"
        );
        // Committed writes take log order in proposal order: the token
        // comparison of the read pre-checks relies on it.
        let mut by_index = self.acked.clone();
        by_index.sort_unstable();
        assert!(
            by_index.windows(2).all(|w| w[0].0 < w[1].0 && w[0].2 < w[1].2),
            "C1: seed {seed}: acknowledged writes are not in proposal order in the log"
        );
        // C1: every acknowledged write sits in every durable log at its
        // index, unless that part of the log was compacted after a destage.
        let mut lost = Vec::new();
        let mut found = 0;
        for &(index, block, token) in &self.acked {
            for (&id, node) in &self.nodes {
                let log = &node.log.entries;
                // Compacted away, or the stand-in entry of a snapshot point.
                if let Some(f) = log.first()
                    && (index < f.index || (index == f.index && f.data.is_empty()))
                {
                    continue;
                }
                let Some(e) = log.iter().find(|e| e.index == index) else {
                    lost.push(format!("node {id} lost acknowledged write {token} at index {index}"));
                    continue;
                };
                let op = EntryOp::decode(&e.data)
                    .unwrap_or_else(|err| panic!("C1: seed {seed}: entry {index} on node {id} is corrupt: {err}"));
                match op.op {
                    VolumeOp::Write { offset, data }
                        if offset == block * BLOCK && data == payload(token).as_slice() =>
                    {
                        found += 1;
                    }
                    other => lost.push(format!(
                        "node {id}: index {index} holds {other:?}, not acknowledged write {token}"
                    )),
                }
            }
        }
        if !lost.is_empty() {
            panic!(
                "C1: seed {seed}: {} acknowledged writes missing from durable logs: {}",
                lost.len(),
                lost.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
            );
        }
        self.stats.acked_in_logs += found;
        // Every replica's state machine (image plus cache) holds the latest
        // acknowledged write of every block or a later one, and they agree;
        // each is a final read in the history.
        let ids = self.ids.clone();
        for block in 0..BLOCKS {
            let floor = self.floor(block);
            let first = Self::block_of(&self.nodes[&ids[0]], block);
            for &id in &ids {
                let data = Self::block_of(&self.nodes[&id], block);
                let value = self.check_block(
                    &format!("final state of block {block} on node {id}"),
                    block,
                    &data,
                    floor,
                );
                if data != first {
                    let token = |d: &[u8]| u64::from_le_bytes(d[..8].try_into().expect("8 bytes"));
                    let (mine, theirs) = (token(&data), token(&first));
                    let node = &self.nodes[&id];
                    let r = node.replica.as_ref().expect("live");
                    panic!(
                        "seed {seed}: replicas disagree on block {block}: node {id} holds write {mine}, node {} \
                         write {theirs}; node {id}: applied {}, volume state {:?}, cache holds the block: {}",
                        ids[0],
                        r.applied_index(),
                        node.applied,
                        r.read(block * BLOCK, BLOCK)
                            .iter()
                            .any(|s| matches!(s, Segment::Cached { .. })),
                    );
                }
                let invoke = self.history.now();
                let complete = self.history.now();
                self.history.reads.push(ReadRec {
                    block,
                    node: id,
                    invoke,
                    invoke_round: self.round,
                    complete,
                    complete_round: self.round,
                    value: value.unwrap_or(0),
                    index: None,
                    final_read: true,
                });
                self.stats.final_reads += 1;
            }
        }
        let epochs: Vec<u64> = self
            .nodes
            .values()
            .map(|n| n.replica.as_ref().expect("live").state().epoch)
            .collect();
        assert!(
            epochs.windows(2).all(|w| w[0] == w[1]),
            "seed {seed}: replicas disagree on the epoch: {epochs:?}"
        );
        // C2: the whole history, block by block.
        match self.history.check(BLOCKS, self.trace.is_some()) {
            Ok(s) => {
                self.stats.lin_ops += s.ops as u64;
                self.stats.lin_states += s.states as u64;
            }
            Err(violations) => panic!(
                "C2: seed {seed}: {} block(s) not linearizable:\n{}",
                violations.len(),
                violations.join("\n")
            ),
        }
    }

    fn finish_stats(&mut self) {
        self.stats.rounds = self.round;
        self.stats.writes_acked = self.history.acked() as u64;
        self.stats.writes_unknown = self.history.unknown() as u64;
        let ns = self.net.stats;
        self.stats.msgs_sent = ns.sent;
        self.stats.msgs_delivered = ns.delivered;
        self.stats.msgs_dropped = ns.dropped;
        self.stats.msgs_lost_to_partitions = ns.lost_to_partitions;
        self.stats.msgs_duplicated = ns.duplicated;
        self.stats.msgs_delayed = ns.delayed;
        self.stats.msgs_delayed_long = ns.delayed_long;
        for n in self.nodes.values() {
            self.stats.log_batches += n.writer.batches;
            self.stats.multi_job_batches += n.writer.multi_job_batches;
            self.stats.unsynced_batches += n.writer.unsynced_batches;
        }
    }
}
