//! The peer transport between the triremed nodes of one cluster.
//!
//! Owns: the Raft links (one TCP connection per ordered node pair carrying
//! the Raft messages of every group, in the length-prefixed format of
//! [`wire`]; see there for why it is not gRPC), the `trireme.v1.PeerService`
//! gRPC calls on the same listener (forwarding volume I/O to a group's
//! leader, pushing catalog changes; see `proto/trireme/v1/peer.proto`),
//! lazy connect and reconnect with capped exponential backoff and jitter,
//! keepalive on both, authentication of every link and call (cluster id,
//! shared secret compared in constant time, node id among the configured
//! peers), size bounds on every message and queue, and the transport's
//! metrics. With the `faults` feature (tests only: triremed's `failpoints`
//! feature turns it on) it also owns [`NetFaults`], a rule table per
//! destination peer that drops, loses, delays or duplicates the outgoing
//! Raft messages and unary calls; without it no fault code is compiled in.
//!
//! Driven by: the daemon, which calls [`Transport::start_routed`] inside its
//! tokio runtime with a router that hands each inbound Raft message to its
//! replica, runs the returned [`PeerServer`] on its peer listener, calls
//! [`Transport::send`] (from group tasks and log writer threads alike) with
//! each replica's outgoing Raft messages, reports
//! [`Transport::take_unreachable`] to raft, and implements [`PeerHandler`]
//! for forwarded requests and catalog changes.
//!
//! Must never depend on: NBD, storage, the replica state machine or the
//! daemon's internals. It moves opaque raft messages and protocol structs;
//! what they mean is the caller's business.

mod config;
mod error;
#[cfg(feature = "faults")]
mod faults;
mod inbound;
mod link;
mod outbox;
mod server;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use trireme_proto::v1::peer_service_client::PeerServiceClient;
use trireme_proto::v1::peer_service_server::PeerServiceServer;

pub use crate::config::{DEFAULT_MAX_MESSAGE_BYTES, TransportConfig};
pub use crate::error::TransportError;
#[cfg(feature = "faults")]
pub use crate::faults::{InjectedFaults, MAX_DELAY_MS, NetFaults, NetRule};
pub use crate::inbound::InboundRouter;
pub use crate::server::{Authenticator, CLUSTER_HEADER, NODE_HEADER, PeerServer, SECRET_HEADER};
pub use trireme_proto::v1::{CatalogChange, ForwardReply, ForwardRequest};

use crate::inbound::{InboundSink, Links};
use crate::link::{Link, LinkConfig};
use crate::server::{ClientAuth, PeerServiceImpl};

/// `ForwardRequest::op` values.
pub mod op {
    /// A linearizable read (ReadIndex on the receiving replica).
    pub const READ: u32 = 0;
    pub const WRITE: u32 = 1;
    pub const WRITE_ZEROES: u32 = 2;
    pub const TRIM: u32 = 3;
    pub const FLUSH: u32 = 4;
    /// Read the applied state once it reaches index `epoch`: snapshot copies only.
    pub const READ_LOCAL: u32 = 5;
    /// Attach the volume to node `offset` (a new writer epoch).
    pub const ATTACH: u32 = 6;
    /// The group's status as JSON in the reply's data (leader only).
    pub const STATUS: u32 = 7;
    /// Epoch and attached node as of log index `offset`, as JSON.
    pub const EPOCH_AT: u32 = 8;
}

/// A Raft message received from a peer. `message.from == from` and
/// `message.to` is this node: the transport drops any other.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub from: u64,
    pub group_id: u64,
    pub message: raft::eraftpb::Message,
}

/// What the daemon implements for requests that arrive from peers. `from`
/// is the authenticated sender. The transport bounds sizes; the handler
/// validates contents (op, ranges, names).
#[tonic::async_trait]
pub trait PeerHandler: Send + Sync + 'static {
    async fn forward(&self, from: u64, req: ForwardRequest) -> ForwardReply;
    async fn catalog(&self, from: u64, change: CatalogChange) -> Result<(), Status>;
}

