use std::path::PathBuf;

/// Everything that can go wrong with the node-wide Raft log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log directory could not be opened or recovered.
    #[error("raft log {dir}: cannot open: {reason}")]
    Open { dir: PathBuf, reason: String },

    /// A checksum or framing error that is not a torn tail: refuse to start.
    #[error("raft log file {file}: corrupt at offset {offset}: {reason}")]
    Corrupt { file: PathBuf, offset: u64, reason: String },

    /// A stored value (hard state, conf state, destaged index) is unreadable.
    #[error("raft log: group {group}: stored {key} is corrupt: {reason}")]
    BadValue {
        group: u64,
        key: &'static str,
        reason: String,
    },

    /// A stored entry could not be read back.
    #[error("raft log: group {group}: reading entries {first}..={last} failed: {reason}")]
    ReadEntries {
        group: u64,
        first: u64,
        last: u64,
        reason: String,
    },

    /// A value could not be encoded (never expected for raft's own messages).
    #[error("raft log: group {group}: encoding {key} failed: {reason}")]
    Encode {
        group: u64,
        key: &'static str,
        reason: String,
    },

    #[error("raft log: group {group}: entry {index} is {bytes} bytes, the limit is {max}")]
    EntryTooLarge {
        group: u64,
        index: u64,
        bytes: usize,
        max: usize,
    },

    #[error("raft log: a batch of {bytes} bytes exceeds the limit of {max}")]
    BatchTooLarge { bytes: usize, max: usize },

    /// Entries of one group in one write must be contiguous and start at 1 or more.
    #[error("raft log: group {group}: entry {index} found where entry {expected} was expected")]
    NotContiguous { group: u64, index: u64, expected: u64 },

    /// The new entries would leave a gap after the stored ones.
    #[error("raft log: group {group}: entries start at {index} but the log ends at {last_index}")]
    Gap { group: u64, index: u64, last_index: u64 },

    /// The new entries would rewrite entries already compacted away.
    #[error("raft log: group {group}: entries start at {index}, below the first stored entry {first_index}")]
    BelowCompacted { group: u64, index: u64, first_index: u64 },

    /// The disk write failed; nothing of the batch was applied.
    #[error("raft log {dir}: write failed: {reason}")]
    Write { dir: PathBuf, reason: String },

    /// An fdatasync (or another step raft-engine cannot take back) failed.
    /// What reached the disk is unknown, so the log takes no more writes
    /// until the process restarts and recovers from the disk.
    #[error("raft log {dir}: failed and takes no more requests until restart: {reason}")]
    Failed { dir: PathBuf, reason: String },

    /// An I/O error (also what [`crate::FaultyLog`] injects).
    #[error("raft log: {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The log was shut down.
    #[error("raft log {dir}: closed")]
    Closed { dir: PathBuf },
}
