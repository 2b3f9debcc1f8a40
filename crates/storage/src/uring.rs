//! The production block store: sparse image files written through io_uring
//! by one node-wide I/O thread.
//!
//! Requests arrive over a bounded channel; an eventfd, kept armed as an
//! io_uring read, wakes the thread when the channel was empty. Fsyncs are
//! group-committed per file: at most one fdatasync per file is in flight,
//! and every sync request that arrives meanwhile is answered by the next
//! one, which is submitted after those requests arrived and so covers every
//! write that completed before them.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use bytes::Bytes;
use io_uring::{IoUring, opcode, squeue, types};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error};

use crate::alloc::AllocMap;
use crate::{BlockStore, Result, StorageError, ZeroMode};

/// Submission queue depth of the node-wide ring.
const RING_ENTRIES: u32 = 256;
/// Data operations in flight at once; the rest of the ring is kept for
/// fsyncs and the wake-up read.
const MAX_INFLIGHT_OPS: usize = 192;
/// Requests queued to the I/O thread before senders wait.
const CHANNEL_CAPACITY: usize = 1024;

const WAKE_TOKEN: u64 = u64::MAX;
const SYNC_TOKEN_BIT: u64 = 1 << 62;

static NEXT_FILE_ID: AtomicU64 = AtomicU64::new(1);

enum OpKind {
    Read {
        length: usize,
    },
    /// `sync_after`: once written, join the file's next fdatasync before
    /// replying, without a round trip back to the caller.
    Write {
        data: Bytes,
        sync_after: bool,
    },
    Fallocate {
        mode: i32,
        length: u64,
    },
    Sync,
}

struct Op {
    file: Arc<File>,
    file_id: u64,
    offset: u64,
    kind: OpKind,
    reply: oneshot::Sender<std::result::Result<Bytes, OpError>>,
}

/// Which step of an operation failed: only a failed fdatasync means data
/// the caller was promised may be gone.
#[derive(Debug)]
enum OpError {
    Op(io::Error),
    Sync(io::Error),
}

impl OpError {
    fn into_storage(self, op: &'static str, offset: u64, length: u64) -> StorageError {
        match self {
            OpError::Op(source) => StorageError::Io {
                op,
                offset,
                length,
                source,
            },
            OpError::Sync(source) => StorageError::Sync(source),
        }
    }
}

struct Shared {
    wake: OwnedFd,
    /// fdatasyncs issued, to show group commit at work (syncs asked > this).
    fdatasyncs: Arc<AtomicU64>,
    /// The I/O thread is (about to be) blocked in the kernel: a sender must
    /// write the eventfd to wake it. While it is awake, senders skip that
    /// syscall; the thread looks at the channel again before it blocks.
    sleeping: Arc<AtomicBool>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
    let n = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    // EAGAIN only when the counter is saturated, which still wakes the reader.
    debug_assert!(n == 8 || io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock);
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Every sender is gone by now (IoEngine drops `tx` before `shared`),
        // so once woken the thread sees the channel closed and winds down.
        wake(&self.wake);
        if let Ok(mut t) = self.thread.lock()
            && let Some(t) = t.take()
        {
            let _ = t.join();
        }
    }
}

/// Handle to the node-wide I/O thread; cheap to clone. The thread finishes
/// the operations in flight and exits when the last handle is dropped.
#[derive(Clone)]
pub struct IoEngine {
    // Field order matters: `tx` must drop before `shared` joins the thread.
    tx: mpsc::Sender<Op>,
    shared: Arc<Shared>,
    /// Images opened through this engine allocate in units of this many
    /// bytes (0: block by block, as written). See [`crate::alloc`].
    allocation_unit_bytes: u64,
}

impl IoEngine {
    pub fn start() -> Result<IoEngine> {
        let ring = IoUring::new(RING_ENTRIES).map_err(StorageError::UringSetup)?;
        // SAFETY: eventfd returns a new descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(StorageError::UringSetup(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let wake_fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let thread_wake = wake_fd.try_clone().map_err(StorageError::UringSetup)?;
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let fdatasyncs = Arc::new(AtomicU64::new(0));
        let sleeping = Arc::new(AtomicBool::new(false));
        let mut worker = Worker {
            fdatasyncs: fdatasyncs.clone(),
            sleeping: sleeping.clone(),
            ring,
            rx,
            wake_fd: thread_wake,
            wake_buf: Box::new([0u8; 8]),
            wake_armed: false,
            slots: (0..MAX_INFLIGHT_OPS).map(|_| None).collect(),
            free: (0..MAX_INFLIGHT_OPS).rev().collect(),
            queue: VecDeque::new(),
            syncs: HashMap::new(),
            completions: Vec::with_capacity(RING_ENTRIES as usize * 2),
        };
        let thread = std::thread::Builder::new()
            .name("trireme-io".into())
            .spawn(move || worker.run())
            .map_err(StorageError::UringSetup)?;
        let shared = Arc::new(Shared {
            wake: wake_fd,
            fdatasyncs,
            sleeping,
            thread: std::sync::Mutex::new(Some(thread)),
        });
        Ok(IoEngine {
            shared,
            tx,
            allocation_unit_bytes: 0,
        })
    }

