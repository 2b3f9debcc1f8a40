//! The transport's configuration and its validation.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::TransportError;
use crate::wire::{FRAME_HEADER_BYTES, GROUP_ID_BYTES, MAX_HELLO_FIELD_BYTES};

/// Default bound of one message (a raft message, a forwarded request or
/// reply, a catalog change): 64 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How one node reaches and admits the other nodes of its cluster.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// This node's id (nonzero; also its replica id in every Raft group).
    pub node_id: u64,
    /// The cluster id; a peer of another cluster is refused.
    pub cluster_id: String,
    /// The shared cluster secret: printable ASCII, not empty when there are
    /// peers (with none, nothing is ever admitted). Sent in the clear: there
    /// is no TLS yet.
    pub secret: String,
    /// The other nodes' peer listeners. Only these node ids are admitted by
    /// the server, and only these can be sent to. Must not contain `node_id`.
    pub peers: BTreeMap<u64, SocketAddr>,
    /// Raft messages queued per peer, not yet written to its link, before
    /// `send` drops (default 4096)...
    pub queue_messages_per_peer: usize,
    /// ...or bytes of them (default 128 MiB; at least one maximal message).
    pub queue_bytes_per_peer: usize,
    /// Raft messages received from all peers and not yet taken from the
    /// inbound receiver of [`crate::Transport::start`]; a full queue stops
    /// the links' reads, which pushes back on the peers (default 16384). Unused with a router
    /// ([`crate::Transport::start_routed`]), which never queues here.
    pub inbound_queue_messages: usize,
    /// Bound of one TCP connect plus the Raft link's hello and its answer,
    /// or the HTTP/2 handshake (default 1000 ms).
    pub connect_timeout_ms: u64,
    /// First reconnect delay after a failed connect or a broken link
    /// (default 50 ms); doubles on each further failure...
    pub backoff_initial_ms: u64,
    /// ...up to this (default 1000 ms). Each delay is jittered down to half.
    pub backoff_max_ms: u64,
    /// Deadline of one `forward` or `catalog` call, connect included
    /// (default 10000 ms: a forwarded write may wait out an election).
    pub request_timeout_ms: u64,
    /// Each side of a Raft link sends a PING after this long without
    /// writing, and HTTP/2 PINGs go out this often on the gRPC connections,
    /// to notice a peer that stopped answering (SIGSTOP, dead host) while
    /// TCP stays open (default 1000 ms).
    pub keepalive_interval_ms: u64,
    /// A link that heard nothing for this long, or a gRPC connection whose
    /// PING is not answered within it, is closed (default 3000 ms).
    pub keepalive_timeout_ms: u64,
    /// Bound of one message in bytes, in both directions: one encoded raft
    /// message, one forwarded request or reply, one catalog change
    /// (default [`DEFAULT_MAX_MESSAGE_BYTES`], 64 MiB).
    pub max_message_bytes: usize,
}

impl TransportConfig {
    /// A configuration with the defaults above.
    pub fn new(
        node_id: u64,
        cluster_id: impl Into<String>,
        secret: impl Into<String>,
        peers: BTreeMap<u64, SocketAddr>,
    ) -> TransportConfig {
        TransportConfig {
            node_id,
            cluster_id: cluster_id.into(),
            secret: secret.into(),
            peers,
            queue_messages_per_peer: 4096,
            queue_bytes_per_peer: 128 << 20,
            inbound_queue_messages: 16384,
            connect_timeout_ms: 1000,
            backoff_initial_ms: 50,
            backoff_max_ms: 1000,
            request_timeout_ms: 10_000,
            keepalive_interval_ms: 1000,
            keepalive_timeout_ms: 3000,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }

    /// Checks every field; the error names the bad one.
    pub fn validate(&self) -> Result<(), TransportError> {
        let bad = |field: &str, why: String| Err(TransportError::Config(format!("{field}: {why}")));
        if self.node_id == 0 {
            return bad("node_id", "must not be 0".into());
        }
        if self.cluster_id.is_empty() || !self.cluster_id.bytes().all(is_header_char) {
            return bad("cluster_id", "must be 1 or more printable ASCII characters".into());
        }
        if !self.secret.bytes().all(is_header_char) {
            return bad("secret", "must be printable ASCII characters".into());
        }
        for (field, value) in [("cluster_id", &self.cluster_id), ("secret", &self.secret)] {
            if value.len() > MAX_HELLO_FIELD_BYTES {
                return bad(field, format!("must be at most {MAX_HELLO_FIELD_BYTES} characters"));
            }
        }
        if self.secret.is_empty() && !self.peers.is_empty() {
            return bad("secret", "must not be empty when there are peers".into());
        }
        if self.peers.contains_key(&self.node_id) {
            return bad("peers", format!("contains this node's own id {}", self.node_id));
        }
        if self.peers.contains_key(&0) {
            return bad("peers", "node id 0 is not valid".into());
        }
        if self.queue_messages_per_peer == 0 {
            return bad("queue_messages_per_peer", "must be at least 1".into());
        }
        if self.inbound_queue_messages == 0 {
            return bad("inbound_queue_messages", "must be at least 1".into());
        }
        for (field, v) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("backoff_initial_ms", self.backoff_initial_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            ("keepalive_interval_ms", self.keepalive_interval_ms),
            ("keepalive_timeout_ms", self.keepalive_timeout_ms),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if self.backoff_max_ms < self.backoff_initial_ms {
            return bad(
                "backoff_max_ms",
                format!(
                    "{} is below backoff_initial_ms {}",
                    self.backoff_max_ms, self.backoff_initial_ms
                ),
            );
        }
        if self.max_message_bytes < 1024 || self.max_message_bytes > (1 << 30) {
            return bad(
                "max_message_bytes",
                format!("{} is outside 1 KiB ..= 1 GiB", self.max_message_bytes),
            );
        }
        let frame = FRAME_HEADER_BYTES + GROUP_ID_BYTES + self.max_message_bytes;
        if self.queue_bytes_per_peer < frame {
            return bad(
                "queue_bytes_per_peer",
                format!(
                    "{} is below one maximal message ({frame} bytes with its framing)",
                    self.queue_bytes_per_peer
                ),
            );
        }
        Ok(())
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// The gRPC decoding/encoding limit: one message plus the envelope of a
    /// batch holding just it (so a single maximal raft message still fits).
    pub(crate) fn grpc_message_limit(&self) -> usize {
        self.max_message_bytes + ENVELOPE_BYTES
    }
}

/// Room for protobuf framing around one maximal payload.
pub(crate) const ENVELOPE_BYTES: usize = 1024;

/// Visible ASCII (what an HTTP/2 header value may carry unchanged).
fn is_header_char(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}
