//! The transport over real sockets on 127.0.0.1 with ephemeral ports: Raft
//! links and gRPC calls on one listener per node. Every wait is bounded by
//! a deadline.

// The helpers below are test code too (clippy.toml allows unwrap only
// inside #[test] functions).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use raft::eraftpb::{Entry, Message, MessageType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Status;
use trireme_proto::v1::peer_service_client::PeerServiceClient;
use trireme_transport::wire::{self, Frame, FrameLimits};
use trireme_transport::{
    CLUSTER_HEADER, CatalogChange, ForwardReply, ForwardRequest, Inbound, NODE_HEADER, PeerHandler, PeerServer,
    SECRET_HEADER, Transport, TransportConfig, TransportError, op,
};

const DEADLINE: Duration = Duration::from_secs(20);
const CLUSTER: &str = "test-cluster";
const SECRET: &str = "s3cr3t-token";

#[derive(Default)]
struct TestHandler {
    forwards: AtomicUsize,
    catalogs: Mutex<Vec<(u64, CatalogChange)>>,
}

#[tonic::async_trait]
impl PeerHandler for TestHandler {
    async fn forward(&self, from: u64, req: ForwardRequest) -> ForwardReply {
        self.forwards.fetch_add(1, Ordering::SeqCst);
        match req.op {
            op::READ => ForwardReply {
                data: vec![from as u8; req.length as usize].into(),
                ..Default::default()
            },
            op::WRITE => ForwardReply {
                data: req.data.iter().rev().copied().collect(),
                ..Default::default()
            },
            op::FLUSH => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                ForwardReply::default()
            }
            _ => ForwardReply {
                errno: 108,
                message: format!("not the leader of {}", req.volume),
                leader_hint: 3,
                ..Default::default()
            },
        }
    }

    async fn catalog(&self, from: u64, change: CatalogChange) -> Result<(), Status> {
        if change.name == "taken" {
            return Err(Status::already_exists("volume taken exists"));
        }
        self.catalogs.lock().unwrap().push((from, change));
        Ok(())
    }
}

/// Logs to the test's output, filtered by RUST_LOG (errors only by default).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into());
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(filter)
        .try_init();
}

/// A listener on an ephemeral port of 127.0.0.1 (or on `addr`), with
/// SO_REUSEADDR so a restarted node can take the same port at once.
fn listen(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    socket.listen(128).unwrap()
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn config(node_id: u64, peers: &[(u64, SocketAddr)]) -> TransportConfig {
    let mut c = TransportConfig::new(
        node_id,
        CLUSTER,
        SECRET,
        peers.iter().copied().collect::<BTreeMap<_, _>>(),
    );
    c.connect_timeout_ms = 500;
    c.backoff_initial_ms = 20;
    c.backoff_max_ms = 200;
    c.keepalive_interval_ms = 200;
    c.keepalive_timeout_ms = 500;
    c
}

struct Node {
    transport: Transport,
    inbound: mpsc::Receiver<Inbound>,
    handler: Arc<TestHandler>,
    server: JoinHandle<()>,
}

/// Starts a node's transport and serves it on `listener`, in the current runtime.
fn start_node(config: TransportConfig, listener: TcpListener) -> Node {
    init_tracing();
    let handler = Arc::new(TestHandler::default());
    let (transport, inbound, server) = Transport::start(config, handler.clone()).unwrap();
    Node {
        transport,
        inbound,
        handler,
        server: serve(server, listener),
    }
}

fn serve<H: PeerHandler>(server: PeerServer<H>, listener: TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        server.serve(listener, std::future::pending()).await.unwrap();
    })
}

fn raft_msg(from: u64, to: u64, index: u64, payload: usize) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgAppend);
    m.from = from;
    m.to = to;
    m.term = 1;
    m.index = index;
    if payload > 0 {
        let e = Entry {
            index: index + 1,
            term: 1,
            data: vec![0xab; payload].into(),
            ..Default::default()
        };
        m.entries = vec![e].into();
    }
    m
}

async fn recv(rx: &mut mpsc::Receiver<Inbound>) -> Inbound {
    tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("no inbound raft message within the deadline")
        .expect("inbound channel closed")
}

