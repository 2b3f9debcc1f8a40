//! The node-wide log writer: drains the log writes of every group that are
//! ready at once into one batch, makes it durable with one write and one
//! fdatasync (group commit across volumes, as TiKV's async-io writer does),
//! and only then tells each group its Ready is persisted and sends the
//! messages that had to wait for it.
//!
//! Two threads share the work as a two-stage pipeline. A round is written
//! (unsynced) under the receive lock, so rounds reach the log in the order
//! their jobs arrived; it is then synced and reported in that same order
//! (by ticket). So while one thread waits for round N's fdatasync, the
//! other writes round N+1, instead of N+1's jobs waiting for a whole write
//! and sync first (the round's fdatasync then covers both). At queue depth
//! 1 one thread does it all, with no hand-off on the way.
//!
//! Why reports stay in order even though a later sync covers earlier rounds:
//! after a failed fdatasync, Linux reports the error to one caller and may
//! mark the lost pages clean, so a second sync can succeed over data that
//! is gone. A round is reported only after every earlier one was, and a
//! failed sync stops the node before it reports anything.

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::mpsc;
use trireme_raftlog::{GroupWrite, RaftLogStore};
use trireme_replica::raft::eraftpb::Message;
use trireme_transport::Transport;

use crate::group::GroupEvent;

/// Jobs queued to the writer before submitters block.
const QUEUE: usize = 8192;
/// How often the purge thread looks at the log. Below its threshold a purge
/// returns at once; past it, a prompt purge hands files back to the recycle
/// pool before the writer needs a new one (a new file is zero-filled first:
/// a whole file of extra disk writes, and a stall of the writer). At
/// 300 MiB/s of appends 100 ms is 30 MiB, well inside the pool's headroom
/// (node.rs); every 2 s was too slow for 1M sequential writes.
const PURGE_POLL: std::time::Duration = std::time::Duration::from_millis(100);
/// A batch stops growing at this many bytes of entries.
const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;
/// Threads of the pipeline: one writing while the other syncs.
const WRITERS: usize = 2;

struct Intake {
    rx: std_mpsc::Receiver<LogJob>,
    /// The ticket of the next round written: the order it is reported in.
    next_ticket: u64,
}

struct Shared {
    store: Arc<dyn RaftLogStore>,
    transport: Transport,
    /// Held while taking a round's jobs and writing them.
    rx: Mutex<Intake>,
    /// The ticket of the round whose turn it is to sync and report.
    reporting: Mutex<u64>,
    turn: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks (a disk error exits the
    // process instead); the data under them is a counter and a receiver.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct LogJob {
    pub write: GroupWrite,
    /// The Ready number to acknowledge once durable.
    pub number: Option<u64>,
    /// Messages that may only leave once this write is durable.
    pub messages_after: Vec<Message>,
    /// False when a crash may lose this write (see
    /// `RaftLogStore::write_batch_unsynced`): a batch of only such jobs
    /// skips the fdatasync, and one with nothing to write skips the write.
    pub must_sync: bool,
    pub notify: mpsc::Sender<GroupEvent>,
}

#[derive(Clone)]
pub struct LogWriter {
    tx: std_mpsc::SyncSender<LogJob>,
}

impl LogWriter {
    pub fn start(store: Arc<dyn RaftLogStore>, transport: Transport) -> std::io::Result<LogWriter> {
        let (tx, rx) = std_mpsc::sync_channel::<LogJob>(QUEUE);
        let shared = Arc::new(Shared {
            store,
            transport,
            rx: Mutex::new(Intake { rx, next_ticket: 0 }),
            reporting: Mutex::new(0),
            turn: Condvar::new(),
        });
        for i in 0..WRITERS {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("trireme-log-{i}"))
                .spawn(move || run(&shared))?;
        }
        Ok(LogWriter { tx })
    }

    /// Starts the thread that reclaims compacted log files: slow file work,
    /// kept off the writer's path (raft-engine never purges unless asked).
    /// Past its threshold a purge names the groups whose entries hold the
    /// oldest files; `checkpoint` asks each to checkpoint, which compacts
    /// them. Unanswered, raft-engine would copy those entries forward into
    /// new files itself after a few rounds: a rewrite of live log data.
    pub fn start_purge(store: Arc<dyn RaftLogStore>, checkpoint: impl Fn(u64) + Send + 'static) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("trireme-log-purge".into())
            .spawn(move || {
                let new_files = metrics::counter!("trireme_log_new_files_total");
                loop {
                    std::thread::sleep(PURGE_POLL);
                    match store.purge() {
                        Ok(groups) => groups.into_iter().for_each(&checkpoint),
                        Err(e) => tracing::warn!("raft log purge failed: {e}"),
                    }
                    new_files.absolute(store.new_files());
                }
            })?;
        Ok(())
    }

