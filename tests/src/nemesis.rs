//! A Jepsen-style nemesis run against real `triremed` processes: clients
//! record a history of NBD operations while a nemesis injects faults, and a
//! checker verifies every read against the acknowledged writes.
//!
//! - **Clients.** Writer threads write whole 4 KiB blocks through the node
//!   the volume is attached to; reader threads read blocks through any node
//!   (leader or follower: reads are ReadIndex reads wherever they land).
//!   Every write carries a unique token, the block number and a pattern
//!   derived from both, so a read names the write it returned and a torn or
//!   misplaced block is caught. Each operation is one request on a raw NBD
//!   session with a timeout, recorded with its invoke and completion times.
//! - **Outcomes.** A write acknowledged with success is `Ok`. A write refused
//!   with EPERM (its session was fenced) is `Fail`: it must never be seen. Any
//!   other error, a timeout or a dropped connection is `Info`: it may or may
//!   not have taken effect, then or later.
//! - **Nemesis.** One fault at a time, held for a while, then healed: SIGKILL
//!   or SIGSTOP of a node, network partitions (isolation, one-way, bridge)
//!   and a slow, lossy, duplicating network through the fault-injecting peer
//!   transport (`--features failpoints`), a full disk (the node's data dir on
//!   a small tmpfs, filled up), a failing log fsync and crashes at points of
//!   the write path (failpoints). When the attached node is taken out, the
//!   nemesis moves the volume to a surviving node as an orchestrator would
//!   (`trireme volume attach`), which fences the old writer.
//! - **Checker.** Per block, the history must be linearizable for a register
//!   with unique values (Wing & Gong's search with Lowe's memoization; `Info`
//!   writes may take effect at any point after their invocation, or never).
//!   On top of that, simple rules name what went wrong: a lost write (an
//!   acknowledged write neither visible in the final state nor overwritten
//!   by a later one), a stale read (a read older than a write acknowledged
//!   before it began, or than a read that completed before it began) and an
//!   impossible read (a value no write produced, a fenced write, a write not
//!   yet invoked, or a corrupt block).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde::Serialize;
use triremed::failpoints;

use crate::{Cluster, Sig, describe, nbd, run_ok, wait_until};

/// Bytes per block: each write and read covers exactly one.
pub const BLOCK_BYTES: usize = 4096;
/// Blocks sit this far apart so each lands in its own destage extent.
const BLOCK_STRIDE_BYTES: u64 = 64 * 1024;
/// The volume the clients use: small, so a snapshot install (which copies
/// the whole volume) does not dominate a run.
const VOLUME_SIZE: &str = "64MiB";
/// Size of the tmpfs under the disk-full node: the Raft log's prefilled
/// and recycled files (up to 384 MiB here), room for the log of a node
/// catching up at full speed (over 500 MiB seen at 2,300 writes/s) and the
/// image and state files. Filling it costs that much memory for a moment.
pub const DISK_FULL_TMPFS_MIB: u64 = 2048;
/// How long the orchestrator keeps trying to move the volume to a survivor.
const MOVE_TIMEOUT: Duration = Duration::from_secs(120);
/// A follower replicating within this many entries of the leader has
/// recovered.
const RECOVERED_LAG_ENTRIES: u64 = 256;
/// The node whose data dir sits on a tmpfs when the disk-full fault is on.
pub const DISK_FULL_NODE: u64 = 3;

/// The faults the nemesis can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// SIGKILL a node, restart it after the hold.
    Kill,
    /// SIGSTOP a node, SIGCONT it after the hold.
    Stop,
    /// Cut one node off from both others, both ways.
    Isolate,
    /// Lose everything one node sends to one other; the reverse still flows.
    OneWay,
    /// The two outer nodes cannot talk to each other; both reach the middle.
    Bridge,
    /// Every peer link delays, loses and duplicates messages.
    Slow,
    /// Fill the filesystem under one node's data dir.
    DiskFull,
    /// Make one node's Raft log fsync fail.
    FsyncError,
    /// Abort one node at a point of the write path.
    CrashPoint,
}

impl Fault {
    pub const ALL: [Fault; 9] = [
        Fault::Kill,
        Fault::Stop,
        Fault::Isolate,
        Fault::OneWay,
        Fault::Bridge,
        Fault::Slow,
        Fault::DiskFull,
        Fault::FsyncError,
        Fault::CrashPoint,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Stop => "stop",
            Fault::Isolate => "isolate",
            Fault::OneWay => "one-way",
            Fault::Bridge => "bridge",
            Fault::Slow => "slow",
            Fault::DiskFull => "disk-full",
            Fault::FsyncError => "fsync-error",
            Fault::CrashPoint => "crash-point",
        }
    }

    /// Parses a comma-separated list of fault names, or `all`.
    pub fn parse_list(s: &str) -> Result<Vec<Fault>> {
        if s == "all" {
            return Ok(Fault::ALL.to_vec());
        }
        s.split(',')
            .map(|name| {
                Fault::ALL.into_iter().find(|f| f.name() == name.trim()).ok_or_else(|| {
                    let known: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                    anyhow!("unknown fault {name:?}; known: {}, or all", known.join(", "))
                })
            })
            .collect()
    }

    /// Needs triremed built with the `failpoints` feature.
    fn needs_failpoints(self) -> bool {
        !matches!(self, Fault::Kill | Fault::Stop | Fault::DiskFull)
    }
}

/// Crash points of the write path, in the order a run visits them.
const CRASH_POINTS: [&str; 5] = [
    failpoints::CRASH_LOG_AFTER_WRITE,
    failpoints::CRASH_LOG_AFTER_SYNC,
    failpoints::CRASH_AFTER_APPLY,
    failpoints::CRASH_DESTAGE_AFTER_IMAGE_WRITE,
    failpoints::CRASH_SNAPSHOT_MID_COPY,
];

#[derive(Clone, Debug)]
pub struct Config {
    /// How long the nemesis phase lasts (faults keep coming until then).
    pub duration: Duration,
    /// Stop after this many faults even if time is left.
    pub max_faults: usize,
    pub faults: Vec<Fault>,
    /// Quiet time after a fault is healed and the cluster has recovered.
    pub interval: Duration,
    /// How long a fault is held.
    pub hold: Duration,
    pub writers: usize,
    pub readers: usize,
    pub blocks: u64,
    pub seed: u64,
    /// One NBD request (or connect and handshake) may take this long.
    pub op_timeout: Duration,
    /// After a heal, the volume must be whole again within this.
    pub recover_timeout: Duration,
}

impl Config {
    pub fn new(faults: Vec<Fault>, duration: Duration, seed: u64) -> Config {
        Config {
            duration,
            max_faults: usize::MAX,
            faults,
            interval: Duration::from_secs(2),
            hold: Duration::from_secs(4),
            writers: 2,
            readers: 2,
            blocks: 16,
            seed,
            op_timeout: Duration::from_secs(3),
            recover_timeout: Duration::from_secs(60),
        }
    }
}

