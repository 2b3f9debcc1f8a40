//! Injected network faults (the `faults` feature) over real sockets on
//! 127.0.0.1: rules act on the live Raft link and on unary calls, and
//! clearing them restores the traffic. Every wait is bounded by a deadline.
#![cfg(feature = "faults")]
// Test code throughout (clippy.toml allows unwrap only inside #[test]).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use raft::eraftpb::{Message, MessageType};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tonic::Status;
use trireme_transport::{
    CatalogChange, ForwardReply, ForwardRequest, Inbound, NetRule, PeerHandler, Transport, TransportConfig,
    TransportError,
};

const DEADLINE: Duration = Duration::from_secs(20);

struct Echo;

#[tonic::async_trait]
impl PeerHandler for Echo {
    async fn forward(&self, _from: u64, req: ForwardRequest) -> ForwardReply {
        ForwardReply {
            data: req.data,
            ..Default::default()
        }
    }

    async fn catalog(&self, _from: u64, _change: CatalogChange) -> Result<(), Status> {
        Ok(())
    }
}

fn listen() -> TcpListener {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    socket.listen(128).unwrap()
}

fn start(node_id: u64, peers: &[(u64, SocketAddr)], listener: TcpListener) -> (Transport, mpsc::Receiver<Inbound>) {
    let mut config = TransportConfig::new(
        node_id,
        "test-cluster",
        "s3cr3t-token",
        peers.iter().copied().collect::<BTreeMap<_, _>>(),
    );
    config.connect_timeout_ms = 500;
    config.backoff_initial_ms = 20;
    config.backoff_max_ms = 200;
    let (transport, inbound, server) = Transport::start(config, Arc::new(Echo)).unwrap();
    tokio::spawn(async move {
        server.serve(listener, std::future::pending()).await.unwrap();
    });
    (transport, inbound)
}

fn heartbeat(from: u64, to: u64, index: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgHeartbeat);
    m.from = from;
    m.to = to;
    m.index = index;
    m
}

/// Two connected nodes, 1 and 2, with a message already delivered 1 -> 2.
async fn pair() -> (Transport, Transport, mpsc::Receiver<Inbound>) {
    let (la, lb) = (listen(), listen());
    let (pa, pb) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let (a, _a_in) = start(1, &[(2, pb)], la);
    let (b, mut b_in) = start(2, &[(1, pa)], lb);
    a.send(2, 0, heartbeat(1, 2, 0));
    let first = tokio::time::timeout(DEADLINE, b_in.recv()).await.unwrap().unwrap();
    assert_eq!(first.message.index, 0);
    (a, b, b_in)
}

#[tokio::test]
async fn dropped_messages_vanish_on_a_live_link_until_the_rule_is_cleared() {
    let (a, _b, mut b_in) = pair().await;
    let drop = NetRule {
        drop: true,
        ..NetRule::default()
    };
    a.net_faults().set(&[2], drop).unwrap();
    for i in 1..=10 {
        a.send(2, 0, heartbeat(1, 2, i));
    }
    let got = tokio::time::timeout(Duration::from_millis(300), b_in.recv()).await;
    assert!(got.is_err(), "a message got through a drop rule: {got:?}");
    assert!(a.net_faults().injected(2).unwrap().dropped >= 1);
    assert_eq!(
        a.peer_stats(2).unwrap().stream_breaks,
        0,
        "the stream stays up: the loss is silent"
    );

    a.net_faults().clear();
    a.send(2, 0, heartbeat(1, 2, 11));
    let next = tokio::time::timeout(DEADLINE, b_in.recv()).await.unwrap().unwrap();
    assert_eq!(next.message.index, 11, "only what was sent after the clear arrives");
}

#[tokio::test]
async fn delayed_messages_arrive_late_and_in_order() {
    let (a, _b, mut b_in) = pair().await;
    a.net_faults()
        .set(
            &[2],
            NetRule {
                delay_ms: 200,
                ..NetRule::default()
            },
        )
        .unwrap();
    let sent = Instant::now();
    for i in 1..=50 {
        a.send(2, 0, heartbeat(1, 2, i));
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for i in 1..=50 {
        let m = tokio::time::timeout(DEADLINE, b_in.recv()).await.unwrap().unwrap();
        assert_eq!(m.message.index, i);
        if i == 1 {
            assert!(sent.elapsed() >= Duration::from_millis(200), "{:?}", sent.elapsed());
        }
    }
}

#[tokio::test]
async fn duplicated_messages_arrive_twice_and_loss_loses_some() {
    let (a, _b, mut b_in) = pair().await;
    a.net_faults()
        .set(
            &[2],
            NetRule {
                dup_percent: 100,
                ..NetRule::default()
            },
        )
        .unwrap();
    for i in 1..=5 {
        a.send(2, 0, heartbeat(1, 2, i));
    }
    for i in 1..=5 {
        for _ in 0..2 {
            let m = tokio::time::timeout(DEADLINE, b_in.recv()).await.unwrap().unwrap();
            assert_eq!(m.message.index, i);
        }
    }
    assert_eq!(a.net_faults().injected(2).unwrap().duplicated, 5);

    a.net_faults()
        .set(
            &[2],
            NetRule {
                loss_percent: 50,
                ..NetRule::default()
            },
        )
        .unwrap();
    for i in 100..300 {
        a.send(2, 0, heartbeat(1, 2, i));
    }
    a.net_faults().clear();
    a.send(2, 0, heartbeat(1, 2, 1000));
    let mut got = Vec::new();
    loop {
        let m = tokio::time::timeout(DEADLINE, b_in.recv()).await.unwrap().unwrap();
        if m.message.index == 1000 {
            break;
        }
        got.push(m.message.index);
    }
    let lost = a.net_faults().injected(2).unwrap().lost;
    assert_eq!(got.len() as u64, 200 - lost, "every message not lost arrived");
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order: {got:?}");
    assert!((50..150).contains(&lost), "{lost} of 200 lost at 50%");
}

#[tokio::test]
async fn unary_calls_to_a_dropped_peer_fail_at_once_and_delays_hold_them() {
    let (a, _b, _b_in) = pair().await;
    let req = ForwardRequest {
        volume: "vol".into(),
        data: vec![7].into(),
        ..Default::default()
    };
    a.net_faults()
        .set(
            &[2],
            NetRule {
                drop: true,
                ..NetRule::default()
            },
        )
        .unwrap();
    let started = Instant::now();
    let e = a.forward(2, req.clone()).await.unwrap_err();
    assert!(matches!(e, TransportError::Unreachable { peer: 2, .. }), "{e}");
    assert!(e.to_string().contains("injected network fault"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "not at once: {:?}",
        started.elapsed()
    );

    a.net_faults()
        .set(
            &[2],
            NetRule {
                delay_ms: 150,
                ..NetRule::default()
            },
        )
        .unwrap();
    let started = Instant::now();
    assert_eq!(a.forward(2, req).await.unwrap().data, vec![7]);
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );
}
