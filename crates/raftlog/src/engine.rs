//! The production log: TiKV's raft-engine under `DATA_DIR/raft-log`. Every
//! request waiting at once becomes one `LogBatch`, one write and one
//! fdatasync, done on the thread of the caller that found no round in
//! progress (the daemon has one log-writer thread, so each round runs on
//! it, without a hand-off to a thread of ours or raft-engine's: that hop
//! cost two wake-ups per round, on the path of every write).
//!
//! Why we merge rather than rely on raft-engine's write group (its
//! `Engine::write` also merges concurrent callers):
//! - raft-engine's group issues one `pwrite` per caller (one sync for all);
//!   merging first gives one `pwrite` per round;
//! - every write must be checked against the entries the group will hold
//!   when it lands (raft-engine panics on a gap, after the data is on disk),
//!   which needs the writes serialised anyway;
//! - raft-engine panics when fdatasync fails; the round catches that panic
//!   and it becomes [`LogError::Failed`] for every caller, instead of
//!   unwinding through whichever thread led the group.
//!
//! [`RaftLogStore::sync`] fdatasyncs the append file itself, outside
//! raft-engine: raft-engine holds its write lock through a synced write's
//! fdatasync (and its own `Engine::sync` does nothing: it returns early on an
//! empty batch), so with it alone the next round's write waits for this
//! round's sync. Writing unsynced and syncing here lets them overlap.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};

use raft::eraftpb::Entry;
use raft_engine::env::{DefaultFileSystem, FileSystem, Handle, Permission};
use raft_engine::{Command, Config, Engine, LogBatch, MessageExt, ReadableSize, RecoveryMode};
use tracing::{error, info, warn};

use crate::codec;
use crate::plan::{GroupPlan, Span, batch_bytes, plan_batch};
use crate::verify;
use crate::writer::PaddedWriter;
use crate::{GroupState, GroupWrite, LogError, MAX_BATCH_BYTES, RaftLogStore};

/// Tells raft-engine where a raft-rs entry's index is.
struct RaftEntries;

impl MessageExt for RaftEntries {
    type Entry = Entry;

    fn index(e: &Entry) -> u64 {
        e.index
    }
}

/// Tunables of [`EngineLog`].
#[derive(Debug, Clone)]
pub struct EngineLogConfig {
    /// Size at which the active log file is rotated.
    pub target_file_size: u64,
    /// Log size beyond which `purge` rewrites or drops old files.
    pub purge_threshold: u64,
    /// Threads raft-engine uses to replay the log at startup.
    pub recovery_threads: usize,
    /// Verify every checksum of every file before opening (see `verify.rs`).
    pub verify_on_open: bool,
    /// Bytes of empty log files to write at the first open, for raft-engine
    /// to recycle: appends then overwrite written blocks instead of growing
    /// a file (no allocation in the page cache or the file system). Non-zero
    /// also zero-fills every new append file (the first one, and any made
    /// when no recycled file is free) before use. 0: off; files are still
    /// recycled once purged.
    pub prefill_bytes: u64,
}

impl Default for EngineLogConfig {
    fn default() -> Self {
        EngineLogConfig {
            target_file_size: 128 * 1024 * 1024,
            purge_threshold: 1024 * 1024 * 1024,
            recovery_threads: 2,
            verify_on_open: true,
            prefill_bytes: 0,
        }
    }
}

#[derive(Debug, Default)]
struct FsStats {
    syncs: AtomicU64,
    /// An fdatasync failed. From then on the store acknowledges nothing, and
    /// further syncs are skipped: raft-engine panics on each failed one, and
    /// when closing it syncs both of its files in a row, so a second failure
    /// would panic during the first one's unwinding and abort the process.
    sync_failed: AtomicBool,
    /// Why that fdatasync failed: raft-engine's panic says only "unwrap".
    sync_error: Mutex<Option<String>>,
    /// New append files zero-filled (see `CountingFs::zero_fill_bytes`).
    zero_filled_files: AtomicU64,
    #[cfg(test)]
    fail_syncs: AtomicBool,
}

