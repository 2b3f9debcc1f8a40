//! The peer listener: tells the Raft links (see `wire`) from gRPC
//! connections by their first byte, and serves both; authentication of
//! every gRPC call (an interceptor, so it runs on the request headers
//! before any message is read) and of every link's hello, with one check;
//! the `PeerService` implementation that hands forwarded requests and
//! catalog changes to the [`PeerHandler`].

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};
use trireme_proto::v1::peer_service_server::{PeerService, PeerServiceServer};
use trireme_proto::v1::{CatalogChange, CatalogReply, ForwardReply, ForwardRequest};

use crate::inbound::Links;
use crate::wire::MAGIC;
use crate::{PeerHandler, TransportError};

/// gRPC metadata key: the sender's cluster id.
pub const CLUSTER_HEADER: &str = "x-trireme-cluster";
/// gRPC metadata key: the sender's node id, in decimal.
pub const NODE_HEADER: &str = "x-trireme-node";
/// gRPC metadata key: the shared cluster secret.
pub const SECRET_HEADER: &str = "x-trireme-secret";

/// Everything served on a node's peer listener: the Raft links and the
/// gRPC `PeerService`. Returned by [`crate::Transport::start`]; run it with
/// [`PeerServer::serve`].
pub struct PeerServer<H> {
    grpc: InterceptedService<PeerServiceServer<PeerServiceImpl<H>>, Authenticator>,
    links: Arc<Links>,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
}

impl<H> std::fmt::Debug for PeerServer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerServer")
            .field("node_id", &self.links.node_id)
            .finish_non_exhaustive()
    }
}

/// Accepted connections waiting for tonic to take them.
const GRPC_ACCEPT_QUEUE: usize = 64;

impl<H: PeerHandler> PeerServer<H> {
    pub(crate) fn new(
        grpc: InterceptedService<PeerServiceServer<PeerServiceImpl<H>>, Authenticator>,
        links: Links,
        keepalive_interval: Duration,
        keepalive_timeout: Duration,
    ) -> PeerServer<H> {
        PeerServer {
            grpc,
            links: Arc::new(links),
            keepalive_interval,
            keepalive_timeout,
        }
    }

    /// Serves `listener` until `signal` resolves: each connection that
    /// opens with the Raft link magic is a link (ended by
    /// [`crate::Transport::shutdown`] or by its peer); any other is gRPC,
    /// which stops gracefully on `signal`. A connection that sends nothing
    /// within the handshake timeout is closed.
    pub async fn serve(
        self,
        listener: TcpListener,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), TransportError> {
        let (grpc_tx, grpc_rx) = mpsc::channel::<Result<TcpStream, std::io::Error>>(GRPC_ACCEPT_QUEUE);
        let links = self.links.clone();
        let accept = tokio::spawn(async move {
            loop {
                let (stream, remote) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Usually EMFILE: back off instead of spinning.
                        warn!("peer listener accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (links, grpc_tx) = (links.clone(), grpc_tx.clone());
                tokio::spawn(async move {
                    let mut first = [0u8; 1];
                    match tokio::time::timeout(links.handshake_timeout, stream.peek(&mut first)).await {
                        Ok(Ok(1)) if first[0] == MAGIC[0] => links.serve(stream, remote).await,
                        Ok(Ok(1)) => {
                            let _ = grpc_tx.send(Ok(stream)).await;
                        }
                        // Closed, failed or silent: nothing to serve.
                        _ => debug!(%remote, "peer connection closed before it said anything"),
                    }
                });
            }
        });
        let served = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(self.keepalive_interval))
            .http2_keepalive_timeout(Some(self.keepalive_timeout))
            .initial_stream_window_size(crate::STREAM_WINDOW_BYTES)
            .initial_connection_window_size(crate::CONNECTION_WINDOW_BYTES)
            .max_frame_size(crate::MAX_FRAME_BYTES)
            .add_service(self.grpc)
            .serve_with_incoming_shutdown(ReceiverStream::new(grpc_rx), signal)
            .await;
        accept.abort();
        served.map_err(|e| TransportError::Listener(e.to_string()))
    }
}

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
        let secret = md
            .get(SECRET_HEADER)
            .ok_or_else(|| format!("missing {SECRET_HEADER} metadata"))?;
        let node = md
            .get(NODE_HEADER)
            .ok_or_else(|| format!("missing {NODE_HEADER} metadata"))?;
        let node = node
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| format!("{NODE_HEADER} is not a node id"))?;
        self.check_fields(cluster.as_bytes(), secret.as_bytes(), node)
    }

    /// The one check behind gRPC calls and Raft link hellos: the admitted
    /// node id, or the name of the failed check (never the secret).
    pub(crate) fn check_fields(&self, cluster: &[u8], secret: &[u8], node: u64) -> Result<u64, String> {
        if cluster != self.cluster_id.as_bytes() {
            return Err("the cluster id does not match this node's cluster id".into());
        }
        if !constant_time_eq(secret, &self.secret) {
            return Err("the secret is not this cluster's secret".into());
        }
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

/// The `PeerService` of one node: forwarded requests and catalog changes.
pub(crate) struct PeerServiceImpl<H> {
    handler: Arc<H>,
}

impl<H> PeerServiceImpl<H> {
    pub(crate) fn new(handler: Arc<H>) -> PeerServiceImpl<H> {
        PeerServiceImpl { handler }
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