    /// Images created or opened from now on allocate whole units of
    /// `unit_bytes` on their first write (0: off). The error names a unit
    /// that is not 0 or a power of two from 64 KiB to 4 MiB.
    pub fn with_allocation_unit(mut self, unit_bytes: u64) -> std::result::Result<IoEngine, String> {
        crate::alloc::validate_unit_bytes(unit_bytes)?;
        self.allocation_unit_bytes = unit_bytes;
        Ok(self)
    }

    /// fdatasyncs issued so far, across all files.
    pub fn fdatasync_count(&self) -> u64 {
        self.shared.fdatasyncs.load(Ordering::Relaxed)
    }

    async fn submit(
        &self,
        file: &Arc<File>,
        file_id: u64,
        offset: u64,
        kind: OpKind,
    ) -> std::result::Result<Bytes, OpError> {
        let (reply, rx) = oneshot::channel();
        let op = Op {
            file: file.clone(),
            file_id,
            offset,
            kind,
            reply,
        };
        self.tx
            .send(op)
            .await
            .map_err(|_| OpError::Op(io::Error::other("I/O engine stopped")))?;
        if self.shared.sleeping.swap(false, Ordering::SeqCst) {
            wake(&self.shared.wake);
        }
        rx.await
            .map_err(|_| OpError::Op(io::Error::other("I/O engine dropped the request")))?
    }
}

struct Inflight {
    file: Arc<File>,
    file_id: u64,
    offset: u64,
    kind: InflightKind,
    reply: oneshot::Sender<std::result::Result<Bytes, OpError>>,
}

enum InflightKind {
    Read { buf: Vec<u8>, done: usize },
    Write { data: Bytes, done: usize, sync_after: bool },
    Fallocate { mode: i32, length: u64 },
}

#[derive(Default)]
struct FileSyncs {
    file: Option<Arc<File>>,
    /// Waiters of the fdatasync in flight, if one is.
    inflight: Option<Vec<oneshot::Sender<std::result::Result<Bytes, OpError>>>>,
    /// Waiters that arrived after it was submitted.
    pending: Vec<oneshot::Sender<std::result::Result<Bytes, OpError>>>,
}

struct Worker {
    fdatasyncs: Arc<AtomicU64>,
    sleeping: Arc<AtomicBool>,
    ring: IoUring,
    rx: mpsc::Receiver<Op>,
    wake_fd: OwnedFd,
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    slots: Vec<Option<Inflight>>,
    free: Vec<usize>,
    queue: VecDeque<Op>,
    syncs: HashMap<u64, FileSyncs>,
    completions: Vec<(u64, i32)>,
}

impl Worker {
    fn run(&mut self) {
        loop {
            let mut closed = false;
            loop {
                match self.rx.try_recv() {
                    Ok(op) => self.queue.push_back(op),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            while let Some(op) = self.queue.pop_front() {
                if let Err(op) = self.start(op) {
                    self.queue.push_front(op);
                    break;
                }
            }
            let busy = self.free.len() < MAX_INFLIGHT_OPS || self.syncs.values().any(|s| s.inflight.is_some());
            if closed && !busy && self.queue.is_empty() {
                debug!("I/O engine stopping");
                return;
            }
            if !self.wake_armed && !closed {
                let e = opcode::Read::new(types::Fd(self.wake_fd.as_raw_fd()), self.wake_buf.as_mut_ptr(), 8)
                    .build()
                    .user_data(WAKE_TOKEN);
                self.push(e);
                self.wake_armed = true;
            }
            // Announce the sleep, then look once more: a sender either sees
            // the flag and writes the eventfd, or its op is seen here.
            self.sleeping.store(true, Ordering::SeqCst);
            if !closed && !self.rx.is_empty() {
                self.sleeping.store(false, Ordering::SeqCst);
                continue;
            }
            let waited = self.ring.submit_and_wait(1);
            self.sleeping.store(false, Ordering::SeqCst);
            match waited {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    // The ring itself failing leaves no way to finish I/O safely.
                    error!("io_uring submit failed: {e}");
                    panic!("io_uring submit failed: {e}");
                }
            }
            self.completions.clear();
            self.completions
                .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            let done = std::mem::take(&mut self.completions);
            for &(user_data, res) in &done {
                self.complete(user_data, res);
            }
            self.completions = done;
        }
    }

    fn push(&mut self, e: squeue::Entry) {
        loop {
            // SAFETY: every buffer an entry points to lives in `self.slots`
            // or `self.wake_buf` until its completion has been reaped.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return;
            }
            // Full submission queue: hand it to the kernel and retry.
            if let Err(err) = self.ring.submit()
                && err.raw_os_error() != Some(libc::EBUSY)
                && err.raw_os_error() != Some(libc::EINTR)
            {
                panic!("io_uring submit failed: {err}");
            }
        }
    }

