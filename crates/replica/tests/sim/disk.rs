//! A node's disks: the raft log (as raft-engine holds it, fed by the
//! daemon's log writer) and volume.state. The image is a plain byte vector
//! in the node (see world.rs).
//!
//! The log writer (crates/daemon/src/logwriter.rs, over
//! crates/raftlog/src/engine.rs) is modelled batch by batch:
//! - when idle, it takes every job queued at that moment into one batch
//!   (one raft-engine `LogBatch`: one record, checksummed as a whole);
//! - a batch holding any job that must be synced is written and
//!   fdatasync'ed; it takes a seeded while, and only then are its jobs
//!   acknowledged (`on_persisted`, messages that waited for it sent);
//! - a batch of only jobs raft allows to lose (`must_sync` false: a new
//!   commit index, nothing else) is written without fdatasync and
//!   acknowledged at once; it becomes durable with the next synced batch
//!   (fdatasync flushes the whole file).
//!
//! A crash keeps every synced batch. Of what was written since (unsynced
//! batches, then the batch being written), a seeded prefix of whole batches
//! survives: the verifier (crates/raftlog/src/verify.rs) drops a torn tail
//! batch whole, and the file is written in order, so no batch survives
//! without those before it. A batch is never partly durable: entries and
//! hard state of every job in it stand or fall together. Jobs still queued
//! to the writer are lost.
//!
//! A failed fdatasync stops the node (README: "A log write failure stops the
//! node"); the failed batch may or may not be on disk (a seeded coin), and
//! the unsynced batches before it are decided as in a crash.

use std::collections::VecDeque;

use trireme_replica::PersistTask;
use trireme_replica::raft::eraftpb::{Entry, HardState, Message};

use crate::rng::Rng;

/// What the raft log holds durably.
#[derive(Default, Clone)]
pub struct DurableLog {
    pub hard_state: HardState,
    pub entries: Vec<Entry>,
}

impl DurableLog {
    pub fn append(&mut self, entries: &[Entry]) {
        if let Some(first) = entries.first() {
            // Raft may overwrite a suffix that a new leader replaced.
            self.entries.retain(|e| e.index < first.index);
            self.entries.extend_from_slice(entries);
        }
    }

    /// Drops the entries below `index`.
    pub fn compact(&mut self, index: u64) {
        self.entries.retain(|e| e.index >= index);
    }
}

/// volume.state: the state machine as of the destaged index.
#[derive(Default, Clone, Copy, Debug)]
pub struct AppliedState {
    pub destaged_index: u64,
    pub epoch: u64,
    pub attached_node: u64,
}

/// One log write submitted to the writer.
pub enum Job {
    Ready(PersistTask),
    /// The held Ready of a snapshot install, written after the copy (the
    /// driver's `on_installed`): the log restarts at the snapshot point.
    Install {
        index: u64,
        term: u64,
        task: PersistTask,
        fix_applied: AppliedState,
    },
    /// Drop durable entries below this index (after a destage).
    Compact(u64),
}

impl Job {
    fn must_sync(&self) -> bool {
        match self {
            Job::Ready(task) => task.must_sync,
            Job::Install { .. } | Job::Compact(_) => true,
        }
    }

    pub fn install_index(&self) -> Option<u64> {
        match self {
            Job::Install { index, .. } => Some(*index),
            _ => None,
        }
    }

    /// Makes the job's effect durable.
    fn apply(self, log: &mut DurableLog, applied: &mut AppliedState) {
        match self {
            Job::Ready(task) => {
                log.append(&task.entries);
                if let Some(hs) = task.hard_state {
                    log.hard_state = hs;
                }
            }
            Job::Install {
                index,
                term,
                task,
                fix_applied,
            } => {
                *applied = fix_applied;
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
                log.append(&entries);
                log.compact(index);
                if let Some(hs) = task.hard_state {
                    log.hard_state = hs;
                }
            }
            Job::Compact(index) => log.compact(index),
        }
    }
}

/// What acknowledging a job does: `on_persisted(number)`, then the
/// messages that waited for it.
pub struct Ack {
    pub number: Option<u64>,
    pub messages_after: Vec<Message>,
}

/// One raft-engine `LogBatch`.
pub struct Batch {
    jobs: Vec<Job>,
    acks: Vec<Ack>,
}

impl Batch {
    fn new(mut jobs: Vec<Job>) -> Batch {
        let acks = jobs
            .iter_mut()
            .map(|j| match j {
                Job::Ready(task) | Job::Install { task, .. } => Ack {
                    number: Some(task.number),
                    messages_after: std::mem::take(&mut task.messages_after),
                },
                Job::Compact(_) => Ack {
                    number: None,
                    messages_after: Vec::new(),
                },
            })
            .collect();
        Batch { jobs, acks }
    }