/// Counters of one peer's sending side, since [`Transport::start`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Raft messages queued for the peer's link.
    pub messages_sent: u64,
    /// Raft messages dropped: queue full, peer unreachable, oversized.
    pub messages_dropped: u64,
    /// Writes to the link's socket (each carries every message queued
    /// when it was made).
    pub writes: u64,
    /// Links opened (connections the peer accepted).
    pub connects: u64,
    /// Links opened after an earlier one ended.
    pub reconnects: u64,
    /// Connection attempts that failed or were refused.
    pub connect_failures: u64,
    /// Open links that broke.
    pub stream_breaks: u64,
}

/// A cloneable handle on the node's peer transport. The link tasks end
/// when every handle is dropped, or at [`Transport::shutdown`].
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: u64,
    peers: BTreeMap<u64, PeerLink>,
    unreachable: Arc<Mutex<BTreeSet<u64>>>,
    unknown_dropped: AtomicU64,
    auth: ClientAuth,
    request_timeout: Duration,
    max_message_bytes: usize,
    shutdown: watch::Sender<bool>,
    #[cfg(feature = "faults")]
    faults: Arc<NetFaults>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

struct PeerLink {
    link: Arc<Link>,
    /// For forward and catalog calls: a gRPC connection of its own, made
    /// lazily and remade by tonic, so busy Raft traffic never delays them.
    client: PeerServiceClient<Channel>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("node_id", &self.inner.node_id)
            .field("peers", &self.inner.peers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// Starts a link task per peer (connecting lazily, on its first
    /// message; reconnecting with exponential backoff and jitter). Returns
    /// the handle, the inbound Raft receiver (bounded by
    /// `inbound_queue_messages`: a full one stops reading the links, which
    /// pushes back on the peers) and the server to run on the node's peer
    /// listener. Must be called inside a tokio runtime; the error names a
    /// bad config field.
    pub fn start<H: PeerHandler>(
        config: TransportConfig,
        handler: Arc<H>,
    ) -> Result<(Transport, mpsc::Receiver<Inbound>, PeerServer<H>), TransportError> {
        let (inbound_tx, inbound_rx) = mpsc::channel(config.inbound_queue_messages);
        let (transport, server) = Transport::start_with(config, handler, InboundSink::Queue(inbound_tx))?;
        Ok((transport, inbound_rx, server))
    }

    /// Like [`Transport::start`], but each inbound Raft message goes to
    /// `router`, called on the receiving link's task, instead of a queue:
    /// the daemon's way, one task hand-off fewer per message.
    pub fn start_routed<H: PeerHandler>(
        config: TransportConfig,
        handler: Arc<H>,
        router: InboundRouter,
    ) -> Result<(Transport, PeerServer<H>), TransportError> {
        Transport::start_with(config, handler, InboundSink::Router(router))
    }

    fn start_with<H: PeerHandler>(
        config: TransportConfig,
        handler: Arc<H>,
        inbound: InboundSink,
    ) -> Result<(Transport, PeerServer<H>), TransportError> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| TransportError::Config("Transport::start must be called inside a tokio runtime".into()))?;
        let auth = ClientAuth::new(config.node_id, &config.cluster_id, &config.secret)?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let unreachable = Arc::new(Mutex::new(BTreeSet::new()));
        let grpc_limit = config.grpc_message_limit();
        #[cfg(feature = "faults")]
        let faults = Arc::new(NetFaults::new(config.node_id, config.peers.keys().copied()));
        let mut hello = Vec::new();
        wire::encode_hello(
            &mut hello,
            &wire::Hello {
                node_id: config.node_id,
                cluster_id: config.cluster_id.as_bytes().to_vec(),
                secret: config.secret.as_bytes().to_vec(),
            },
        )?;
        let hello = bytes::Bytes::from(hello);