    fn start(&mut self, op: Op) -> std::result::Result<(), Op> {
        let kind = match op.kind {
            OpKind::Sync => {
                let s = self.syncs.entry(op.file_id).or_default();
                s.file.get_or_insert_with(|| op.file.clone());
                s.pending.push(op.reply);
                if s.inflight.is_none() {
                    self.start_fsync(op.file_id);
                }
                return Ok(());
            }
            OpKind::Read { length } => InflightKind::Read {
                buf: vec![0u8; length],
                done: 0,
            },
            OpKind::Write { data, sync_after } => InflightKind::Write {
                data,
                done: 0,
                sync_after,
            },
            OpKind::Fallocate { mode, length } => InflightKind::Fallocate { mode, length },
        };
        let Some(slot) = self.free.pop() else {
            // Put the op back as it came; it is retried after completions.
            let kind = match kind {
                InflightKind::Read { buf, .. } => OpKind::Read { length: buf.len() },
                InflightKind::Write { data, sync_after, .. } => OpKind::Write { data, sync_after },
                InflightKind::Fallocate { mode, length } => OpKind::Fallocate { mode, length },
            };
            return Err(Op {
                file: op.file,
                file_id: op.file_id,
                offset: op.offset,
                kind,
                reply: op.reply,
            });
        };
        self.slots[slot] = Some(Inflight {
            file: op.file,
            file_id: op.file_id,
            offset: op.offset,
            kind,
            reply: op.reply,
        });
        self.submit_slot(slot);
        Ok(())
    }

    fn start_fsync(&mut self, file_id: u64) {
        let Some(s) = self.syncs.get_mut(&file_id) else { return };
        let Some(file) = s.file.as_ref() else { return };
        let fd = types::Fd(file.as_raw_fd());
        s.inflight = Some(std::mem::take(&mut s.pending));
        self.fdatasyncs.fetch_add(1, Ordering::Relaxed);
        let e = opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(SYNC_TOKEN_BIT | file_id);
        self.push(e);
    }

    fn submit_slot(&mut self, slot: usize) {
        let inf = self.slots[slot].as_mut().expect("submitting an empty I/O slot");
        let fd = types::Fd(inf.file.as_raw_fd());
        let e = match &mut inf.kind {
            InflightKind::Read { buf, done } => {
                let rest = buf.len() - *done;
                // SAFETY: `done < buf.len()`, so the pointer stays inside `buf`.
                let ptr = unsafe { buf.as_mut_ptr().add(*done) };
                opcode::Read::new(fd, ptr, rest as u32)
                    .offset(inf.offset + *done as u64)
                    .build()
            }
            InflightKind::Write { data, done, .. } => {
                let rest = data.len() - *done;
                // SAFETY: `done < data.len()`, so the pointer stays inside `data`.
                let ptr = unsafe { data.as_ptr().add(*done) };
                opcode::Write::new(fd, ptr, rest as u32)
                    .offset(inf.offset + *done as u64)
                    .build()
            }
            InflightKind::Fallocate { mode, length } => opcode::Fallocate::new(fd, *length)
                .offset(inf.offset)
                .mode(*mode)
                .build(),
        };
        self.push(e.user_data(slot as u64));
    }

    fn complete(&mut self, user_data: u64, res: i32) {
        if user_data == WAKE_TOKEN {
            self.wake_armed = false;
            return;
        }
        if user_data & SYNC_TOKEN_BIT != 0 {
            let file_id = user_data & !SYNC_TOKEN_BIT;
            let Some(s) = self.syncs.get_mut(&file_id) else { return };
            for w in s.inflight.take().unwrap_or_default() {
                let r = if res < 0 {
                    Err(OpError::Sync(io::Error::from_raw_os_error(-res)))
                } else {
                    Ok(Bytes::new())
                };
                let _ = w.send(r);
            }
            if s.pending.is_empty() {
                self.syncs.remove(&file_id);
            } else {
                self.start_fsync(file_id);
            }
            return;
        }
        let slot = user_data as usize;
        if res == -libc::EINTR || res == -libc::EAGAIN {
            self.submit_slot(slot);
            return;
        }
        let inf = self.slots[slot].as_mut().expect("completion for an empty I/O slot");
        let finished: Option<io::Result<()>> = if res < 0 {
            Some(Err(io::Error::from_raw_os_error(-res)))
        } else {
            let n = res as usize;
            match &mut inf.kind {
                InflightKind::Read { buf, done } => {
                    *done += n;
                    // n == 0 is end of file: the rest stays zero, as in a hole.
                    if n == 0 || *done >= buf.len() {
                        Some(Ok(()))
                    } else {
                        None
                    }
                }
                InflightKind::Write { data, done, .. } => {
                    *done += n;
                    if n == 0 {
                        Some(Err(io::Error::new(io::ErrorKind::WriteZero, "write made no progress")))
                    } else if *done >= data.len() {
                        Some(Ok(()))
                    } else {
                        None
                    }
                }
                InflightKind::Fallocate { .. } => Some(Ok(())),
            }
        };
        match finished {
            None => self.submit_slot(slot),
            Some(r) => {
                let inf = self.slots[slot].take().expect("finished slot is occupied");
                self.free.push(slot);
                if r.is_ok() && matches!(inf.kind, InflightKind::Write { sync_after: true, .. }) {
                    // Written: now wait for an fdatasync submitted after this point.
                    let s = self.syncs.entry(inf.file_id).or_default();
                    s.file.get_or_insert_with(|| inf.file.clone());
                    s.pending.push(inf.reply);
                    if s.inflight.is_none() {
                        self.start_fsync(inf.file_id);
                    }
                    return;
                }
                let r = r.map_err(OpError::Op).map(|()| match inf.kind {
                    InflightKind::Read { buf, .. } => Bytes::from(buf),
                    _ => Bytes::new(),
                });
                let _ = inf.reply.send(r);
            }
        }
    }
}

