//! The node-wide log writer: drains the log writes of every group that are
//! ready at once into one round, makes it durable with one fdatasync
//! (group commit across volumes, as TiKV's async-io writer does), and only
//! then tells each group its Ready is persisted and sends the messages that
//! had to wait for it.
//!
//! Two threads share the work. One of them, the writer, holds the intake:
//! it takes the jobs as they come and writes them (unsynced) into the open
//! round, for as long as the other thread's fdatasync runs. When that sync
//! is done, the writer closes the round, becomes the syncer (fdatasync,
//! then report), and the other thread becomes the writer of the next round.
//! So each fdatasync covers everything that arrived until the moment it
//! started, and the writes of the next round overlap it. (A pipeline that
//! cut a round as soon as the previous one was written made every other
//! round a small one: two fdatasyncs where one would do, on a disk whose
//! flushes are what W2 waits on.) At queue depth 1 one thread does it all,
//! with no hand-off on the way.
//!
//! Why rounds are synced and reported strictly in order, one at a time:
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
/// A round stops taking jobs at this many bytes of entries (it then waits
/// for its turn to sync).
const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;
/// Threads: one writing while the other syncs.
const WRITERS: usize = 2;

/// What the writer thread receives.
// Nearly every message is a job; boxing it would add an allocation to each.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Job(LogJob),
    /// A sync finished: a writer waiting for its turn takes it.
    SyncDone,
}

struct Shared {
    store: Arc<dyn RaftLogStore>,
    transport: Transport,
    /// Held by the writer of the open round.
    rx: Mutex<std_mpsc::Receiver<Msg>>,
    /// For the syncer's wake-up of a writer blocked on an empty queue;
    /// taken away when the last [`LogWriter`] goes, so the threads end.
    tx: Mutex<Option<std_mpsc::SyncSender<Msg>>>,
    turn: Mutex<Turn>,
    sync_done: Condvar,
}

#[derive(Default)]
struct Turn {
    /// A round is being synced and reported.
    syncing: bool,
    /// The writer holds jobs and waits on the queue for its turn: the
    /// syncer wakes it with [`Msg::SyncDone`].
    writer_waiting: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks (a disk error exits the
    // process instead); the data under them is a flag and a receiver.
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
    handle: Arc<Handle>,
}

struct Handle {
    tx: std_mpsc::SyncSender<Msg>,
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        lock(&self.shared.tx).take();
    }
}

impl LogWriter {
    pub fn start(store: Arc<dyn RaftLogStore>, transport: Transport) -> std::io::Result<LogWriter> {
        let (tx, rx) = std_mpsc::sync_channel::<Msg>(QUEUE);
        let shared = Arc::new(Shared {
            store,
            transport,
            rx: Mutex::new(rx),
            tx: Mutex::new(Some(tx.clone())),
            turn: Mutex::new(Turn::default()),
            sync_done: Condvar::new(),
        });
        for i in 0..WRITERS {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("trireme-log-{i}"))
                .spawn(move || run(&shared))?;
        }
        Ok(LogWriter {
            handle: Arc::new(Handle { tx, shared }),
        })
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
        if let Err(std_mpsc::TrySendError::Full(msg)) = self.handle.tx.try_send(Msg::Job(job)) {
            // Rare: block this group's task briefly rather than drop a write.
            let tx = self.handle.tx.clone();
            tokio::task::block_in_place(move || {
                let _ = tx.send(msg);
            });
        }
    }
}

/// Jobs written and not yet synced.
#[derive(Default)]
struct Round {
    /// Each job's `write` is taken once written; its group stays.
    jobs: Vec<LogJob>,
    entries: usize,
    bytes: usize,
    must_sync: bool,
}

struct Metrics {
    write_duration: metrics::Histogram,
    sync_duration: metrics::Histogram,
    batch_entries: metrics::Histogram,
    batch_groups: metrics::Histogram,
    batch_bytes: metrics::Histogram,
    appended_entries: metrics::Counter,
    appended_bytes: metrics::Counter,
    batches: metrics::Counter,
}

impl Round {
    fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Writes `jobs` (unsynced), which hold `bytes` of entries, and adds
    /// them to the round.
    fn write(&mut self, store: &dyn RaftLogStore, mut jobs: Vec<LogJob>, bytes: usize, m: &Metrics) {
        let mut entries = 0;
        for j in &jobs {
            entries += j.write.entries.len();
            // Followers answer every heartbeat and append through here (their
            // replies may only leave after what came before is durable); most
            // such jobs carry nothing, or only a new commit index, and need
            // no fdatasync.
            self.must_sync |= j.must_sync;
        }
        let batch: Vec<GroupWrite> = jobs
            .iter_mut()
            .map(|j| {
                let group = j.write.group;
                let write = std::mem::take(&mut j.write);
                j.write.group = group;
                write
            })
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
            m.write_duration.record(started.elapsed().as_secs_f64());
        }
        m.appended_entries.increment(entries as u64);
        m.appended_bytes.increment(bytes as u64);
        self.entries += entries;
        self.bytes += bytes;
        self.jobs.extend(jobs);
    }
}