        let mut peers = BTreeMap::new();
        for (&peer, addr) in &config.peers {
            let link = Arc::new(Link::new(
                LinkConfig {
                    peer,
                    node_id: config.node_id,
                    addr: *addr,
                    hello: hello.clone(),
                    max_message_bytes: config.max_message_bytes,
                    queue_messages: config.queue_messages_per_peer,
                    queue_bytes: config.queue_bytes_per_peer,
                    connect_timeout: config.connect_timeout(),
                    keepalive_interval: Duration::from_millis(config.keepalive_interval_ms),
                    keepalive_timeout: Duration::from_millis(config.keepalive_timeout_ms),
                    backoff: (
                        Duration::from_millis(config.backoff_initial_ms),
                        Duration::from_millis(config.backoff_max_ms),
                    ),
                },
                unreachable.clone(),
                #[cfg(feature = "faults")]
                faults.clone(),
            ));
            runtime.spawn(link::run(link.clone(), shutdown_rx.clone()));
            let client = PeerServiceClient::new(endpoint(&config, *addr)?.connect_lazy())
                .max_encoding_message_size(grpc_limit)
                .max_decoding_message_size(grpc_limit);
            peers.insert(peer, PeerLink { link, client });
        }

        let grpc = PeerServiceServer::new(PeerServiceImpl::new(handler))
            .max_decoding_message_size(grpc_limit)
            .max_encoding_message_size(grpc_limit);
        let authenticator = Authenticator::new(
            config.node_id,
            &config.cluster_id,
            &config.secret,
            config.peers.keys().copied().collect(),
        );
        let grpc = tonic::service::interceptor::InterceptedService::new(grpc, authenticator.clone());
        let links = Links {
            node_id: config.node_id,
            auth: authenticator,
            sink: inbound,
            max_message_bytes: config.max_message_bytes,
            handshake_timeout: config.connect_timeout().max(Duration::from_secs(1)),
            keepalive_interval: Duration::from_millis(config.keepalive_interval_ms),
            keepalive_timeout: Duration::from_millis(config.keepalive_timeout_ms),
            shutdown: shutdown_rx,
        };
        let server = PeerServer::new(
            grpc,
            links,
            Duration::from_millis(config.keepalive_interval_ms),
            Duration::from_millis(config.keepalive_timeout_ms),
        );

