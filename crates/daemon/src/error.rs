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