/// A volume image: a sparse file served by the node-wide [`IoEngine`].
pub struct UringStore {
    engine: IoEngine,
    file: Arc<File>,
    file_id: u64,
    path: PathBuf,
    /// None when the engine's allocation unit is 0.
    alloc: Option<Arc<Mutex<AllocMap>>>,
}

impl UringStore {
    /// Creates a new sparse image of `size_bytes`; fails if it exists.
    pub fn create(engine: &IoEngine, path: &Path, size_bytes: u64) -> Result<UringStore> {
        let file_err = |source| StorageError::File {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(file_err)?;
        file.set_len(size_bytes).map_err(file_err)?;
        file.sync_all().map_err(file_err)?;
        let alloc =
            (engine.allocation_unit_bytes > 0).then(|| AllocMap::empty(engine.allocation_unit_bytes, size_bytes));
        Ok(Self::from_file(engine, path, file, alloc))
    }

    /// Opens an existing image, checking it is at least `size_bytes` long.
    pub fn open(engine: &IoEngine, path: &Path, size_bytes: u64) -> Result<UringStore> {
        let file_err = |source| StorageError::File {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(file_err)?;
        let len = file.metadata().map_err(file_err)?.len();
        if len < size_bytes {
            return Err(StorageError::File {
                path: path.to_path_buf(),
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("image is {len} bytes but the volume is {size_bytes} bytes"),
                ),
            });
        }
        let alloc = match engine.allocation_unit_bytes {
            0 => None,
            unit => Some(AllocMap::scan(&file, unit, len).map_err(file_err)?),
        };
        Ok(Self::from_file(engine, path, file, alloc))
    }

    fn from_file(engine: &IoEngine, path: &Path, file: File, alloc: Option<AllocMap>) -> UringStore {
        UringStore {
            engine: engine.clone(),
            file: Arc::new(file),
            file_id: NEXT_FILE_ID.fetch_add(1, Ordering::Relaxed),
            path: path.to_path_buf(),
            alloc: alloc.map(|m| Arc::new(Mutex::new(m))),
        }
    }

    /// True when a write of the range must allocate whole units first.
    fn needs_fill(&self, offset: u64, length: u64) -> bool {
        self.alloc.as_ref().is_some_and(|a| {
            a.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .touches_clear(offset, length)
        })
    }

    /// Allocation units holding data or written as zeroes, and all units;
    /// None when units are off.
    #[cfg(test)]
    fn allocation_units(&self) -> Option<(u64, u64)> {
        self.alloc
            .as_ref()
            .map(|a| a.lock().unwrap_or_else(PoisonError::into_inner).counts())
    }

    async fn write_op(&self, offset: u64, data: Bytes, sync_after: bool) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let length = data.len() as u64;
        #[cfg(feature = "failpoints")]
        if let Some(source) = crate::failpoints::injected_io_error(crate::failpoints::IMAGE_WRITE) {
            return Err(StorageError::Io {
                op: "write",
                offset,
                length,
                source,
            });
        }
        #[cfg(feature = "failpoints")]
        if sync_after && let Some(e) = crate::failpoints::injected_io_error(crate::failpoints::IMAGE_FSYNC) {
            return Err(StorageError::Sync(e));
        }
        if self.needs_fill(offset, length) {
            self.write_many(vec![(offset, data)]).await?;
            return if sync_after { self.sync().await } else { Ok(()) };
        }
        self.engine
            .submit(&self.file, self.file_id, offset, OpKind::Write { data, sync_after })
            .await
            .map(|_| ())
            .map_err(|e| e.into_storage("write", offset, length))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image's length: the volume size (read from the open file, so it
    /// is right even if the file was renamed).
    pub fn len_bytes(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|source| StorageError::File {
                path: self.path.clone(),
                source,
            })
    }

    /// Bytes the image occupies on disk (it is sparse).
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }
}