    /// Queues a job. Called from group tasks; the queue is deep, and when it
    /// is full the group waits (backpressure from a slow disk).
    pub fn submit(&self, job: LogJob) {
        if let Err(std_mpsc::TrySendError::Full(job)) = self.tx.try_send(job) {
            // Rare: block this group's task briefly rather than drop a write.
            let tx = self.tx.clone();
            tokio::task::block_in_place(move || {
                let _ = tx.send(job);
            });
        }
    }
}

fn run(shared: &Shared) {
    let write_duration = metrics::histogram!("trireme_log_write_duration_seconds");
    let sync_duration = metrics::histogram!("trireme_log_sync_duration_seconds");
    let batch_entries = metrics::histogram!("trireme_log_batch_entries");
    let batch_groups = metrics::histogram!("trireme_log_batch_groups");
    let batch_bytes = metrics::histogram!("trireme_log_batch_bytes");
    let appended_entries = metrics::counter!("trireme_log_appended_entries_total");
    let appended_bytes = metrics::counter!("trireme_log_appended_bytes_total");
    let batches = metrics::counter!("trireme_log_batches_total");
    let store = &*shared.store;
    loop {
        // Stage 1, one thread at a time: take every job waiting and write
        // them, unsynced.
        let (ticket, jobs, groups, must_sync) = {
            let mut intake = lock(&shared.rx);
            let Ok(first) = intake.rx.recv() else { return };
            let mut jobs = vec![first];
            let mut bytes: usize = jobs[0].write.entries.iter().map(|e| e.data.len()).sum();
            while bytes < MAX_BATCH_BYTES {
                match intake.rx.try_recv() {
                    Ok(j) => {
                        bytes += j.write.entries.iter().map(|e| e.data.len()).sum::<usize>();
                        jobs.push(j);
                    }
                    Err(_) => break,
                }
            }
            let groups: Vec<u64> = jobs.iter().map(|j| j.write.group).collect();
            let entries: usize = jobs.iter().map(|j| j.write.entries.len()).sum();
            // Followers answer every heartbeat and append through here (their
            // replies may only leave after what came before is durable); most
            // such rounds carry nothing, or only a new commit index, and need
            // no fdatasync.
            let must_sync = jobs.iter().any(|j| j.must_sync);
            let batch: Vec<GroupWrite> = jobs
                .iter_mut()
                .map(|j| std::mem::take(&mut j.write))
                .filter(|w| !w.is_empty())
                .collect();
            if !batch.is_empty() {
                let started = std::time::Instant::now();
                if let Err(e) = store.write_batch_unsynced(batch) {
                    // DESIGN.md: an I/O error on the log is fatal for the
                    // replica; the log is node-wide, so the node stops and its
                    // replicas are rebuilt elsewhere. Limping on could
                    // acknowledge what is not durable.
                    crate::error::exit_on_disk_error(
                        "log_write",
                        &format!("raft log write failed, stopping the node: {e}"),
                    );
                }
                write_duration.record(started.elapsed().as_secs_f64());
            }
            batches.increment(1);
            batch_entries.record(entries as f64);
            batch_groups.record(groups.len() as f64);
            batch_bytes.record(bytes as f64);
            appended_entries.increment(entries as u64);
            appended_bytes.increment(bytes as u64);
            let ticket = intake.next_ticket;
            intake.next_ticket += 1;
            (ticket, jobs, groups, must_sync)
        };
        // Stage 2, in ticket order: make the round durable (the other thread
        // may be writing the next one meanwhile), then report it.
        let mut reporting = lock(&shared.reporting);
        while *reporting != ticket {
            reporting = shared.turn.wait(reporting).unwrap_or_else(|p| p.into_inner());
        }
        if must_sync {
            let started = std::time::Instant::now();
            if let Err(e) = store.sync() {
                crate::error::exit_on_disk_error(
                    "log_write",
                    &format!("raft log write failed, stopping the node: {e}"),
                );
            }
            sync_duration.record(started.elapsed().as_secs_f64());
            #[cfg(feature = "failpoints")]
            crate::failpoints::crash_point(crate::failpoints::CRASH_LOG_AFTER_SYNC);
        }
        for (j, group) in jobs.into_iter().zip(groups) {
            for m in j.messages_after {
                shared.transport.send(m.to, group, m);
            }
            if let Some(n) = j.number {
                let _ = j.notify.blocking_send(GroupEvent::Persisted(n));
            }
        }
        *reporting += 1;
        drop(reporting);
        shared.turn.notify_all();
    }
}