/// Starts the 3-node cluster a nemesis run needs: with `DISK_FULL_NODE`'s
/// data dir on a small tmpfs when `faults` has `DiskFull`.
pub fn start_cluster(test_name: &str, faults: &[Fault]) -> Result<Cluster> {
    if !faults.contains(&Fault::DiskFull) {
        return Cluster::start_nodes(test_name, 3, Some(VOLUME_SIZE));
    }
    ensure!(is_root(), "the disk-full nemesis mounts a tmpfs and needs root");
    Cluster::start_nodes_prepared(test_name, 3, Some(VOLUME_SIZE), &|data_dir: &Path| {
        let dir = data_dir.join(format!("node-{DISK_FULL_NODE}"));
        fs::create_dir_all(&dir)?;
        run_ok(
            std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={DISK_FULL_TMPFS_MIB}m"), "tmpfs"])
                .arg(&dir),
            Duration::from_secs(10),
        )?;
        Ok(vec![dir])
    })
}

/// True if this process runs as root (the effective uid in /proc).
fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1).map(|euid| euid == "0"))
            .unwrap_or(false)
    })
}

// ---------------------------------------------------------------------------
// History
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Fail,
    Info,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum OpKind {
    /// Wrote the block with this token.
    Write { token: u64 },
    /// Read the block and found the write with this token (0: zeroes).
    Read { value: u64 },
}

#[derive(Clone, Debug, Serialize)]
pub struct Op {
    pub process: usize,
    pub node: u64,
    pub block: u64,
    #[serde(flatten)]
    pub kind: OpKind,
    pub outcome: Outcome,
    pub invoke_us: u64,
    /// None for `Info`: it may take effect any time after its invocation.
    pub complete_us: Option<u64>,
}

/// A read that returned something no write could have produced.
#[derive(Clone, Debug)]
struct Corrupt {
    process: usize,
    node: u64,
    block: u64,
    at_us: u64,
    why: String,
}

/// The data of the write with `token` to `block`.
pub fn block_data(token: u64, block: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BLOCK_BYTES);
    v.extend_from_slice(&token.to_le_bytes());
    v.extend_from_slice(&block.to_le_bytes());
    let mut x = token.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block;
    while v.len() < BLOCK_BYTES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(BLOCK_BYTES);
    v
}

/// The token of the write `data` (read from `block`) holds: 0 for zeroes.
fn decode_block(block: u64, data: &[u8]) -> std::result::Result<u64, String> {
    if data.iter().all(|b| *b == 0) {
        return Ok(0);
    }
    let token = u64::from_le_bytes(data[..8].try_into().map_err(|_| "short block".to_string())?);
    let wblock = u64::from_le_bytes(data[8..16].try_into().map_err(|_| "short block".to_string())?);
    if wblock != block {
        return Err(format!("holds token {token} written to block {wblock}"));
    }
    if data != block_data(token, block).as_slice() {
        let first = data
            .iter()
            .zip(block_data(token, block))
            .position(|(a, b)| *a != b)
            .unwrap_or(0);
        return Err(format!(
            "token {token}, but the block differs from that write at byte {first}"
        ));
    }
    Ok(token)
}

