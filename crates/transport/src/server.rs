//! The receiving side: authentication of every call (an interceptor, so it
//! runs on the request headers before any message is read) and the
//! `PeerService` implementation that hands Raft messages to the inbound
//! queue and requests to the [`PeerHandler`].

use std::collections::BTreeSet;
use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::sync::{mpsc, watch};
use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};
use trireme_proto::v1::peer_service_server::{PeerService, PeerServiceServer};
use trireme_proto::v1::{
    CatalogChange, CatalogReply, ForwardReply, ForwardRequest, GroupMessage, RaftBatch, RaftStreamEnd,
};

use crate::{Inbound, PeerHandler, TransportError};

/// gRPC metadata key: the sender's cluster id.
pub const CLUSTER_HEADER: &str = "x-trireme-cluster";
/// gRPC metadata key: the sender's node id, in decimal.
pub const NODE_HEADER: &str = "x-trireme-node";
/// gRPC metadata key: the shared cluster secret.
pub const SECRET_HEADER: &str = "x-trireme-secret";

/// The service to mount on the node's peer listener:
/// `tonic::transport::Server::builder().add_service(server)`.
pub type PeerServer<H> = InterceptedService<PeerServiceServer<PeerServiceImpl<H>>, Authenticator>;

/// The identity the [`Authenticator`] admitted, for the handlers.
#[derive(Debug, Clone, Copy)]
struct AuthenticatedPeer(u64);

/// Checks cluster id, secret and node id of every call before the call's
/// messages are read.
#[derive(Clone)]
pub struct Authenticator {
    node_id: u64,
    cluster_id: Arc<str>,
    secret: Arc<[u8]>,
    peers: Arc<BTreeSet<u64>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("node_id", &self.node_id)
            .field("cluster_id", &self.cluster_id)
            .field("secret", &"<redacted>")
            .field("peers", &self.peers)
            .finish()
    }
}

impl Authenticator {
    pub(crate) fn new(node_id: u64, cluster_id: &str, secret: &str, peers: BTreeSet<u64>) -> Authenticator {
        Authenticator {
            node_id,
            cluster_id: cluster_id.into(),
            secret: secret.as_bytes().into(),
            peers: Arc::new(peers),
        }
    }

    /// The admitted node id, or the name of the failed check.
    fn check(&self, md: &MetadataMap) -> Result<u64, String> {
        let cluster = md
            .get(CLUSTER_HEADER)
            .ok_or_else(|| format!("missing {CLUSTER_HEADER} metadata"))?;
        if cluster.as_bytes() != self.cluster_id.as_bytes() {
            return Err(format!("{CLUSTER_HEADER} does not match this node's cluster id"));
        }
        let secret = md
            .get(SECRET_HEADER)
            .ok_or_else(|| format!("missing {SECRET_HEADER} metadata"))?;
        if !constant_time_eq(secret.as_bytes(), &self.secret) {
            return Err(format!("{SECRET_HEADER} is not this cluster's secret"));
        }
        let node = md
            .get(NODE_HEADER)
            .ok_or_else(|| format!("missing {NODE_HEADER} metadata"))?;
        let node = node
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| format!("{NODE_HEADER} is not a node id"))?;
        if !self.peers.contains(&node) {
            return Err(format!("node {node} is not a configured peer of node {}", self.node_id));
        }
        Ok(node)
    }
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        match self.check(request.metadata()) {
            Ok(node) => {
                request.extensions_mut().insert(AuthenticatedPeer(node));
                Ok(request)
            }
            Err(reason) => {
                metrics::counter!("trireme_transport_auth_refused_total").increment(1);
                warn!(node = self.node_id, remote = ?request.remote_addr(), "peer call refused: {reason}");
                Err(Status::unauthenticated(reason))
            }
        }
    }
}

/// Equality whose time depends only on the length of `expected`, not on
/// where the inputs differ.
fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != expected.len());
    for (i, e) in expected.iter().enumerate() {
        diff |= given.get(i).copied().unwrap_or(0) ^ e;
    }
    std::hint::black_box(diff) == 0
}

/// Client-side metadata: this node's credentials, encoded once.
#[derive(Clone)]
pub(crate) struct ClientAuth {
    cluster: MetadataValue<Ascii>,
    node: MetadataValue<Ascii>,
    secret: MetadataValue<Ascii>,
}

