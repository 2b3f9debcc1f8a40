//! One task per peer: takes the Raft messages queued for that peer, batches
//! them and writes them on one client stream; reconnects with exponential
//! backoff and jitter when the connection fails or the stream breaks.

use std::collections::BTreeSet;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use crate::PeerStats;
use crate::codec::{OutBatch, RaftStreamCodec};
use crate::server::{ClientAuth, shutdown_requested};

/// One queued Raft message.
pub(crate) struct Outgoing {
    pub group_id: u64,
    pub message: raft::eraftpb::Message,
}

/// A batch is cut when adding the next message would pass this many bytes
/// (a single larger message still goes, alone).
const BATCH_TARGET_BYTES: usize = 4 * 1024 * 1024;
/// Protobuf framing of one `GroupMessage` inside a batch, at most.
const PER_MESSAGE_OVERHEAD: usize = 24;

/// Why messages were dropped, as the `reason` label of the metric.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DropReason {
    /// The peer's queue was full when `send` was called.
    QueueFull,
    /// Queued, then dropped because the peer could not be reached.
    Unreachable,
    /// The encoded message exceeds the message bound.
    Oversized,
    /// The transport is shut down.
    Closed,
}

impl DropReason {
    fn label(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::Unreachable => "unreachable",
            DropReason::Oversized => "oversized",
            DropReason::Closed => "closed",
        }
    }
}

/// Per-peer counters: exported as metrics and kept as numbers for
/// [`crate::Transport::peer_stats`].
pub(crate) struct PeerCounters {
    peer: String,
    sent: AtomicU64,
    dropped: AtomicU64,
    batches: AtomicU64,
    connects: AtomicU64,
    reconnects: AtomicU64,
    connect_failures: AtomicU64,
    stream_breaks: AtomicU64,
}

impl PeerCounters {
    pub(crate) fn new(peer: u64) -> PeerCounters {
        let label = peer.to_string();
        PeerCounters {
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            stream_breaks: AtomicU64::new(0),
            peer: label,
        }
    }

    pub(crate) fn dropped(&self, reason: DropReason, n: u64) {
        if n == 0 {
            return;
        }
        self.dropped.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("trireme_transport_messages_dropped_total", "peer" => self.peer.clone(), "reason" => reason.label())
            .increment(n);
    }

    fn batch_sent(&self, messages: u64) {
        self.sent.fetch_add(messages, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("trireme_transport_messages_sent_total", "peer" => self.peer.clone()).increment(messages);
        metrics::counter!("trireme_transport_batches_sent_total", "peer" => self.peer.clone()).increment(1);
    }

    pub(crate) fn snapshot(&self) -> PeerStats {
        PeerStats {
            messages_sent: self.sent.load(Ordering::Relaxed),
            messages_dropped: self.dropped.load(Ordering::Relaxed),
            batches_sent: self.batches.load(Ordering::Relaxed),
            connects: self.connects.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            connect_failures: self.connect_failures.load(Ordering::Relaxed),
            stream_breaks: self.stream_breaks.load(Ordering::Relaxed),
        }
    }
}

/// Everything one sender task needs.
pub(crate) struct SenderCtx {
    pub peer: u64,
    pub node_id: u64,
    pub endpoint: Endpoint,
    pub auth: ClientAuth,
    pub counters: Arc<PeerCounters>,
    pub unreachable: Arc<Mutex<BTreeSet<u64>>>,
    pub shutdown: watch::Receiver<bool>,
    pub connect_timeout: Duration,
    pub backoff: Backoff,
    pub max_message_bytes: usize,
    pub grpc_limit: usize,
    /// Messages taken from the queue at once (the queue's capacity).
    pub take_at_once: usize,
    /// Injected network faults, applied to every batch this task sends.
    #[cfg(feature = "faults")]
    pub faults: Arc<crate::faults::NetFaults>,
}

/// Exponential backoff, each delay jittered down to as little as half.
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.max);
        let half = d / 2;
        let span = u64::try_from((d - half).as_micros()).unwrap_or(u64::MAX);
        half + Duration::from_micros(random_u64() % span.saturating_add(1))
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// A random number from std's per-process random hash keys: enough for
/// jitter, without a dependency.
pub(crate) fn random_u64() -> u64 {
    std::collections::hash_map::RandomState::new().hash_one(Instant::now())
}

/// How a stream ended.
enum StreamEnd {
    /// Shutdown, or every `Transport` handle is gone: the task ends.
    Finished,
    /// The connection or the stream failed; reconnect.
    Broken(String),
}