fn offset_of(block: u64) -> u64 {
    block * BLOCK_STRIDE_BYTES
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

struct Shared {
    start: Instant,
    stop: AtomicBool,
    /// The node writers write through.
    attached: AtomicU64,
    next_token: AtomicU64,
    /// (node id, NBD address, export).
    nodes: Vec<(u64, String)>,
    export: String,
    blocks: u64,
    op_timeout: Duration,
    history: Mutex<Vec<Op>>,
    corrupt: Mutex<Vec<Corrupt>>,
    /// Reads that failed (no effect on the check).
    reads_failed: AtomicU64,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn addr(&self, node: u64) -> Option<&str> {
        self.nodes.iter().find(|(id, _)| *id == node).map(|(_, a)| a.as_str())
    }

    fn record(&self, op: Op) {
        self.history.lock().unwrap_or_else(PoisonError::into_inner).push(op);
    }
}

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Opens a session whose every request times out after `timeout`.
fn open_session(addr: &str, export: &str, timeout: Duration) -> Result<nbd::Conn> {
    let mut c = nbd::Conn::connect(addr)?;
    c.stream.set_read_timeout(Some(timeout))?;
    c.stream.set_write_timeout(Some(timeout))?;
    c.greet()?;
    c.go(export)?.map_err(|r| anyhow!("GO {export} refused: {r:?}"))?;
    Ok(c)
}

/// A client's one request: Ok(errno) when a reply came.
fn write_block(c: &mut nbd::Conn, handle: u64, block: u64, data: &[u8]) -> Result<u32> {
    let mut b = nbd::encode_request(0, nbd::CMD_WRITE, handle, offset_of(block), data.len() as u32);
    b.extend_from_slice(data);
    c.send(&b)?;
    c.simple_reply(handle)
}

fn read_block(c: &mut nbd::Conn, handle: u64, block: u64) -> Result<std::result::Result<Vec<u8>, u32>> {
    c.request(0, nbd::CMD_READ, handle, offset_of(block), BLOCK_BYTES as u32)?;
    let e = c.simple_reply(handle)?;
    if e != 0 {
        return Ok(Err(e));
    }
    Ok(Ok(c.read_exact_vec(BLOCK_BYTES)?))
}

/// Waits a little before retrying a connection, so a dead node is not
/// hammered; the stop flag cuts it short.
fn backoff(shared: &Shared) {
    for _ in 0..5 {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn writer(process: usize, seed: u64, shared: Arc<Shared>) {
    let mut rng = Rng::new(seed);
    let mut session: Option<(u64, nbd::Conn)> = None;
    let mut handle = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let target = shared.attached.load(Ordering::Relaxed);
        if session.as_ref().is_some_and(|(n, _)| *n != target) {
            session = None;
        }
        if session.is_none() {
            let Some(addr) = shared.addr(target) else {
                backoff(&shared);
                continue;
            };
            match open_session(addr, &shared.export, shared.op_timeout) {
                Ok(c) => session = Some((target, c)),
                Err(_) => {
                    backoff(&shared);
                    continue;
                }
            }
        }
        let Some((node, conn)) = session.as_mut() else { continue };
        let node = *node;
        let block = rng.below(shared.blocks);
        let token = shared.next_token.fetch_add(1, Ordering::Relaxed);
        let data = block_data(token, block);
        handle += 1;
        let invoke_us = shared.now_us();
        let res = write_block(conn, handle, block, &data);
        let now = shared.now_us();
        let (outcome, complete_us) = match res {
            Ok(0) => (Outcome::Ok, Some(now)),
            Ok(nbd::EPERM) => (Outcome::Fail, Some(now)),
            Ok(_) => (Outcome::Info, None),
            Err(_) => {
                session = None;
                (Outcome::Info, None)
            }
        };
        if outcome == Outcome::Fail {
            // A fenced session is closed by the server.
            session = None;
        }
        shared.record(Op {
            process,
            node,
            block,
            kind: OpKind::Write { token },
            outcome,
            invoke_us,
            complete_us,
        });
    }
}

fn reader(process: usize, seed: u64, shared: Arc<Shared>) {
    let mut rng = Rng::new(seed);
    let mut session: Option<(u64, nbd::Conn)> = None;
    let mut handle = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        if session.is_none() {
            let (node, addr) = shared.nodes[rng.below(shared.nodes.len() as u64) as usize].clone();
            match open_session(&addr, &shared.export, shared.op_timeout) {
                Ok(c) => session = Some((node, c)),
                Err(_) => {
                    backoff(&shared);
                    continue;
                }
            }
        }
        let Some((node, conn)) = session.as_mut() else { continue };
        let node = *node;
        let block = rng.below(shared.blocks);
        handle += 1;
        let invoke_us = shared.now_us();
        let res = read_block(conn, handle, block);
        let complete_us = shared.now_us();
        match res {
            Ok(Ok(data)) => match decode_block(block, &data) {
                Ok(value) => shared.record(Op {
                    process,
                    node,
                    block,
                    kind: OpKind::Read { value },
                    outcome: Outcome::Ok,
                    invoke_us,
                    complete_us: Some(complete_us),
                }),
                Err(why) => shared
                    .corrupt
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(Corrupt {
                        process,
                        node,
                        block,
                        at_us: complete_us,
                        why,
                    }),
            },
            Ok(Err(_)) => {
                shared.reads_failed.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                shared.reads_failed.fetch_add(1, Ordering::Relaxed);
                session = None;
            }
        }
        // Now and then move to another node, so every node serves reads.
        if rng.below(50) == 0 {
            session = None;
        }
    }
}

// ---------------------------------------------------------------------------
// Checker
// ---------------------------------------------------------------------------

/// What the checker found, with the run's figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub duration_s: f64,
    pub operations: usize,
    pub writes_acknowledged: usize,
    pub writes_fenced: usize,
    pub writes_indeterminate: usize,
    pub reads_ok: usize,
    pub reads_failed: u64,
    pub final_reads: usize,
    pub faults: BTreeMap<String, u64>,
    pub fault_log: Vec<String>,
    pub lost_writes: usize,
    pub stale_reads: usize,
    pub impossible_reads: usize,
    pub nonlinearizable_blocks: usize,
    /// Longest stretch with no acknowledged write, in seconds.
    pub longest_write_unavailability_s: f64,
    /// When that stretch began, in seconds from the start.
    pub longest_write_unavailability_at_s: f64,
    /// Longest stretch with no successful read, in seconds.
    pub longest_read_unavailability_s: f64,
    pub longest_read_unavailability_at_s: f64,
    /// Longest time from a heal until the volume was whole again.
    pub longest_recovery_s: f64,
    /// Longest time the orchestrator took to move the volume to a survivor.
    pub longest_move_s: f64,
    /// Nodes found dead with no fault aimed at them.
    pub unexpected_exits: u64,
    /// The first few problems, described.
    pub problems: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.lost_writes == 0
            && self.stale_reads == 0
            && self.impossible_reads == 0
            && self.nonlinearizable_blocks == 0
            && self.problems.is_empty()
    }

    /// The figures as a table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(s, "| {k:<34} | {v:>14} |");
        };
        row("duration (s)", format!("{:.1}", self.duration_s));
        row("operations", self.operations.to_string());
        row("writes acknowledged", self.writes_acknowledged.to_string());
        row("writes fenced (EPERM)", self.writes_fenced.to_string());
        row("writes indeterminate", self.writes_indeterminate.to_string());
        row("reads ok", self.reads_ok.to_string());
        row("reads failed", self.reads_failed.to_string());
        row("final reads", self.final_reads.to_string());
        let total: u64 = self.faults.values().sum();
        row("faults injected", total.to_string());
        for (k, v) in &self.faults {
            row(&format!("  {k}"), v.to_string());
        }
        row("lost writes", self.lost_writes.to_string());
        row("stale reads", self.stale_reads.to_string());
        row("impossible reads", self.impossible_reads.to_string());
        row("non-linearizable blocks", self.nonlinearizable_blocks.to_string());
        row(
            "longest write unavailability (s)",
            format!(
                "{:.2} at {:.1}",
                self.longest_write_unavailability_s, self.longest_write_unavailability_at_s
            ),
        );
        row(
            "longest read unavailability (s)",
            format!(
                "{:.2} at {:.1}",
                self.longest_read_unavailability_s, self.longest_read_unavailability_at_s
            ),
        );
        row(
            "longest recovery after heal (s)",
            format!("{:.2}", self.longest_recovery_s),
        );
        row("longest volume move (s)", format!("{:.2}", self.longest_move_s));
        row("unexpected node exits", self.unexpected_exits.to_string());
        s
    }
}

/// Checks a history (final reads included) and fills in the verdicts.
pub fn check(history: &[Op], report: &mut Report) {
    let mut by_block: BTreeMap<u64, Vec<&Op>> = BTreeMap::new();
    for op in history {
        by_block.entry(op.block).or_default().push(op);
    }
    let mut problems = Vec::new();
    for (block, ops) in &by_block {
        check_block(*block, ops, report, &mut problems);
        if let Err(why) = linearizable(ops) {
            report.nonlinearizable_blocks += 1;
            problems.push(format!("block {block}: not linearizable: {why}"));
        }
    }
    problems.truncate(20);
    report.problems.extend(problems);
}