    fn apply(self, log: &mut DurableLog, applied: &mut AppliedState) {
        for j in self.jobs {
            j.apply(log, applied);
        }
    }
}

pub enum WriterStep {
    /// Nothing queued.
    Idle,
    /// A synced batch is still being written.
    Busy,
    /// These jobs are acknowledged, in order.
    Wrote(Vec<Ack>),
    /// The fdatasync of the batch being written failed: the node stops.
    FsyncFailed,
}

/// What a crash left of the log writer's work.
#[derive(Default, Debug, Clone, Copy)]
pub struct CrashLoss {
    /// A batch was being written and did not survive: a torn tail.
    pub torn_tail: bool,
    /// The batch being written survived although it was never acknowledged.
    pub tail_kept: bool,
    /// Unsynced batches lost.
    pub unsynced_lost: usize,
    /// Jobs queued to the writer, never written.
    pub queued_lost: usize,
}

#[derive(Default)]
pub struct LogWriter {
    pub queue: VecDeque<Job>,
    /// The synced batch being written.
    writing: Option<Batch>,
    /// Batches written without fdatasync since the last synced one.
    unsynced: Vec<Batch>,
    /// The next fdatasync fails.
    pub fail_next_sync: bool,
    /// Batches written, those holding more than one job, those not synced.
    pub batches: u64,
    pub multi_job_batches: u64,
    pub unsynced_batches: u64,
}

impl LogWriter {
    pub fn submit(&mut self, job: Job) {
        self.queue.push_back(job);
    }

    /// Nothing queued or being written (unsynced batches may remain).
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.writing.is_none()
    }

    /// The index of a snapshot install whose log write is not yet durable.
    pub fn install_pending(&self) -> Option<u64> {
        self.queue
            .iter()
            .chain(self.writing.iter().flat_map(|b| b.jobs.iter()))
            .find_map(Job::install_index)
    }

    /// One opportunity for the writer to make progress; `sync_percent` is
    /// the chance that a synced batch in flight completes now.
    pub fn step(
        &mut self,
        rng: &mut Rng,
        sync_percent: u64,
        log: &mut DurableLog,
        applied: &mut AppliedState,
    ) -> WriterStep {
        if self.writing.is_none() {
            if self.queue.is_empty() {
                return WriterStep::Idle;
            }
            let jobs: Vec<Job> = self.queue.drain(..).collect();
            let synced = jobs.iter().any(Job::must_sync);
            self.batches += 1;
            self.multi_job_batches += u64::from(jobs.len() > 1);
            let mut batch = Batch::new(jobs);
            if !synced {
                self.unsynced_batches += 1;
                let acks = std::mem::take(&mut batch.acks);
                self.unsynced.push(batch);
                return WriterStep::Wrote(acks);
            }
            self.writing = Some(batch);
        }
        if !rng.chance(sync_percent) {
            return WriterStep::Busy;
        }
        if self.fail_next_sync {
            self.fail_next_sync = false;
            return WriterStep::FsyncFailed;
        }
        let mut batch = self.writing.take().expect("a batch in flight");
        for u in self.unsynced.drain(..) {
            u.apply(log, applied);
        }
        let acks = std::mem::take(&mut batch.acks);
        batch.apply(log, applied);
        WriterStep::Wrote(acks)
    }

    /// The node died: a seeded prefix of what was written but not synced
    /// survives, in whole batches. `failed_sync_kept`: the node died of a
    /// failed fdatasync of the batch being written, which is on disk or not.
    pub fn crash(
        &mut self,
        rng: &mut Rng,
        failed_sync_kept: Option<bool>,
        log: &mut DurableLog,
        applied: &mut AppliedState,
    ) -> CrashLoss {
        let mut loss = CrashLoss {
            queued_lost: self.queue.len(),
            ..CrashLoss::default()
        };
        self.queue.clear();
        self.fail_next_sync = false;
        let unsynced: Vec<Batch> = self.unsynced.drain(..).collect();
        let tail = self.writing.take();
        let n = unsynced.len();
        let (keep_unsynced, keep_tail) = match failed_sync_kept {
            Some(true) => (n, true),
            Some(false) => (rng.range(0, n as u64) as usize, false),
            None => {
                let written = n + usize::from(tail.is_some());
                let k = rng.range(0, written as u64) as usize;
                (k.min(n), k > n)
            }
        };
        loss.unsynced_lost = n - keep_unsynced;
        for b in unsynced.into_iter().take(keep_unsynced) {
            b.apply(log, applied);
        }
        if let Some(b) = tail {
            if keep_tail {
                loss.tail_kept = true;
                b.apply(log, applied);
            } else {
                loss.torn_tail = true;
            }
        }
        loss
    }
}