/// Polls `cond` every 10 ms until it holds or the deadline passes.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A gRPC client speaking the protocol directly, with the given credentials.
async fn raw_client(addr: SocketAddr) -> PeerServiceClient<tonic::transport::Channel> {
    PeerServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX)
}

fn with_creds<T>(message: T, cluster: &str, node: u64, secret: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert(CLUSTER_HEADER, cluster.parse().unwrap());
    r.metadata_mut().insert(NODE_HEADER, node.to_string().parse().unwrap());
    r.metadata_mut().insert(SECRET_HEADER, secret.parse().unwrap());
    r
}

/// A Raft link opened by hand, as the wire format says: the hello, then
/// the receiver's answer (Err: its REFUSE reason).
async fn raw_link(addr: SocketAddr, cluster: &str, node: u64, secret: &str) -> (TcpStream, Result<(), String>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut hello = Vec::new();
    wire::encode_hello(
        &mut hello,
        &wire::Hello {
            node_id: node,
            cluster_id: cluster.as_bytes().to_vec(),
            secret: secret.as_bytes().to_vec(),
        },
    )
    .unwrap();
    stream.write_all(&hello).await.unwrap();
    let mut buf = BytesMut::new();
    let answer = loop {
        match wire::decode_frame(
            &mut buf,
            FrameLimits {
                raft_message_bytes: None,
            },
        )
        .unwrap()
        {
            Some(Frame::Accept) => break Ok(()),
            Some(Frame::Refuse(reason)) => break Err(reason),
            Some(other) => panic!("unexpected {other:?}"),
            None => {
                let n = tokio::time::timeout(DEADLINE, stream.read_buf(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(n > 0, "closed without an answer");
            }
        }
    };
    (stream, answer)
}

/// A RAFT frame carrying `message` as it is, valid or not.
fn raft_frame(group_id: u64, message: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&((wire::GROUP_ID_BYTES + message.len()) as u32).to_le_bytes());
    f.push(wire::kind::RAFT);
    f.extend_from_slice(&group_id.to_le_bytes());
    f.extend_from_slice(message);
    f
}

/// Waits until the peer closes `stream`, skipping its PINGs.
async fn closed_by_peer(stream: &mut TcpStream) {
    let mut sink = vec![0u8; 4096];
    loop {
        match tokio::time::timeout(DEADLINE, stream.read(&mut sink)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => panic!("the peer kept the link open"),
        }
    }
}

/// The daemon's way: inbound messages go to a router called on the link's
/// task, in the order sent, and misaddressed ones never reach it.
#[tokio::test]
async fn a_routed_transport_hands_messages_to_its_router_in_order() {
    init_tracing();
    let (la, lb) = (listen(any_port()), listen(any_port()));
    let (pa, pb) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let a = start_node(config(1, &[(2, pb)]), la);
    let routed: Arc<Mutex<Vec<Inbound>>> = Arc::default();
    let sink = routed.clone();
    let cb = config(2, &[(1, pa)]);
    let (b, service) = Transport::start_routed(
        cb,
        Arc::new(TestHandler::default()),
        Arc::new(move |m: Inbound| sink.lock().unwrap().push(m)),
    )
    .unwrap();
    let server = serve(service, lb);
    for i in 0..200u64 {
        a.transport.send(2, 7 + i % 2, raft_msg(1, 2, i, 64));
    }
    // Says it is for node 3: dropped by the server, never routed.
    a.transport.send(2, 7, raft_msg(1, 3, 1000, 0));
    a.transport.send(2, 7, raft_msg(1, 2, 200, 0));
    eventually("every message routed", || routed.lock().unwrap().len() >= 201).await;
    let got: Vec<(u64, u64, u64)> = routed
        .lock()
        .unwrap()
        .iter()
        .map(|m| (m.from, m.group_id, m.message.index))
        .collect();
    let want: Vec<(u64, u64, u64)> = (0..=200u64).map(|i| (1, 7 + (i % 2) * u64::from(i < 200), i)).collect();
    assert_eq!(got, want);
    b.shutdown();
    server.abort();
}

#[tokio::test]
async fn raft_messages_flow_in_order_for_every_group_and_batch() {
    let (la, lb) = (listen(any_port()), listen(any_port()));
    let (pa, pb) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let a = start_node(config(1, &[(2, pb)]), la);
    let mut b = start_node(config(2, &[(1, pa)]), lb);

    // Queued before the link is up (this runtime has one thread and `send`
    // never yields), so they leave together once it is.
    let groups = [10u64, 11, 12];
    let total = 1500u64;
    for i in 0..total {
        a.transport.send(2, groups[(i % 3) as usize], raft_msg(1, 2, i, 16));
    }
    for i in 0..total {
        let m = recv(&mut b.inbound).await;
        assert_eq!((m.from, m.group_id, m.message.index), (1, groups[(i % 3) as usize], i));
        assert_eq!(m.message.get_msg_type(), MessageType::MsgAppend);
        assert_eq!(m.message.entries[0].data.len(), 16);
    }
    let stats = a.transport.peer_stats(2).unwrap();
    assert_eq!(stats.messages_sent, total);
    assert_eq!(stats.messages_dropped, 0);
    assert!(
        stats.writes * 10 <= total,
        "{stats:?}: messages queued at once should share writes"
    );
    assert_eq!(stats.connects, 1);

    // On the open link each `send` writes at once; `send_all` writes once
    // per peer.
    for i in total..total + 10 {
        a.transport.send(2, 7, raft_msg(1, 2, i, 0));
    }
    let burst: Vec<Message> = (total + 10..2 * total).map(|i| raft_msg(1, 2, i, 0)).collect();
    a.transport.send_all(7, &burst);
    for i in total..2 * total {
        assert_eq!(recv(&mut b.inbound).await.message.index, i);
    }
    let after = a.transport.peer_stats(2).unwrap();
    assert!(
        after.writes - stats.writes <= 10 + 5,
        "{after:?}: ten sends and one send_all of {} messages",
        burst.len()
    );

    // The other direction has its own link.
    let mut a = a;
    for i in 0..50 {
        b.transport.send(1, 99, raft_msg(2, 1, i, 0));
    }
    for i in 0..50 {
        let m = recv(&mut a.inbound).await;
        assert_eq!((m.from, m.group_id, m.message.index), (2, 99, i));
    }

    // Unknown destinations are dropped and counted.
    a.transport.send(42, 1, raft_msg(1, 42, 0, 0));
    assert_eq!(a.transport.unknown_peer_dropped(), 1);
    a.transport
        .send_all(1, &[raft_msg(1, 42, 1, 0), raft_msg(1, 2, 7, 0), raft_msg(1, 43, 2, 0)]);
    assert_eq!(
        a.transport.unknown_peer_dropped(),
        3,
        "one per message to a node that is no peer"
    );
    assert_eq!(recv(&mut b.inbound).await.message.index, 7, "the rest still goes");
    assert!(a.transport.take_unreachable().is_empty());
}

#[tokio::test]
async fn wrong_cluster_secret_or_node_is_refused_and_nothing_is_delivered() {
    let lb = listen(any_port());
    let pb = lb.local_addr().unwrap();
    let mut b = start_node(config(2, &[(1, "127.0.0.1:9".parse().unwrap())]), lb);

    // Three misconfigured senders, each using the transport itself.
    let mut wrong_cluster = config(1, &[(2, pb)]);
    wrong_cluster.cluster_id = "other-cluster".into();
    let mut wrong_secret = config(1, &[(2, pb)]);
    wrong_secret.secret = "guessed-secret".into();
    let unknown_node = config(9, &[(2, pb)]);
    let handler = Arc::new(TestHandler::default());
    for (cfg, expect) in [
        (wrong_cluster, "cluster id"),
        (wrong_secret, "secret"),
        (unknown_node, "node 9 is not a configured peer"),
    ] {
        let node_id = cfg.node_id;
        let (t, _inbound, _service) = Transport::start(cfg, handler.clone()).unwrap();
        for i in 0..10 {
            t.send(2, 5, raft_msg(node_id, 2, i, 8));
        }
        // The refused link counts as failed.
        eventually("the refused link to be reported", || t.take_unreachable() == vec![2]).await;

        let err = t
            .forward(
                2,
                ForwardRequest {
                    volume: "v".into(),
                    op: op::READ,
                    length: 4096,
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        let TransportError::Status { code, message, .. } = &err else {
            panic!("unexpected {err:?}");
        };
        assert_eq!(*code, tonic::Code::Unauthenticated, "{err}");
        assert!(message.contains(expect), "{message:?} should name {expect:?}");
        assert!(
            !message.contains(SECRET) && !message.contains("guessed-secret"),
            "{message}"
        );

        let err = t.catalog(2, CatalogChange::default()).await.unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::Status {
                    code: tonic::Code::Unauthenticated,
                    ..
                }
            ),
            "{err}"
        );
        t.shutdown();
    }

    // By hand: a refused link, and a call with a missing header.
    let (mut link, answer) = raw_link(pb, CLUSTER, 1, "nope").await;
    let reason = answer.unwrap_err();
    assert!(
        reason.contains("secret") && !reason.contains(SECRET) && !reason.contains("nope"),
        "{reason}"
    );
    closed_by_peer(&mut link).await;
    let (_, answer) = raw_link(pb, CLUSTER, 2, SECRET).await;
    assert!(answer.unwrap_err().contains("node 2 is not a configured peer"));
    let mut raw = raw_client(pb).await;
    let refused = raw
        .catalog(tonic::Request::new(CatalogChange::default()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(refused.message().contains("missing"), "{}", refused.message());
    // Neither gRPC nor the link magic, and silence: both closed.
    let mut junk = TcpStream::connect(pb).await.unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    closed_by_peer(&mut junk).await;

    // Nothing reached the node: no handler call, no inbound message.
    assert_eq!(b.handler.forwards.load(Ordering::SeqCst), 0);
    assert!(b.handler.catalogs.lock().unwrap().is_empty());
    assert!(b.inbound.try_recv().is_err());

    // The right credentials by hand are accepted.
    let (mut link, answer) = raw_link(pb, CLUSTER, 1, SECRET).await;
    answer.unwrap();
    let m = protobuf::Message::write_to_bytes(&raft_msg(1, 2, 77, 0)).unwrap();
    link.write_all(&raft_frame(6, &m)).await.unwrap();
    let m = recv(&mut b.inbound).await;
    assert_eq!((m.from, m.group_id, m.message.index), (1, 6, 77));
}

/// A node in a runtime of its own, so that "killing" it (shutting the
/// runtime down) closes its listener and every connection at once, as a
/// SIGKILL would.
struct RemoteNode {
    runtime: tokio::runtime::Runtime,
    transport: Transport,
    inbound: mpsc::Receiver<Inbound>,
}

fn start_remote(config: TransportConfig, addr: SocketAddr) -> RemoteNode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let node = {
        let _guard = runtime.enter();
        start_node(config, listen(addr))
    };
    RemoteNode {
        runtime,
        transport: node.transport,
        inbound: node.inbound,
    }
}

impl RemoteNode {
    fn kill(self) {
        drop(self.transport);
        self.runtime.shutdown_background();
    }
}

#[tokio::test]
async fn a_peer_that_dies_and_comes_back_is_reconnected_and_send_never_blocks() {
    let la = listen(any_port());
    let pa = la.local_addr().unwrap();
    let pb = listen(any_port()).local_addr().unwrap(); // reserve a port for B, then free it
    let mut ca = config(1, &[(2, pb)]);
    ca.queue_messages_per_peer = 64;
    let a = start_node(ca, la);

    let mut b = start_remote(config(2, &[(1, pa)]), pb);
    for i in 0..50 {
        a.transport.send(2, 1, raft_msg(1, 2, i, 0));
    }
    for i in 0..50 {
        assert_eq!(recv(&mut b.inbound).await.message.index, i);
    }
    assert!(a.transport.take_unreachable().is_empty());

    // Kill B. A notices, reports it, and `send` stays instant while the
    // queue bound drops the excess.
    let mut old_inbound = std::mem::replace(&mut b.inbound, mpsc::channel(1).1);
    b.kill();
    eventually("B to be reported unreachable", || {
        a.transport.take_unreachable().contains(&2)
    })
    .await;
    let dropped_before = a.transport.peer_stats(2).unwrap().messages_dropped;
    let mut slowest = Duration::ZERO;
    for i in 0..5000 {
        let t = Instant::now();
        a.transport.send(2, 1, raft_msg(1, 2, 1000 + i, 64));
        slowest = slowest.max(t.elapsed());
    }
    assert!(slowest < Duration::from_millis(250), "send blocked for {slowest:?}");
    let stats = a.transport.peer_stats(2).unwrap();
    assert!(
        stats.messages_dropped >= dropped_before + 5000 - 64,
        "a queue of 64 must drop the rest: {stats:?}"
    );
    eventually("a failed reconnect attempt", || {
        a.transport.peer_stats(2).unwrap().connect_failures > 0
    })
    .await;
    while let Ok(m) = old_inbound.try_recv() {
        assert!(
            m.message.index < 50,
            "a message sent after the kill reached the dead node"
        );
    }

    // B comes back on the same port: A reconnects by itself.
    let mut b = start_remote(config(2, &[(1, pa)]), pb);
    let start = Instant::now();
    let mut probe = 10_000u64;
    loop {
        assert!(start.elapsed() < DEADLINE, "no delivery after B came back");
        a.transport.send(2, 1, raft_msg(1, 2, probe, 0));
        probe += 1;
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(50), b.inbound.recv()).await {
            break;
        }
    }
    // In-order delivery resumes (in rounds that fit the queue of 64).
    for i in 0..40 {
        a.transport.send(2, 1, raft_msg(1, 2, 1_000_000 + i, 0));
    }
    let mut next = 1_000_000;
    while next < 1_000_040 {
        let m = recv(&mut b.inbound).await;
        if m.message.index >= 1_000_000 {
            assert_eq!(m.message.index, next);
            next += 1;
        }
    }
    let stats = a.transport.peer_stats(2).unwrap();
    assert!(stats.reconnects >= 1 && stats.stream_breaks >= 1, "{stats:?}");
    b.kill();
}

#[tokio::test]
async fn a_stalled_peer_does_not_hold_up_the_others() {
    // C accepts TCP connections and never answers: a SIGSTOPped process.
    let stalled = listen(any_port());
    let pc = stalled.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = stalled.accept().await {
            conns.push(s);
        }
    });
    let (la, lb) = (listen(any_port()), listen(any_port()));
    let (pa, pb) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let mut ca = config(1, &[(2, pb), (3, pc)]);
    ca.queue_messages_per_peer = 256;
    let a = start_node(ca, la);
    let mut b = start_node(config(2, &[(1, pa)]), lb);

    // Enough to C to fill its TCP buffers, interleaved with traffic to B.
    for round in 0..20u64 {
        for i in 0..256 {
            let t = Instant::now();
            a.transport.send(3, 1, raft_msg(1, 3, round * 256 + i, 16 * 1024));
            assert!(
                t.elapsed() < Duration::from_millis(250),
                "send to a stalled peer blocked"
            );
        }
        for i in 0..10 {
            a.transport.send(2, 1, raft_msg(1, 2, round * 10 + i, 0));
        }
        for i in 0..10 {
            assert_eq!(recv(&mut b.inbound).await.message.index, round * 10 + i);
        }
        tokio::task::yield_now().await;
    }
    // C never answers the hello: each attempt times out.
    eventually("the stalled peer's link to fail", || {
        let s = a.transport.peer_stats(3).unwrap();
        s.stream_breaks + s.connect_failures > 0
    })
    .await;
    assert!(a.transport.take_unreachable().contains(&3));
    assert!(a.transport.peer_stats(3).unwrap().messages_dropped > 0);
    assert_eq!(a.transport.peer_stats(2).unwrap().messages_dropped, 0);
    held.abort();
}