/// The rule-based checks of one block: lost writes, stale and impossible
/// reads.
fn check_block(block: u64, ops: &[&Op], report: &mut Report, problems: &mut Vec<String>) {
    let writes: HashMap<u64, &Op> = ops
        .iter()
        .filter_map(|op| match op.kind {
            OpKind::Write { token } => Some((token, *op)),
            OpKind::Read { .. } => None,
        })
        .collect();
    let acked: Vec<&Op> = writes.values().filter(|w| w.outcome == Outcome::Ok).copied().collect();
    let mut reads: Vec<&Op> = ops
        .iter()
        .filter(|op| matches!(op.kind, OpKind::Read { .. }))
        .copied()
        .collect();
    reads.sort_by_key(|r| r.invoke_us);
    let end = |op: &Op| op.complete_us.unwrap_or(u64::MAX);
    // Both stale-read rules are "is some newer thing older than the read":
    // sorted by when it ended, with a running maximum of how new it is, each
    // read takes one binary search (histories run to millions of ops).
    // Acknowledged writes by end: (end, max invoke so far, its token).
    let mut acked_by_end: Vec<(u64, u64, u64)> = acked
        .iter()
        .filter_map(|w| match w.kind {
            OpKind::Write { token } => Some((end(w), w.invoke_us, token)),
            OpKind::Read { .. } => None,
        })
        .collect();
    acked_by_end.sort_unstable();
    let mut best = (0u64, 0u64);
    for e in &mut acked_by_end {
        if e.1 >= best.0 {
            best = (e.1, e.2);
        }
        (e.1, e.2) = best;
    }
    // Reads by completion: (completion, max invoke of a non-zero value's
    // write so far, that value).
    let mut completed: Vec<(u64, u64, u64)> = reads
        .iter()
        .filter_map(|r| match r.kind {
            OpKind::Read { value } if value != 0 => writes.get(&value).map(|w| (end(r), w.invoke_us, value)),
            _ => None,
        })
        .collect();
    completed.sort_unstable();
    let mut best = (0u64, 0u64);
    for e in &mut completed {
        if e.1 >= best.0 {
            best = (e.1, e.2);
        }
        (e.1, e.2) = best;
    }
    for r in &reads {
        let OpKind::Read { value } = r.kind else { continue };
        let what = || {
            format!(
                "block {block}: read by client {} through node {} at {:.3}-{:.3} s returned {}",
                r.process,
                r.node,
                r.invoke_us as f64 / 1e6,
                end(r) as f64 / 1e6,
                if value == 0 {
                    "zeroes".to_string()
                } else {
                    format!("write {value}")
                }
            )
        };
        // When the write the read returned ended: zeroes "ended" before
        // everything.
        let w_end = if value == 0 {
            None
        } else {
            match writes.get(&value) {
                None => {
                    report.impossible_reads += 1;
                    problems.push(format!("{}, which no client wrote to this block", what()));
                    continue;
                }
                Some(w) if w.outcome == Outcome::Fail => {
                    report.impossible_reads += 1;
                    problems.push(format!("{}, a write refused as fenced", what()));
                    continue;
                }
                Some(w) if w.invoke_us > end(r) => {
                    report.impossible_reads += 1;
                    problems.push(format!("{}, a write not yet issued", what()));
                    continue;
                }
                Some(w) => Some(end(w)),
            }
        };
        let newer_than_ours = |invoke: u64| w_end.is_none_or(|e| invoke > e);
        // Stale against an acknowledged write: one that began after the
        // returned write ended and was acknowledged before the read began.
        let n = acked_by_end.partition_point(|(e, _, _)| *e < r.invoke_us);
        if n > 0 && newer_than_ours(acked_by_end[n - 1].1) {
            report.stale_reads += 1;
            let (_, invoke, token) = acked_by_end[n - 1];
            let ack = writes.get(&token).map_or(0, |w| end(w));
            problems.push(format!(
                "{}, but write {token} (issued {:.3} s) was acknowledged at {:.3} s, before the read began",
                what(),
                invoke as f64 / 1e6,
                ack as f64 / 1e6
            ));
            continue;
        }
        // Stale against an earlier read: one completed before this read
        // began that returned a write which began after ours ended.
        let n = completed.partition_point(|(c, _, _)| *c < r.invoke_us);
        if n > 0 && newer_than_ours(completed[n - 1].1) {
            report.stale_reads += 1;
            problems.push(format!(
                "{}, but an earlier read, completed before this one began, returned the newer write {}",
                what(),
                completed[n - 1].2
            ));
        }
    }
    // Lost: an acknowledged write that the final state neither holds nor
    // could have overwritten. The final reads are the last reads of the
    // block (after every client stopped).
    let Some(last) = reads.iter().max_by_key(|r| r.invoke_us) else {
        return;
    };
    let OpKind::Read { value: final_value } = last.kind else {
        return;
    };
    let final_end = if final_value == 0 {
        0
    } else {
        writes.get(&final_value).map_or(0, |w| end(w))
    };
    for w in &acked {
        let OpKind::Write { token } = w.kind else { continue };
        if token != final_value && (final_value == 0 || w.invoke_us > final_end) && end(w) < last.invoke_us {
            report.lost_writes += 1;
            problems.push(format!(
                "block {block}: acknowledged write {token} (issued {:.3} s, acknowledged {:.3} s) is lost: \
                 the final read returned {}",
                w.invoke_us as f64 / 1e6,
                end(w) as f64 / 1e6,
                if final_value == 0 {
                    "zeroes".to_string()
                } else {
                    format!("write {final_value}")
                }
            ));
        }
    }
}

/// Bound on the search, so a pathological history cannot hang the run.
const MAX_SEARCH_STEPS: u64 = 50_000_000;

/// Wing & Gong's linearizability search with Lowe's memoization, for one
/// register whose writes carry unique values (0 is the initial value).
/// `Info` writes have no return event: they may be linearized anywhere after
/// their call, or never. Failed writes never took effect and are left out.
pub fn linearizable(ops: &[&Op]) -> std::result::Result<(), String> {
    // Writes no read returned change nothing a client saw: leaving the
    // indeterminate ones out keeps the search small and decides the same.
    let read_values: HashSet<u64> = ops
        .iter()
        .filter_map(|o| match o.kind {
            OpKind::Read { value } => Some(value),
            OpKind::Write { .. } => None,
        })
        .collect();
    let kept: Vec<&Op> = ops
        .iter()
        .filter(|o| match (o.kind, o.outcome) {
            (_, Outcome::Fail) => false,
            (OpKind::Write { token }, Outcome::Info) => read_values.contains(&token),
            _ => true,
        })
        .copied()
        .collect();
    // An indeterminate write that a read returned took effect before that
    // read completed: its window closes at the first such completion.
    // (Same verdict, and it lets the search forget it afterwards.)
    let mut first_seen: HashMap<u64, u64> = HashMap::new();
    for o in &kept {
        if let (OpKind::Read { value }, Some(c)) = (o.kind, o.complete_us) {
            let e = first_seen.entry(value).or_insert(c);
            *e = (*e).min(c);
        }
    }
    let closed: Vec<Op> = kept
        .iter()
        .map(|o| match (o.kind, o.outcome) {
            (OpKind::Write { token }, Outcome::Info) => Op {
                complete_us: first_seen.get(&token).map(|c| (*c).max(o.invoke_us)),
                ..(*o).clone()
            },
            _ => (*o).clone(),
        })
        .collect();
    let ops: Vec<&Op> = closed.iter().collect();
    // Events: (time, 0 = call / 1 = return, op). Calls sort before returns
    // at the same microsecond: equal times are taken as concurrent.
    let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(ops.len() * 2);
    for (i, op) in ops.iter().enumerate() {
        events.push((op.invoke_us, 0, i));
        if let Some(c) = op.complete_us {
            events.push((c.max(op.invoke_us), 1, i));
        }
    }
    events.sort_unstable();
    // A doubly linked list over the events; node 0 is the head sentinel.
    const NIL: usize = usize::MAX;
    let n = events.len() + 1;
    let mut next: Vec<usize> = (1..=n).map(|i| if i < n { i } else { NIL }).collect();
    let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { NIL } else { i - 1 }).collect();
    let mut return_node = vec![NIL; ops.len()];
    for (k, &(_, kind, op)) in events.iter().enumerate() {
        if kind == 1 {
            return_node[op] = k + 1;
        }
    }
    let mut remaining_returns = events.iter().filter(|e| e.1 == 1).count();
    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut state = 0u64;
    let mut cache: HashSet<(Vec<u64>, u64)> = HashSet::new();
    // (call node, state before).
    let mut stack: Vec<(usize, u64)> = Vec::new();
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, node: usize| {
        let (p, nx) = (prev[node], next[node]);
        next[p] = nx;
        if nx != NIL {
            prev[nx] = p;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, node: usize| {
        let (p, nx) = (prev[node], next[node]);
        next[p] = node;
        if nx != NIL {
            prev[nx] = node;
        }
    };
    let mut entry = next[0];
    let mut steps = 0u64;
    let mut deepest = 0usize;
    let mut blocked = 0usize;
    loop {
        if remaining_returns == 0 {
            return Ok(());
        }
        steps += 1;
        if steps > MAX_SEARCH_STEPS {
            return Err(format!(
                "search gave up after {MAX_SEARCH_STEPS} steps ({} operations)",
                ops.len()
            ));
        }
        if entry == NIL {
            // Only unlinearized Info calls are left after the last return:
            // cannot happen while returns remain, but be safe.
            return Err("ran off the end of the history".into());
        }
        let (_, kind, op) = events[entry - 1];
        if kind == 0 {
            let new_state = match ops[op].kind {
                OpKind::Write { token } => Some(token),
                OpKind::Read { value } => (value == state).then_some(state),
            };
            if let Some(new_state) = new_state {
                let mut lin = linearized.clone();
                lin[op / 64] |= 1 << (op % 64);
                if cache.insert((lin.clone(), new_state)) {
                    stack.push((entry, state));
                    linearized = lin;
                    state = new_state;
                    unlink(&mut next, &mut prev, entry);
                    if return_node[op] != NIL {
                        unlink(&mut next, &mut prev, return_node[op]);
                        remaining_returns -= 1;
                    }
                    entry = next[0];
                    continue;
                }
            }
            entry = next[entry];
        } else {
            // A return whose op could not be linearized before it: undo the
            // last choice. The op that blocked the longest prefix is the
            // one worth naming.
            if stack.len() >= deepest {
                deepest = stack.len();
                blocked = op;
            }
            let Some((call, before)) = stack.pop() else {
                let stuck = &ops[blocked];
                let what = if matches!(stuck.kind, OpKind::Read { .. }) {
                    "read"
                } else {
                    "write"
                };
                return Err(format!(
                    "no order explains the {what} by client {} through node {} at {:.3}-{:.3} s ({:?}); \
                     at most {deepest} of {} operations could be ordered before it",
                    stuck.process,
                    stuck.node,
                    stuck.invoke_us as f64 / 1e6,
                    stuck.complete_us.unwrap_or(0) as f64 / 1e6,
                    stuck.kind,
                    ops.len()
                ));
            };
            let (_, _, cop) = events[call - 1];
            if return_node[cop] != NIL {
                relink(&mut next, &mut prev, return_node[cop]);
                remaining_returns += 1;
            }
            relink(&mut next, &mut prev, call);
            linearized[cop / 64] &= !(1 << (cop % 64));
            state = before;
            entry = next[call];
        }
    }
}

// ---------------------------------------------------------------------------
// Nemesis
// ---------------------------------------------------------------------------

/// Drives faults against the cluster and keeps the volume attached to a
/// live node.
struct Nemesis<'a> {
    cluster: &'a mut Cluster,
    shared: Arc<Shared>,
    rng: Rng,
    ids: Vec<u64>,
    report: Report,
    crash_points_used: usize,
}

