//! The NBD protocol for Trireme.
//!
//! Owns: the wire format (`codec`, pure functions: parse returns
//! "incomplete" until a frame is whole), the handshake, and a tokio server
//! that pipelines requests and replies out of order by handle (`server`).
//! Driven by: the daemon, which hands it listeners and an [`ExportRegistry`].
//! Must never depend on: Raft, storage or any other Trireme crate. What a
//! "block device" is behind an export is the caller's business; this crate
//! only speaks NBD.

pub mod codec;
pub mod server;

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
pub use codec::Errno;
pub use server::{Server, ServerConfig};

/// An error a device reports for one request; sent to the client as an NBD
/// error (with the message when structured replies are on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (NBD errno {errno:?})")]
pub struct DeviceError {
    pub errno: Errno,
    pub message: String,
}

impl DeviceError {
    pub fn new(errno: Errno, message: impl Into<String>) -> Self {
        DeviceError {
            errno,
            message: message.into(),
        }
    }
}

pub type DeviceResult<T> = Result<T, DeviceError>;

/// The block device behind one NBD session. Ranges are already checked
/// against the size the session negotiated. A successful reply promises what
/// the NBD flags advertised: with FUA or after FLUSH, the data is durable.
pub trait BlockDevice: Send + Sync + 'static {
    fn read(&self, offset: u64, length: u32) -> impl Future<Output = DeviceResult<Bytes>> + Send;
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = DeviceResult<()>> + Send;
    /// `may_trim`: a hole may be punched (NO_HOLE was not set).
    /// `fast_only`: fail with `Errno::NotSup` rather than write zeroes slowly.
    fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        may_trim: bool,
        fast_only: bool,
        fua: bool,
    ) -> impl Future<Output = DeviceResult<()>> + Send;
    fn trim(&self, offset: u64, length: u32, fua: bool) -> impl Future<Output = DeviceResult<()>> + Send;
    /// Every write acknowledged before this call is durable when it returns.
    fn flush(&self) -> impl Future<Output = DeviceResult<()>> + Send;
    /// A hint to prefetch; the default does nothing, which the spec allows.
    fn cache(&self, _offset: u64, _length: u32) -> impl Future<Output = DeviceResult<()>> + Send {
        async { Ok(()) }
    }
}

/// What a client can learn about an export before opening it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size_bytes: u64,
}

/// An export opened for one session.
pub struct OpenedExport<D> {
    pub info: ExportInfo,
    pub device: Arc<D>,
    /// Becomes `true` when the owner wants the session gone (the volume is
    /// deleted, or a newer writer was attached elsewhere). The session stops
    /// reading requests, finishes those in flight, and closes.
    pub revoked: tokio::sync::watch::Receiver<bool>,
}

/// The exports a server offers.
pub trait ExportRegistry: Send + Sync + 'static {
    type Device: BlockDevice;
    fn list(&self) -> Vec<ExportInfo>;
    fn describe(&self, name: &str) -> Option<ExportInfo>;
    /// Opens the export for a session; the device handle lives as long as
    /// the session (its drop is the session's end).
    fn open(&self, name: &str) -> Result<OpenedExport<Self::Device>, String>;
}
