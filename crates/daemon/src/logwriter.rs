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

use std::collections::VecDeque;
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

struct Shared {
    store: Arc<dyn RaftLogStore>,
    transport: Transport,
    state: Mutex<State>,
    /// The writer waits here for jobs, or for the sync before its own to end.
    intake: Condvar,
    /// A thread without the writer's role waits here for jobs to take it for.
    idle: Condvar,
    /// Submitters wait here while the queue is full.
    room: Condvar,
}

/// Who does what. A thread wakes only when it has something to do: a job
/// arrives for the writer (or, with nobody writing, for an idle thread), or
/// the sync a writer holding jobs waits for is done. Handing the writer's
/// role over costs no wake-up when nothing is queued: at queue depth 1 each
/// round is one wake-up (the job) plus the fdatasync.
#[derive(Default)]
struct State {
    queue: VecDeque<LogJob>,
    /// A thread holds the writer's role: it takes the queued jobs into the
    /// open round.
    writing: bool,
    /// The writer waits on `intake`.
    writer_waiting: bool,
    /// A round is being synced and reported.
    syncing: bool,
    /// The last [`LogWriter`] is gone: the threads end once idle.
    closed: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding this lock (a disk error exits the
    // process instead); the data under it is a queue and flags.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn wait<'a, T>(c: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    c.wait(g).unwrap_or_else(|p| p.into_inner())
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
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.intake.notify_all();
        self.shared.idle.notify_all();
    }
}

impl LogWriter {
    pub fn start(store: Arc<dyn RaftLogStore>, transport: Transport) -> std::io::Result<LogWriter> {
        let shared = Arc::new(Shared {
            store,
            transport,
            state: Mutex::new(State::default()),
            intake: Condvar::new(),
            idle: Condvar::new(),
            room: Condvar::new(),
        });
        for i in 0..WRITERS {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("trireme-log-{i}"))
                .spawn(move || run(&shared))?;
        }
        Ok(LogWriter {
            handle: Arc::new(Handle { shared }),
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
        let shared = &*self.handle.shared;
        let mut st = lock(&shared.state);
        if st.queue.len() >= QUEUE {
            // Rare: block this group's task briefly rather than drop a write.
            st = tokio::task::block_in_place(|| {
                while st.queue.len() >= QUEUE {
                    st = wait(&shared.room, st);
                }
                st
            });
        }
        st.queue.push_back(job);
        if !st.writing {
            shared.idle.notify_one();
        } else if st.writer_waiting {
            shared.intake.notify_one();
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

/// Takes queued jobs, up to the round's byte bound (at least one). The
/// jobs and their bytes of entries.
fn drain(queue: &mut VecDeque<LogJob>, room_bytes: usize) -> (Vec<LogJob>, usize) {
    let mut jobs = Vec::new();
    let mut bytes = 0;
    while bytes < room_bytes
        && let Some(j) = queue.pop_front()
    {
        bytes += j.write.entries.iter().map(|e| e.data.len()).sum::<usize>();
        jobs.push(j);
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
            let mut st = lock(&shared.state);
            while st.writing || st.queue.is_empty() {
                if st.closed && st.queue.is_empty() {
                    return;
                }
                st = wait(&shared.idle, st);
            }
            st.writing = true;
            let mut round = Round::default();
            loop {
                if !round.is_empty() && !st.syncing {
                    st.syncing = true;
                    st.writing = false;
                    if !st.queue.is_empty() {
                        // Jobs for the next round: the other thread takes them.
                        shared.idle.notify_one();
                    }
                    break;
                }
                if st.queue.is_empty() || round.bytes >= MAX_BATCH_BYTES {
                    if st.closed && round.is_empty() {
                        st.writing = false;
                        return;
                    }
                    // A sync is running: wait for jobs to add, or for its end.
                    st.writer_waiting = true;
                    st = wait(&shared.intake, st);
                    st.writer_waiting = false;
                    continue;
                }
                let was_full = st.queue.len() >= QUEUE;
                let (jobs, bytes) = drain(&mut st.queue, MAX_BATCH_BYTES - round.bytes);
                if was_full {
                    shared.room.notify_all();
                }
                drop(st);
                round.write(store, jobs, bytes, &m);
                st = lock(&shared.state);
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
        let mut st = lock(&shared.state);
        st.syncing = false;
        if st.writer_waiting {
            // The writer holds jobs (or waits for some): its turn came.
            shared.intake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use trireme_raftlog::{HardState, MemLog};
    use trireme_transport::{CatalogChange, ForwardReply, ForwardRequest, PeerHandler, TransportConfig};

    use super::*;

    struct NoPeers;

    #[tonic::async_trait]
    impl PeerHandler for NoPeers {
        async fn forward(&self, _from: u64, _req: ForwardRequest) -> ForwardReply {
            ForwardReply::default()
        }
        async fn catalog(&self, _from: u64, _change: CatalogChange) -> Result<(), tonic::Status> {
            Ok(())
        }
    }

    /// Many groups submitting at once, from runtime tasks, with small event
    /// queues (so reporting blocks now and then): every job is reported
    /// once, in order per group, and the last write of each group is the
    /// one the log holds. A lost wake-up between the two threads' roles
    /// would leave jobs unreported and fail the deadline.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_job_is_reported_once_and_in_order() {
        const GROUPS: u64 = 6;
        // Fewer jobs in all than the queue's bound: a submitter blocked on a
        // full queue would hold the runtime's shutdown, and a failure here
        // must end the test, not hang it.
        const JOBS: u64 = 1000;
        let config = TransportConfig::new(1, "logwriter-test", "a-secret-of-16-chars", BTreeMap::new());
        let (transport, _inbound, _server) = Transport::start(config, Arc::new(NoPeers)).expect("transport");
        let store = Arc::new(MemLog::new());
        let log = LogWriter::start(store.clone(), transport).expect("log writer");
        let mut collectors = Vec::new();
        for group in 1..=GROUPS {
            let (tx, mut rx) = mpsc::channel(4);
            let log = log.clone();
            tokio::spawn(async move {
                for n in 1..=JOBS {
                    log.submit(LogJob {
                        write: GroupWrite {
                            group,
                            hard_state: Some(HardState {
                                term: 1,
                                commit: n,
                                ..Default::default()
                            }),
                            ..GroupWrite::default()
                        },
                        number: Some(n),
                        messages_after: Vec::new(),
                        must_sync: n % 3 != 0,
                        notify: tx.clone(),
                    });
                    if n % 64 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            });
            collectors.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                while seen.len() < JOBS as usize {
                    match rx.recv().await {
                        Some(GroupEvent::Persisted(n)) => seen.push(n),
                        Some(_) => {}
                        None => break,
                    }
                }
                seen
            }));
        }
        for (group, c) in (1..=GROUPS).zip(collectors) {
            let seen = tokio::time::timeout(Duration::from_secs(20), c)
                .await
                .unwrap_or_else(|_| panic!("group {group}: not every job was reported within 20 s"))
                .expect("collector");
            assert_eq!(
                seen,
                (1..=JOBS).collect::<Vec<_>>(),
                "group {group}: reports out of order or missing"
            );
            let held = store.load(group).expect("load").expect("group state");
            assert_eq!(
                held.hard_state.commit, JOBS,
                "group {group}: the log holds an older write last"
            );
        }
        assert!(store.sync_count() > 0, "no round was synced");
    }
}
