//! A running node: the data dir, the I/O engine, the catalog and the
//! listeners, and the orderly way to stop them all.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};
use trireme_nbd::{Server, ServerConfig};
use trireme_proto::v1::fault_service_server::FaultServiceServer;
use trireme_proto::v1::node_service_server::NodeServiceServer;
use trireme_proto::v1::volume_service_server::VolumeServiceServer;
use trireme_storage::statefile;
use trireme_storage::uring::IoEngine;

use crate::admin::{FaultApi, NodeApi, VolumeApi};
use crate::catalog::{Catalog, NodeServices};
use crate::config::Config;
use crate::error::{DaemonError, Result};
use crate::liveness::Liveness;
use crate::logwriter::LogWriter;
use crate::peer::{self, PeerApi};
use crate::telemetry;
use trireme_raftlog::{EngineLog, EngineLogConfig, RaftLogStore};
use trireme_transport::{Transport, TransportConfig};

/// DATA_DIR/node.toml: who this data dir belongs to, written once.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct NodeIdentity {
    node_id: u64,
    cluster_id: String,
}

/// How long a starting node waits for the data dir lock.
const DATA_DIR_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Checks (or, on first start, records) which node owns the data dir, and
/// takes an exclusive lock so two daemons never share one.
fn prepare_data_dir(config: &Config) -> Result<(PathBuf, nix::fcntl::Flock<fs::File>)> {
    let dir = &config.data_dir;
    let dd_err = |reason: String| DaemonError::DataDir {
        path: dir.clone(),
        reason,
    };
    fs::create_dir_all(dir).map_err(|e| dd_err(format!("cannot create: {e}")))?;
    let dir = dir.canonicalize().map_err(|e| dd_err(format!("cannot resolve: {e}")))?;
    let lock_path = dir.join("lock");
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| dd_err(format!("cannot open {}: {e}", lock_path.display())))?;
    // A triremed that just died may hold the lock a little longer: the
    // kernel tears down its io_uring instances, and the files they hold,
    // asynchronously after the exit. So a restart right after a crash waits
    // (bounded) instead of failing.
    let deadline = std::time::Instant::now() + DATA_DIR_LOCK_WAIT;
    let mut lock_file = lock_file;
    let mut warned = false;
    let lock = loop {
        match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => break lock,
            Err((file, e)) if e == nix::errno::Errno::EWOULDBLOCK && std::time::Instant::now() < deadline => {
                if !warned {
                    tracing::warn!(dir = %dir.display(), "data dir is locked; waiting for the previous triremed to let go");
                    warned = true;
                }
                lock_file = file;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err((_, e)) => {
                return Err(dd_err(format!(
                    "is in use by another triremed ({e}; waited {} s)",
                    DATA_DIR_LOCK_WAIT.as_secs()
                )));
            }
        }
    };
    let identity_path = dir.join("node.toml");
    let want = NodeIdentity {
        node_id: config.node_id,
        cluster_id: config.cluster_id.clone(),
    };
    match fs::read_to_string(&identity_path) {
        Ok(text) => {
            let have: NodeIdentity = toml::from_str(&text).map_err(|e| DaemonError::DataDir {
                path: identity_path.clone(),
                reason: format!("corrupt: {}", e.to_string().trim_end()),
            })?;
            if have != want {
                return Err(DaemonError::DataDir {
                    path: identity_path,
                    reason: format!(
                        "belongs to node {} of cluster \"{}\", but the config says node {} of cluster \"{}\"",
                        have.node_id, have.cluster_id, want.node_id, want.cluster_id
                    ),
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = toml::to_string(&want).map_err(|e| dd_err(format!("encoding node.toml: {e}")))?;
            let tmp = dir.join(".node.toml.tmp");
            fs::write(&tmp, text).map_err(|e| DaemonError::io(tmp.display().to_string(), e))?;
            OpenOptions::new()
                .write(true)
                .open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| DaemonError::io(tmp.display().to_string(), e))?;
            fs::rename(&tmp, &identity_path).map_err(|e| DaemonError::io(identity_path.display().to_string(), e))?;
            statefile::fsync_dir(&dir)?;
        }
        Err(e) => return Err(DaemonError::io(identity_path.display().to_string(), e)),
    }
    Ok((dir, lock))
}

fn bind_unix(path: &Path) -> Result<UnixListener> {
    // A socket file left by a previous run (we hold the data dir lock, so
    // it is not live) is replaced; anything else at that path is not ours.
    if let Ok(meta) = fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            fs::remove_file(path).map_err(|e| DaemonError::io(format!("nbd.unix_socket {}", path.display()), e))?;
        } else {
            return Err(DaemonError::Config {
                path: "nbd.unix_socket".into(),
                reason: format!("{} exists and is not a socket", path.display()),
            });
        }
    }
    UnixListener::bind(path).map_err(|e| DaemonError::io(format!("binding nbd.unix_socket {}", path.display()), e))
}