/// raft-engine's default file system, counting fdatasyncs (and, in tests,
/// failing them), and writing new append files through before use.
struct CountingFs {
    inner: DefaultFileSystem,
    stats: Arc<FsStats>,
    /// Bytes of zeroes written (and synced) into each new append file
    /// before raft-engine gets it; 0: none. raft-engine otherwise grows a
    /// new file with fallocate, which leaves unwritten extents: every
    /// append then converts one, and its fdatasync must commit the file
    /// system journal. On this machine's ext4 that made a 4 KiB append's
    /// sync take ~470 us instead of ~290 us with three logs on one disk.
    /// Recycled files (prefilled or reused) are written already; this
    /// covers the first file and any made when none is free, at the cost
    /// of one `target_file_size` write when the file is made.
    zero_fill_bytes: u64,
    append_files: Arc<Mutex<AppendFiles>>,
}

type InnerHandle = <DefaultFileSystem as FileSystem>::Handle;

struct CountingHandle {
    fd: Arc<InnerHandle>,
    stats: Arc<FsStats>,
    /// A file of the append queue (where every round's entries go), as
    /// opposed to the rewrite queue's or a reserved file.
    append: bool,
    /// Where the file was when opened, to open the writer's own descriptor.
    path: PathBuf,
}

/// The append-queue files [`EngineLog::sync`] must fdatasync: the one
/// raft-engine writes now and any it rotated away from since the last sync.
/// raft-engine syncs a file when it rotates away from it, but a sync of
/// ours does not rely on that. Not reachable from a handle (no cycle).
#[derive(Default)]
struct AppendFiles {
    active: Option<Arc<CountingHandle>>,
    retired: Vec<Arc<CountingHandle>>,
}

impl Handle for CountingHandle {
    fn truncate(&self, offset: usize) -> io::Result<()> {
        self.fd.truncate(offset)
    }

    fn file_size(&self) -> io::Result<usize> {
        self.fd.file_size()
    }

    fn sync(&self) -> io::Result<()> {
        if self.stats.sync_failed.load(Ordering::SeqCst) {
            return Ok(());
        }
        // What was written is in the page cache; nothing is durable yet.
        #[cfg(feature = "failpoints")]
        crate::failpoints::crash_point(crate::failpoints::CRASH_LOG_AFTER_WRITE);
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        #[cfg(test)]
        let result = if self.stats.fail_syncs.load(Ordering::SeqCst) {
            Err(io::Error::other("injected fdatasync failure"))
        } else {
            self.fd.sync()
        };
        #[cfg(all(not(test), feature = "failpoints"))]
        let result = match crate::failpoints::injected_io_error(crate::failpoints::LOG_FSYNC) {
            Some(e) => Err(e),
            None => self.fd.sync(),
        };
        #[cfg(all(not(test), not(feature = "failpoints")))]
        let result = self.fd.sync();
        if let Err(e) = &result {
            // The error first: whoever sees the flag finds the reason.
            lock(&self.stats.sync_error).get_or_insert_with(|| e.to_string());
            self.stats.sync_failed.store(true, Ordering::SeqCst);
        }
        result
    }
}

/// Writes zeroes from the end of `fd` to `bytes` and syncs them, so that
/// the blocks are allocated and written before any log record lands there.
/// A crash part-way leaves a file of zeroes without a header, which the
/// open treats as the torn tail it is (nothing in it was acknowledged).
fn zero_fill(fd: &InnerHandle, bytes: u64) -> io::Result<()> {
    const CHUNK: usize = 1 << 20;
    let zeroes = vec![0u8; CHUNK];
    let mut at = fd.file_size()?;
    let end = usize::try_from(bytes).map_err(io::Error::other)?;
    while at < end {
        let n = (end - at).min(CHUNK);
        let written = fd.write(at, &zeroes[..n])?;
        if written == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "zero-filling a new log file"));
        }
        at += written;
    }
    fd.sync()
}

fn is_append_file(path: &Path) -> bool {
    path.to_str().is_some_and(|p| p.ends_with(verify::APPEND_SUFFIX))
}

impl CountingFs {
    fn wrap(&self, fd: InnerHandle, path: &Path) -> CountingHandle {
        CountingHandle {
            fd: Arc::new(fd),
            stats: self.stats.clone(),
            append: is_append_file(path),
            path: path.to_path_buf(),
        }
    }
}

