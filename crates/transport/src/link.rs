//! The sending side of the Raft links: one [`Link`] per peer.
//!
//! Whoever has a message for the peer (a group task, a log writer thread,
//! the liveness task) encodes it into the link's pending bytes and, when
//! the connection is up and nothing is waiting ahead of it, writes it to
//! the socket itself: no task hand-off and no wake-up on the way out. Only
//! when the socket pushes back (its buffer is full) does the link's task
//! take over and write the rest once it is writable. The same task
//! connects lazily, says hello and waits for the peer's ACCEPT, sends a
//! PING when nothing was written for a keepalive interval, reads the peer's
//! PINGs (a peer silent for the keepalive timeout is taken as gone), and
//! reconnects with capped exponential backoff and jitter.
//!
//! Bytes reach the socket only under the link's lock and only from the
//! front of the pending buffer, so frames never interleave and messages
//! leave in the order they were sent.

use std::collections::BTreeSet;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use protobuf::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::PeerStats;
use crate::outbox::Outbox;
use crate::wire::{self, Frame, FrameLimits};

/// What the peer may send on a link this node opened.
const SENDER_SIDE: FrameLimits = FrameLimits {
    raft_message_bytes: None,
};
/// Injected delays (the `faults` feature) hold at most this many frames
/// per link; more are dropped as for a full queue.
#[cfg(feature = "faults")]
const MAX_DELAYED_FRAMES: usize = 4096;

/// Why messages were dropped, as the `reason` label of the metric.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DropReason {
    /// The link's queue bound was reached when `send` was called.
    QueueFull,
    /// Queued, then dropped because the peer could not be reached.
    Unreachable,
    /// The encoded message exceeds the message bound.
    Oversized,
}

impl DropReason {
    fn label(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::Unreachable => "unreachable",
            DropReason::Oversized => "oversized",
        }
    }
}

/// Per-peer counters: exported as metrics and kept as numbers for
/// [`crate::Transport::peer_stats`].
pub(crate) struct PeerCounters {
    peer: String,
    /// The per-message and per-write metrics, looked up once: they are
    /// counted on the path of every replicated write. (The recorder is
    /// installed before the transport starts.)
    sent_total: metrics::Counter,
    writes_total: metrics::Counter,
    sent: AtomicU64,
    dropped: AtomicU64,
    writes: AtomicU64,
    connects: AtomicU64,
    reconnects: AtomicU64,
    connect_failures: AtomicU64,
    stream_breaks: AtomicU64,
}

impl PeerCounters {
    fn new(peer: u64) -> PeerCounters {
        let label = peer.to_string();
        PeerCounters {
            sent_total: metrics::counter!("trireme_transport_messages_sent_total", "peer" => label.clone()),
            writes_total: metrics::counter!("trireme_transport_writes_total", "peer" => label.clone()),
            peer: label,
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            stream_breaks: AtomicU64::new(0),
        }
    }

    fn dropped(&self, reason: DropReason, n: u64) {
        if n == 0 {
            return;
        }
        self.dropped.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("trireme_transport_messages_dropped_total", "peer" => self.peer.clone(), "reason" => reason.label())
            .increment(n);
    }

    fn sent(&self, messages: u64) {
        self.sent.fetch_add(messages, Ordering::Relaxed);
        self.sent_total.increment(messages);
    }

    fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.writes_total.increment(1);
    }

    fn count(&self, counter: &AtomicU64, metric: Option<&'static str>) {
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(name) = metric {
            metrics::counter!(name, "peer" => self.peer.clone()).increment(1);
        }
    }

    pub(crate) fn snapshot(&self) -> PeerStats {
        PeerStats {
            messages_sent: self.sent.load(Ordering::Relaxed),
            messages_dropped: self.dropped.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            connects: self.connects.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            connect_failures: self.connect_failures.load(Ordering::Relaxed),
            stream_breaks: self.stream_breaks.load(Ordering::Relaxed),
        }
    }
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

