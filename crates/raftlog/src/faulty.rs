//! A store wrapper that injects I/O errors into writes, to test that every
//! caller surfaces them (an error on the log is fatal for the replica, never
//! ignored).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::{GroupState, GroupWrite, LogError, RaftLogStore};

#[derive(Debug, Default)]
struct FaultState {
    /// Writes still to fail.
    fail_next: u64,
    /// Writes still to succeed before the disk "dies".
    countdown: Option<u64>,
    /// The disk died: every write fails until `heal`.
    dead: bool,
    /// A failed write still reaches the inner store, as when the data was
    /// written but the fdatasync after it failed.
    failed_writes_land: bool,
    injected: u64,
}

/// Switches of a [`FaultyLog`]; apply to `write_batch`, `write_batch_unsynced`, `sync` and
/// `remove_group`.
#[derive(Debug, Default)]
pub struct LogFaults {
    state: Mutex<FaultState>,
}

impl LogFaults {
    fn lock(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails the next `n` writes.
    pub fn fail_next_writes(&self, n: u64) {
        self.lock().fail_next = n;
    }

    /// Lets `n` more writes succeed, then fails every write until [`heal`](Self::heal).
    pub fn fail_after_writes(&self, n: u64) {
        self.lock().countdown = Some(n);
    }

    /// Whether a failed write still reaches the inner store (the write
    /// happened, its fdatasync failed) or not (the write itself failed).
    pub fn set_failed_writes_land(&self, land: bool) {
        self.lock().failed_writes_land = land;
    }

    /// Clears every pending fault.
    pub fn heal(&self) {
        let mut s = self.lock();
        s.fail_next = 0;
        s.countdown = None;
        s.dead = false;
    }

    /// Errors injected so far.
    pub fn injected(&self) -> u64 {
        self.lock().injected
    }

    /// Decides the fate of one write: `Some(lands)` to fail it.
    fn next_write(&self) -> Option<bool> {
        let mut s = self.lock();
        if let Some(left) = s.countdown {
            if left == 0 {
                s.dead = true;
                s.countdown = None;
            } else {
                s.countdown = Some(left - 1);
            }
        }
        let fail = if s.dead {
            true
        } else if s.fail_next > 0 {
            s.fail_next -= 1;
            true
        } else {
            false
        };
        if fail {
            s.injected += 1;
            Some(s.failed_writes_land)
        } else {
            None
        }
    }
}

/// Wraps any [`RaftLogStore`] and fails writes on command.
pub struct FaultyLog<L> {
    inner: L,
    faults: Arc<LogFaults>,
}

impl<L: RaftLogStore> FaultyLog<L> {
    pub fn new(inner: L) -> (FaultyLog<L>, Arc<LogFaults>) {
        let faults = Arc::new(LogFaults::default());
        (
            FaultyLog {
                inner,
                faults: faults.clone(),
            },
            faults,
        )
    }

    pub fn inner(&self) -> &L {
        &self.inner
    }

    fn injected(op: &'static str) -> LogError {
        LogError::Io {
            op,
            path: PathBuf::from("<injected>"),
            source: std::io::Error::other("injected I/O error"),
        }
    }

    fn maybe_fail(&self, op: &'static str, write: impl FnOnce() -> Result<(), LogError>) -> Result<(), LogError> {
        match self.faults.next_write() {
            None => write(),
            Some(true) => {
                // The outcome of the write itself no longer matters: the caller sees the failure.
                let _ = write();
                Err(Self::injected(op))
            }
            Some(false) => Err(Self::injected(op)),
        }
    }
}

impl<L: RaftLogStore> RaftLogStore for FaultyLog<L> {
    fn write_batch(&self, batch: Vec<GroupWrite>) -> Result<(), LogError> {
        self.maybe_fail("write_batch", || self.inner.write_batch(batch))
    }

    fn write_batch_unsynced(&self, batch: Vec<GroupWrite>) -> Result<(), LogError> {
        self.maybe_fail("write_batch_unsynced", || self.inner.write_batch_unsynced(batch))
    }

    fn sync(&self) -> Result<(), LogError> {
        self.maybe_fail("sync", || self.inner.sync())
    }

    fn load(&self, group: u64) -> Result<Option<GroupState>, LogError> {
        self.inner.load(group)
    }

    fn groups(&self) -> Result<Vec<u64>, LogError> {
        self.inner.groups()
    }

    fn remove_group(&self, group: u64) -> Result<(), LogError> {
        self.maybe_fail("remove_group", || self.inner.remove_group(group))
    }

    fn sync_count(&self) -> u64 {
        self.inner.sync_count()
    }

    fn purge(&self) -> Result<Vec<u64>, LogError> {
        self.inner.purge()
    }

    fn new_files(&self) -> u64 {
        self.inner.new_files()
    }
}