pub struct Node {
    transport: Transport,
    peer_server: Option<JoinHandle<()>>,
    shutdown_tx: watch::Sender<bool>,
    nbd: Arc<Server<Catalog>>,
    catalog: Arc<Catalog>,
    tasks: Vec<JoinHandle<()>>,
    admin: JoinHandle<()>,
    unix_socket: Option<PathBuf>,
    shutdown_timeout: Duration,
    _lock: nix::fcntl::Flock<fs::File>,
}

impl Node {
    pub async fn start(config: Config) -> Result<Node> {
        let started = Instant::now();
        let (data_dir, lock) = prepare_data_dir(&config)?;
        // Before anything makes metric handles (the log writer, every
        // replica): a handle binds to the recorder installed at its creation.
        if let Some(addr) = config.metrics_addr() {
            telemetry::install(addr, config.node_id)
                .map_err(|e| DaemonError::io(format!("starting metrics.listen {addr}"), std::io::Error::other(e)))?;
        }
        let engine = IoEngine::start()?
            .with_allocation_unit(config.storage.allocation_unit_bytes)
            .map_err(|e| DaemonError::InvalidArgument(format!("storage.allocation_unit_bytes {e}")))?;
        let log_dir = data_dir.join("raft-log");
        let log: Arc<dyn RaftLogStore> = Arc::new(
            EngineLog::open_with(
                &log_dir,
                EngineLogConfig {
                    prefill_bytes: config.log.prefill_bytes,
                    // Small files and an early purge keep recycled (already
                    // written) files coming: appends into new files cost about
                    // twice the CPU per byte (benches/: engine_prefilled), and
                    // each new one is zero-filled first. raft-engine keeps
                    // 1.5 x purge_threshold of files for recycling (12 here)
                    // and purges once more than 8 are in use: 4 files
                    // (128 MiB) of headroom for the writer between purges.
                    target_file_size: 32 << 20,
                    purge_threshold: 256 << 20,
                    ..EngineLogConfig::default()
                },
            )
            .map_err(|e| DaemonError::DataDir {
                path: log_dir.clone(),
                reason: format!("raft log: {e}"),
            })?,
        );
        let nodes = config.cluster_nodes();
        let peers = nodes
            .iter()
            .filter(|(id, _)| **id != config.node_id)
            .map(|(id, a)| (*id, *a))
            .collect();
        let peer_api = Arc::new(PeerApi::default());
        // A one-node cluster has no peers and no peer listener; its
        // transport never authenticates anyone, so any secret will do.
        let secret = match config.cluster.secret.as_str() {
            "" if nodes.len() <= 1 => "one-node-cluster".to_string(),
            s => s.to_string(),
        };
        let transport_config = TransportConfig::new(config.node_id, config.cluster_id.clone(), secret, peers);
        let liveness = Arc::new(Liveness::new(config.node_id, nodes.keys().copied()));
        let router = peer::inbound_router(peer_api.clone(), liveness.clone());
        let (transport, peer_service) =
            Transport::start_routed(transport_config, peer_api.clone(), router).map_err(|e| DaemonError::Config {
                path: "cluster".into(),
                reason: e.to_string(),
            })?;
        let log_writer = LogWriter::start(log.clone(), transport.clone())
            .map_err(|e| DaemonError::io("starting the log writer thread", e))?;
        let catalog = Arc::new(Catalog::load(
            config.node_id,
            &data_dir,
            NodeServices {
                engine,
                log: log.clone(),
                log_writer,
                transport: transport.clone(),
                liveness: liveness.clone(),
                nodes: nodes.clone(),
                checkpoints: crate::group::Checkpoints {
                    interval: std::time::Duration::from_millis(config.log.checkpoint_interval_ms),
                    log_bytes: config.log.checkpoint_bytes,
                },
            },
        )?);
        let _ = peer_api.catalog.set(catalog.clone());
        let purge_catalog = catalog.clone();
        LogWriter::start_purge(log.clone(), move |group| {
            if let Some(g) = purge_catalog.group(group) {
                g.request_checkpoint();
            }
        })
        .map_err(|e| DaemonError::io("starting the log purge thread", e))?;
        tokio::spawn(peer::report_unreachable(catalog.clone(), transport.clone()));
        tokio::spawn(liveness.clone().run(transport.clone()));
        tokio::spawn(telemetry::run_node_gauges(
            catalog.clone(),
            liveness.clone(),
            log_dir.clone(),
        ));

        let nbd_addr = config.nbd_addr();
        let tcp = TcpListener::bind(nbd_addr)
            .await
            .map_err(|e| DaemonError::io(format!("binding nbd.listen {nbd_addr}"), e))?;
        let unix = config.nbd.unix_socket.as_deref().map(bind_unix).transpose()?;
        let admin_addr = config.admin_addr();
        let admin_listener = TcpListener::bind(admin_addr)
            .await
            .map_err(|e| DaemonError::io(format!("binding admin.listen {admin_addr}"), e))?;

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut peer_server = None;
        if nodes.len() > 1 {
            let peer_addr = config.peer_addr();
            let peer_listener = TcpListener::bind(peer_addr)
                .await
                .map_err(|e| DaemonError::io(format!("binding cluster.peer_listen {peer_addr}"), e))?;
            let mut stop = shutdown_rx.clone();
            peer_server = Some(tokio::spawn(async move {
                // Raft links and gRPC peer calls share the listener; both
                // keep alive, so a stopped (SIGSTOP) peer's connections are
                // closed on this side too.
                let r = peer_service
                    .serve(peer_listener, async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
                if let Err(e) = r {
                    warn!("peer server stopped: {e}");
                }
            }));
        }
        let server_config = ServerConfig {
            max_connections: config.nbd.max_connections,
            max_inflight_requests_per_connection: config.nbd.max_inflight_requests_per_connection,
            max_inflight_bytes_per_connection: config.nbd.max_inflight_bytes_per_connection,
            handshake_timeout_ms: config.nbd.handshake_timeout_ms,
            ..ServerConfig::default()
        };
        let nbd = Server::new(catalog.clone(), server_config, shutdown_rx.clone());
        let mut tasks = vec![tokio::spawn(nbd.clone().serve_tcp(tcp))];
        if let Some(u) = unix {
            tasks.push(tokio::spawn(nbd.clone().serve_unix(u)));
        }

        let volume_api = VolumeApi {
            catalog: catalog.clone(),
            node_id: config.node_id,
        };
        let node_api = NodeApi {
            catalog: catalog.clone(),
            node_id: config.node_id,
            cluster_id: config.cluster_id.clone(),
            nbd_address: nbd_addr.to_string(),
            nbd_unix_socket: config
                .nbd
                .unix_socket
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            started,
        };
        let fault_api = FaultApi {
            transport: transport.clone(),
        };
        let mut admin_shutdown = shutdown_rx.clone();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(admin_listener);
        let admin = tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .add_service(VolumeServiceServer::new(volume_api))
                .add_service(NodeServiceServer::new(node_api))
                .add_service(FaultServiceServer::new(fault_api))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = admin_shutdown.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = r {
                warn!("admin API server stopped: {e}");
            }
        });
        info!(
            node_id = config.node_id,
            nbd = %nbd_addr,
            admin = %admin_addr,
            unix_socket = ?config.nbd.unix_socket,
            volumes = catalog.list().len(),
            "triremed ready"
        );
        Ok(Node {
            transport,
            peer_server,
            shutdown_tx,
            nbd,
            catalog,
            tasks,
            admin,
            unix_socket: config.nbd.unix_socket.clone(),
            shutdown_timeout: Duration::from_millis(config.shutdown_timeout_ms),
            _lock: lock,
        })
    }

    /// Stops accepting, lets sessions finish the requests they already
    /// read, syncs every volume, and returns.
    pub async fn shutdown(self) -> Result<()> {
        info!("shutting down: no new connections; finishing in-flight requests");
        self.shutdown_tx.send_replace(true);
        for t in self.tasks {
            let _ = t.await;
        }
        if !self.nbd.wait_idle(self.shutdown_timeout).await {
            warn!(
                open = self.nbd.open_connections(),
                "NBD sessions still open after {:?}", self.shutdown_timeout
            );
        }
        let _ = self.admin.await;
        // Every acknowledged write is already in the durable Raft log; a
        // last checkpoint per replica only spares the restart a replay.
        self.catalog.stop_all().await;
        // Raft links never end on their own.
        self.transport.shutdown();
        if let Some(p) = self.peer_server {
            let _ = p.await;
        }
        if let Some(p) = &self.unix_socket {
            let _ = fs::remove_file(p);
        }
        info!("shutdown complete");
        Ok(())
    }
}
