//! The node-wide Raft log: one durable log for every Raft group on a node
//! (each volume is a group, and so is the cluster metadata group).
//!
//! It owns, per group: the Raft entries not yet compacted, the `HardState`,
//! the `ConfState` and the destaged index (the highest index the volume image
//! durably holds). The appends of all groups that are ready at the same time
//! go out as one write and one fdatasync (group commit): that is what makes
//! many volumes on one node cheap.
//!
//! What drives it: the daemon's log writer threads. Each round collects the
//! replicas' `PersistTask`s, writes them with
//! [`RaftLogStore::write_batch_unsynced`] and makes them durable with
//! [`RaftLogStore::sync`], and only then reports the tasks as persisted; the
//! next round's write overlaps this one's sync. At startup the daemon
//! calls [`RaftLogStore::groups`] and [`RaftLogStore::load`] to restart each
//! replica.
//!
//! What it must never depend on: the network, NBD, the replica state machine
//! or the daemon. It knows raft-rs's message types and the disk, nothing else,
//! so that it can be tested (and crashed) on its own.
//!
//! Implementations: [`EngineLog`] (production, TiKV's raft-engine), [`MemLog`]
//! (in memory, crashable, for unit tests and the simulator) and [`FaultyLog`]
//! (wraps either, injects I/O errors). With the `failpoints` feature the
//! engine also carries the [`failpoints`] that triremed's fault-injection
//! API configures in a running node.

mod codec;
mod engine;
mod error;
pub mod failpoints;
mod faulty;
mod mem;
mod plan;
mod verify;
mod writer;

#[cfg(test)]
mod tests;

pub use engine::{EngineLog, EngineLogConfig};
pub use error::LogError;
pub use faulty::{FaultyLog, LogFaults};
pub use mem::MemLog;

pub use raft::eraftpb::{ConfState, Entry, HardState};

/// Largest entry payload (data + context) the log accepts: a 32 MiB NBD write
/// plus its header, with room to spare. Larger entries are refused, never
/// split: an entry is the unit Raft replicates.
pub const MAX_ENTRY_BYTES: usize = 33 * 1024 * 1024;

/// Largest `write_batch` (sum of entry payloads plus a small per-entry and
/// per-value allowance) the log accepts in one call, and the most the writer
/// merges into one disk write. Bounds the writer's memory and the latency of
/// one fdatasync.
pub const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;

/// One group's durable Raft state, as loaded at startup.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupState {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    /// The image durably holds everything up to here; entries after it are
    /// replayed into the write-back cache.
    pub destaged_index: u64,
    /// Every entry still in the log, in index order (contiguous).
    pub entries: Vec<Entry>,
}

/// What one group wants made durable in a batch.
///
/// Within one write, entries are applied first (replacing stored entries at
/// and after the first new index), then the values, then `compact_to`. A
/// write whose entries would leave a gap after the stored ones is refused,
/// unless `compact_to` reaches the first new entry (installing a snapshot:
/// the old entries all go).
#[derive(Debug, Clone, Default)]
pub struct GroupWrite {
    pub group: u64,
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    pub conf_state: Option<ConfState>,
    pub destaged_index: Option<u64>,
    /// Drop entries below this index.
    pub compact_to: Option<u64>,
}

impl GroupWrite {
    /// True when the write carries nothing to store.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && self.hard_state.is_none()
            && self.conf_state.is_none()
            && self.destaged_index.is_none()
            && self.compact_to.is_none()
    }
}

/// The node-wide Raft log of every group.
pub trait RaftLogStore: Send + Sync + 'static {
    /// Durably applies every write (one write + one fdatasync for the whole batch). Entries for a group
    /// replace any stored entries at index >= the first new entry's index (Raft log truncation).
    /// compact_to(i) drops entries below i. Blocking: called from a dedicated log writer thread.
    ///
    /// All or nothing per call: a refused write (too large, not contiguous,
    /// a gap, below the compacted index) stores none of the batch.
    fn write_batch(&self, batch: Vec<GroupWrite>) -> Result<(), LogError>;

    /// Like [`RaftLogStore::write_batch`], without the fdatasync: the writes
    /// become durable with the next synced write. Only for what Raft allows
    /// to be lost in a crash (a HardState whose only change is the commit
    /// index: raft-rs's `Ready::must_sync` is false). Stores that cannot
    /// tell the difference sync anyway.
    fn write_batch_unsynced(&self, batch: Vec<GroupWrite>) -> Result<(), LogError> {
        self.write_batch(batch)
    }

    /// Makes durable every write that returned before this call (one
    /// fdatasync), so that a writer can write its next batch unsynced while
    /// this one syncs: the two overlap instead of taking turns. May run on
    /// another thread at the same time as a write. An error is fatal for the
    /// store, as a failed `write_batch` sync is. Stores whose unsynced
    /// writes are synced anyway have nothing to do.
    fn sync(&self) -> Result<(), LogError> {
        Ok(())
    }

    /// The group's durable state, or `None` if the log holds nothing of it.
    fn load(&self, group: u64) -> Result<Option<GroupState>, LogError>;

    /// Every group the log holds something of, in ascending order.
    fn groups(&self) -> Result<Vec<u64>, LogError>;

    /// Removes everything of a group (volume deleted or replica moved away), durably.
    fn remove_group(&self, group: u64) -> Result<(), LogError>;

    /// fdatasyncs issued so far (to show group commit in tests and metrics).
    fn sync_count(&self) -> u64;

    /// Reclaims disk space of compacted entries, if the store needs to.
    /// Returns groups that hold old entries back and should compact. Call it
    /// from a background thread now and then, not from the writer.
    fn purge(&self) -> Result<Vec<u64>, LogError> {
        Ok(Vec::new())
    }

    /// Log files created since the open because no purged file was free to
    /// recycle. Each costs a whole file of zeroes written and synced before
    /// use, so a store kept in step by `purge` creates none under steady
    /// writes.
    fn new_files(&self) -> u64 {
        0
    }
}

impl<T: RaftLogStore + ?Sized> RaftLogStore for std::sync::Arc<T> {
    fn write_batch(&self, batch: Vec<GroupWrite>) -> Result<(), LogError> {
        (**self).write_batch(batch)
    }
    fn write_batch_unsynced(&self, batch: Vec<GroupWrite>) -> Result<(), LogError> {
        (**self).write_batch_unsynced(batch)
    }
    fn sync(&self) -> Result<(), LogError> {
        (**self).sync()
    }
    fn load(&self, group: u64) -> Result<Option<GroupState>, LogError> {
        (**self).load(group)
    }
    fn groups(&self) -> Result<Vec<u64>, LogError> {
        (**self).groups()
    }
    fn remove_group(&self, group: u64) -> Result<(), LogError> {
        (**self).remove_group(group)
    }
    fn sync_count(&self) -> u64 {
        (**self).sync_count()
    }
    fn purge(&self) -> Result<Vec<u64>, LogError> {
        (**self).purge()
    }
    fn new_files(&self) -> u64 {
        (**self).new_files()
    }
}
