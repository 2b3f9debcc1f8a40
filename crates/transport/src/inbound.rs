//! The receiving side of the Raft links: one task per connection a peer
//! opened. It checks the peer's hello (cluster id, secret, node id), answers
//! ACCEPT or REFUSE, then reads frames and hands each Raft message to its
//! group on this task, answering the peer's silence with PINGs so a
//! stopped node on either side is noticed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::link::shutdown_requested;
use crate::server::Authenticator;
use crate::wire::{self, Frame, FrameLimits};
use crate::{Inbound, TransportError};

/// Bytes asked of the socket per read at least: many small frames per read
/// under load, and a large frame's whole body in one buffer.
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// Hands each inbound Raft message to its group, on the link's own task.
/// It must not block: a group that cannot take a message now drops it (Raft
/// retransmits).
pub type InboundRouter = Arc<dyn Fn(Inbound) + Send + Sync>;

/// Where inbound Raft messages go.
pub(crate) enum InboundSink {
    /// A bounded queue someone drains: a full one stops the link's reads,
    /// which pushes back on the peer.
    Queue(mpsc::Sender<Inbound>),
    /// Straight to the groups: the link's task wakes the group's, with no
    /// routing task in between.
    Router(InboundRouter),
}

/// What every inbound link of one node shares.
pub(crate) struct Links {
    pub node_id: u64,
    pub auth: Authenticator,
    pub sink: InboundSink,
    pub max_message_bytes: usize,
    pub handshake_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub shutdown: watch::Receiver<bool>,
}

impl Links {
    fn limits(&self) -> FrameLimits {
        FrameLimits {
            raft_message_bytes: Some(self.max_message_bytes),
        }
    }

    /// Serves one connection that opened with the link magic, until it
    /// closes, breaks the protocol, goes silent, or the node shuts down.
    pub(crate) async fn serve(&self, mut stream: TcpStream, remote: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
        let hello = match tokio::time::timeout(self.handshake_timeout, read_hello(&mut stream, &mut buf)).await {
            Ok(Ok(hello)) => hello,
            Ok(Err(e)) => {
                warn!(node = self.node_id, %remote, "raft link refused: {e}");
                refuse(&mut stream, &e.to_string()).await;
                return;
            }
            Err(_) => {
                debug!(node = self.node_id, %remote, "raft link gave no hello within {:?}", self.handshake_timeout);
                return;
            }
        };
        let from = match self.auth.check_fields(&hello.cluster_id, &hello.secret, hello.node_id) {
            Ok(from) => from,
            Err(reason) => {
                metrics::counter!("trireme_transport_auth_refused_total").increment(1);
                warn!(node = self.node_id, %remote, "raft link refused: {reason}");
                refuse(&mut stream, &reason).await;
                return;
            }
        };
        let mut accept = Vec::new();
        wire::encode_empty(&mut accept, wire::kind::ACCEPT);
        if stream.write_all(&accept).await.is_err() {
            return;
        }
        debug!(node = self.node_id, from, %remote, "raft link opened");
        match self.read_frames(&mut stream, &mut buf, from).await {
            Ok(()) => debug!(node = self.node_id, from, "raft link closed"),
            Err(e) => warn!(node = self.node_id, from, "raft link from peer ended: {e}"),
        }
    }