impl ClientAuth {
    pub(crate) fn new(node_id: u64, cluster_id: &str, secret: &str) -> Result<ClientAuth, TransportError> {
        let value = |field: &str, v: &str| {
            MetadataValue::try_from(v)
                .map_err(|_| TransportError::Config(format!("{field}: not a valid gRPC metadata value")))
        };
        let mut secret = value("secret", secret)?;
        // Keeps it out of HPACK's dynamic table.
        secret.set_sensitive(true);
        Ok(ClientAuth {
            cluster: value("cluster_id", cluster_id)?,
            node: value("node_id", &node_id.to_string())?,
            secret,
        })
    }

    pub(crate) fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let md = request.metadata_mut();
        md.insert(CLUSTER_HEADER, self.cluster.clone());
        md.insert(NODE_HEADER, self.node.clone());
        md.insert(SECRET_HEADER, self.secret.clone());
        request
    }
}

/// Waits until shutdown is requested; never returns if the sender is gone
/// without requesting it.
pub(crate) async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Hands each inbound Raft message to its group, on the stream's own task.
/// It must not block: a group that cannot take a message now drops it (Raft
/// retransmits).
pub type InboundRouter = Arc<dyn Fn(Inbound) + Send + Sync>;

/// Where the server puts inbound Raft messages.
pub(crate) enum InboundSink {
    /// A bounded queue someone drains: a full one pushes back on the stream.
    Queue(mpsc::Sender<Inbound>),
    /// Straight to the groups: one task hand-off fewer on the path of every
    /// replicated write (the stream's task wakes the group's, instead of a
    /// routing task's, which then wakes the group's).
    Router(InboundRouter),
}

/// The `PeerService` of one node (mounted through [`PeerServer`]).
pub struct PeerServiceImpl<H> {
    node_id: u64,
    handler: Arc<H>,
    inbound: InboundSink,
    max_message_bytes: usize,
    shutdown: watch::Receiver<bool>,
}

impl<H> std::fmt::Debug for PeerServiceImpl<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerServiceImpl")
            .field("node_id", &self.node_id)
            .field("max_message_bytes", &self.max_message_bytes)
            .finish_non_exhaustive()
    }
}

impl<H> PeerServiceImpl<H> {
    pub(crate) fn new(
        node_id: u64,
        handler: Arc<H>,
        inbound: InboundSink,
        max_message_bytes: usize,
        shutdown: watch::Receiver<bool>,
    ) -> PeerServiceImpl<H> {
        PeerServiceImpl {
            node_id,
            handler,
            inbound,
            max_message_bytes,
            shutdown,
        }
    }

    /// Bounds, parses and checks one raft message. `Err` ends the stream
    /// (an oversized message); `Ok(None)` drops just this message.
    ///
    /// rust-protobuf 2.28 has RUSTSEC-2024-0437 (stack overflow on crafted
    /// input) and no fixed 2.x release. Here: the payload is bounded before
    /// parsing; eraftpb's own nesting is at most 4 deep (Message, Snapshot,
    /// SnapshotMetadata, ConfState); 2.28 skips an unknown group without
    /// recursing (a group inside it is a parse error); and every sender is
    /// an authenticated member. A test sends such payloads.
    fn decode(&self, from: u64, gm: GroupMessage) -> Result<Option<Inbound>, Status> {
        if gm.message.len() > self.max_message_bytes {
            metrics::counter!("trireme_transport_inbound_dropped_total", "peer" => from.to_string(), "reason" => "oversized")
                .increment(1);
            return Err(Status::resource_exhausted(format!(
                "raft message of {} bytes for group {} exceeds the limit of {} bytes",
                gm.message.len(),
                gm.group_id,
                self.max_message_bytes
            )));
        }
        // Entry payloads stay slices of the received buffer (no copy).
        let message = match Message::parse_from_carllerche_bytes(&gm.message) {
            Ok(m) => m,
            Err(e) => {
                metrics::counter!("trireme_transport_inbound_dropped_total", "peer" => from.to_string(), "reason" => "corrupt")
                    .increment(1);
                warn!(
                    node = self.node_id,
                    from,
                    group = gm.group_id,
                    "dropping undecodable raft message: {e}"
                );
                return Ok(None);
            }
        };
        if message.from != from || message.to != self.node_id {
            metrics::counter!("trireme_transport_inbound_dropped_total", "peer" => from.to_string(), "reason" => "misaddressed")
                .increment(1);
            warn!(
                node = self.node_id,
                from,
                group = gm.group_id,
                msg_from = message.from,
                msg_to = message.to,
                "dropping raft message whose from/to do not match the stream"
            );
            return Ok(None);
        }
        Ok(Some(Inbound {
            from,
            group_id: gm.group_id,
            message,
        }))
    }
}