/// Far more than a socket buffer holds, sent at once: the first writes go
/// out from `send`, the socket pushes back, the link's task writes the
/// rest as it drains, and everything arrives whole and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_socket_hands_the_rest_to_the_link_task_in_order() {
    let (la, lb) = (listen(any_port()), listen(any_port()));
    let (pa, pb) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let a = start_node(config(1, &[(2, pb)]), la);
    let mut b = start_node(config(2, &[(1, pa)]), lb);
    a.transport.send(2, 1, raft_msg(1, 2, 0, 0));
    assert_eq!(recv(&mut b.inbound).await.message.index, 0);

    const MESSAGES: u64 = 200;
    const PAYLOAD: usize = 256 * 1024;
    let sender = a.transport.clone();
    // From a plain thread, as the log writer sends.
    std::thread::spawn(move || {
        for i in 1..=MESSAGES {
            sender.send(2, 1 + i % 2, raft_msg(1, 2, i, PAYLOAD));
        }
    })
    .join()
    .unwrap();
    for i in 1..=MESSAGES {
        let m = recv(&mut b.inbound).await;
        assert_eq!((m.group_id, m.message.index), (1 + i % 2, i));
        assert_eq!(m.message.entries[0].data.len(), PAYLOAD);
        assert!(m.message.entries[0].data.iter().all(|&x| x == 0xab));
    }
    let stats = a.transport.peer_stats(2).unwrap();
    assert_eq!((stats.messages_sent, stats.messages_dropped), (MESSAGES + 1, 0));
    assert_eq!(stats.stream_breaks, 0, "{stats:?}");
}