impl Nemesis<'_> {
    fn log(&mut self, what: String) {
        let line = format!("[{:8.3} s] {what}", self.shared.now_us() as f64 / 1e6);
        eprintln!("nemesis {line}");
        self.report.fault_log.push(line);
    }

    fn cli_ok(&self, node: u64, args: &[&str]) -> Result<()> {
        let out = self.cluster.cli_on(node, args)?;
        ensure!(
            out.status.success(),
            "`trireme {}` on node {node} failed\n{}",
            args.join(" "),
            describe(&out)
        );
        Ok(())
    }

    fn attached(&self) -> u64 {
        self.shared.attached.load(Ordering::Relaxed)
    }

    /// Moves the volume to a running node other than `avoid` (the
    /// orchestrator's failover), trying each candidate through each
    /// running node until one attach commits.
    fn move_volume(&mut self, avoid: u64) -> Result<()> {
        let candidates: Vec<u64> = self
            .ids
            .iter()
            .copied()
            .filter(|&n| n != avoid && self.cluster.is_running(n))
            .collect();
        let started = Instant::now();
        let deadline = started + MOVE_TIMEOUT;
        let volume = self.cluster.volume().to_string();
        let mut last = String::new();
        while Instant::now() < deadline {
            for &to in &candidates {
                for &via in &candidates {
                    let out = self
                        .cluster
                        .cli_on(via, &["volume", "attach", &volume, "--node", &to.to_string()]);
                    match out {
                        Ok(o) if o.status.success() => {
                            self.shared.attached.store(to, Ordering::Relaxed);
                            let took = started.elapsed().as_secs_f64();
                            self.report.longest_move_s = self.report.longest_move_s.max(took);
                            self.log(format!(
                                "moved the volume to node {to} (away from node {avoid}) in {took:.2} s"
                            ));
                            return Ok(());
                        }
                        Ok(o) => last = describe(&o),
                        Err(e) => last = format!("{e:#}"),
                    }
                    if !last.is_empty() {
                        self.log(format!(
                            "attach to node {to} through node {via} failed: {}",
                            last.lines().find(|l| l.starts_with("error")).unwrap_or("see above")
                        ));
                    }
                }
            }
            thread::sleep(Duration::from_millis(200));
        }
        bail!("could not move the volume away from node {avoid} within {MOVE_TIMEOUT:?}: {last}")
    }

    fn net_rule(&self, from: u64, to: &[u64], extra: &[&str]) -> Result<()> {
        let to: Vec<String> = to.iter().map(u64::to_string).collect();
        let to = to.join(",");
        let mut args = vec!["fault", "net", "set", "--to", to.as_str()];
        args.extend_from_slice(extra);
        self.cli_ok(from, &args)
    }

    fn clear_net(&self) -> Result<()> {
        for &id in &self.ids {
            if self.cluster.is_running(id) {
                self.cli_ok(id, &["fault", "net", "clear"])?;
            }
        }
        Ok(())
    }

    fn others(&self, id: u64) -> Vec<u64> {
        self.ids.iter().copied().filter(|&n| n != id).collect()
    }

    /// Waits (up to `hold`) for node `id` to exit by itself; true if it did.
    fn wait_exit(&self, id: u64, hold: Duration) -> bool {
        wait_until(hold, "the node to exit", || Ok(!self.cluster.is_alive(id))).is_ok()
    }

    fn restart_if_dead(&mut self, id: u64) -> Result<()> {
        if !self.cluster.is_alive(id) {
            self.cluster.restart_node_id(id)?;
            self.log(format!("restarted node {id}"));
        }
        Ok(())
    }

    /// Injects `fault`, holds it, heals it.
    fn inject(&mut self, fault: Fault, hold: Duration) -> Result<()> {
        *self.report.faults.entry(fault.name().to_string()).or_default() += 1;
        let target = self.rng.pick(&self.ids);
        match fault {
            Fault::Kill => {
                self.log(format!("SIGKILL node {target}"));
                self.cluster.kill_node_id(target)?;
                if target == self.attached() {
                    self.move_volume(target)?;
                }
                thread::sleep(hold);
                self.cluster.restart_node_id(target)?;
                self.log(format!("restarted node {target}"));
            }
            Fault::Stop => {
                self.log(format!("SIGSTOP node {target}"));
                self.cluster.signal_node_id(target, Sig::SIGSTOP)?;
                if target == self.attached() {
                    self.move_volume(target)?;
                }
                thread::sleep(hold);
                self.cluster.signal_node_id(target, Sig::SIGCONT)?;
                self.log(format!("SIGCONT node {target}"));
            }
            Fault::Isolate => {
                self.log(format!("isolate node {target} (both ways)"));
                self.net_rule(target, &self.others(target), &["--drop"])?;
                for o in self.others(target) {
                    self.net_rule(o, &[target], &["--drop"])?;
                }
                if target == self.attached() {
                    self.move_volume(target)?;
                }
                thread::sleep(hold);
                self.clear_net()?;
                self.log("healed the partition".into());
            }
            Fault::OneWay => {
                let others = self.others(target);
                let to = self.rng.pick(&others);
                self.log(format!("one-way partition: node {target} -> node {to} lost"));
                self.net_rule(target, &[to], &["--drop"])?;
                thread::sleep(hold);
                self.clear_net()?;
                self.log("healed the partition".into());
            }
            Fault::Bridge => {
                let others = self.others(target);
                let (a, b) = (others[0], others[1]);
                self.log(format!(
                    "bridge partition: node {a} and node {b} cut, both reach node {target}"
                ));
                self.net_rule(a, &[b], &["--drop"])?;
                self.net_rule(b, &[a], &["--drop"])?;
                thread::sleep(hold);
                self.clear_net()?;
                self.log("healed the partition".into());
            }
            Fault::Slow => {
                self.log("slow network: 20 ms delay, 10% loss, 5% duplication on every link".into());
                for &id in &self.ids.clone() {
                    self.net_rule(
                        id,
                        &self.others(id),
                        &["--delay-ms", "20", "--loss-percent", "10", "--dup-percent", "5"],
                    )?;
                }
                thread::sleep(hold);
                self.clear_net()?;
                self.log("network back to normal".into());
            }
            Fault::DiskFull => {
                let id = DISK_FULL_NODE;
                let dir = self.cluster.node_by_id(id)?.data_dir.clone();
                let filler = dir.join("nemesis-filler");
                let free = fill_disk(&filler)?;
                self.log(format!("filled node {id}'s disk ({} MiB)", free >> 20));
                let died = self.wait_exit(id, hold);
                fs::remove_file(&filler).with_context(|| format!("removing {}", filler.display()))?;
                self.log(format!(
                    "freed node {id}'s disk; {}",
                    if died {
                        "the node had exited"
                    } else {
                        "the node stayed up"
                    }
                ));
                if died && id == self.attached() {
                    self.move_volume(id)?;
                }
                self.restart_if_dead(id)?;
            }
            Fault::FsyncError | Fault::CrashPoint => {
                let (point, actions) = if fault == Fault::FsyncError {
                    (failpoints::LOG_FSYNC, "return")
                } else {
                    // Every point in turn, so a short run covers them all.
                    let point = CRASH_POINTS[self.crash_points_used % CRASH_POINTS.len()];
                    self.crash_points_used += 1;
                    (point, "return")
                };
                self.log(format!("failpoint {point}={actions} on node {target}"));
                // A crash point on a busy path may fire before the call that
                // set it returns, taking the answer with it.
                if let Err(e) = self.cli_ok(target, &["fault", "point", "set", point, actions])
                    && !self.wait_exit(target, Duration::from_secs(2))
                {
                    return Err(e);
                }
                let died = self.wait_exit(target, hold);
                if died {
                    self.log(format!("node {target} exited at the failpoint"));
                    if target == self.attached() {
                        self.move_volume(target)?;
                    }
                    self.restart_if_dead(target)?;
                } else {
                    self.cli_ok(target, &["fault", "point", "clear"])?;
                    self.log(format!("node {target} did not reach {point}; cleared it"));
                }
            }
        }
        Ok(())
    }

    /// Waits until every replica is back and replicating.
    fn recover(&mut self, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        let ids = self.ids.clone();
        // Under load a follower is rarely at lag 0 at the instant asked;
        // replicating with a short lag is whole. A node that exits while
        // catching up (say, its disk filled again) is restarted and counted.
        let deadline = started + timeout;
        let mut last: String;
        loop {
            for &id in &ids {
                if !self.cluster.is_alive(id) {
                    self.report.unexpected_exits += 1;
                    self.log(format!("node {id} exited while recovering; restarting it"));
                    self.restart_if_dead(id)?;
                }
            }
            match self.cluster.volume_info() {
                Ok(v)
                    if v.leader != 0
                        && ids.iter().all(|&n| {
                            v.replica(n).is_some_and(|r| {
                                matches!(r.state.as_str(), "healthy" | "catching-up")
                                    && r.lag_entries < RECOVERED_LAG_ENTRIES
                            })
                        }) =>
                {
                    break;
                }
                Ok(v) => last = v.summary(),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                bail!("the volume was not whole again {timeout:?} after the heal; last volume info: {last}");
            }
            thread::sleep(Duration::from_millis(100));
        }
        let took = started.elapsed().as_secs_f64();
        self.report.longest_recovery_s = self.report.longest_recovery_s.max(took);
        Ok(())
    }
}

