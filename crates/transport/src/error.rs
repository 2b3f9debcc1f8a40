//! The crate's one error type.

/// Why a transport call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// A configuration field is invalid; the message names it.
    #[error("invalid transport config: {0}")]
    Config(String),
    /// The node id is not one of the configured peers.
    #[error("node {0} is not a configured peer")]
    UnknownPeer(u64),
    /// The peer did not answer within the request deadline.
    #[error("peer {peer} did not answer within {timeout_ms} ms")]
    Timeout { peer: u64, timeout_ms: u64 },
    /// The peer could not be reached (connect failed, connection lost).
    #[error("peer {peer} unreachable: {message}")]
    Unreachable { peer: u64, message: String },
    /// The peer answered with a gRPC error status.
    #[error("peer {peer} answered {code:?}: {message}")]
    Status {
        peer: u64,
        code: tonic::Code,
        message: String,
    },
    /// An injected network fault rule (the `faults` feature) was refused;
    /// the message names the field or peer.
    #[error("invalid network fault rule: {0}")]
    FaultRule(String),
    /// A peer broke the Raft link's wire protocol; the message says how.
    #[error("raft link protocol: {0}")]
    Protocol(String),
    /// The peer listener could not be served.
    #[error("peer listener: {0}")]
    Listener(String),
    /// The request is larger than the message bound.
    #[error("message of {bytes} bytes exceeds the limit of {limit} bytes")]
    TooLarge { bytes: usize, limit: usize },
}

impl TransportError {
    pub(crate) fn from_status(peer: u64, timeout_ms: u64, status: tonic::Status) -> TransportError {
        match status.code() {
            tonic::Code::DeadlineExceeded => TransportError::Timeout { peer, timeout_ms },
            // The receiver enforces the `grpc-timeout` the request carries.
            tonic::Code::Cancelled if status.message() == tonic::TimeoutExpired(()).to_string() => {
                TransportError::Timeout { peer, timeout_ms }
            }
            tonic::Code::Unavailable => TransportError::Unreachable {
                peer,
                message: status.message().to_string(),
            },
            code => TransportError::Status {
                peer,
                code,
                message: status.message().to_string(),
            },
        }
    }
}
