//! The history of client operations and the C2 checker: every block must
//! behave as a linearizable register over the whole run.
//!
//! Every event (an invocation or a completion) takes the next number of one
//! global sequence, so "A completed before B was invoked" is exact, not
//! rounded to a round. A write is invoked when the client proposes it and
//! completes when the client gets its reply; its outcome is:
//! - acknowledged: it took effect at its linearization point in
//!   [invoke, complete];
//! - failed (fenced, superseded, refused): it never takes effect;
//! - indeterminate (the reply says its outcome is unknown: a snapshot
//!   replaced its proposer's log past it): it took effect at a point in
//!   [invoke, complete], or never;
//! - unknown (the reply never came: the node crashed, or the run ended):
//!   it may take effect at any point after its invocation, or never.
//!
//! A read is invoked when the client asks a replica (ReadIndex) and
//! completes when the replica serves it; reads that were never served
//! constrain nothing. Every write's data is its token, so a read names the
//! write it returned (0 stands for zeroes, the initial value).
//!
//! The check, per block (registers compose: P-compositionality), is Wing &
//! Gong's search as refined by Lowe: repeatedly linearize one of the
//! minimal pending operations (those invoked before every other pending
//! one completed), depth first, memoizing (set of linearized operations,
//! register value) so no configuration is explored twice. Two reductions
//! keep it small without changing the answer:
//! - a write of unknown or indeterminate outcome that no read returned is
//!   dropped (it may be taken never to happen: no read can tell);
//! - a minimal read that returns the current value is linearized at once
//!   without branching (values are unique, so no valid order needs a write
//!   before it).
//!
//! Fast pre-checks name the obvious faults first: a read returning a value
//! no client wrote to the block, a failed write, or a write invoked after
//! the read completed.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;

/// Past this many configurations a block's search gives up (and fails: an
/// unchecked history is not a passed one).
const MAX_STATES: usize = 400_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    Unknown,
    Acked(u64),
    Failed(&'static str),
    /// The client got a reply saying the outcome is unknown.
    Indeterminate,
}

#[derive(Debug, Clone)]
pub struct WriteRec {
    pub block: u64,
    pub node: u64,
    pub invoke: u64,
    pub invoke_round: u64,
    pub complete: Option<(u64, u64)>,
    pub outcome: WriteOutcome,
}

#[derive(Debug, Clone)]
pub struct ReadRec {
    pub block: u64,
    pub node: u64,
    pub invoke: u64,
    pub invoke_round: u64,
    pub complete: u64,
    pub complete_round: u64,
    /// Token of the write returned; 0: zeroes.
    pub value: u64,
    /// The confirmed read index.
    pub index: Option<u64>,
    /// A read of each replica's state once the group settled.
    pub final_read: bool,
}

#[derive(Default)]
pub struct History {
    seq: u64,
    pub writes: BTreeMap<u64, WriteRec>,
    pub reads: Vec<ReadRec>,
}

#[derive(Default, Debug, Clone, Copy)]
pub struct CheckStats {
    pub ops: usize,
    pub states: usize,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Write(u64),
    Read(u64),
}

#[derive(Clone, Copy, Debug)]
struct LinOp {
    invoke: u64,
    /// u64::MAX: never completed.
    complete: u64,
    /// A write that may never have taken effect (unknown or indeterminate
    /// outcome).
    optional: bool,
    kind: Kind,
    /// Index into the block's described operations.
    src: usize,
}

enum SearchError {
    /// No order exists; `blocking` is a pending operation at the deepest
    /// configuration reached.
    Stuck {
        blocking: usize,
    },
    TooLarge,
}