    async fn read_frames(&self, stream: &mut TcpStream, buf: &mut BytesMut, from: u64) -> Result<(), TransportError> {
        let received = metrics::counter!("trireme_transport_messages_received_total", "peer" => from.to_string());
        let mut shutdown = self.shutdown.clone();
        let mut tick = tokio::time::interval(self.keepalive_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        let mut heard = Instant::now();
        let mut ping = Vec::new();
        wire::encode_empty(&mut ping, wire::kind::PING);
        let limits = self.limits();
        loop {
            let delivered = self.deliver(buf, from, limits, &mut shutdown).await?;
            received.increment(delivered);
            if *shutdown.borrow() {
                return Ok(());
            }
            // Room for the frame in progress, whole, so a large body is read
            // in place instead of grown into.
            let want = match wire::pending_body(buf, limits)? {
                Some(body) => (wire::FRAME_HEADER_BYTES + body).saturating_sub(buf.len()),
                None => 0,
            };
            buf.reserve(want.max(READ_CHUNK_BYTES / 4));
            tokio::select! {
                biased;
                () = shutdown_requested(&mut shutdown) => return Ok(()),
                read = stream.read_buf(buf) => match read {
                    Ok(0) => return Ok(()),
                    Ok(_) => heard = Instant::now(),
                    Err(e) => return Err(TransportError::Protocol(format!("read failed: {e}"))),
                },
                _ = tick.tick() => {
                    if heard.elapsed() >= self.keepalive_timeout {
                        return Err(TransportError::Protocol(format!(
                            "no word from the peer for {} ms",
                            heard.elapsed().as_millis()
                        )));
                    }
                    // The sender learns this side is alive. A peer that
                    // reads nothing (stopped) fills its buffer with pings
                    // slowly; one that cannot take this one skips it.
                    let _ = stream.try_write(&ping);
                }
            }
        }
    }

    /// Hands every whole frame in `buf` to its group; how many messages.
    async fn deliver(
        &self,
        buf: &mut BytesMut,
        from: u64,
        limits: FrameLimits,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<u64, TransportError> {
        let mut delivered = 0;
        while let Some(frame) = wire::decode_frame(buf, limits).inspect_err(|e| {
            let reason = if matches!(e, TransportError::TooLarge { .. }) {
                "oversized"
            } else {
                "protocol"
            };
            metrics::counter!("trireme_transport_inbound_dropped_total", "peer" => from.to_string(), "reason" => reason)
                .increment(1);
        })? {
            let Frame::Raft { group_id, message } = frame else {
                continue;
            };
            let Some(inbound) = self.decode(from, group_id, &message) else {
                continue;
            };
            delivered += 1;
            match &self.sink {
                InboundSink::Router(route) => route(inbound),
                InboundSink::Queue(queue) => {
                    tokio::select! {
                        biased;
                        () = shutdown_requested(shutdown) => return Ok(delivered),
                        sent = queue.send(inbound) => {
                            if sent.is_err() {
                                return Err(TransportError::Protocol("the node no longer takes raft messages".into()));
                            }
                        }
                    }
                }
            }
        }
        Ok(delivered)
    }

    /// Parses and checks one raft message; `None` drops just this one.
    fn decode(&self, from: u64, group_id: u64, bytes: &bytes::Bytes) -> Option<Inbound> {
        let message = match wire::parse_message(bytes) {
            Ok(m) => m,
            Err(e) => {
                metrics::counter!("trireme_transport_inbound_dropped_total", "peer" => from.to_string(), "reason" => "corrupt")
                    .increment(1);
                warn!(
                    node = self.node_id,
                    from,
                    group = group_id,
                    "dropping a raft message: {e}"
                );
                return None;
            }
        };
        if message.from != from || message.to != self.node_id {
            metrics::counter!("trireme_transport_inbound_dropped_total", "peer" => from.to_string(), "reason" => "misaddressed")
                .increment(1);
            warn!(
                node = self.node_id,
                from,
                group = group_id,
                msg_from = message.from,
                msg_to = message.to,
                "dropping raft message whose from/to do not match the link"
            );
            return None;
        }
        Some(Inbound {
            from,
            group_id,
            message,
        })
    }
}

async fn read_hello(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<wire::Hello, TransportError> {
    loop {
        if let Some(hello) = wire::decode_hello(buf)? {
            return Ok(hello);
        }
        match stream.read_buf(buf).await {
            Ok(0) => return Err(TransportError::Protocol("closed before its hello was whole".into())),
            Ok(_) => {}
            Err(e) => return Err(TransportError::Protocol(format!("reading the hello: {e}"))),
        }
    }
}

/// Tells the peer why, briefly, and closes.
async fn refuse(stream: &mut TcpStream, reason: &str) {
    let mut out = Vec::new();
    wire::encode_refuse(&mut out, reason);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&out).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