impl FileSystem for CountingFs {
    type Handle = CountingHandle;
    type Reader = <DefaultFileSystem as FileSystem>::Reader;
    type Writer = PaddedWriter;

    fn create<P: AsRef<Path>>(&self, path: P) -> io::Result<CountingHandle> {
        let fd = self.inner.create(path.as_ref())?;
        // Only the append queue: rewrite files are written in bulk and
        // rarely, and reserved (prefill) files are zeroes already.
        if self.zero_fill_bytes > 0 && is_append_file(path.as_ref()) {
            zero_fill(&fd, self.zero_fill_bytes)?;
            self.stats.zero_filled_files.fetch_add(1, Ordering::Relaxed);
        }
        Ok(self.wrap(fd, path.as_ref()))
    }

    fn open<P: AsRef<Path>>(&self, path: P, perm: Permission) -> io::Result<CountingHandle> {
        Ok(self.wrap(self.inner.open(path.as_ref(), perm)?, path.as_ref()))
    }

    fn delete<P: AsRef<Path>>(&self, path: P) -> io::Result<()> {
        self.inner.delete(path)
    }

    fn rename<P: AsRef<Path>>(&self, src_path: P, dst_path: P) -> io::Result<()> {
        self.inner.rename(src_path, dst_path)
    }

    fn new_reader(&self, handle: Arc<CountingHandle>) -> io::Result<Self::Reader> {
        self.inner.new_reader(handle.fd.clone())
    }

    fn new_writer(&self, handle: Arc<CountingHandle>) -> io::Result<Self::Writer> {
        // raft-engine makes a writer right after opening or creating the
        // file, so the path still names it.
        let file = std::fs::File::options().write(true).open(&handle.path)?;
        let writer = PaddedWriter::new(handle.fd.clone(), file, handle.append)?;
        // raft-engine makes a writer only for the file it appends to next
        // (at open and at each rotation), and prefilled files are reserved,
        // not append files, while it fills them.
        if handle.append {
            let mut files = lock(&self.append_files);
            if let Some(old) = files.active.replace(handle) {
                files.retired.push(old);
            }
        }
        Ok(writer)
    }
}

type RaftEngine = Engine<CountingFs>;

/// Owns the engine so that its drop cannot panic out of `EngineLog`'s:
/// raft-engine closes the active file with an fdatasync it unwraps, and a
/// failed disk must not turn a shutdown into a crash of the dropping thread.
struct Guarded(Option<RaftEngine>);

impl std::ops::Deref for Guarded {
    type Target = RaftEngine;

