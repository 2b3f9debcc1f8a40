//! Trireme's storage layer.
//!
//! Owns: the [`BlockStore`] trait (a volume image: positional reads and
//! writes, zeroing, and durable sync) with three implementations:
//! [`uring::UringStore`] (production: a sparse image file driven by a
//! node-wide io_uring thread with group commit), [`mem::MemStore`] (unit
//! tests and simulation; it can "crash" and lose or tear unsynced writes),
//! and [`fault::FaultyStore`] (injects I/O and sync errors around any store).
//! Also the allocation units of sparse images ([`alloc`]: the first write
//! into a unit allocates all of it, so random writes leave no scattered
//! blocks behind), the checksummed state-file format ([`statefile`]), and,
//! with the `failpoints` feature, the image and state-file [`failpoints`]
//! that triremed's fault-injection API configures in a running node.
//! Driven by: the daemon's volume layer (and, later, the replica's destager).
//! Must never depend on: the network, NBD, Raft or gRPC. This crate knows
//! bytes and files, nothing about who asked for them.

pub mod alloc;
pub mod failpoints;
pub mod fault;
pub mod mem;
pub mod statefile;
pub mod uring;

use std::future::Future;
use std::io;
use std::path::PathBuf;

use bytes::Bytes;

/// Media assumptions this layer is built on (also in the README):
/// fdatasync makes prior writes durable; an aligned 4 KiB sector write may
/// tear across sectors on power loss; the disk can fail, and an error is
/// reported, never ignored.
pub const SECTOR_BYTES: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{op} at offset {offset} length {length}: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        length: u64,
        #[source]
        source: io::Error,
    },
    #[error("fdatasync failed: {0}")]
    Sync(#[source] io::Error),
    #[error("the filesystem cannot {0} in place")]
    Unsupported(&'static str),
    #[error("the I/O engine has stopped")]
    EngineStopped,
    #[error("io_uring setup failed: {0}")]
    UringSetup(#[source] io::Error),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state file {path}: {reason}")]
    StateFile { path: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// How a range should be zeroed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMode {
    /// Deallocate the range (punch a hole); it reads back as zeroes.
    Punch,
    /// Keep the range allocated and write zeroes (NBD's NO_HOLE).
    Allocate,
}

/// One volume image. Writes are visible to reads once they return; they are
/// durable only after a later [`BlockStore::sync`] returns. Concurrent syncs
/// may share one fdatasync (group commit): a sync covers every write that
/// completed before the sync was called.
pub trait BlockStore: Send + Sync + 'static {
    fn read(&self, offset: u64, length: usize) -> impl Future<Output = Result<Bytes>> + Send;
    fn write(&self, offset: u64, data: Bytes) -> impl Future<Output = Result<()>> + Send;
    /// Writes and makes the write durable (a group-committed fdatasync)
    /// before returning. A failed fdatasync is [`StorageError::Sync`]: after
    /// it the caller can no longer trust the store's durability.
    fn write_durable(&self, offset: u64, data: Bytes) -> impl Future<Output = Result<()>> + Send {
        async move {
            self.write(offset, data).await?;
            self.sync().await
        }
    }
    /// Writes many disjoint extents, not durable until a later
    /// [`BlockStore::sync`]. A destage hands over thousands of small extents
    /// at once; a store that can write them without a round trip each
    /// overrides this.
    fn write_many(&self, extents: Vec<(u64, Bytes)>) -> impl Future<Output = Result<()>> + Send {
        async move {
            for (offset, data) in extents {
                self.write(offset, data).await?;
            }
            Ok(())
        }
    }
    /// May fail with [`StorageError::Unsupported`] when the filesystem can't
    /// zero without writing; the caller then writes zeroes itself.
    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode) -> impl Future<Output = Result<()>> + Send;
    fn sync(&self) -> impl Future<Output = Result<()>> + Send;
    /// Grows the image to `size_bytes` (never shrinks) and makes the new size durable.
    fn grow(&self, size_bytes: u64) -> impl Future<Output = Result<()>> + Send;
}
