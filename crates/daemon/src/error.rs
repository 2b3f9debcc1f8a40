//! The daemon library's one error type, and its one conversion to a gRPC status.

use std::io;
use std::path::PathBuf;

use trireme_storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("volume \"{0}\" not found")]
    VolumeNotFound(String),
    #[error("volume \"{0}\" already exists")]
    VolumeExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("config {path}: {reason}")]
    Config { path: String, reason: String },
    #[error("data dir {path}: {reason}")]
    DataDir { path: PathBuf, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl DaemonError {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        DaemonError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, DaemonError>;

/// The exit status of a node stopped by a disk error (EX_SOFTWARE).
pub const DISK_ERROR_EXIT_STATUS: i32 = 70;

/// Stops the node at once on a disk error it cannot take back: a failed
/// write or fdatasync of the Raft log, of a volume image or of a state file.
/// After a failed fdatasync the kernel may have dropped the dirty pages, and
/// a later fdatasync can "succeed" with the data gone, so carrying on (or
/// retrying) could acknowledge, or compact the log past, what is not on the
/// disk. The other replicas carry the volumes on; on restart the node
/// recovers from what is durable and catches up.
pub fn exit_on_disk_error(kind: &'static str, message: &str) -> ! {
    // Nothing below may keep the node alive: under the disk-full nemesis a
    // node was seen (twice in ~15 runs) to log this error and then go on
    // serving, its group stuck, without reaching _exit. Whatever blocks
    // this thread, a SIGKILL a moment later ends the process.
    let _ = std::thread::Builder::new().name("trireme-exit".into()).spawn(|| {
        std::thread::sleep(std::time::Duration::from_secs(2));
        // SAFETY: plain syscalls on our own pid.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    });
    metrics::counter!("trireme_disk_errors_total", "kind" => kind).increment(1);
    tracing::error!(kind, "{message}");
    // _exit, not exit: exit runs the C library's and thread-local teardown
    // on this (tokio) thread while every other thread keeps running, and
    // under a disk-full nemesis it was seen to never return, leaving a node
    // that heartbeats but no longer writes. Nothing buffered is lost: the
    // logs go to stderr unbuffered, and durability never rests on a
    // clean exit.
    // SAFETY: _exit takes no pointers and does not return.
    unsafe { libc::_exit(DISK_ERROR_EXIT_STATUS) }
}

impl From<DaemonError> for tonic::Status {
    fn from(e: DaemonError) -> Self {
        use tonic::Status;
        let msg = e.to_string();
        match e {
            DaemonError::VolumeNotFound(_) => Status::not_found(msg),
            DaemonError::VolumeExists(_) => Status::already_exists(msg),
            DaemonError::InvalidArgument(_) => Status::invalid_argument(msg),
            DaemonError::FailedPrecondition(_) => Status::failed_precondition(msg),
            DaemonError::Config { .. }
            | DaemonError::DataDir { .. }
            | DaemonError::Io { .. }
            | DaemonError::Storage(_) => Status::internal(msg),
        }
    }
}