/// Takes what is queued without waiting, up to the round's byte bound;
/// `first` was already received. The jobs and their bytes of entries.
fn drain(rx: &std_mpsc::Receiver<Msg>, first: Option<Msg>, room_bytes: usize) -> (Vec<LogJob>, usize) {
    let mut jobs = Vec::new();
    let mut bytes = 0;
    let mut next = first;
    loop {
        match next {
            Some(Msg::Job(j)) => {
                bytes += j.write.entries.iter().map(|e| e.data.len()).sum::<usize>();
                jobs.push(j);
            }
            Some(Msg::SyncDone) => {}
            None => break,
        }
        if bytes >= room_bytes {
            break;
        }
        next = rx.try_recv().ok();
    }
    (jobs, bytes)
}

fn run(shared: &Shared) {
    let m = Metrics {
        write_duration: metrics::histogram!("trireme_log_write_duration_seconds"),
        sync_duration: metrics::histogram!("trireme_log_sync_duration_seconds"),
        batch_entries: metrics::histogram!("trireme_log_batch_entries"),
        batch_groups: metrics::histogram!("trireme_log_batch_groups"),
        batch_bytes: metrics::histogram!("trireme_log_batch_bytes"),
        appended_entries: metrics::counter!("trireme_log_appended_entries_total"),
        appended_bytes: metrics::counter!("trireme_log_appended_bytes_total"),
        batches: metrics::counter!("trireme_log_batches_total"),
    };
    let store = &*shared.store;
    loop {
        // The writer: one thread at a time. It writes jobs into the open
        // round as they come, until no sync is running and the round holds
        // something; then it closes the round and syncs it.
        let round = {
            let rx = lock(&shared.rx);
            let mut round = Round::default();
            loop {
                let mut turn = lock(&shared.turn);
                if !round.is_empty() && !turn.syncing {
                    turn.syncing = true;
                    turn.writer_waiting = false;
                    break;
                }
                if round.bytes >= MAX_BATCH_BYTES {
                    // Full: wait for the turn only.
                    while turn.syncing {
                        turn = shared.sync_done.wait(turn).unwrap_or_else(|p| p.into_inner());
                    }
                    continue;
                }
                turn.writer_waiting = !round.is_empty();
                drop(turn);
                // Nothing to close yet (an empty round, or a sync running):
                // wait for a job, or for the syncer's word that it is done.
                let Ok(first) = rx.recv() else { return };
                let (jobs, bytes) = drain(&rx, Some(first), MAX_BATCH_BYTES - round.bytes);
                if !jobs.is_empty() {
                    round.write(store, jobs, bytes, &m);
                }
            }
            round
        };
        // The syncer: the other thread may now write the next round.
        if round.must_sync {
            let started = std::time::Instant::now();
            if let Err(e) = store.sync() {
                crate::error::exit_on_disk_error(
                    "log_write",
                    &format!("raft log write failed, stopping the node: {e}"),
                );
            }
            m.sync_duration.record(started.elapsed().as_secs_f64());
            #[cfg(feature = "failpoints")]
            crate::failpoints::crash_point(crate::failpoints::CRASH_LOG_AFTER_SYNC);
        }
        m.batches.increment(1);
        m.batch_entries.record(round.entries as f64);
        m.batch_groups.record(round.jobs.len() as f64);
        m.batch_bytes.record(round.bytes as f64);
        for j in round.jobs {
            // Written to the peers' sockets from this thread: no task
            // wakes up between the fdatasync and the reply leaving.
            shared.transport.send_all(j.write.group, &j.messages_after);
            if let Some(n) = j.number {
                let _ = j.notify.blocking_send(GroupEvent::Persisted(n));
            }
        }
        let wake = {
            let mut turn = lock(&shared.turn);
            turn.syncing = false;
            std::mem::take(&mut turn.writer_waiting)
        };
        shared.sync_done.notify_all();
        // A writer that holds jobs and waits on the queue learns its turn
        // came. (A full queue means it is not blocked.)
        if wake && let Some(tx) = lock(&shared.tx).as_ref() {
            let _ = tx.try_send(Msg::SyncDone);
        }
    }
}