impl BlockStore for UringStore {
    async fn read(&self, offset: u64, length: usize) -> Result<Bytes> {
        if length == 0 {
            return Ok(Bytes::new());
        }
        if length <= MAX_INLINE_READ_BYTES
            && let Some(data) = read_cached(&self.file, offset, length)
        {
            return Ok(data);
        }
        self.engine
            .submit(&self.file, self.file_id, offset, OpKind::Read { length })
            .await
            .map_err(|e| e.into_storage("read", offset, length as u64))
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        self.write_op(offset, data, false).await
    }

    async fn write_durable(&self, offset: u64, data: Bytes) -> Result<()> {
        self.write_op(offset, data, true).await
    }

    /// Plain `pwrite`s on a blocking thread: a buffered write only copies
    /// into the page cache, and through io_uring each one would be punted
    /// to an io-wq worker and cost two wake-ups (profiled under 4k random
    /// writes: a quarter of all CPU went to the destage's round trips).
    async fn write_many(&self, extents: Vec<(u64, Bytes)>) -> Result<()> {
        if extents.is_empty() {
            return Ok(());
        }
        let file = self.file.clone();
        let alloc = self.alloc.clone();
        tokio::task::spawn_blocking(move || match alloc {
            None => write_extents(&file, &extents),
            Some(alloc) => write_allocating(&file, &alloc, extents),
        })
        .await
        .map_err(|_| StorageError::EngineStopped)?
    }

    async fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode) -> Result<()> {
        if length == 0 {
            return Ok(());
        }
        let mode = match mode {
            ZeroMode::Punch => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            ZeroMode::Allocate => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        };
        #[cfg(feature = "failpoints")]
        if let Some(source) = crate::failpoints::injected_io_error(crate::failpoints::IMAGE_WRITE) {
            return Err(StorageError::Io {
                op: "fallocate",
                offset,
                length,
                source,
            });
        }
        match self
            .engine
            .submit(&self.file, self.file_id, offset, OpKind::Fallocate { mode, length })
            .await
        {
            Ok(_) => Ok(()),
            Err(OpError::Op(e)) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                Err(StorageError::Unsupported("zero a range"))
            }
            Err(e) => Err(e.into_storage("fallocate", offset, length)),
        }
    }

    async fn sync(&self) -> Result<()> {
        #[cfg(feature = "failpoints")]
        if let Some(e) = crate::failpoints::injected_io_error(crate::failpoints::IMAGE_FSYNC) {
            return Err(StorageError::Sync(e));
        }
        self.engine
            .submit(&self.file, self.file_id, 0, OpKind::Sync)
            .await
            .map(|_| ())
            .map_err(|e| e.into_storage("fdatasync", 0, 0))
    }

    async fn grow(&self, size_bytes: u64) -> Result<()> {
        let file = self.file.clone();
        let path = self.path.clone();
        let alloc = self.alloc.clone();
        let r = tokio::task::spawn_blocking(move || -> io::Result<()> {
            if file.metadata()?.len() < size_bytes {
                file.set_len(size_bytes)?;
            }
            if let Some(alloc) = alloc {
                alloc.lock().unwrap_or_else(PoisonError::into_inner).grow(size_bytes);
            }
            file.sync_all()
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))
        .and_then(|r| r);
        r.map_err(|source| StorageError::File { path, source })
    }
}

/// Larger reads always go through the I/O thread: copying them on the
/// caller's (async) thread would hold it up too long.
const MAX_INLINE_READ_BYTES: usize = 256 * 1024;

/// Reads from the page cache without blocking: `preadv2(RWF_NOWAIT)` fails
/// with EAGAIN instead of waiting for the disk. Most reads of a hot volume
/// are cached, and served here they skip the round trip to the I/O thread
/// (two wake-ups). None: not wholly cached (or any error): ask io_uring,
/// which reports real errors.
fn read_cached(file: &File, offset: u64, length: usize) -> Option<Bytes> {
    let at = libc::off_t::try_from(offset).ok()?;
    let mut buf = bytes::BytesMut::with_capacity(length);
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: length,
    };
    // SAFETY: the iovec covers `length` bytes of `buf`'s allocation, which
    // outlives the call; the fd is open for as long as `file` is borrowed.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
    if usize::try_from(n).ok()? != length {
        return None;
    }
    // SAFETY: the kernel initialised all `length` bytes.
    unsafe { buf.set_len(length) };
    Some(buf.freeze())
}

/// Writes each extent in full, merging runs of adjacent extents into one
/// `pwritev` (a sequential stream destages in few large writes).
fn write_extents(file: &File, extents: &[(u64, Bytes)]) -> Result<()> {
    let mut i = 0;
    while i < extents.len() {
        let start = extents[i].0;
        let mut end = start + extents[i].1.len() as u64;
        let mut j = i + 1;
        while j < extents.len() && extents[j].0 == end && j - i < MAX_IOVECS {
            end += extents[j].1.len() as u64;
            j += 1;
        }
        #[cfg(feature = "failpoints")]
        if let Some(source) = crate::failpoints::injected_io_error(crate::failpoints::IMAGE_WRITE) {
            return Err(StorageError::Io {
                op: "write",
                offset: start,
                length: end - start,
                source,
            });
        }
        pwritev_all(file, start, &extents[i..j]).map_err(|source| StorageError::Io {
            op: "write",
            offset: start,
            length: end - start,
            source,
        })?;
        let streamed: u64 = extents[i..j]
            .iter()
            .filter(|(_, d)| !crate::alloc::is_fill(d))
            .map(|(_, d)| d.len() as u64)
            .sum();
        if streamed >= STREAM_WRITEBACK_BYTES {
            start_writeback(file, start, end - start);
        }
        i = j;
    }
    Ok(())
}