        let transport = Transport {
            inner: Arc::new(Inner {
                node_id: config.node_id,
                peers,
                unreachable,
                unknown_dropped: AtomicU64::new(0),
                auth,
                request_timeout: config.request_timeout(),
                max_message_bytes: config.max_message_bytes,
                shutdown,
                #[cfg(feature = "faults")]
                faults,
            }),
        };
        Ok((transport, server))
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.inner.node_id
    }

    /// Sends a Raft message to peer `to`; never blocks. When the link is
    /// free the message is written to its socket by the caller, at once;
    /// otherwise it is queued behind what waits. Past the queue's bounds
    /// the message is dropped, counted, and the peer is reported by
    /// [`Transport::take_unreachable`] (Raft retransmits). A message for a
    /// node that is not a configured peer is dropped and counted too.
    pub fn send(&self, to: u64, group_id: u64, message: raft::eraftpb::Message) {
        if let Some(link) = self.link(to, group_id) {
            link.send(group_id, &message);
        }
    }

    /// Sends many messages of one group, each to its `to`, with one write
    /// per peer.
    pub fn send_all(&self, group_id: u64, messages: &[raft::eraftpb::Message]) {
        // A cluster has a handful of peers: one pass over the messages per
        // peer, and no allocation on this path of every write.
        for (&to, peer) in &self.inner.peers {
            if messages.iter().any(|m| m.to == to) {
                peer.link
                    .send_many(messages.iter().filter(|m| m.to == to).map(|m| (group_id, m)));
            }
        }
        for m in messages.iter().filter(|m| !self.inner.peers.contains_key(&m.to)) {
            self.unknown_peer(m.to, group_id);
        }
    }

    fn link(&self, to: u64, group_id: u64) -> Option<&Link> {
        match self.inner.peers.get(&to) {
            Some(peer) => Some(&peer.link),
            None => {
                self.unknown_peer(to, group_id);
                None
            }
        }
    }

    /// Counts a message dropped because `to` is not a peer.
    fn unknown_peer(&self, to: u64, group_id: u64) {
        self.inner.unknown_dropped.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("trireme_transport_messages_dropped_total", "peer" => to.to_string(), "reason" => "unknown_peer")
            .increment(1);
        tracing::debug!(
            node = self.inner.node_id,
            to,
            group_id,
            "raft message for an unknown peer dropped"
        );
    }

    /// Peers whose link broke, whose connection failed, or whose queue
    /// overflowed since the last call, so the caller can
    /// `report_unreachable` them to raft. Ascending node ids.
    pub fn take_unreachable(&self) -> Vec<u64> {
        let mut set = self.inner.unreachable.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut *set).into_iter().collect()
    }

    /// Forwards one volume request to peer `to` and waits for its reply, at
    /// most `request_timeout_ms`.
    pub async fn forward(&self, to: u64, req: ForwardRequest) -> Result<ForwardReply, TransportError> {
        self.unary(
            to,
            req,
            |mut client, request| async move { client.forward(request).await },
        )
        .await
    }

    /// Pushes a catalog change to peer `to` and waits until it is applied
    /// there, at most `request_timeout_ms`.
    pub async fn catalog(&self, to: u64, change: CatalogChange) -> Result<(), TransportError> {
        self.unary(to, change, |mut client, request| async move {
            client.catalog(request).await
        })
        .await
        .map(|_| ())
    }

    async fn unary<T, R, F, Fut>(&self, to: u64, message: T, call: F) -> Result<R, TransportError>
    where
        T: prost::Message,
        F: FnOnce(PeerServiceClient<Channel>, Request<T>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let link = self.inner.peers.get(&to).ok_or(TransportError::UnknownPeer(to))?;
        let bytes = message.encoded_len();
        if bytes > self.inner.max_message_bytes {
            return Err(TransportError::TooLarge {
                bytes,
                limit: self.inner.max_message_bytes,
            });
        }
        let timeout = self.inner.request_timeout;
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let mut request = self.inner.auth.request(message);
        request.set_timeout(timeout);
        let call = call(link.client.clone(), request);
        // An injected delay counts against the call's deadline, as time on
        // a slow network would.
        #[cfg(feature = "faults")]
        let call = {
            let delay = self.inner.faults.on_call(to)?;
            async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                call.await
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(TransportError::Timeout { peer: to, timeout_ms }),
            Ok(Err(status)) => Err(TransportError::from_status(to, timeout_ms, status)),
            Ok(Ok(response)) => Ok(response.into_inner()),
        }
    }

    /// Sending-side counters of peer `to`, None if it is not a peer.
    pub fn peer_stats(&self, to: u64) -> Option<PeerStats> {
        self.inner.peers.get(&to).map(|l| l.link.counters.snapshot())
    }

    /// The injected network fault rules of this node (the `faults` feature).
    #[cfg(feature = "faults")]
    pub fn net_faults(&self) -> &Arc<NetFaults> {
        &self.inner.faults
    }

    /// Raft messages dropped because their destination is not a peer.
    pub fn unknown_peer_dropped(&self) -> u64 {
        self.inner.unknown_dropped.load(Ordering::Relaxed)
    }

    /// Ends every link task (closing its connection) and every inbound
    /// link this node's [`PeerServer`] is serving. Forward and catalog
    /// calls still work until the server stops.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }
}

/// The endpoint of one peer: connect timeout, HTTP/2 keepalive (notices a
/// stopped peer whose TCP connection stays open), no Nagle.
fn endpoint(config: &TransportConfig, addr: SocketAddr) -> Result<Endpoint, TransportError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| TransportError::Config(format!("peers: address {addr}: {e}")))?;
    Ok(endpoint
        .connect_timeout(config.connect_timeout())
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_millis(config.keepalive_interval_ms))
        .keep_alive_timeout(Duration::from_millis(config.keepalive_timeout_ms))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES))
}

/// HTTP/2 flow-control windows. h2's default of 64 KiB makes a forwarded
/// 1 MiB write wait for 16 window updates.
const STREAM_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
const CONNECTION_WINDOW_BYTES: u32 = 64 * 1024 * 1024;

/// The largest HTTP/2 frame each side accepts. h2's default of 16 KiB
/// splits a forwarded 1 MiB write into 64 DATA frames, each read and
/// written by its own syscall; 256 KiB frames move it in four.
const MAX_FRAME_BYTES: u32 = 256 * 1024;

#[cfg(test)]
mod tests {
    #[test]
    fn handles_cross_threads() {
        fn send_sync<T: Send + Sync + Clone>() {}
        send_sync::<super::Transport>();
    }
}