/// Fills the filesystem holding `filler` with one file; returns its size.
fn fill_disk(filler: &Path) -> Result<u64> {
    let dir = filler
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", filler.display()))?;
    let st = nix::sys::statvfs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    let free = st.blocks_available() * st.fragment_size();
    let f = fs::File::create(filler).with_context(|| format!("creating {}", filler.display()))?;
    // Allocate in steps: the last one may fail once the disk is full.
    let step = 16u64 << 20;
    let mut size = 0u64;
    while size < free {
        let len = step.min(free - size);
        match nix::fcntl::posix_fallocate(&f, size as i64, len as i64) {
            Ok(()) => size += len,
            Err(_) => break,
        }
    }
    Ok(size)
}

/// The longest gap between successive `times` (microseconds), counting the
/// run's start and end as times too: (length, start), in seconds.
fn longest_gap(mut times: Vec<u64>, start_us: u64, end_us: u64) -> (f64, f64) {
    times.retain(|t| (start_us..=end_us).contains(t));
    times.push(start_us);
    times.push(end_us);
    times.sort_unstable();
    let (len, at) = times.windows(2).map(|w| (w[1] - w[0], w[0])).max().unwrap_or((0, 0));
    (len as f64 / 1e6, at as f64 / 1e6)
}

/// Runs clients and the nemesis against `cluster` (3 nodes, volume `vol0`)
/// for `cfg.duration`, heals everything, reads every block through every
/// node, and checks the history. The report says what was found; an error
/// means the run itself could not go on (say, a node would not restart).
pub fn run(cluster: &mut Cluster, cfg: &Config) -> Result<Report> {
    ensure!(cluster.nodes().len() == 3, "a nemesis run needs 3 nodes");
    ensure!(!cfg.faults.is_empty(), "no faults to inject");
    ensure!(
        cfg.blocks > 0 && cfg.writers > 0,
        "need at least one block and one writer"
    );
    let ids = cluster.node_ids();
    if cfg.faults.iter().any(|f| f.needs_failpoints()) {
        let out = cluster.cli_on(ids[0], &["fault", "list"])?;
        ensure!(
            out.status.success(),
            "these faults need triremed built with the `failpoints` feature \
             (cargo build --bins --features triremed/failpoints; a workspace build has it)\n{}",
            describe(&out)
        );
    }
    if cfg.faults.contains(&Fault::DiskFull) {
        let dir = cluster.node_by_id(DISK_FULL_NODE)?.data_dir.clone();
        let st = nix::sys::statvfs::statvfs(&dir)?;
        let size_mib = (st.blocks() * st.fragment_size()) >> 20;
        ensure!(
            size_mib <= DISK_FULL_TMPFS_MIB,
            "the disk-full fault needs node {DISK_FULL_NODE}'s data dir on a small filesystem \
             (start the cluster with nemesis::start_cluster); {} is {size_mib} MiB",
            dir.display()
        );
    }
    let info = cluster.wait_volume(Duration::from_secs(30), "a leader", |v| v.leader != 0)?;
    let shared = Arc::new(Shared {
        start: Instant::now(),
        stop: AtomicBool::new(false),
        attached: AtomicU64::new(if info.attached_node != 0 {
            info.attached_node
        } else {
            info.leader
        }),
        next_token: AtomicU64::new(1),
        nodes: cluster.nodes().iter().map(|n| (n.id, n.nbd.clone())).collect(),
        export: cluster.volume().to_string(),
        blocks: cfg.blocks,
        op_timeout: cfg.op_timeout,
        history: Mutex::new(Vec::new()),
        corrupt: Mutex::new(Vec::new()),
        reads_failed: AtomicU64::new(0),
    });
    let mut workers = Vec::new();
    for w in 0..cfg.writers {
        let s = Arc::clone(&shared);
        let seed = cfg.seed ^ (w as u64 + 1);
        workers.push(thread::spawn(move || writer(w, seed, s)));
    }
    for r in 0..cfg.readers {
        let s = Arc::clone(&shared);
        let process = cfg.writers + r;
        let seed = cfg.seed ^ ((process as u64 + 1) << 20);
        workers.push(thread::spawn(move || reader(process, seed, s)));
    }
    let mut nemesis = Nemesis {
        cluster,
        shared: Arc::clone(&shared),
        rng: Rng::new(cfg.seed),
        ids: ids.clone(),
        report: Report::default(),
        crash_points_used: 0,
    };
    nemesis.log(format!(
        "start: faults {:?}, seed {}, volume attached to node {}",
        cfg.faults.iter().map(|f| f.name()).collect::<Vec<_>>(),
        cfg.seed,
        nemesis.attached()
    ));
    let nemesis_end = Instant::now() + cfg.duration;
    let mut outcome: Result<()> = Ok(());
    let mut round = 0usize;
    while round < cfg.max_faults && Instant::now() + cfg.interval < nemesis_end {
        thread::sleep(cfg.interval);
        let fault = cfg.faults[round % cfg.faults.len()];
        round += 1;
        // A node that exited with no fault aimed at it is worth knowing
        // about (and must come back before the next fault).
        for id in ids.clone() {
            if !nemesis.cluster.is_alive(id) {
                nemesis.report.unexpected_exits += 1;
                nemesis.log(format!("node {id} had exited on its own; restarting it"));
                if let Err(e) = nemesis.restart_if_dead(id) {
                    outcome = Err(e);
                    break;
                }
            }
        }
        if outcome.is_err() {
            break;
        }
        if let Err(e) = nemesis.inject(fault, cfg.hold) {
            outcome = Err(e.context(format!("injecting {}", fault.name())));
            break;
        }
        if let Err(e) = nemesis.recover(cfg.recover_timeout) {
            nemesis
                .report
                .problems
                .push(format!("after healing {}: {e:#}", fault.name()));
            outcome = Err(e.context(format!("recovering from {}", fault.name())));
            break;
        }
    }
    let workload_end_us = shared.now_us();
    shared.stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    nemesis.log("clients stopped; healing everything".into());
    let uses_failpoints = cfg.faults.iter().any(|f| f.needs_failpoints());
    let outcome = outcome.and_then(|()| heal_all(&mut nemesis, uses_failpoints));
    let mut report = std::mem::take(&mut nemesis.report);
    if let Err(e) = outcome {
        // Check what was recorded anyway: a violation matters more than
        // the run's failure to go on.
        let history = shared.history.lock().unwrap_or_else(PoisonError::into_inner).clone();
        report.duration_s = shared.now_us() as f64 / 1e6;
        count(&history, &mut report);
        check(&history, &mut report);
        return Err(e.context(format!(
            "the nemesis run could not finish; the history so far:\n{}problems: {:#?}",
            report.table(),
            report.problems
        )));
    }
    // Every replica must hold everything: then read each block through
    // each node.
    let cluster = nemesis.cluster;
    cluster.wait_volume(cfg.recover_timeout, "every replica to catch up", |v| {
        v.leader != 0 && v.all_caught_up(&ids)
    })?;
    let mut final_ops = Vec::new();
    for &id in &ids {
        let addr = cluster.node_by_id(id)?.nbd.clone();
        let mut conn = open_session(&addr, cluster.volume(), Duration::from_secs(10))
            .with_context(|| format!("final reads through node {id}"))?;
        for block in 0..cfg.blocks {
            let invoke_us = shared.now_us();
            let data = read_block(&mut conn, block + 1, block)?
                .map_err(|e| anyhow!("final read of block {block} through node {id} failed with errno {e}"))?;
            let complete_us = shared.now_us();
            match decode_block(block, &data) {
                Ok(value) => final_ops.push(Op {
                    process: usize::MAX,
                    node: id,
                    block,
                    kind: OpKind::Read { value },
                    outcome: Outcome::Ok,
                    invoke_us,
                    complete_us: Some(complete_us),
                }),
                Err(why) => {
                    report.impossible_reads += 1;
                    report
                        .problems
                        .push(format!("final read of block {block} through node {id}: {why}"));
                }
            }
        }
    }
    let mut history = std::mem::take(&mut *shared.history.lock().unwrap_or_else(PoisonError::into_inner));
    report.final_reads = final_ops.len();
    history.extend(final_ops);
    for c in shared.corrupt.lock().unwrap_or_else(PoisonError::into_inner).iter() {
        report.impossible_reads += 1;
        report.problems.push(format!(
            "block {}: read by client {} through node {} at {:.3} s: {}",
            c.block,
            c.process,
            c.node,
            c.at_us as f64 / 1e6,
            c.why
        ));
    }
    report.duration_s = workload_end_us as f64 / 1e6;
    count(&history, &mut report);
    report.reads_failed = shared.reads_failed.load(Ordering::Relaxed);
    let done = |write: bool| -> Vec<u64> {
        history
            .iter()
            .filter(|o| o.outcome == Outcome::Ok && matches!(o.kind, OpKind::Write { .. }) == write)
            .filter_map(|o| o.complete_us)
            .collect()
    };
    (
        report.longest_write_unavailability_s,
        report.longest_write_unavailability_at_s,
    ) = longest_gap(done(true), 0, workload_end_us);
    (
        report.longest_read_unavailability_s,
        report.longest_read_unavailability_at_s,
    ) = longest_gap(done(false), 0, workload_end_us);
    check(&history, &mut report);
    if !report.ok() {
        // Evidence beside the node logs, for a run whose dir is kept.
        let path = cluster.scratch().join("nemesis-history.json");
        if let Ok(json) = serde_json::to_string(&history) {
            let _ = fs::write(&path, json);
            report.problems.push(format!("history written to {}", path.display()));
        }
    }
    Ok(report)
}