/// A peer that accepted the link and then says nothing (a stopped process
/// keeps its sockets open) is given up after the keepalive timeout; and a
/// sender that says nothing is closed by the receiver the same way.
#[tokio::test]
async fn a_silent_peer_is_given_up_after_the_keepalive_timeout() {
    let silent = listen(any_port());
    let pc = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((mut s, _)) = silent.accept().await {
            let mut accept = Vec::new();
            wire::encode_empty(&mut accept, wire::kind::ACCEPT);
            s.write_all(&accept).await.unwrap();
            conns.push(s);
        }
    });
    let la = listen(any_port());
    let pa = la.local_addr().unwrap();
    let a = start_node(config(1, &[(3, pc)]), la);
    let started = Instant::now();
    a.transport.send(3, 1, raft_msg(1, 3, 0, 0));
    eventually("the silent peer's link to break", || {
        a.transport.peer_stats(3).unwrap().stream_breaks > 0
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "broke before the keepalive timeout: {:?}",
        started.elapsed()
    );
    assert!(a.transport.take_unreachable().contains(&3));
    held.abort();

    // The receiver's side: a link that sends nothing is closed.
    let (mut link, answer) = raw_link(pa, CLUSTER, 3, SECRET).await;
    answer.unwrap();
    let opened = Instant::now();
    closed_by_peer(&mut link).await;
    assert!(opened.elapsed() >= Duration::from_millis(400), "{:?}", opened.elapsed());
}