impl History {
    /// The next event number.
    pub fn now(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    pub fn invoke_write(&mut self, token: u64, block: u64, node: u64, round: u64) {
        let invoke = self.now();
        self.writes.insert(
            token,
            WriteRec {
                block,
                node,
                invoke,
                invoke_round: round,
                complete: None,
                outcome: WriteOutcome::Unknown,
            },
        );
    }

    /// The client got the write's reply.
    pub fn complete_write(&mut self, token: u64, outcome: WriteOutcome, round: u64) {
        let at = self.now();
        if let Some(w) = self.writes.get_mut(&token) {
            w.complete = Some((at, round));
            w.outcome = outcome;
        }
    }

    pub fn acked(&self) -> usize {
        self.writes
            .values()
            .filter(|w| matches!(w.outcome, WriteOutcome::Acked(_)))
            .count()
    }

    pub fn unknown(&self) -> usize {
        self.writes
            .values()
            .filter(|w| w.outcome == WriteOutcome::Unknown)
            .count()
    }

    fn describe_write(&self, token: u64) -> String {
        let Some(w) = self.writes.get(&token) else {
            return format!("write {token} (never proposed)");
        };
        match (w.outcome, w.complete) {
            (WriteOutcome::Acked(index), Some((_, r))) => format!(
                "write {token} via node {}: invoked round {}, acked round {r} at index {index}",
                w.node, w.invoke_round
            ),
            (WriteOutcome::Failed(why), Some((_, r))) => format!(
                "write {token} via node {}: invoked round {}, failed ({why}) round {r}",
                w.node, w.invoke_round
            ),
            (WriteOutcome::Indeterminate, Some((_, r))) => format!(
                "write {token} via node {}: invoked round {}, outcome unknown (I/O error) round {r}",
                w.node, w.invoke_round
            ),
            _ => format!(
                "write {token} via node {}: invoked round {}, outcome unknown",
                w.node, w.invoke_round
            ),
        }
    }

    fn describe_read(r: &ReadRec) -> String {
        let value = if r.value == 0 {
            "zeroes".to_string()
        } else {
            format!("write {}", r.value)
        };
        if r.final_read {
            return format!("final read on node {} of the settled group: {value}", r.node);
        }
        format!(
            "read via node {}: invoked round {}, served round {} at read index {:?}, returned {value}",
            r.node, r.invoke_round, r.complete_round, r.index
        )
    }

    /// Checks every block; returns the sizes checked, or one message per
    /// block that is not linearizable.
    pub fn check(&self, blocks: u64, verbose: bool) -> Result<CheckStats, Vec<String>> {
        let mut stats = CheckStats::default();
        let mut violations = Vec::new();
        for block in 0..blocks {
            match self.check_block(block, verbose) {
                Ok(s) => {
                    stats.ops += s.ops;
                    stats.states += s.states;
                }
                Err(e) => violations.push(e),
            }
        }
        if violations.is_empty() {
            Ok(stats)
        } else {
            Err(violations)
        }
    }

    fn check_block(&self, block: u64, verbose: bool) -> Result<CheckStats, String> {
        let reads: Vec<&ReadRec> = self.reads.iter().filter(|r| r.block == block).collect();
        // Pre-checks, with plain messages.
        for r in &reads {
            if r.value == 0 {
                continue;
            }
            let what = Self::describe_read(r);
            let Some(w) = self.writes.get(&r.value) else {
                return Err(format!("block {block}: {what}: no client ever wrote that"));
            };
            if w.block != block {
                return Err(format!("block {block}: {what}: that write was to block {}", w.block));
            }
            if let WriteOutcome::Failed(_) = w.outcome {
                return Err(format!(
                    "block {block}: {what}: {}, so it must never take effect",
                    self.describe_write(r.value)
                ));
            }
            if w.invoke > r.complete {
                return Err(format!(
                    "block {block}: {what}: {} was invoked after the read completed",
                    self.describe_write(r.value)
                ));
            }
        }
        // Every operation that may constrain the block, as (operation as if
        // the history ended at its end, description, invocation round).
        let mut all: Vec<(LinOp, String, u64)> = Vec::new();
        for (&token, w) in self.writes.iter().filter(|(_, w)| w.block == block) {
            let (complete, optional) = match (w.outcome, w.complete) {
                (WriteOutcome::Acked(_), Some((at, _))) => (at, false),
                (WriteOutcome::Indeterminate, Some((at, _))) => (at, true),
                (WriteOutcome::Unknown, _) => (u64::MAX, true),
                _ => continue,
            };
            let op = LinOp {
                invoke: w.invoke,
                complete,
                optional,
                kind: Kind::Write(token),
                src: all.len(),
            };
            all.push((op, self.describe_write(token), w.invoke_round));
        }
        for r in &reads {
            let op = LinOp {
                invoke: r.invoke,
                complete: r.complete,
                optional: false,
                kind: Kind::Read(r.value),
                src: all.len(),
            };
            all.push((op, Self::describe_read(r), r.invoke_round));
        }
        let ops = prefix(&all, u64::MAX);
        let n = ops.len();
        let failure = match search(&ops) {
            Ok(states) => return Ok(CheckStats { ops: n, states }),
            Err(SearchError::TooLarge) => {
                return Err(format!(
                    "block {block}: the linearizability search of {n} operations passed {MAX_STATES} \
                     configurations; the history is left unchecked"
                ));
            }
            Err(SearchError::Stuck { blocking, .. }) => ops[blocking].src,
        };
        // Find the shortest prefix of the history (ending at a completion)
        // that is already not linearizable: its last operation is the first
        // that no order allows. Prefixes only add constraints, so bisect.
        let mut ends: Vec<u64> = all
            .iter()
            .map(|(o, _, _)| o.complete)
            .filter(|c| *c != u64::MAX)
            .collect();
        ends.sort_unstable();
        let (mut lo, mut hi) = (0, ends.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if search(&prefix(&all, ends[mid])).is_ok() {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let culprit = ends
            .get(lo)
            .and_then(|end| all.iter().position(|(o, _, _)| o.complete == *end))
            .unwrap_or(failure);
        let (cop, cwhat, cround) = &all[culprit];
        let mut msg = format!(
            "block {block} is not linearizable: the first operation no order of what came before allows is\n    \
             {cwhat}"
        );
        let _ = write!(msg, "\n  the operations concurrent with it:");
        for (o, what, _) in &all {
            if o.src != culprit && o.invoke < cop.complete && o.complete > cop.invoke {
                let _ = write!(msg, "\n    {what}");
            }
        }
        let last_acked = all
            .iter()
            .filter(|(o, _, _)| matches!(o.kind, Kind::Write(_)) && o.complete < cop.invoke)
            .max_by_key(|(o, _, _)| o.complete);
        if let Some((_, what, _)) = last_acked {
            let _ = write!(msg, "\n  the last write acknowledged before it was invoked: {what}");
        }
        if verbose {
            let from = cround.saturating_sub(200);
            let _ = write!(
                msg,
                "\n  history of block {block} from round {from} to the failure, by invocation:"
            );
            let mut window: Vec<&(LinOp, String, u64)> = all
                .iter()
                .filter(|(o, _, r)| *r >= from && o.invoke <= cop.complete)
                .collect();
            window.sort_by_key(|(o, _, _)| o.invoke);
            for (_, what, _) in window {
                let _ = write!(msg, "\n    {what}");
            }
        }
        Err(msg)
    }
}

/// The operations of a history cut at event `end`, by invocation: reads
/// that completed by then; writes invoked before it, pending if they had
/// not completed; writes that may never have taken effect (of unknown or
/// indeterminate outcome, or pending at the cut) only if an included read
/// returned them (else they may be taken never to happen).
fn prefix(all: &[(LinOp, String, u64)], end: u64) -> Vec<LinOp> {
    let read: BTreeSet<u64> = all
        .iter()
        .filter_map(|(o, _, _)| match o.kind {
            Kind::Read(v) if o.complete <= end && v != 0 => Some(v),
            _ => None,
        })
        .collect();
    let mut ops: Vec<LinOp> = all
        .iter()
        .filter_map(|(o, _, _)| {
            let mut o = *o;
            match o.kind {
                Kind::Read(_) if o.complete <= end => Some(o),
                Kind::Read(_) => None,
                Kind::Write(t) if o.invoke < end => {
                    if o.complete > end {
                        o.complete = u64::MAX;
                        o.optional = true;
                    }
                    (!o.optional || read.contains(&t)).then_some(o)
                }
                Kind::Write(_) => None,
            }
        })
        .collect();
    ops.sort_by_key(|o| o.invoke);
    ops
}

fn is_set(bits: &[u64], i: usize) -> bool {
    bits[i / 64] & (1 << (i % 64)) != 0
}

fn set(bits: &mut [u64], i: usize) {
    bits[i / 64] |= 1 << (i % 64);
}

/// The pending operations that may be linearized next: those invoked before
/// the earliest completion among pending ones.
fn frontier(ops: &[LinOp], bits: &[u64]) -> Vec<usize> {
    let Some(first) = (0..ops.len()).find(|&i| !is_set(bits, i)) else {
        return Vec::new();
    };
    let mut min_complete = u64::MAX;
    for (i, o) in ops.iter().enumerate().skip(first) {
        if o.invoke >= min_complete {
            break;
        }
        if !is_set(bits, i) {
            min_complete = min_complete.min(o.complete);
        }
    }
    (first..ops.len())
        .take_while(|&i| ops[i].invoke < min_complete)
        .filter(|&i| !is_set(bits, i))
        .collect()
}

/// Linearizes every minimal read of the current value, until none is left.
fn take_reads(ops: &[LinOp], bits: &mut [u64], value: u64) {
    loop {
        let mut progressed = false;
        for i in frontier(ops, bits) {
            if let Kind::Read(v) = ops[i].kind
                && v == value
            {
                set(bits, i);
                progressed = true;
            }
        }
        if !progressed {
            return;
        }
    }
}

/// The minimal writes, the one completing first last (it is tried first).
fn write_candidates(ops: &[LinOp], bits: &[u64]) -> Vec<usize> {
    let mut c: Vec<usize> = frontier(ops, bits)
        .into_iter()
        .filter(|&i| matches!(ops[i].kind, Kind::Write(_)))
        .collect();
    c.sort_by_key(|&i| std::cmp::Reverse(ops[i].complete));
    c
}

fn search(ops: &[LinOp]) -> Result<usize, SearchError> {
    let n = ops.len();
    let words = n.div_ceil(64).max(1);
    let count = |bits: &[u64]| bits.iter().map(|w| w.count_ones() as usize).sum::<usize>();
    let mut bits = vec![0u64; words];
    take_reads(ops, &mut bits, 0);
    if count(&bits) == n {
        return Ok(1);
    }
    let mut memo: HashSet<(Vec<u64>, u64)> = HashSet::new();
    memo.insert((bits.clone(), 0));
    let mut best = (count(&bits), bits.clone());
    let cands = write_candidates(ops, &bits);
    let mut stack: Vec<(Vec<u64>, Vec<usize>)> = vec![(bits, cands)];
    while let Some((bits, cands)) = stack.last_mut() {
        let Some(c) = cands.pop() else {
            stack.pop();
            continue;
        };
        let Kind::Write(token) = ops[c].kind else {
            unreachable!("only writes are branched on")
        };
        let mut next = bits.clone();
        set(&mut next, c);
        take_reads(ops, &mut next, token);
        let done = count(&next);
        if done == n {
            return Ok(memo.len() + 1);
        }
        if !memo.insert((next.clone(), token)) {
            continue;
        }
        if memo.len() > MAX_STATES {
            return Err(SearchError::TooLarge);
        }
        if done > best.0 {
            best = (done, next.clone());
        }
        let cands = write_candidates(ops, &next);
        stack.push((next, cands));
    }
    let candidates = frontier(ops, &best.1);
    let blocking = candidates
        .iter()
        .copied()
        .min_by_key(|&i| ops[i].complete)
        .expect("a pending operation");
    Err(SearchError::Stuck { blocking })
}