/// Counts the operations of `history` by kind and outcome.
fn count(history: &[Op], report: &mut Report) {
    report.operations = history.len();
    for op in history {
        match (op.kind, op.outcome) {
            (OpKind::Write { .. }, Outcome::Ok) => report.writes_acknowledged += 1,
            (OpKind::Write { .. }, Outcome::Fail) => report.writes_fenced += 1,
            (OpKind::Write { .. }, Outcome::Info) => report.writes_indeterminate += 1,
            (OpKind::Read { .. }, _) => report.reads_ok += 1,
        }
    }
}

/// Clears every fault and brings every node back.
fn heal_all(n: &mut Nemesis<'_>, uses_failpoints: bool) -> Result<()> {
    for id in n.ids.clone() {
        if n.cluster.is_alive(id) && !n.cluster.is_running(id) {
            n.cluster.signal_node_id(id, Sig::SIGCONT)?;
        }
        n.restart_if_dead(id)?;
    }
    if uses_failpoints {
        n.clear_net()?;
        for id in n.ids.clone() {
            n.cli_ok(id, &["fault", "point", "clear"])?;
        }
    }
    n.recover(Duration::from_secs(60))
}

/// Writes `report` (and the history's size) as JSON to `path`.
pub fn write_report(path: &PathBuf, report: &Report) -> Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(process: usize, token: u64, invoke: u64, complete: Option<u64>, outcome: Outcome) -> Op {
        Op {
            process,
            node: 1,
            block: 0,
            kind: OpKind::Write { token },
            outcome,
            invoke_us: invoke,
            complete_us: complete,
        }
    }

    fn r(process: usize, value: u64, invoke: u64, complete: u64) -> Op {
        Op {
            process,
            node: 1,
            block: 0,
            kind: OpKind::Read { value },
            outcome: Outcome::Ok,
            invoke_us: invoke,
            complete_us: Some(complete),
        }
    }

    fn verdict(ops: &[Op]) -> (std::result::Result<(), String>, Report) {
        let refs: Vec<&Op> = ops.iter().collect();
        let mut report = Report::default();
        let mut problems = Vec::new();
        check_block(0, &refs, &mut report, &mut problems);
        (linearizable(&refs), report)
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let ops = [
            r(0, 0, 0, 1),
            w(1, 7, 2, Some(3), Outcome::Ok),
            r(0, 7, 4, 5),
            w(1, 8, 6, Some(7), Outcome::Ok),
            r(0, 8, 8, 9),
        ];
        let (lin, rep) = verdict(&ops);
        assert!(lin.is_ok(), "{lin:?}");
        assert_eq!((rep.stale_reads, rep.lost_writes, rep.impossible_reads), (0, 0, 0));
    }

    #[test]
    fn stale_read_is_caught() {
        let ops = [
            w(1, 7, 0, Some(1), Outcome::Ok),
            w(1, 8, 2, Some(3), Outcome::Ok),
            r(0, 7, 4, 5),
        ];
        let (lin, rep) = verdict(&ops);
        assert!(lin.is_err());
        assert_eq!(rep.stale_reads, 1);
    }

    #[test]
    fn lost_write_is_caught() {
        let ops = [w(1, 7, 0, Some(1), Outcome::Ok), r(0, 0, 4, 5)];
        let (lin, rep) = verdict(&ops);
        assert!(lin.is_err());
        assert_eq!(rep.lost_writes, 1);
        assert_eq!(rep.stale_reads, 1);
    }

    #[test]
    fn read_inversion_is_caught_by_the_search() {
        // Both writes concurrent with both reads, but read 1 (done before
        // read 2 began) saw 8 and read 2 saw 7 again, while 7 precedes 8.
        let ops = [
            w(1, 7, 0, Some(10), Outcome::Ok),
            w(2, 8, 5, Some(30), Outcome::Ok),
            r(0, 8, 11, 12),
            r(3, 7, 13, 14),
        ];
        let (lin, _) = verdict(&ops);
        assert!(lin.is_err(), "7 after 8 was observed, after 7 had completed");
    }

    #[test]
    fn concurrent_writes_either_order() {
        let ops = [
            w(1, 7, 0, Some(10), Outcome::Ok),
            w(2, 8, 1, Some(9), Outcome::Ok),
            r(0, 7, 11, 12),
            r(3, 7, 13, 14),
        ];
        let (lin, rep) = verdict(&ops);
        assert!(lin.is_ok(), "{lin:?}");
        assert_eq!(rep.stale_reads, 0);
    }

    #[test]
    fn indeterminate_write_may_land_late_or_never() {
        let late = [
            w(1, 7, 0, None, Outcome::Info),
            r(0, 0, 5, 6),
            r(0, 7, 100, 101),
            r(0, 7, 102, 103),
        ];
        assert!(verdict(&late).0.is_ok());
        let never = [w(1, 7, 0, None, Outcome::Info), r(0, 0, 100, 101)];
        assert!(verdict(&never).0.is_ok());
        // But once seen it cannot vanish.
        let vanished = [w(1, 7, 0, None, Outcome::Info), r(0, 7, 5, 6), r(0, 0, 100, 101)];
        assert!(verdict(&vanished).0.is_err());
    }

    #[test]
    fn fenced_write_must_never_be_seen() {
        let ops = [w(1, 7, 0, Some(1), Outcome::Fail), r(0, 7, 2, 3)];
        let (lin, rep) = verdict(&ops);
        assert!(lin.is_err());
        assert_eq!(rep.impossible_reads, 1);
    }

    #[test]
    fn blocks_decode_and_corruption_is_named() {
        let d = block_data(42, 3);
        assert_eq!(decode_block(3, &d), Ok(42));
        assert_eq!(decode_block(3, &[0u8; BLOCK_BYTES]), Ok(0));
        assert!(decode_block(4, &d).is_err());
        let mut torn = d.clone();
        torn[2048] ^= 1;
        assert!(decode_block(3, &torn).unwrap_err().contains("byte 2048"));
    }

    #[test]
    fn long_history_with_many_indeterminate_writes_is_decided_quickly() {
        let mut ops = Vec::new();
        let mut t = 0;
        for token in 1..3000u64 {
            ops.push(w(1, token, t, Some(t + 5), Outcome::Ok));
            ops.push(w(2, 100_000 + token, t + 1, None, Outcome::Info));
            ops.push(r(3, token, t + 6, t + 7));
            t += 10;
        }
        let started = Instant::now();
        let (lin, _) = verdict(&ops);
        assert!(lin.is_ok(), "{lin:?}");
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}