/// Waits until shutdown is requested; never returns if the sender is gone
/// without requesting it.
pub(crate) async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// How one link to a peer is set up.
pub(crate) struct LinkConfig {
    pub peer: u64,
    pub node_id: u64,
    pub addr: SocketAddr,
    /// The encoded hello this node opens every connection with.
    pub hello: Bytes,
    pub max_message_bytes: usize,
    pub queue_messages: usize,
    pub queue_bytes: usize,
    pub connect_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub backoff: (Duration, Duration),
}

/// The link's mutable state, under its lock.
#[derive(Default)]
struct LinkState {
    /// The connection, once the peer accepted it.
    stream: Option<Arc<TcpStream>>,
    /// Encoded frames not yet written, from a frame boundary on.
    pending: Outbox,
    /// The link task is writing `pending` (the socket pushed back, or the
    /// connection is new): senders only append.
    flushing: bool,
    /// A write failed; the link task ends the connection.
    failed: Option<String>,
    /// Bytes were written since the link task last looked (no PING due).
    wrote: bool,
    /// Frames held back by an injected delay, with the time each is due.
    #[cfg(feature = "faults")]
    delayed: std::collections::VecDeque<(tokio::time::Instant, Vec<u8>)>,
}

/// The sending side of the Raft link to one peer.
pub(crate) struct Link {
    config: LinkConfig,
    state: Mutex<LinkState>,
    /// Wakes the link's task: connect, take over a blocked write, or a
    /// delayed frame was queued.
    wake: Notify,
    pub(crate) counters: PeerCounters,
    unreachable: Arc<Mutex<BTreeSet<u64>>>,
    #[cfg(feature = "faults")]
    faults: Arc<crate::faults::NetFaults>,
}

/// How a connection ended.
enum LinkEnd {
    /// Shutdown, or every `Transport` handle is gone: the task ends.
    Finished,
    /// The connection failed or the peer went silent; reconnect.
    Broken(String),
}

impl Link {
    pub(crate) fn new(
        config: LinkConfig,
        unreachable: Arc<Mutex<BTreeSet<u64>>>,
        #[cfg(feature = "faults")] faults: Arc<crate::faults::NetFaults>,
    ) -> Link {
        Link {
            counters: PeerCounters::new(config.peer),
            config,
            state: Mutex::new(LinkState::default()),
            wake: Notify::new(),
            unreachable,
            #[cfg(feature = "faults")]
            faults,
        }
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        // Nothing panics while holding it; the state stays consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn mark_unreachable(&self) {
        self.unreachable
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(self.config.peer);
    }

    /// Queues one message and, when the link is free, writes it at once.
    /// Never blocks: past the queue's bounds the message is dropped and the
    /// peer reported unreachable (Raft retransmits).
    pub(crate) fn send(&self, group_id: u64, message: &raft::eraftpb::Message) {
        let mut st = self.lock();
        if self.enqueue(&mut st, group_id, message) {
            self.push(&mut st);
        }
    }

