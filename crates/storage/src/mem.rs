//! An in-memory block store for unit tests and the simulator. It keeps what
//! is durable apart from what is only written, so a simulated crash can drop
//! unsynced writes, or tear them sector by sector as a power cut may.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;

use crate::{BlockStore, Result, SECTOR_BYTES, ZeroMode};

const PAGE: u64 = SECTOR_BYTES;

#[derive(Clone, Default)]
struct Pages(HashMap<u64, Box<[u8]>>);

impl Pages {
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = offset + pos as u64;
            let (page, within) = (abs / PAGE, (abs % PAGE) as usize);
            let n = (PAGE as usize - within).min(data.len() - pos);
            let p = self
                .0
                .entry(page)
                .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            p[within..within + n].copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
    }

    fn zero(&mut self, offset: u64, length: u64) {
        let mut pos = 0u64;
        while pos < length {
            let abs = offset + pos;
            let (page, within) = (abs / PAGE, (abs % PAGE) as usize);
            let n = (PAGE - within as u64).min(length - pos) as usize;
            if within == 0 && n == PAGE as usize {
                self.0.remove(&page);
            } else if let Some(p) = self.0.get_mut(&page) {
                p[within..within + n].fill(0);
            }
            pos += n as u64;
        }
    }

    fn read(&self, offset: u64, length: usize) -> Vec<u8> {
        let mut out = vec![0u8; length];
        let mut pos = 0usize;
        while pos < length {
            let abs = offset + pos as u64;
            let (page, within) = (abs / PAGE, (abs % PAGE) as usize);
            let n = (PAGE as usize - within).min(length - pos);
            if let Some(p) = self.0.get(&page) {
                out[pos..pos + n].copy_from_slice(&p[within..within + n]);
            }
            pos += n;
        }
        out
    }
}

#[derive(Clone)]
enum Unsynced {
    Write { offset: u64, data: Bytes },
    Zero { offset: u64, length: u64 },
}

/// What a simulated crash does to writes that were not synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Every unsynced write is lost.
    DropUnsynced,
    /// Each sector of each unsynced write survives or not, decided by a
    /// seeded generator, as a power cut may tear a multi-sector write.
    TearUnsynced { seed: u64 },
}

#[derive(Default)]
struct State {
    current: Pages,
    durable: Pages,
    unsynced: Vec<Unsynced>,
    syncs: u64,
}

#[derive(Default)]
pub struct MemStore {
    state: Mutex<State>,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// Simulates a crash and restart: what is visible afterwards is what was
    /// durable plus whatever `mode` lets survive.
    pub fn crash(&self, mode: CrashMode) {
        let mut s = self.state.lock().expect("MemStore lock poisoned");
        let unsynced = std::mem::take(&mut s.unsynced);
        if let CrashMode::TearUnsynced { seed } = mode {
            let mut rng = seed | 1;
            let mut coin = || {
                // xorshift64: deterministic from the seed, no dependency.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng & 1 == 1
            };
            for u in unsynced {
                match u {
                    Unsynced::Write { offset, data } => {
                        let mut pos = 0usize;
                        while pos < data.len() {
                            let abs = offset + pos as u64;
                            let n = ((PAGE - abs % PAGE) as usize).min(data.len() - pos);
                            if coin() {
                                s.durable.write(abs, &data[pos..pos + n]);
                            }
                            pos += n;
                        }
                    }
                    Unsynced::Zero { offset, length } => {
                        if coin() {
                            s.durable.zero(offset, length);
                        }
                    }
                }
            }
        }
        s.current = s.durable.clone();
    }

    /// Number of syncs that reached "disk", for group-commit assertions.
    pub fn sync_count(&self) -> u64 {
        self.state.lock().expect("MemStore lock poisoned").syncs
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().expect("MemStore lock poisoned"))
    }
}

impl BlockStore for MemStore {
    async fn read(&self, offset: u64, length: usize) -> Result<Bytes> {
        Ok(Bytes::from(self.with(|s| s.current.read(offset, length))))
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        self.with(|s| {
            s.current.write(offset, &data);
            s.unsynced.push(Unsynced::Write { offset, data });
        });
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, length: u64, _mode: ZeroMode) -> Result<()> {
        self.with(|s| {
            s.current.zero(offset, length);
            s.unsynced.push(Unsynced::Zero { offset, length });
        });
        Ok(())
    }

    async fn sync(&self) -> Result<()> {
        self.with(|s| {
            s.durable = s.current.clone();
            s.unsynced.clear();
            s.syncs += 1;
        });
        Ok(())
    }

    async fn grow(&self, _size_bytes: u64) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[tokio::test]
    async fn a_crash_loses_exactly_the_unsynced_writes() {
        let m = MemStore::new();
        m.write(0, Bytes::from_static(b"durable")).await.expect("write");
        m.sync().await.expect("sync");
        m.write(100, Bytes::from_static(b"volatile")).await.expect("write");
        assert_eq!(&m.read(100, 8).await.expect("read")[..], b"volatile");
        m.crash(CrashMode::DropUnsynced);
        assert_eq!(&m.read(0, 7).await.expect("read")[..], b"durable");
        assert_eq!(&m.read(100, 8).await.expect("read")[..], &[0u8; 8]);
    }

    #[tokio::test]
    async fn a_torn_crash_keeps_whole_sectors_only() {
        let m = MemStore::new();
        let data = Bytes::from(vec![7u8; 8 * PAGE as usize]);
        m.write(0, data).await.expect("write");
        m.crash(CrashMode::TearUnsynced { seed: 42 });
        let r = m.read(0, 8 * PAGE as usize).await.expect("read");
        for sector in r.chunks(PAGE as usize) {
            assert!(
                sector.iter().all(|b| *b == 7) || sector.iter().all(|b| *b == 0),
                "sector is torn inside"
            );
        }
    }

    proptest! {
        // The page map behaves like a flat byte array (redb's model check, in small).
        #[test]
        fn pages_match_a_flat_model(ops in proptest::collection::vec((0u64..20000, 1usize..9000, any::<u8>(), any::<bool>()), 1..40)) {
            let mut model = vec![0u8; 40000];
            let mut pages = Pages::default();
            for (off, len, byte, zero) in ops {
                if zero {
                    pages.zero(off, len as u64);
                    model[off as usize..off as usize + len].fill(0);
                } else {
                    pages.write(off, &vec![byte; len]);
                    model[off as usize..off as usize + len].fill(byte);
                }
            }
            prop_assert_eq!(pages.read(0, 40000), model);
        }
    }
}