#[tokio::test]
async fn forward_and_catalog_round_trip() {
    let (la, lb) = (listen(any_port()), listen(any_port()));
    let (pa, pb) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let mut ca = config(1, &[(2, pb)]);
    ca.request_timeout_ms = 300;
    let a = start_node(ca, la);
    let b = start_node(config(2, &[(1, pa)]), lb);

    let reply = a
        .transport
        .forward(
            2,
            ForwardRequest {
                volume: "vol".into(),
                epoch: 3,
                op: op::READ,
                offset: 4096,
                length: 8192,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((reply.errno, reply.data.len()), (0, 8192));
    assert!(
        reply.data.iter().all(|&b| b == 1),
        "the handler saw the sender as node 1"
    );

    let reply = a
        .transport
        .forward(
            2,
            ForwardRequest {
                volume: "vol".into(),
                op: op::WRITE,
                length: 3,
                data: vec![1, 2, 3].into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(reply.data, vec![3, 2, 1]);

    let reply = a
        .transport
        .forward(
            2,
            ForwardRequest {
                volume: "vol".into(),
                op: op::TRIM,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((reply.errno, reply.leader_hint), (108, 3));
    assert!(reply.message.contains("vol"));

    // The deadline holds against a handler that never answers.
    let t = Instant::now();
    let err = a
        .transport
        .forward(
            2,
            ForwardRequest {
                volume: "vol".into(),
                op: op::FLUSH,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Timeout { peer: 2, .. }), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5));

    let change = CatalogChange {
        name: "vol".into(),
        id: "00ff".into(),
        size_bytes: 1 << 30,
        replicas: vec![1, 2, 3],
        group_id: 17,
        delete: false,
        created_at_unix_s: 1_700_000_000,
        durability: "quorum-receipt".into(),
    };
    a.transport.catalog(2, change.clone()).await.unwrap();
    assert_eq!(b.handler.catalogs.lock().unwrap().as_slice(), &[(1, change)]);
    let err = a
        .transport
        .catalog(
            2,
            CatalogChange {
                name: "taken".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(
        err,
        TransportError::Status {
            peer: 2,
            code: tonic::Code::AlreadyExists,
            message: "volume taken exists".into()
        }
    );
    assert_eq!(
        a.transport.catalog(5, CatalogChange::default()).await,
        Err(TransportError::UnknownPeer(5))
    );
    assert_eq!(b.handler.forwards.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn oversized_messages_are_refused() {
    const LIMIT: usize = 64 * 1024;
    let (la, lb) = (listen(any_port()), listen(any_port()));
    let (pa, pb) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let mut ca = config(1, &[(2, pb)]);
    ca.max_message_bytes = LIMIT;
    let mut cb = config(2, &[(1, pa)]);
    cb.max_message_bytes = LIMIT;
    let a = start_node(ca, la);
    let mut b = start_node(cb, lb);

    // The sender drops (and counts) a raft message over the bound and
    // keeps its link: the next one arrives.
    a.transport.send(2, 1, raft_msg(1, 2, 0, LIMIT + 1));
    a.transport.send(2, 1, raft_msg(1, 2, 1, LIMIT / 2));
    let m = recv(&mut b.inbound).await;
    assert_eq!(m.message.index, 1);
    let stats = a.transport.peer_stats(2).unwrap();
    assert_eq!((stats.messages_dropped, stats.messages_sent), (1, 1));

    // The receiver refuses what a sender did not bound: a RAFT frame over
    // the limit closes the link before its body is read.
    for size in [LIMIT + 1, 4 * LIMIT] {
        let (mut link, answer) = raw_link(pb, CLUSTER, 1, SECRET).await;
        answer.unwrap();
        let frame = raft_frame(1, &vec![0; size]);
        // The receiver may close before it all went out.
        let _ = link.write_all(&frame).await;
        closed_by_peer(&mut link).await;
    }
    let mut raw = raw_client(pb).await;
    let status = raw
        .forward(with_creds(
            ForwardRequest {
                volume: "v".into(),
                op: op::WRITE,
                data: vec![0; 2 * LIMIT].into(),
                ..Default::default()
            },
            CLUSTER,
            1,
            SECRET,
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), tonic::Code::ResourceExhausted | tonic::Code::OutOfRange),
        "{status:?}"
    );
    assert_eq!(b.handler.forwards.load(Ordering::SeqCst), 0);
    assert!(b.inbound.try_recv().is_err());

    // The client refuses to send one too.
    let err = a
        .transport
        .forward(
            2,
            ForwardRequest {
                volume: "v".into(),
                op: op::WRITE,
                data: vec![0; 2 * LIMIT].into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::TooLarge { .. }), "{err}");
}

/// RUSTSEC-2024-0437 (rust-protobuf: stack overflow on crafted input):
/// deeply nested groups in unknown fields, and garbage, are dropped without
/// harm, and the link goes on.
#[tokio::test]
async fn crafted_raft_payloads_are_dropped_and_the_link_goes_on() {
    let lb = listen(any_port());
    let pb = lb.local_addr().unwrap();
    let mut b = start_node(config(2, &[(1, "127.0.0.1:9".parse().unwrap())]), lb);

    let start_group = (100u8 << 3) | 3; // field 100, wire type 3 (start group)
    let end_group = (100u8 << 3) | 4;
    let mut nested = vec![start_group; 1_000_000];
    nested.extend(std::iter::repeat_n(end_group, 1_000_000));
    let mut in_entry = Vec::new();
    for _ in 0..200_000 {
        // entries (field 7, length-delimited) nesting groups inside an Entry
        in_entry.extend([(7 << 3) | 2, 2, start_group, end_group]);
    }
    let valid = protobuf::Message::write_to_bytes(&raft_msg(1, 2, 5, 0)).unwrap();
    let misaddressed = protobuf::Message::write_to_bytes(&raft_msg(3, 2, 6, 0)).unwrap();
    let (mut link, answer) = raw_link(pb, CLUSTER, 1, SECRET).await;
    answer.unwrap();
    for message in [nested, in_entry, vec![0xff; 64], misaddressed, valid] {
        link.write_all(&raft_frame(1, &message)).await.unwrap();
    }
    let m = recv(&mut b.inbound).await;
    assert_eq!((m.from, m.message.index), (1, 5), "only the valid message is delivered");
    assert!(b.inbound.try_recv().is_err());
}

#[tokio::test]
async fn shutdown_ends_the_links_so_a_graceful_stop_completes() {
    let (la, lb) = (listen(any_port()), listen(any_port()));
    let (pa, pb) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let a = start_node(config(1, &[(2, pb)]), la);

    let cb = config(2, &[(1, pa)]);
    let handler = Arc::new(TestHandler::default());
    let (tb, mut inbound_b, service) = Transport::start(cb, handler).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        service
            .serve(lb, async {
                let _ = stop_rx.await;
            })
            .await
    });
    a.transport.send(2, 1, raft_msg(1, 2, 0, 0));
    recv(&mut inbound_b).await;

    tb.shutdown();
    stop_tx.send(()).unwrap();
    tokio::time::timeout(DEADLINE, server)
        .await
        .expect("graceful server stop held up by a raft link")
        .unwrap()
        .unwrap();
    a.server.abort();
}

#[tokio::test]
async fn bad_config_is_refused_naming_the_field() {
    let handler = Arc::new(TestHandler::default());
    let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
    type Mutate = Box<dyn Fn(&mut TransportConfig)>;
    let cases: [(&str, Mutate); 5] = [
        ("node_id", Box::new(|c| c.node_id = 0)),
        ("secret", Box::new(|c| c.secret = String::new())),
        ("cluster_id", Box::new(|c| c.cluster_id = "has space".into())),
        ("peers", Box::new(|c| c.node_id = 2)),
        ("backoff_max_ms", Box::new(|c| c.backoff_max_ms = 1)),
    ];
    for (field, mutate) in cases {
        let mut c = config(1, &[(2, peer)]);
        mutate(&mut c);
        let err = Transport::start(c, handler.clone()).unwrap_err();
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
    // A node without peers admits nobody, so it needs no secret.
    let mut single = config(1, &[]);
    single.secret = String::new();
    Transport::start(single, handler).unwrap();
}

/// Counts every counter by name and labels, for one thread.
#[derive(Default)]
struct CountingRecorder {
    counters: Mutex<BTreeMap<String, Arc<std::sync::atomic::AtomicU64>>>,
}

impl CountingRecorder {
    fn get(&self, key: &str) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .get(key)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

impl metrics::Recorder for CountingRecorder {
    fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let mut name = key.name().to_string();
        for label in key.labels() {
            name.push_str(&format!(" {}={}", label.key(), label.value()));
        }
        let counter = self.counters.lock().unwrap().entry(name).or_default().clone();
        metrics::Counter::from_arc(counter)
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// The counters reach the recorder installed before `Transport::start` (as
/// the daemon installs it).
#[test]
fn metrics_count_per_peer() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let recorder = CountingRecorder::default();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let (la, lb) = (listen(any_port()), listen(any_port()));
            let (pa, pb) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
            let mut ca = config(1, &[(2, pb)]);
            ca.queue_messages_per_peer = 8;
            let (a, mut b) = (start_node(ca, la), start_node(config(2, &[(1, pa)]), lb));
            for i in 0..10 {
                a.transport.send(2, 1, raft_msg(1, 2, i, 0));
            }
            a.transport.send(7, 1, raft_msg(1, 7, 0, 0));
            for i in 0..8 {
                assert_eq!(recv(&mut b.inbound).await.message.index, i);
            }
        })
    });
    assert_eq!(recorder.get("trireme_transport_messages_sent_total peer=2"), 8);
    assert_eq!(recorder.get("trireme_transport_writes_total peer=2"), 1);
    assert_eq!(
        recorder.get("trireme_transport_messages_dropped_total peer=2 reason=queue_full"),
        2
    );
    assert_eq!(
        recorder.get("trireme_transport_messages_dropped_total peer=7 reason=unknown_peer"),
        1
    );
    assert_eq!(recorder.get("trireme_transport_messages_received_total peer=1"), 8);
}