    /// Queues many messages and writes them together.
    pub(crate) fn send_many<'m>(&self, messages: impl IntoIterator<Item = (u64, &'m raft::eraftpb::Message)>) {
        let mut st = self.lock();
        let mut queued = false;
        for (group_id, message) in messages {
            queued |= self.enqueue(&mut st, group_id, message);
        }
        if queued {
            self.push(&mut st);
        }
    }

    /// Encodes `message` into the pending bytes (or the delay queue); true
    /// if it went into the pending bytes.
    fn enqueue(&self, st: &mut LinkState, group_id: u64, message: &raft::eraftpb::Message) -> bool {
        let size = message.compute_size() as usize;
        if size > self.config.max_message_bytes {
            self.counters.dropped(DropReason::Oversized, 1);
            warn!(
                peer = self.config.peer,
                group = group_id,
                bytes = size,
                limit = self.config.max_message_bytes,
                "raft message over the size limit, dropped"
            );
            return false;
        }
        #[cfg(feature = "faults")]
        let copies = match self.faults.on_message(self.config.peer) {
            crate::faults::Verdict::Lost => return false,
            crate::faults::Verdict::Send { copies, delay } => {
                if !delay.is_zero() || !st.delayed.is_empty() {
                    self.hold_back(st, group_id, message, size, copies, delay);
                    return false;
                }
                copies
            }
        };
        #[cfg(not(feature = "faults"))]
        let copies = 1;
        let frame = wire::FRAME_HEADER_BYTES + wire::GROUP_ID_BYTES + size;
        if st.pending.messages() + copies > self.config.queue_messages
            || st.pending.held_bytes() + copies * frame > self.config.queue_bytes
        {
            self.counters.dropped(DropReason::QueueFull, 1);
            self.mark_unreachable();
            return false;
        }
        for _ in 0..copies {
            if let Err(e) = st.pending.push_raft(group_id, message, size) {
                // Part of a frame may be queued: the link must start over.
                self.counters.dropped(DropReason::Oversized, 1);
                warn!(peer = self.config.peer, group = group_id, "raft message not sent: {e}");
                st.failed = Some(format!("encoding a message for group {group_id}: {e}"));
                self.wake.notify_one();
                return false;
            }
        }
        self.counters.sent(1);
        true
    }

    /// After something was queued: write it now if the link is free, or
    /// get the link's task going.
    fn push(&self, st: &mut LinkState) {
        match st.stream.clone() {
            Some(stream) if !st.flushing => {
                if !self.write_out(st, &stream) {
                    st.flushing = true;
                    self.wake.notify_one();
                }
            }
            // The link's task writes it once the socket takes more.
            Some(_) => {}
            // Connect.
            None => self.wake.notify_one(),
        }
    }

    /// Writes as much of the pending bytes as the socket takes now; true
    /// if they are all out. A failed write is left in `failed` for the
    /// link's task.
    fn write_out(&self, st: &mut LinkState, stream: &TcpStream) -> bool {
        while !st.pending.is_empty() {
            let written = stream.try_write_vectored(&st.pending.slices());
            match written {
                Ok(0) => {
                    st.failed = Some("the connection takes no more bytes".into());
                    return false;
                }
                Ok(n) => {
                    st.pending.advance(n);
                    st.wrote = true;
                    self.counters.wrote();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    st.failed = Some(format!("write failed: {e}"));
                    return false;
                }
            }
        }
        true
    }

    /// Holds a message back for an injected delay; it leaves in order, after
    /// every message held before it.
    #[cfg(feature = "faults")]
    fn hold_back(
        &self,
        st: &mut LinkState,
        group_id: u64,
        message: &raft::eraftpb::Message,
        size: usize,
        copies: usize,
        delay: Duration,
    ) {
        if st.delayed.len() >= MAX_DELAYED_FRAMES {
            self.counters.dropped(DropReason::QueueFull, 1);
            self.mark_unreachable();
            return;
        }
        let mut frame = Vec::new();
        for _ in 0..copies {
            if let Err(e) = wire::encode_raft(&mut frame, group_id, message, size) {
                warn!(peer = self.config.peer, group = group_id, "raft message not sent: {e}");
                return;
            }
        }
        let mut due = tokio::time::Instant::now() + delay;
        if let Some((last, _)) = st.delayed.back() {
            due = due.max(*last);
        }
        st.delayed.push_back((due, frame));
        self.counters.sent(1);
        self.wake.notify_one();
    }

    /// Moves the held-back frames that are due into the pending bytes;
    /// returns when the next one is due.
    #[cfg(feature = "faults")]
    fn release_due(&self, st: &mut LinkState) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        while let Some((due, _)) = st.delayed.front() {
            if *due > now {
                return Some(*due);
            }
            if let Some((_, frame)) = st.delayed.pop_front() {
                st.pending.extend_message(&frame);
            }
        }
        None
    }

    #[cfg(not(feature = "faults"))]
    fn release_due(&self, _: &mut LinkState) -> Option<tokio::time::Instant> {
        None
    }

    fn has_work(&self) -> bool {
        let st = self.lock();
        #[cfg(feature = "faults")]
        if !st.delayed.is_empty() {
            return true;
        }
        !st.pending.is_empty()
    }

    /// Drops what is queued: the peer is not reachable, and Raft
    /// retransmits once `report_unreachable` moved it to probing. Keeps
    /// memory bounded while a peer is down.
    fn lose_pending(&self, st: &mut LinkState) {
        #[cfg(feature = "faults")]
        let held = std::mem::take(&mut st.delayed).len();
        #[cfg(not(feature = "faults"))]
        let held = 0;
        let n = st.pending.messages() + held;
        st.pending.clear();
        self.counters.dropped(DropReason::Unreachable, n as u64);
    }

    /// Connects, says hello, and waits for the peer's answer.
    async fn connect(&self) -> Result<TcpStream, String> {
        let addr = self.config.addr;
        let handshake = async {
            let mut stream = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect to {addr}: {e}"))?;
            stream.set_nodelay(true).map_err(|e| format!("TCP_NODELAY: {e}"))?;
            stream
                .write_all(&self.config.hello)
                .await
                .map_err(|e| format!("sending the hello: {e}"))?;
            let mut buf = BytesMut::with_capacity(256);
            loop {
                match wire::decode_frame(&mut buf, SENDER_SIDE).map_err(|e| format!("the peer's answer: {e}"))? {
                    Some(Frame::Accept) => return Ok(stream),
                    Some(Frame::Refuse(reason)) => return Err(format!("the peer refused the link: {reason}")),
                    Some(_) => continue,
                    None => {}
                }
                match stream.read_buf(&mut buf).await {
                    Ok(0) => return Err("the peer closed the connection during the handshake".into()),
                    Ok(_) => {}
                    Err(e) => return Err(format!("reading the peer's answer: {e}")),
                }
            }
        };
        match tokio::time::timeout(self.config.connect_timeout, handshake).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", self.config.connect_timeout)),
        }
    }

    /// Runs one accepted connection until it breaks or the task must end.
    async fn serve(&self, stream: &TcpStream, shutdown: &mut watch::Receiver<bool>) -> LinkEnd {
        let mut inbound = BytesMut::with_capacity(64);
        let mut tick = tokio::time::interval(self.config.keepalive_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        let mut heard = Instant::now();
        loop {
            let (want_write, next_due) = {
                let mut st = self.lock();
                if let Some(failed) = st.failed.take() {
                    return LinkEnd::Broken(failed);
                }
                let next_due = self.release_due(&mut st);
                st.flushing = !st.pending.is_empty() && !self.write_out(&mut st, stream);
                if let Some(failed) = st.failed.take() {
                    return LinkEnd::Broken(failed);
                }
                (st.flushing, next_due)
            };
            let due = next_due.unwrap_or_else(|| tokio::time::Instant::now() + self.config.keepalive_interval);
            tokio::select! {
                biased;
                () = shutdown_requested(shutdown) => return LinkEnd::Finished,
                () = self.wake.notified() => {}
                writable = stream.writable(), if want_write => {
                    if let Err(e) = writable {
                        return LinkEnd::Broken(format!("waiting to write: {e}"));
                    }
                }
                readable = stream.readable() => {
                    if let Err(e) = readable {
                        return LinkEnd::Broken(format!("waiting to read: {e}"));
                    }
                    inbound.reserve(64);
                    match stream.try_read_buf(&mut inbound) {
                        Ok(0) => return LinkEnd::Broken("the peer closed the connection".into()),
                        Ok(_) => heard = Instant::now(),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return LinkEnd::Broken(format!("read failed: {e}")),
                    }
                    loop {
                        match wire::decode_frame(&mut inbound, SENDER_SIDE) {
                            Ok(Some(Frame::Ping)) => {}
                            Ok(Some(Frame::Refuse(reason))) => return LinkEnd::Broken(format!("the peer ended the link: {reason}")),
                            Ok(Some(other)) => return LinkEnd::Broken(format!("the peer sent {other:?} on an open link")),
                            Ok(None) => break,
                            Err(e) => return LinkEnd::Broken(format!("the peer's frames: {e}")),
                        }
                    }
                }
                _ = tick.tick() => {
                    if heard.elapsed() >= self.config.keepalive_timeout {
                        return LinkEnd::Broken(format!(
                            "no word from the peer for {} ms",
                            heard.elapsed().as_millis()
                        ));
                    }
                    let mut st = self.lock();
                    if !st.wrote && st.pending.is_empty() {
                        let mut ping = Vec::with_capacity(wire::FRAME_HEADER_BYTES);
                        wire::encode_empty(&mut ping, wire::kind::PING);
                        st.pending.extend(&ping);
                        self.push(&mut st);
                    }
                    st.wrote = false;
                }
                () = tokio::time::sleep_until(due), if next_due.is_some() => {}
            }
        }
    }
}

