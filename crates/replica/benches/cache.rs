//! Micro-benchmarks of the replica's write path that runs on the apply thread:
//! the write-back cache (`WriteCache`) and the checksummed entry codec (`EntryOp`).
//!
//! - `cache_insert/*`: committed 4 KiB writes going into the cache: random aligned
//!   writes into a fresh cache, one overwrite in a cache already holding 64 Ki extents
//!   (the steady state of a busy volume), and unaligned overlapping writes that split
//!   and trim the extents around them.
//! - `cache_read/*`: resolving a read into cached, zeroed and image segments: a 4 KiB
//!   hit, a 4 KiB miss, and 64 KiB across alternating cached and uncached blocks.
//! - `cache_destage/*`: `dirty_up_to` + `mark_destaged` of half of 1024 extents, what
//!   the destager does each round.
//! - `entry_op/*`: encode and decode (with crc32c verification) of a 4 KiB `Write`.
//!
//! Why: every acknowledged write is encoded once, decoded on apply on every replica and
//! inserted into the cache; every read consults the cache. These bound a replica's IOPS
//! independent of disk and network.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use trireme_replica::{EntryOp, ExtentData, VolumeOp, WriteCache};

const BLOCK: u64 = 4096;
/// Writes per iteration of the batched insert benches.
const WRITES: u64 = 1024;
/// Blocks of the volume that random writes land in (1 GiB).
const VOLUME_BLOCKS: u64 = 1 << 18;

/// splitmix64: a deterministic, dependency-free source of offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn block_data() -> Bytes {
    Bytes::from((0..BLOCK).map(|i| (i * 13 + 1) as u8).collect::<Vec<u8>>())
}

fn inserts(c: &mut Criterion) {
    let data = block_data();
    let mut rng = Rng(1);
    let random: Vec<u64> = (0..WRITES).map(|_| rng.below(VOLUME_BLOCKS) * BLOCK).collect();
    // Within 1 MiB, at 512-byte alignment: nearly every write overlaps one or two others.
    let overlapping: Vec<u64> = (0..WRITES).map(|_| rng.below(2048 - 8) * 512).collect();

    // The cache copies no data (extents share the entry's `Bytes`): count writes, not bytes.
    let mut g = c.benchmark_group("cache_insert");
    g.throughput(Throughput::Elements(WRITES));
    g.bench_function("random_4k_x1024_fresh", |b| {
        b.iter_batched(
            WriteCache::new,
            |mut cache| {
                for (i, &offset) in random.iter().enumerate() {
                    cache.insert(offset, BLOCK, ExtentData::Data(data.clone()), i as u64 + 1);
                }
                cache
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("overlapping_4k_at_512_x1024", |b| {
        b.iter_batched(
            WriteCache::new,
            |mut cache| {
                for (i, &offset) in overlapping.iter().enumerate() {
                    cache.insert(offset, BLOCK, ExtentData::Data(data.clone()), i as u64 + 1);
                }
                cache
            },
            BatchSize::SmallInput,
        )
    });

    // Steady state: 64 Ki extents cached, each write replaces one of them.
    let held = 1u64 << 16;
    let mut cache = WriteCache::new();
    for i in 0..held {
        cache.insert(i * 4 * BLOCK, BLOCK, ExtentData::Data(data.clone()), i + 1);
    }
    let mut index = held;
    g.throughput(Throughput::Elements(1));
    g.bench_function("overwrite_4k_in_64k_extents", |b| {
        b.iter(|| {
            index += 1;
            let offset = rng.below(held) * 4 * BLOCK;
            cache.insert(black_box(offset), BLOCK, ExtentData::Data(data.clone()), index);
        })
    });
    assert_eq!(cache.extent_count() as u64, held, "overwrites keep the extent count");
    g.finish();
}

fn reads(c: &mut Criterion) {
    let data = block_data();
    // 4 MiB where every other block is cached (every fourth one zeroed), then nothing.
    let mut cache = WriteCache::new();
    for i in 0..1024u64 {
        let extent = match i % 4 {
            0 => ExtentData::Data(data.clone()),
            2 => ExtentData::Zero,
            _ => continue,
        };
        cache.insert(i * BLOCK, BLOCK, extent, i + 1);
    }

    let mut g = c.benchmark_group("cache_read");
    g.bench_function("hit_4k", |b| b.iter(|| cache.read(black_box(64 * BLOCK), BLOCK)));
    g.bench_function("miss_4k", |b| b.iter(|| cache.read(black_box(4096 * BLOCK), BLOCK)));
    g.bench_function("mixed_64k_unaligned", |b| {
        b.iter(|| cache.read(black_box(100 * BLOCK + 512), 16 * BLOCK))
    });
    g.finish();
}

fn destage(c: &mut Criterion) {
    let data = block_data();
    let mut rng = Rng(2);
    let offsets: Vec<u64> = (0..WRITES).map(|_| rng.below(VOLUME_BLOCKS) * BLOCK).collect();
    let filled = || {
        let mut cache = WriteCache::new();
        for (i, &offset) in offsets.iter().enumerate() {
            cache.insert(offset, BLOCK, ExtentData::Data(data.clone()), i as u64 + 1);
        }
        cache
    };

    let mut g = c.benchmark_group("cache_destage");
    g.throughput(Throughput::Elements(WRITES / 2));
    g.bench_function("half_of_1024", |b| {
        b.iter_batched(
            filled,
            |mut cache| {
                let upto = WRITES / 2;
                let dirty = cache.dirty_up_to(upto);
                cache.mark_destaged(upto);
                (cache, dirty)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn entry_op(c: &mut Criterion) {
    let op = EntryOp {
        epoch: 7,
        op: VolumeOp::Write {
            offset: 123 * BLOCK,
            data: block_data(),
        },
    };
    let encoded = Bytes::from(op.encode());

    let mut g = c.benchmark_group("entry_op");
    g.throughput(Throughput::Bytes(BLOCK));
    g.bench_function("encode_write_4k", |b| b.iter(|| black_box(&op).encode()));
    g.bench_function("decode_write_4k", |b| {
        b.iter(|| EntryOp::decode(black_box(&encoded)).expect("a valid entry"))
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = inserts, reads, destage, entry_op
}
criterion_main!(benches);