pub(crate) async fn run(mut ctx: SenderCtx, mut rx: mpsc::Receiver<Outgoing>) {
    let mut buf: Vec<Outgoing> = Vec::new();
    let mut connected_before = false;
    let mut failing = false;
    loop {
        // Connect lazily: only once there is something to send.
        if buf.is_empty() {
            let n = tokio::select! {
                biased;
                () = shutdown_requested(&mut ctx.shutdown) => return,
                n = rx.recv_many(&mut buf, ctx.take_at_once) => n,
            };
            if n == 0 {
                return;
            }
        }
        let connected = tokio::select! {
            biased;
            () = shutdown_requested(&mut ctx.shutdown) => return,
            c = tokio::time::timeout(ctx.connect_timeout, ctx.endpoint.connect()) => c,
        };
        let channel = match connected {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                connect_failed(&ctx, &mut failing, &format!("{e}: {}", source_chain(&e)));
                lost(&ctx, &mut buf, &mut rx);
                if !pause(&mut ctx).await {
                    return;
                }
                continue;
            }
            Err(_) => {
                connect_failed(
                    &ctx,
                    &mut failing,
                    &format!("no connection within {:?}", ctx.connect_timeout),
                );
                lost(&ctx, &mut buf, &mut rx);
                if !pause(&mut ctx).await {
                    return;
                }
                continue;
            }
        };
        ctx.counters.connects.fetch_add(1, Ordering::Relaxed);
        if connected_before {
            ctx.counters.reconnects.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("trireme_transport_reconnects_total", "peer" => ctx.counters.peer.clone()).increment(1);
        }
        if failing || connected_before {
            info!(node = ctx.node_id, peer = ctx.peer, "raft stream to peer reconnected");
        }
        connected_before = true;
        failing = false;
        let opened = Instant::now();
        match stream(&mut ctx, channel, &mut rx, &mut buf).await {
            StreamEnd::Finished => return,
            StreamEnd::Broken(reason) => {
                ctx.counters.stream_breaks.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("trireme_transport_stream_breaks_total", "peer" => ctx.counters.peer.clone())
                    .increment(1);
                warn!(
                    node = ctx.node_id,
                    peer = ctx.peer,
                    "raft stream to peer broke: {reason}"
                );
                mark_unreachable(&ctx);
                lost(&ctx, &mut buf, &mut rx);
                if opened.elapsed() >= ctx.backoff.max {
                    ctx.backoff.reset();
                }
                if !pause(&mut ctx).await {
                    return;
                }
            }
        }
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = String::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn connect_failed(ctx: &SenderCtx, failing: &mut bool, reason: &str) {
    ctx.counters.connect_failures.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("trireme_transport_connect_failures_total", "peer" => ctx.counters.peer.clone()).increment(1);
    if *failing {
        debug!(
            node = ctx.node_id,
            peer = ctx.peer,
            "connect to peer failed again: {reason}"
        );
    } else {
        warn!(node = ctx.node_id, peer = ctx.peer, "connect to peer failed: {reason}");
    }
    *failing = true;
    mark_unreachable(ctx);
}

fn mark_unreachable(ctx: &SenderCtx) {
    ctx.unreachable
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(ctx.peer);
}

/// Drops what was taken but not sent, and what is queued: the peer is not
/// reachable, Raft retransmits once `report_unreachable` moved it to probe.
/// Keeps memory bounded while a peer is down.
fn lost(ctx: &SenderCtx, buf: &mut Vec<Outgoing>, rx: &mut mpsc::Receiver<Outgoing>) {
    let mut n = buf.len() as u64;
    buf.clear();
    for _ in 0..ctx.take_at_once {
        if rx.try_recv().is_err() {
            break;
        }
        n += 1;
    }
    ctx.counters.dropped(DropReason::Unreachable, n);
}

/// Sleeps the next backoff delay; false if shutdown came first.
async fn pause(ctx: &mut SenderCtx) -> bool {
    let delay = ctx.backoff.next_delay();
    tokio::select! {
        biased;
        () = shutdown_requested(&mut ctx.shutdown) => false,
        () = tokio::time::sleep(delay) => true,
    }
}

/// Runs one client stream until it breaks or the task must end. On return,
/// `buf` holds only the messages that were not handed to the stream.
async fn stream(
    ctx: &mut SenderCtx,
    channel: Channel,
    rx: &mut mpsc::Receiver<Outgoing>,
    buf: &mut Vec<Outgoing>,
) -> StreamEnd {
    // One batch in hand-off at a time: while HTTP/2 writes it, new messages
    // pile up in the peer's queue and form the next batch.
    let (batch_tx, batch_rx) = mpsc::channel::<OutBatch>(1);
    let mut client = tonic::client::Grpc::new(channel)
        .max_encoding_message_size(ctx.grpc_limit)
        .max_decoding_message_size(ctx.grpc_limit);
    let requests = ReceiverStream::new(batch_rx);
    #[cfg(feature = "faults")]
    let requests = crate::faults::FaultyBatches::new(requests, ctx.faults.clone(), ctx.peer);
    let request = ctx.auth.request(requests);
    // The generated client's `raft`, with the codec that encodes raft
    // messages once (crate::codec).
    let call = async move {
        client
            .ready()
            .await
            .map_err(|e| tonic::Status::unknown(format!("the peer channel is not ready: {e}")))?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static("/trireme.v1.PeerService/Raft");
        client.client_streaming(request, path, RaftStreamCodec).await
    };
    tokio::pin!(call);
    loop {
        if buf.is_empty() {
            let n = tokio::select! {
                biased;
                () = shutdown_requested(&mut ctx.shutdown) => 0,
                ended = &mut call => return StreamEnd::Broken(describe_end(ended)),
                n = rx.recv_many(buf, ctx.take_at_once) => n,
            };
            if n == 0 {
                // Close the request stream; the peer answers RaftStreamEnd.
                drop(batch_tx);
                let _ = tokio::time::timeout(Duration::from_secs(1), call).await;
                return StreamEnd::Finished;
            }
        }
        let mut next = 0;
        while next < buf.len() {
            // The slot first: building a batch moves messages out of `buf`,
            // and whatever is not handed over stays there for the next stream.
            let permit = tokio::select! {
                biased;
                () = shutdown_requested(&mut ctx.shutdown) => {
                    buf.drain(..next);
                    return StreamEnd::Finished;
                }
                ended = &mut call => {
                    buf.drain(..next);
                    return StreamEnd::Broken(describe_end(ended));
                }
                permit = batch_tx.reserve() => permit,
            };
            let Ok(permit) = permit else {
                buf.drain(..next);
                return StreamEnd::Broken("the request stream was closed".into());
            };
            let (batch, taken) = build_batch(ctx, &mut buf[next..]);
            next += taken;
            if batch.is_empty() {
                continue;
            }
            let count = batch.len() as u64;
            tracing::trace!(node = ctx.node_id, peer = ctx.peer, messages = count, "raft batch sent");
            permit.send(batch);
            ctx.counters.batch_sent(count);
        }
        buf.clear();
    }
}

/// Takes messages from the front of `pending` into one batch, up to
/// [`BATCH_TARGET_BYTES`] encoded (always at least one message), moving
/// them out. Returns the batch (empty if every taken message was dropped)
/// and how many messages of `pending` were taken.
fn build_batch(ctx: &SenderCtx, pending: &mut [Outgoing]) -> (OutBatch, usize) {
    let target = BATCH_TARGET_BYTES.min(ctx.max_message_bytes);
    let mut batch = OutBatch::default();
    let mut bytes = 0;
    let mut taken = 0;
    for out in pending {
        // Also caches the sizes `OutBatch::encode` writes with.
        let size = out.message.compute_size() as usize;
        if size > ctx.max_message_bytes {
            taken += 1;
            ctx.counters.dropped(DropReason::Oversized, 1);
            warn!(
                peer = ctx.peer,
                group = out.group_id,
                bytes = size,
                limit = ctx.max_message_bytes,
                "raft message over the size limit, dropped"
            );
            continue;
        }
        let cost = size + PER_MESSAGE_OVERHEAD;
        if !batch.is_empty() && bytes + cost > target {
            break;
        }
        taken += 1;
        bytes += cost;
        batch.push(out.group_id, std::mem::take(&mut out.message), size);
    }
    (batch, taken)
}

fn describe_end(ended: Result<tonic::Response<trireme_proto::v1::RaftStreamEnd>, tonic::Status>) -> String {
    match ended {
        Ok(_) => "the peer ended the stream".into(),
        Err(status) => {
            let cause = source_chain(&status);
            if cause.is_empty() {
                format!("{:?}: {}", status.code(), status.message())
            } else {
                format!("{:?}: {}: {cause}", status.code(), status.message())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_max_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_millis(1000));
        let mut nominal = 50;
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(nominal / 2) && d <= Duration::from_millis(nominal),
                "{d:?} vs {nominal}"
            );
            nominal = (nominal * 2).min(1000);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(50));
    }
}
