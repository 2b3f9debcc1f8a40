//! A block store wrapper that injects failures: I/O errors after a
//! countdown of writes, failing syncs, failing reads. Used by unit tests of
//! everything above the store, to prove errors are reported and never
//! swallowed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use bytes::Bytes;

use crate::{BlockStore, Result, StorageError, ZeroMode};

/// Injected failures look exactly like the kernel's: EIO from the same step.
fn eio(op: &'static str, offset: u64, length: u64) -> StorageError {
    StorageError::Io {
        op,
        offset,
        length,
        source: std::io::Error::from_raw_os_error(libc::EIO),
    }
}

/// Shared switches; tests keep a clone and flip them while I/O runs.
#[derive(Debug)]
pub struct Faults {
    /// Writes still allowed before every write fails; negative means never fail.
    pub writes_before_failure: AtomicI64,
    /// The next this many syncs fail.
    pub failing_syncs: AtomicU64,
    pub fail_reads: AtomicBool,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            writes_before_failure: AtomicI64::new(-1),
            failing_syncs: AtomicU64::new(0),
            fail_reads: AtomicBool::new(false),
        }
    }
}

impl Faults {
    fn write_allowed(&self) -> bool {
        let left = self.writes_before_failure.load(Ordering::SeqCst);
        if left < 0 {
            return true;
        }
        if left == 0 {
            return false;
        }
        self.writes_before_failure.fetch_sub(1, Ordering::SeqCst) > 0
    }

    fn sync_fails(&self) -> bool {
        self.failing_syncs
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

pub struct FaultyStore<S> {
    inner: S,
    faults: Arc<Faults>,
}

impl<S: BlockStore> FaultyStore<S> {
    pub fn new(inner: S) -> (FaultyStore<S>, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        (
            FaultyStore {
                inner,
                faults: faults.clone(),
            },
            faults,
        )
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: BlockStore> BlockStore for FaultyStore<S> {
    async fn read(&self, offset: u64, length: usize) -> Result<Bytes> {
        if self.faults.fail_reads.load(Ordering::SeqCst) {
            return Err(eio("read", offset, length as u64));
        }
        self.inner.read(offset, length).await
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        if !self.faults.write_allowed() {
            return Err(eio("write", offset, data.len() as u64));
        }
        self.inner.write(offset, data).await
    }

    async fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode) -> Result<()> {
        if !self.faults.write_allowed() {
            return Err(eio("fallocate", offset, length));
        }
        self.inner.write_zeroes(offset, length, mode).await
    }

    async fn sync(&self) -> Result<()> {
        if self.faults.sync_fails() {
            return Err(StorageError::Sync(std::io::Error::from_raw_os_error(libc::EIO)));
        }
        self.inner.sync().await
    }

    async fn grow(&self, size_bytes: u64) -> Result<()> {
        self.inner.grow(size_bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemStore;

    #[tokio::test]
    async fn writes_fail_after_the_countdown_and_syncs_fail_as_armed() {
        let (s, f) = FaultyStore::new(MemStore::new());
        f.writes_before_failure.store(2, Ordering::SeqCst);
        assert!(s.write(0, Bytes::from_static(b"a")).await.is_ok());
        assert!(s.write(0, Bytes::from_static(b"b")).await.is_ok());
        assert!(s.write(0, Bytes::from_static(b"c")).await.is_err());
        f.failing_syncs.store(1, Ordering::SeqCst);
        assert!(s.sync().await.is_err());
        assert!(s.sync().await.is_ok());
        f.fail_reads.store(true, Ordering::SeqCst);
        assert!(s.read(0, 1).await.is_err());
    }
}