/// The link's task: connects lazily (once there is something to send),
/// serves the connection, and reconnects after a backoff when it breaks.
pub(crate) async fn run(link: Arc<Link>, mut shutdown: watch::Receiver<bool>) {
    let (initial, max) = link.config.backoff;
    let mut backoff = Backoff::new(initial, max);
    let (peer, node) = (link.config.peer, link.config.node_id);
    let mut connected_before = false;
    let mut failing = false;
    loop {
        while !link.has_work() {
            tokio::select! {
                biased;
                () = shutdown_requested(&mut shutdown) => return,
                () = link.wake.notified() => {}
            }
        }
        let connected = tokio::select! {
            biased;
            () = shutdown_requested(&mut shutdown) => return,
            c = link.connect() => c,
        };
        let stream = match connected {
            Ok(stream) => Arc::new(stream),
            Err(reason) => {
                link.counters.count(
                    &link.counters.connect_failures,
                    Some("trireme_transport_connect_failures_total"),
                );
                if failing {
                    debug!(node, peer, "raft link to peer failed again: {reason}");
                } else {
                    warn!(node, peer, "raft link to peer failed: {reason}");
                }
                failing = true;
                link.mark_unreachable();
                link.lose_pending(&mut link.lock());
                if !pause(&mut backoff, &mut shutdown).await {
                    return;
                }
                continue;
            }
        };
        link.counters.count(&link.counters.connects, None);
        if connected_before {
            link.counters
                .count(&link.counters.reconnects, Some("trireme_transport_reconnects_total"));
        }
        if failing || connected_before {
            info!(node, peer, "raft link to peer reconnected");
        }
        connected_before = true;
        failing = false;
        {
            let mut st = link.lock();
            st.stream = Some(stream.clone());
            st.failed = None;
            // What piled up while connecting goes first, from the task.
            st.flushing = true;
        }
        let opened = Instant::now();
        let end = link.serve(&stream, &mut shutdown).await;
        {
            let mut st = link.lock();
            st.stream = None;
            st.flushing = false;
            st.failed = None;
            if matches!(end, LinkEnd::Broken(_)) {
                link.lose_pending(&mut st);
            }
        }
        match end {
            LinkEnd::Finished => return,
            LinkEnd::Broken(reason) => {
                link.counters.count(
                    &link.counters.stream_breaks,
                    Some("trireme_transport_stream_breaks_total"),
                );
                warn!(node, peer, "raft link to peer broke: {reason}");
                link.mark_unreachable();
                if opened.elapsed() >= max {
                    backoff.reset();
                }
                if !pause(&mut backoff, &mut shutdown).await {
                    return;
                }
            }
        }
    }
}

/// Sleeps the next backoff delay; false if shutdown came first.
async fn pause(backoff: &mut Backoff, shutdown: &mut watch::Receiver<bool>) -> bool {
    let delay = backoff.next_delay();
    tokio::select! {
        biased;
        () = shutdown_requested(shutdown) => false,
        () = tokio::time::sleep(delay) => true,
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