/// Writes extents into an image with allocation units. The clear units
/// they touch are first allocated with `fallocate` (unwritten extents: they
/// read as zeroes even if a crash comes before the zeroes below reach the
/// disk, where blocks allocated by the write itself could show stale data),
/// then written in full, zeroes around the extents, in the same pass and
/// under the map's lock, so that no other write lands in a unit while it is
/// being filled. Units are marked even when a step fails: a unit that may
/// hold part of a write must never be filled again.
fn write_allocating(file: &File, alloc: &Mutex<AllocMap>, extents: Vec<(u64, Bytes)>) -> Result<()> {
    let mut map = alloc.lock().unwrap_or_else(PoisonError::into_inner);
    let runs = map.clear_runs(&extents);
    if runs.is_empty() {
        // Set bits are never cleared: these units need no lock.
        drop(map);
        return write_extents(file, &extents);
    }
    let fills = match runs
        .iter()
        .try_for_each(|&(offset, length)| allocate(file, offset, length))
    {
        Ok(()) => map.fills(&runs, &extents),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            // Without fallocate a fill could expose stale blocks after a
            // crash: write block by block instead.
            Vec::new()
        }
        Err(source) => {
            map.mark_all(&extents);
            let (offset, length) = runs[0];
            return Err(StorageError::Io {
                op: "fallocate",
                offset,
                length,
                source,
            });
        }
    };
    let disjoint_sorted = extents
        .windows(2)
        .all(|w| w[0].0.saturating_add(w[0].1.len() as u64) <= w[1].0);
    let result = if disjoint_sorted {
        // One pass in offset order: a unit's fill and data merge into one pwritev.
        let mut all: Vec<(u64, Bytes)> = fills.into_iter().chain(extents.iter().cloned()).collect();
        all.sort_unstable_by_key(|(o, _)| *o);
        write_extents(file, &all)
    } else {
        write_extents(file, &fills).and_then(|()| write_extents(file, &extents))
    };
    for &(offset, length) in &runs {
        map.mark(offset, length);
    }
    map.mark_all(&extents);
    result
}

/// Allocates `[offset, offset + length)` as unwritten extents, keeping the
/// file's size.
fn allocate(file: &File, offset: u64, length: u64) -> io::Result<()> {
    let (Ok(offset), Ok(length)) = (libc::off_t::try_from(offset), libc::off_t::try_from(length)) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "range past off_t"));
    };
    loop {
        // SAFETY: plain syscall on an open descriptor we own; no memory passed.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, offset, length) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// A run of at least this many bytes is sequential data (1M writes, a
/// rebuild's copy): its write-back starts at once. Smaller runs stay dirty in
/// the page cache until the next checkpoint, which may overwrite them again
/// (random 4k writes) and writes the rest back sorted.
const STREAM_WRITEBACK_BYTES: u64 = 256 * 1024;

/// Starts writing a range back without waiting for it
/// (`SYNC_FILE_RANGE_WRITE`): streaming data then goes to the disk as it
/// comes, instead of all at once in the next checkpoint's fdatasync, whose
/// burst held the log's fdatasyncs back (1M writes at QD8: p99 completion
/// 194-234 ms without this, 80-88 ms with it). Only a hint; durability still
/// comes from the checkpoint's fdatasync, so a failure here is ignored.
fn start_writeback(file: &File, offset: u64, length: u64) {
    let (Ok(offset), Ok(length)) = (i64::try_from(offset), i64::try_from(length)) else {
        return;
    };
    // SAFETY: plain syscall on an open descriptor we own; no memory passed.
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, length, libc::SYNC_FILE_RANGE_WRITE) };
}

/// Most buffers in one `pwritev` (Linux's IOV_MAX is 1024).
const MAX_IOVECS: usize = 512;

