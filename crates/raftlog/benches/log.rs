//! Micro-benchmarks of the node-wide Raft log writer: `RaftLogStore::write_batch`, the
//! call the daemon's log writer thread makes once per round, for batches of 1, 8 and 32
//! entries of 4 KiB in each of 1 and 16 groups (each group write also carries a
//! `HardState`, as a Ready with new entries usually does). Throughput is entry bytes.
//!
//! - `engine_disk`: `EngineLog` (raft-engine) in cargo's target tmp dir, on the build
//!   disk: one write + one fdatasync per call, the real cost of acknowledging a write.
//! - `engine_prefilled`: the same with `prefill_bytes` (raft-engine prefills empty files
//!   for recycling), measured after the first 32 MiB file has filled, so the appends
//!   overwrite written blocks of a recycled file.
//! - `engine_tmpfs`: the same in /dev/shm, where fdatasync costs next to nothing. The
//!   store always syncs (no API to skip it), so this is how the CPU side (planning,
//!   encoding, raft-engine's batch and checksums, the hand-off to the writer thread,
//!   the `write` syscall) is told apart from the disk's. Skipped without /dev/shm.
//! - `memlog`: `MemLog`, the in-memory store: the batch checks (`plan_batch`) and
//!   bookkeeping alone, a floor for any store.
//!
//! - `direct_append` / `buffered_append`: the floor of a log of our own, for the
//!   "raft-engine or an O_DIRECT log?" question: the same batch framed as crc32c-checked
//!   records into one 4 KiB-aligned buffer, written at the tail of a preallocated file
//!   with one pwrite (O_DIRECT, or through the page cache) and one fdatasync. No index,
//!   no recovery, no purge: what such a log could cost at best on this disk.
//!
//! Why: group commit is what makes many volumes per node cheap; these numbers show what
//! one round costs and how it scales with entries and groups per round.
//!
//! Each sample opens a fresh store in a fresh directory (outside the timing) so that the
//! log does not grow across the whole run; only `write_batch` itself is timed.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tempfile::TempDir;
use trireme_raftlog::{EngineLog, Entry, GroupWrite, HardState, MemLog, RaftLogStore};

const ENTRY_BYTES: usize = 4096;
const GROUPS: [u64; 2] = [1, 16];
const ENTRIES: [u64; 3] = [1, 8, 32];

#[derive(Clone, Copy)]
enum Backend {
    Disk,
    DiskPrefilled,
    Tmpfs,
    Mem,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Disk => "engine_disk",
            Backend::DiskPrefilled => "engine_prefilled",
            Backend::Tmpfs => "engine_tmpfs",
            Backend::Mem => "memlog",
        }
    }
}

/// A store and the directory it lives in; the store is dropped (closed) first.
struct Store {
    log: Box<dyn RaftLogStore>,
    _dir: Option<TempDir>,
}

fn open(backend: Backend) -> Store {
    let engine_in = |parent: &Path, prefill_bytes: u64| {
        let dir = tempfile::Builder::new()
            .prefix("trireme-raftlog-bench-")
            .tempdir_in(parent)
            .expect("creating the bench log directory");
        let config = trireme_raftlog::EngineLogConfig {
            prefill_bytes,
            target_file_size: 32 << 20,
            ..Default::default()
        };
        let log = EngineLog::open_with(dir.path().join("raft-log"), config).expect("opening the bench log");
        Store {
            log: Box::new(log),
            _dir: Some(dir),
        }
    };
    match backend {
        Backend::Disk => engine_in(Path::new(env!("CARGO_TARGET_TMPDIR")), 0),
        Backend::DiskPrefilled => {
            let store = engine_in(Path::new(env!("CARGO_TARGET_TMPDIR")), 64 << 20);
            // Write past the first (new) file, so the timed appends go to a
            // recycled one.
            let chunk = Bytes::from(vec![7u8; 1 << 20]);
            let mut next = [1u64];
            for _ in 0..40 {
                store
                    .log
                    .write_batch(batch(&mut next, 1, &chunk))
                    .expect("filling the first file");
            }
            store
        }
        Backend::Tmpfs => engine_in(Path::new("/dev/shm"), 0),
        Backend::Mem => Store {
            log: Box::new(MemLog::new()),
            _dir: None,
        },
    }
}