    fn deref(&self) -> &RaftEngine {
        match &self.0 {
            Some(e) => e,
            None => unreachable!("the engine is taken only when dropped"),
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(engine) = self.0.take()
            && let Err(panic) = catch_unwind(AssertUnwindSafe(move || drop(engine)))
        {
            error!("raft log: closing raft-engine failed: {}", panic_message(&*panic));
        }
    }
}

enum Op {
    /// The writes, and whether they must be synced before the reply.
    Write(Vec<GroupWrite>, bool),
    Remove(u64),
}

struct Job {
    op: Op,
    /// Bytes counted against [`MAX_BATCH_BYTES`] when merging.
    bytes: usize,
    reply: SyncSender<Result<(), LogError>>,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// A caller is running rounds; new jobs wait for it.
    writing: bool,
    shutdown: bool,
}

struct Shared {
    dir: PathBuf,
    engine: Guarded,
    queue: Mutex<Queue>,
    /// Set once an unrecoverable error happened; every request then fails.
    failed: Mutex<Option<String>>,
    stats: Arc<FsStats>,
    /// The previous round's `LogBatch`, drained by raft-engine after its
    /// write, kept for the next round. Its buffer keeps its capacity (up to
    /// raft-engine's 8 MiB cap), so a round of large entries encodes into
    /// memory already mapped instead of growing a fresh buffer page fault
    /// by page fault (a tenth of all CPU under 1 MiB writes).
    spare_batch: Mutex<Option<LogBatch>>,
    append_files: Arc<Mutex<AppendFiles>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; if something did, the data
    // is still consistent (plain queue operations).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

impl Shared {
    fn check(&self) -> Result<(), LogError> {
        match &*lock(&self.failed) {
            Some(reason) => Err(LogError::Failed {
                dir: self.dir.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn fail(&self, reason: String) {
        lock(&self.failed).get_or_insert(reason);
    }

    /// Why raft-engine panicked while `doing` something: a failed
    /// fdatasync if that is what it was, else its panic message.
    fn panic_reason(&self, doing: &str, panic: &(dyn std::any::Any + Send)) -> String {
        match lock(&self.stats.sync_error).as_deref() {
            Some(e) => format!("fdatasync failed while {doing}: {e}"),
            None => format!("raft-engine panicked while {doing}: {}", panic_message(panic)),
        }
    }

    fn span(&self, group: u64) -> Span {
        self.engine.first_index(group).zip(self.engine.last_index(group))
    }

    /// Runs rounds until no job is left, then hands the writer role back.
    fn write_rounds(&self) {
        loop {
            let jobs = {
                let mut q = lock(&self.queue);
                if q.jobs.is_empty() {
                    q.writing = false;
                    return;
                }
                let mut jobs = Vec::new();
                let mut bytes = 0usize;
                while let Some(job) = q.jobs.front() {
                    if !jobs.is_empty() && bytes + job.bytes > MAX_BATCH_BYTES {
                        break;
                    }
                    bytes += job.bytes;
                    jobs.extend(q.jobs.pop_front());
                }
                jobs
            };
            self.round(jobs);
        }
    }

    /// One group commit: every job that passes its checks goes into one
    /// `LogBatch`, written and synced once.
    fn round(&self, jobs: Vec<Job>) {
        if let Some(reason) = lock(&self.failed).clone() {
            for job in jobs {
                let _ = job.reply.send(Err(LogError::Failed {
                    dir: self.dir.clone(),
                    reason: reason.clone(),
                }));
            }
            return;
        }
        let mut lb = lock(&self.spare_batch).take().unwrap_or_default();
        // One synced write makes the whole round synced.
        let mut must_sync = false;
        let mut spans: HashMap<u64, Span> = HashMap::new();
        let mut accepted = Vec::with_capacity(jobs.len());
        let mut jobs = jobs.into_iter();
        while let Some(job) = jobs.next() {
            match job.op {
                Op::Write(batch, sync) => {
                    must_sync |= sync;
                    let staged = plan_batch(&batch, &mut spans, |g| self.span(g))
                        .and_then(|plans| encode_values(&batch).map(|values| (plans, values)));
                    match staged {
                        Ok((plans, values)) => {
                            if let Err(e) = add_to_batch(&mut lb, &batch, &plans, values) {
                                // Part of this job may be in the batch already:
                                // nothing of this round can be written.
                                let reason = format!("building the log batch: {e}");
                                let rest = jobs.map(|j| j.reply);
                                for reply in accepted.into_iter().chain([job.reply]).chain(rest) {
                                    let _ = reply.send(Err(LogError::Write {
                                        dir: self.dir.clone(),
                                        reason: reason.clone(),
                                    }));
                                }
                                return;
                            }
                            accepted.push(job.reply);
                        }
                        Err(e) => {
                            let _ = job.reply.send(Err(e));
                        }
                    }
                }
                Op::Remove(group) => {
                    must_sync = true;
                    lb.add_command(group, Command::Clean);
                    spans.insert(group, None);
                    accepted.push(job.reply);
                }
            }
        }
        if accepted.is_empty() {
            // Nothing was added, so the batch is still empty and open.
            *lock(&self.spare_batch) = Some(lb);
            return;
        }
        #[cfg(feature = "failpoints")]
        let injected = crate::failpoints::injected_io_error(crate::failpoints::LOG_WRITE);
        #[cfg(not(feature = "failpoints"))]
        let injected: Option<io::Error> = None;
        let outcome = match injected {
            // As a failed pwrite: nothing of the batch is in the log.
            Some(e) => Err(e.to_string()),
            None => match catch_unwind(AssertUnwindSafe(|| self.engine.write(&mut lb, must_sync))) {
                Ok(Ok(_)) => {
                    // A successful write drains the batch. After a failed
                    // one its state is unknown, so it is dropped.
                    *lock(&self.spare_batch) = Some(lb);
                    Ok(())
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(panic) => {
                    let reason = self.panic_reason("writing", &*panic);
                    self.fail(reason.clone());
                    Err(reason)
                }
            },
        };
        let failed = lock(&self.failed).is_some();
        for reply in accepted {
            let result = match &outcome {
                Ok(()) => Ok(()),
                Err(reason) if failed => Err(LogError::Failed {
                    dir: self.dir.clone(),
                    reason: reason.clone(),
                }),
                Err(reason) => Err(LogError::Write {
                    dir: self.dir.clone(),
                    reason: reason.clone(),
                }),
            };
            let _ = reply.send(result);
        }
    }
}

/// The encoded values of each write, encoded before anything of the write is
/// added to the batch.
type Values = (Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>);

fn encode_values(batch: &[GroupWrite]) -> Result<Vec<Values>, LogError> {
    batch
        .iter()
        .map(|w| {
            Ok((
                w.hard_state
                    .as_ref()
                    .map(|hs| codec::encode_hard_state(w.group, hs))
                    .transpose()?,
                w.conf_state
                    .as_ref()
                    .map(|cs| codec::encode_conf_state(w.group, cs))
                    .transpose()?,
                w.destaged_index.map(codec::encode_destaged),
            ))
        })
        .collect()
}

fn add_to_batch(
    lb: &mut LogBatch,
    batch: &[GroupWrite],
    plans: &[GroupPlan],
    values: Vec<Values>,
) -> Result<(), raft_engine::Error> {
    for ((w, plan), (hs, cs, destaged)) in batch.iter().zip(plans).zip(values) {
        let g = w.group;
        if let Some(index) = plan.clear_below {
            lb.add_command(g, Command::Compact { index });
        }
        lb.add_entries::<RaftEntries>(g, &w.entries)?;
        if let Some(v) = hs {
            lb.put(g, codec::KEY_HARD_STATE.to_vec(), v)?;
        }
        if let Some(v) = cs {
            lb.put(g, codec::KEY_CONF_STATE.to_vec(), v)?;
        }
        if let Some(v) = destaged {
            lb.put(g, codec::KEY_DESTAGED.to_vec(), v)?;
        }
        if let Some(index) = plan.compact_to {
            lb.add_command(g, Command::Compact { index });
        }
    }
    Ok(())
}

/// The node-wide Raft log on raft-engine.
pub struct EngineLog {
    // Not shared with a thread any more: rounds run on the callers.
    shared: Shared,
}

impl EngineLog {
    /// Opens (creating if needed) the log under `dir`, with default tunables.
    pub fn open(dir: impl AsRef<Path>) -> Result<EngineLog, LogError> {
        EngineLog::open_with(dir, EngineLogConfig::default())
    }

    pub fn open_with(dir: impl AsRef<Path>, config: EngineLogConfig) -> Result<EngineLog, LogError> {
        let dir = dir.as_ref().to_path_buf();
        let open_err = |reason: String| LogError::Open {
            dir: dir.clone(),
            reason,
        };
        let dir_str = dir
            .to_str()
            .ok_or_else(|| open_err("the path is not UTF-8 (raft-engine needs it to be)".to_string()))?
            .to_owned();
        std::fs::create_dir_all(&dir).map_err(|e| LogError::Io {
            op: "creating",
            path: dir.clone(),
            source: e,
        })?;
        if config.verify_on_open {
            // Hold raft-engine's own lock while reading, so that a second
            // process on the same directory is refused as such rather than
            // seen as a torn tail.
            let lock_path = dir.join("LOCK");
            let lock_file = std::fs::File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| LogError::Io {
                    op: "opening",
                    path: lock_path.clone(),
                    source: e,
                })?;
            lock_file.try_lock().map_err(|e| match e {
                std::fs::TryLockError::WouldBlock => open_err("in use by another process".to_string()),
                std::fs::TryLockError::Error(e) => LogError::Io {
                    op: "locking",
                    path: lock_path.clone(),
                    source: e,
                },
            })?;
            let report = verify::verify_dir(&dir)?;
            for t in &report.torn {
                if t.zeroes {
                    info!(
                        file = %t.file.display(),
                        offset = t.offset,
                        bytes = t.bytes,
                        "raft log: trimming preallocated space left by an unclean shutdown"
                    );
                } else {
                    warn!(
                        file = %t.file.display(),
                        offset = t.offset,
                        bytes = t.bytes,
                        "raft log: dropping a torn tail (a write cut short by a crash, never acknowledged)"
                    );
                }
            }
            if !report.ignored.is_empty() {
                info!(
                    files = report.ignored.len(),
                    "raft log: ignoring obsolete files kept for reuse"
                );
            }
            info!(
                dir = %dir.display(),
                files = report.files,
                batches = report.batches,
                "raft log: verified every checksum"
            );
        }
        let stats = Arc::new(FsStats::default());
        let append_files = Arc::new(Mutex::new(AppendFiles::default()));
        let fs = Arc::new(CountingFs {
            append_files: append_files.clone(),
            inner: DefaultFileSystem,
            stats: stats.clone(),
            // With recycling asked for, no append file is ever grown.
            zero_fill_bytes: if config.prefill_bytes > 0 {
                config.target_file_size
            } else {
                0
            },
        });
        let cfg = Config {
            dir: dir_str,
            // A torn tail is dropped; a break anywhere else is refused (by
            // verify.rs before we get here, and by raft-engine itself for
            // files other than the last). AbsoluteConsistency would refuse
            // every restart after a crash: the active file is preallocated,
            // so its tail past the last write is zeroes, which it reads as a
            // broken batch.
            recovery_mode: RecoveryMode::TolerateTailCorruption,
            target_file_size: ReadableSize(config.target_file_size),
            purge_threshold: ReadableSize(config.purge_threshold.max(config.target_file_size)),
            // Never compress: block data compresses poorly, the writer is on
            // the latency path of every write, and verify.rs refuses any
            // compressed batch (the type byte has no checksum).
            batch_compression_threshold: ReadableSize(0),
            recovery_threads: config.recovery_threads.max(1),
            prefill_for_recycle: config.prefill_bytes > 0,
            prefill_limit: (config.prefill_bytes > 0).then_some(ReadableSize(config.prefill_bytes)),
            ..Config::default()
        };
        let engine = match catch_unwind(AssertUnwindSafe(|| Engine::open_with_file_system(cfg, fs))) {
            Ok(Ok(engine)) => engine,
            Ok(Err(e)) => return Err(open_err(e.to_string())),
            Err(panic) => return Err(open_err(format!("raft-engine panicked: {}", panic_message(&*panic)))),
        };
        Ok(EngineLog {
            shared: Shared {
                dir: dir.clone(),
                engine: Guarded(Some(engine)),
                queue: Mutex::new(Queue::default()),
                failed: Mutex::new(None),
                stats,
                spare_batch: Mutex::new(None),
                append_files,
            },
        })
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    fn submit(&self, op: Op, bytes: usize) -> Result<(), LogError> {
        self.shared.check()?;
        let (tx, rx) = sync_channel(1);
        let lead = {
            let mut q = lock(&self.shared.queue);
            if q.shutdown {
                return Err(LogError::Closed {
                    dir: self.shared.dir.clone(),
                });
            }
            q.jobs.push_back(Job { op, bytes, reply: tx });
            !std::mem::replace(&mut q.writing, true)
        };
        if lead {
            self.shared.write_rounds();
        }
        rx.recv().unwrap_or_else(|_| {
            Err(LogError::Closed {
                dir: self.shared.dir.clone(),
            })
        })
    }

    #[cfg(test)]
    pub(crate) fn fail_syncs(&self, on: bool) {
        self.shared.stats.fail_syncs.store(on, Ordering::SeqCst);
    }
}

impl Drop for EngineLog {
    fn drop(&mut self) {
        lock(&self.shared.queue).shutdown = true;
    }
}

impl RaftLogStore for EngineLog {
    fn write_batch(&self, batch: Vec<GroupWrite>) -> Result<(), LogError> {
        // Size limits are checked here, so an oversized batch never queues.
        let bytes = batch_bytes(&batch)?;
        if batch.iter().all(GroupWrite::is_empty) {
            return self.shared.check();
        }
        self.submit(Op::Write(batch, true), bytes)
    }

    fn write_batch_unsynced(&self, batch: Vec<GroupWrite>) -> Result<(), LogError> {
        let bytes = batch_bytes(&batch)?;
        if batch.iter().all(GroupWrite::is_empty) {
            return self.shared.check();
        }
        self.submit(Op::Write(batch, false), bytes)
    }

    fn sync(&self) -> Result<(), LogError> {
        let s = &self.shared;
        s.check()?;
        let files = {
            let mut files = lock(&s.append_files);
            let mut all = std::mem::take(&mut files.retired);
            all.extend(files.active.clone());
            all
        };
        for file in files {
            // After a failed fdatasync the handle answers Ok to keep
            // raft-engine from panicking again; the flag says what happened.
            let result = file.sync();
            if result.is_err() || s.stats.sync_failed.load(Ordering::SeqCst) {
                // The handle records every failed fdatasync's error as it sets the flag.
                let reason = format!(
                    "fdatasync failed: {}",
                    lock(&s.stats.sync_error).as_deref().unwrap_or("unknown error")
                );
                s.fail(reason.clone());
                return Err(LogError::Failed {
                    dir: s.dir.clone(),
                    reason,
                });
            }
        }
        Ok(())
    }

    fn load(&self, group: u64) -> Result<Option<GroupState>, LogError> {
        let s = &self.shared;
        s.check()?;
        if !s.engine.raft_groups().contains(&group) {
            return Ok(None);
        }
        let hard_state = match s.engine.get(group, codec::KEY_HARD_STATE) {
            Some(raw) => codec::decode_hard_state(group, &raw)?,
            None => Default::default(),
        };
        let conf_state = match s.engine.get(group, codec::KEY_CONF_STATE) {
            Some(raw) => codec::decode_conf_state(group, &raw)?,
            None => Default::default(),
        };
        let destaged_index = match s.engine.get(group, codec::KEY_DESTAGED) {
            Some(raw) => codec::decode_destaged(group, &raw)?,
            None => 0,
        };
        let mut entries = Vec::new();
        if let Some((first, last)) = s.span(group) {
            let read_err = |reason: String| LogError::ReadEntries {
                group,
                first,
                last,
                reason,
            };
            s.engine
                .fetch_entries_to::<RaftEntries>(group, first, last + 1, None, &mut entries)
                .map_err(|e| read_err(e.to_string()))?;
            // Entries come back parsed from disk: check they are the ones asked for.
            for (i, e) in entries.iter().enumerate() {
                if e.index != first + i as u64 {
                    return Err(read_err(format!("entry {} found at position {}", e.index, i)));
                }
            }
            if entries.len() as u64 != last - first + 1 {
                return Err(read_err(format!("{} entries read", entries.len())));
            }
        }
        Ok(Some(GroupState {
            hard_state,
            conf_state,
            destaged_index,
            entries,
        }))
    }

    fn groups(&self) -> Result<Vec<u64>, LogError> {
        self.shared.check()?;
        let mut groups = self.shared.engine.raft_groups();
        groups.sort_unstable();
        Ok(groups)
    }

    fn remove_group(&self, group: u64) -> Result<(), LogError> {
        self.submit(Op::Remove(group), 0)
    }

    fn sync_count(&self) -> u64 {
        self.shared.stats.syncs.load(Ordering::Relaxed)
    }

    fn new_files(&self) -> u64 {
        self.shared.stats.zero_filled_files.load(Ordering::Relaxed)
    }

    fn purge(&self) -> Result<Vec<u64>, LogError> {
        let s = &self.shared;
        s.check()?;
        match catch_unwind(AssertUnwindSafe(|| s.engine.purge_expired_files())) {
            Ok(Ok(groups)) => Ok(groups),
            Ok(Err(e)) => Err(LogError::Write {
                dir: s.dir.clone(),
                reason: format!("purging old files: {e}"),
            }),
            Err(panic) => {
                let reason = s.panic_reason("purging", &*panic);
                s.fail(reason.clone());
                Err(LogError::Failed {
                    dir: s.dir.clone(),
                    reason,
                })
            }
        }
    }
}