/// One run of adjacent extents, retried after short writes.
fn pwritev_all(file: &File, offset: u64, run: &[(u64, Bytes)]) -> io::Result<()> {
    let total: usize = run.iter().map(|(_, d)| d.len()).sum();
    let mut done = 0usize;
    while done < total {
        // Skip what was written: whole buffers, then part of one.
        let mut skip = done;
        let mut iov = Vec::with_capacity(run.len());
        for (_, d) in run {
            if skip >= d.len() {
                skip -= d.len();
                continue;
            }
            iov.push(io::IoSlice::new(&d[skip..]));
            skip = 0;
        }
        let at = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset past off_t"))?;
        match nix::sys::uio::pwritev(file, &iov, at) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev wrote nothing")),
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &tempfile::TempDir, size: u64) -> (IoEngine, UringStore) {
        let engine = IoEngine::start().expect("io_uring available");
        let s = UringStore::create(&engine, &dir.path().join("image"), size).expect("create image");
        (engine, s)
    }

    #[tokio::test]
    async fn written_data_reads_back_and_holes_read_as_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_e, s) = store(&dir, 1 << 20);
        s.write(4095, Bytes::from_static(b"hello")).await.expect("write");
        s.sync().await.expect("sync");
        let r = s.read(4090, 16).await.expect("read");
        assert_eq!(&r[..5], &[0; 5]);
        assert_eq!(&r[5..10], b"hello");
        assert_eq!(&r[10..], &[0; 6]);
    }

    #[tokio::test]
    async fn zeroing_by_punch_and_by_allocation_reads_back_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_e, s) = store(&dir, 1 << 20);
        s.write(0, Bytes::from(vec![0xaa; 65536])).await.expect("write");
        s.write_zeroes(4096, 4096, ZeroMode::Punch).await.expect("punch");
        s.write_zeroes(16384, 100, ZeroMode::Allocate)
            .await
            .expect("zero range");
        let r = s.read(0, 65536).await.expect("read");
        assert!(r[..4096].iter().all(|b| *b == 0xaa));
        assert!(r[4096..8192].iter().all(|b| *b == 0));
        assert!(r[16384..16484].iter().all(|b| *b == 0));
        assert!(r[16484..].iter().all(|b| *b == 0xaa));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_writes_and_syncs_all_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (engine, s) = store(&dir, 64 << 20);
        let s = Arc::new(s);
        let mut tasks = Vec::new();
        // More than MAX_INFLIGHT_OPS at once exercises the queue.
        for i in 0..400u64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let data = Bytes::from(vec![(i % 251) as u8; 8192]);
                s.write(i * 8192, data).await?;
                s.sync().await
            }));
        }
        for t in tasks {
            t.await.expect("join").expect("write+sync");
        }
        // Group commit: 400 concurrent syncs must share fdatasyncs.
        let fsyncs = engine.fdatasync_count();
        assert!(fsyncs < 400, "{fsyncs} fdatasyncs for 400 concurrent syncs");
        for i in [0u64, 199, 399] {
            let r = s.read(i * 8192, 8192).await.expect("read");
            assert!(r.iter().all(|b| *b == (i % 251) as u8));
        }
    }

    #[tokio::test]
    async fn write_many_merges_adjacent_runs_and_keeps_gaps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_e, s) = store(&dir, 1 << 20);
        // Two adjacent runs (one of 600 buffers, past one pwritev's limit)
        // and a lone extent, with untouched gaps between them.
        let mut extents: Vec<(u64, Bytes)> = (0..600u64)
            .map(|i| (i * 512, Bytes::from(vec![(i % 251) as u8 + 1; 512])))
            .collect();
        extents.push((400_000, Bytes::from(vec![0xee; 100])));
        extents.push((400_100, Bytes::from(vec![0xdd; 4096])));
        extents.push((900_000, Bytes::from(vec![0xcc; 7])));
        s.write_many(extents).await.expect("write_many");
        s.sync().await.expect("sync");
        let r = s.read(0, 1 << 20).await.expect("read");
        for i in 0..600usize {
            assert!(
                r[i * 512..(i + 1) * 512].iter().all(|&b| b == (i % 251) as u8 + 1),
                "block {i}"
            );
        }
        assert!(r[600 * 512..400_000].iter().all(|&b| b == 0), "gap after the first run");
        assert!(r[400_000..400_100].iter().all(|&b| b == 0xee));
        assert!(r[400_100..404_196].iter().all(|&b| b == 0xdd));
        assert!(r[404_196..900_000].iter().all(|&b| b == 0));
        assert_eq!(&r[900_000..900_007], &[0xcc; 7]);
        assert!(r[900_007..].iter().all(|&b| b == 0));
    }

    #[tokio::test]
    async fn cached_reads_skip_the_ring_and_match_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_e, s) = store(&dir, 1 << 20);
        s.write(8192, Bytes::from(vec![0x42; 8192])).await.expect("write");
        // Just written, so in the page cache: served inline, same bytes.
        let inline = read_cached(&s.file, 4096, 16384).expect("a cached range reads inline");
        let ring = s.read(4096, 16384).await.expect("read");
        assert_eq!(inline, ring);
        assert!(inline[..4096].iter().all(|&b| b == 0) && inline[4096..12288].iter().all(|&b| b == 0x42));
        // Past the end of the file: not a whole read, so left to the ring.
        assert!(read_cached(&s.file, (1 << 20) - 100, 4096).is_none());
    }

    #[tokio::test]
    async fn grow_extends_and_open_checks_the_length() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (engine, s) = store(&dir, 4096);
        s.grow(8192).await.expect("grow");
        drop(s);
        let path = dir.path().join("image");
        assert!(UringStore::open(&engine, &path, 8192).is_ok());
        assert!(UringStore::open(&engine, &path, 16384).is_err());
    }

    const UNIT: u64 = crate::alloc::MIN_UNIT_BYTES;

    fn unit_store(dir: &tempfile::TempDir, size: u64) -> (IoEngine, UringStore) {
        let engine = IoEngine::start()
            .expect("io_uring available")
            .with_allocation_unit(UNIT)
            .expect("a valid unit");
        let s = UringStore::create(&engine, &dir.path().join("image"), size).expect("create image");
        (engine, s)
    }

    #[tokio::test]
    async fn a_first_write_allocates_its_whole_unit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_e, s) = unit_store(&dir, 8 * UNIT);
        s.write_many(vec![(UNIT + 4096, Bytes::from(vec![0x61; 4096]))])
            .await
            .expect("write_many");
        s.write(5 * UNIT + 512, Bytes::from(vec![0x62; 512]))
            .await
            .expect("write");
        s.sync().await.expect("sync");
        assert_eq!(s.allocation_units(), Some((2, 8)));
        assert!(
            s.allocated_bytes() >= 2 * UNIT,
            "{} bytes allocated",
            s.allocated_bytes()
        );
        let r = s.read(0, 8 * UNIT as usize).await.expect("read");
        let (a, b) = ((UNIT + 4096) as usize, (5 * UNIT + 512) as usize);
        assert!(r[..a].iter().all(|&x| x == 0));
        assert!(r[a..a + 4096].iter().all(|&x| x == 0x61));
        assert!(r[a + 4096..b].iter().all(|&x| x == 0));
        assert!(r[b..b + 512].iter().all(|&x| x == 0x62));
        assert!(r[b + 512..].iter().all(|&x| x == 0));
    }

    /// The safety rule: data an image already holds when it is opened is
    /// never filled over by a later write into the same unit.
    #[tokio::test]
    async fn data_found_at_open_is_never_filled_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (engine, s) = unit_store(&dir, 4 * UNIT);
        s.write(2 * UNIT, Bytes::from(vec![0x71; 4096])).await.expect("write");
        drop(s);
        // Written behind the store's back while it was closed.
        let path = dir.path().join("image");
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::OpenOptions::new().write(true).open(&path).expect("open"),
            &[0x72; 4096],
            4096,
        )
        .expect("write");
        let s = UringStore::open(&engine, &path, 4 * UNIT).expect("open");
        assert_eq!(s.allocation_units(), Some((2, 4)));
        s.write_many(vec![(UNIT - 4096, Bytes::from(vec![0x73; 8192]))])
            .await
            .expect("write_many");
        s.write(2 * UNIT + 8192, Bytes::from(vec![0x74; 4096]))
            .await
            .expect("write");
        let r = s.read(0, 4 * UNIT as usize).await.expect("read");
        let at = |o: u64| r[o as usize];
        assert_eq!(at(4096), 0x72, "data written while closed survived");
        assert_eq!(at(2 * UNIT), 0x71, "data written before the reopen survived");
        assert_eq!((at(UNIT - 1), at(UNIT + 4095)), (0x73, 0x73));
        assert_eq!(at(2 * UNIT + 8192), 0x74);
        assert_eq!(at(UNIT + 4096), 0, "the rest of a filled unit reads as zero");
        assert_eq!(s.allocation_units(), Some((3, 4)));
    }

    /// Many writers into the same fresh units, through both write paths:
    /// every block reads back, whichever write filled its unit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_writes_into_one_unit_all_survive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_e, s) = unit_store(&dir, 4 * UNIT);
        let s = Arc::new(s);
        let blocks = 4 * UNIT / 4096;
        let mut tasks = Vec::new();
        for i in 0..blocks {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let data = Bytes::from(vec![(i % 250) as u8 + 1; 4096]);
                if i % 2 == 0 {
                    s.write(i * 4096, data).await
                } else {
                    s.write_many(vec![(i * 4096, data)]).await
                }
            }));
        }
        for t in tasks {
            t.await.expect("join").expect("write");
        }
        let r = s.read(0, 4 * UNIT as usize).await.expect("read");
        for i in 0..blocks as usize {
            assert!(
                r[i * 4096..(i + 1) * 4096].iter().all(|&b| b == (i % 250) as u8 + 1),
                "block {i} lost"
            );
        }
    }

    #[tokio::test]
    async fn growing_adds_units_to_fill() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_e, s) = unit_store(&dir, UNIT);
        s.grow(3 * UNIT).await.expect("grow");
        s.write(2 * UNIT, Bytes::from(vec![0x55; 4096])).await.expect("write");
        assert_eq!(s.allocation_units(), Some((1, 3)));
        let r = s.read(2 * UNIT, UNIT as usize).await.expect("read");
        assert!(r[..4096].iter().all(|&b| b == 0x55) && r[4096..].iter().all(|&b| b == 0));
    }
}