/// The next batch: `entries` new entries for each of `next.len()` groups.
fn batch(next: &mut [u64], entries: u64, payload: &Bytes) -> Vec<GroupWrite> {
    next.iter_mut()
        .enumerate()
        .map(|(g, first)| {
            let start = *first;
            *first += entries;
            GroupWrite {
                group: g as u64 + 1,
                entries: (start..start + entries)
                    .map(|index| Entry {
                        index,
                        term: 1,
                        data: payload.clone(),
                        ..Default::default()
                    })
                    .collect(),
                hard_state: Some(HardState {
                    term: 1,
                    vote: 1,
                    commit: start.saturating_sub(1),
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
        .collect()
}

fn write_batch(c: &mut Criterion) {
    let mut backends = vec![Backend::Disk, Backend::DiskPrefilled];
    if Path::new("/dev/shm").is_dir() {
        backends.push(Backend::Tmpfs);
    } else {
        eprintln!("no /dev/shm: skipping engine_tmpfs");
    }
    backends.push(Backend::Mem);

    for backend in backends {
        bench_shapes(
            c,
            backend.name(),
            |_, _| open(backend),
            |store, writes| store.log.write_batch(writes).expect("write_batch"),
        );
    }
}

/// One benchmark per batch shape (groups x entries of 4 KiB): a fresh
/// target from `open` per sample, only `write` timed.
fn bench_shapes<T>(
    c: &mut Criterion,
    name: &str,
    open: impl Fn(u64, u64) -> T,
    write: impl Fn(&mut T, Vec<GroupWrite>),
) {
    let payload = Bytes::from((0..ENTRY_BYTES).map(|i| (i * 7 + 3) as u8).collect::<Vec<u8>>());
    let mut g = c.benchmark_group(name);
    for groups in GROUPS {
        for entries in ENTRIES {
            g.throughput(Throughput::Bytes(groups * entries * ENTRY_BYTES as u64));
            let id = BenchmarkId::from_parameter(format!("{groups}g_x_{entries}e"));
            g.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut target = open(groups, entries);
                    let mut next = vec![1u64; groups as usize];
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        let writes = batch(&mut next, entries, &payload);
                        let start = Instant::now();
                        write(&mut target, black_box(writes));
                        spent += start.elapsed();
                    }
                    spent
                })
            });
        }
    }
    g.finish();
}

/// A preallocated file written at its tail, O_DIRECT or buffered.
struct AppendFile {
    file: std::fs::File,
    offset: u64,
    _dir: TempDir,
}

const APPEND_FILE_BYTES: u64 = 64 << 20;
const ALIGN: usize = 4096;

impl AppendFile {
    fn open(direct: bool) -> AppendFile {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::Builder::new()
            .prefix("trireme-append-bench-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("creating the bench directory");
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true).create(true);
        if direct {
            opts.custom_flags(0o40000); // O_DIRECT on Linux x86-64 and aarch64
        }
        let file = opts.open(dir.path().join("log")).expect("opening the append file");
        // Filled once so the appends overwrite allocated blocks, as in a
        // recycled log segment (no extent allocation to journal at fdatasync).
        let mut zeros = AlignedBuf::new(4 << 20);
        let mut at = 0;
        while at < APPEND_FILE_BYTES {
            std::os::unix::fs::FileExt::write_all_at(&file, zeros.as_mut(), at).expect("filling the append file");
            at += 4 << 20;
        }
        file.sync_all().expect("syncing the append file");
        AppendFile {
            file,
            offset: 0,
            _dir: dir,
        }
    }

    /// Frames `writes` into `buf` (record: len u32, crc32c u32, group u64,
    /// index u64, data), pads to 4 KiB, writes and fdatasyncs.
    fn append(&mut self, writes: &[GroupWrite], buf: &mut AlignedBuf) {
        use std::os::unix::fs::FileExt;
        let mut n = 0;
        for w in writes {
            for e in &w.entries {
                let len = 24 + e.data.len();
                let rec = &mut buf.as_mut()[n..n + len];
                rec[0..4].copy_from_slice(&(len as u32).to_le_bytes());
                rec[8..16].copy_from_slice(&w.group.to_le_bytes());
                rec[16..24].copy_from_slice(&e.index.to_le_bytes());
                rec[24..].copy_from_slice(&e.data);
                let crc = crc32c::crc32c(&rec[8..]);
                rec[4..8].copy_from_slice(&crc.to_le_bytes());
                n += len;
            }
        }
        let padded = n.div_ceil(ALIGN) * ALIGN;
        if self.offset + padded as u64 > APPEND_FILE_BYTES {
            self.offset = 0;
        }
        self.file
            .write_all_at(&buf.as_mut()[..padded], self.offset)
            .expect("appending");
        self.file.sync_data().expect("fdatasync");
        self.offset += padded as u64;
    }
}

/// A zeroed buffer aligned to 4 KiB, as O_DIRECT needs.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(bytes: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(bytes.div_ceil(ALIGN) * ALIGN, ALIGN).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).expect("allocating");
        AlignedBuf { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr owns layout.size() initialised bytes for our lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

fn append_floor(c: &mut Criterion) {
    for (name, direct) in [("direct_append", true), ("buffered_append", false)] {
        bench_shapes(
            c,
            name,
            |groups, entries| {
                let buf = AlignedBuf::new((groups * entries) as usize * (ENTRY_BYTES + 24) + ALIGN);
                (AppendFile::open(direct), buf)
            },
            |(file, buf), writes| file.append(&writes, buf),
        );
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = write_batch, append_floor
}
criterion_main!(benches);