fn authenticated<T>(request: &Request<T>) -> Result<u64, Status> {
    request
        .extensions()
        .get::<AuthenticatedPeer>()
        .map(|p| p.0)
        .ok_or_else(|| Status::unauthenticated("call did not pass authentication"))
}

#[tonic::async_trait]
impl<H: PeerHandler> PeerService for PeerServiceImpl<H> {
    async fn raft(&self, request: Request<Streaming<RaftBatch>>) -> Result<Response<RaftStreamEnd>, Status> {
        let from = authenticated(&request)?;
        debug!(node = self.node_id, from, "raft stream opened");
        let peer_label = from.to_string();
        let mut stream = request.into_inner();
        let mut shutdown = self.shutdown.clone();
        loop {
            let next = tokio::select! {
                biased;
                () = shutdown_requested(&mut shutdown) => break,
                next = stream.message() => next,
            };
            let batch = match next {
                Ok(Some(batch)) => batch,
                Ok(None) => break,
                Err(status) => {
                    debug!(node = self.node_id, from, "raft stream ended: {status}");
                    return Err(status);
                }
            };
            metrics::counter!("trireme_transport_messages_received_total", "peer" => peer_label.clone())
                .increment(batch.messages.len() as u64);
            tracing::trace!(
                node = self.node_id,
                from,
                messages = batch.messages.len(),
                "raft batch received"
            );
            for gm in batch.messages {
                let Some(inbound) = self.decode(from, gm)? else {
                    continue;
                };
                let queue = match &self.inbound {
                    InboundSink::Router(route) => {
                        route(inbound);
                        continue;
                    }
                    InboundSink::Queue(queue) => queue,
                };
                tokio::select! {
                    biased;
                    () = shutdown_requested(&mut shutdown) => return Ok(Response::new(RaftStreamEnd {})),
                    sent = queue.send(inbound) => {
                        if sent.is_err() {
                            return Err(Status::unavailable("the node no longer takes raft messages"));
                        }
                    }
                }
            }
        }
        debug!(node = self.node_id, from, "raft stream closed");
        Ok(Response::new(RaftStreamEnd {}))
    }

    async fn forward(&self, request: Request<ForwardRequest>) -> Result<Response<ForwardReply>, Status> {
        let from = authenticated(&request)?;
        Ok(Response::new(self.handler.forward(from, request.into_inner()).await))
    }

    async fn catalog(&self, request: Request<CatalogChange>) -> Result<Response<CatalogReply>, Status> {
        let from = authenticated(&request)?;
        self.handler.catalog(from, request.into_inner()).await?;
        Ok(Response::new(CatalogReply {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret1", b"secret"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"secret\0", b"secret"));
    }

    #[test]
    fn checks_name_the_failure_and_never_echo_the_secret() {
        let auth = Authenticator::new(1, "c1", "s3cr3t", [2, 3].into());
        let client = ClientAuth::new(2, "c1", "s3cr3t").unwrap();
        assert_eq!(auth.check(client.request(()).metadata()), Ok(2));

        let wrong_cluster = ClientAuth::new(2, "c2", "s3cr3t").unwrap();
        let e = auth.check(wrong_cluster.request(()).metadata()).unwrap_err();
        assert!(e.contains("cluster"), "{e}");

        let wrong_secret = ClientAuth::new(2, "c1", "guess").unwrap();
        let e = auth.check(wrong_secret.request(()).metadata()).unwrap_err();
        assert!(
            e.contains("secret") && !e.contains("s3cr3t") && !e.contains("guess"),
            "{e}"
        );

        let unknown = ClientAuth::new(9, "c1", "s3cr3t").unwrap();
        let e = auth.check(unknown.request(()).metadata()).unwrap_err();
        assert!(e.contains("node 9"), "{e}");

        let e = auth.check(&MetadataMap::new()).unwrap_err();
        assert!(e.contains("missing"), "{e}");
    }
}
