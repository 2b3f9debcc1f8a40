//! `trireme dev up`: a local cluster of real triremed processes for
//! development and for the acceptance tests, which rely on the exact port
//! scheme, file layout and JSON line produced here.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};
use tonic::transport::Channel;
use trireme_proto::v1::node_service_client::NodeServiceClient;
use trireme_proto::v1::volume_service_client::VolumeServiceClient;
use trireme_proto::v1::{CreateVolumeRequest, GetNodeRequest, GetVolumeRequest, Volume};

use crate::admin::{self, status_error};
use crate::size::human_size;

pub const DEFAULT_BASE_PORT: u16 = 7100;
pub const VOLUME_NAME: &str = "vol0";
/// Most nodes `dev up` starts: keeps every port range (P+i, P+200+i, ...)
/// clear of the next one.
pub const MAX_NODES: u32 = 9;
const CLUSTER_ID: &str = "dev";
const HOST: &str = "127.0.0.1";
const NBD_PORT_OFFSET: u32 = 3700;
const METRICS_PORT_OFFSET: u32 = 200;
const PEER_PORT_OFFSET: u32 = 300;
/// In DIR: the cluster's shared peer secret, made once and reused so nodes
/// restarted from their argv (or by a re-run) still trust each other.
const SECRET_FILE: &str = "cluster.secret";
/// Random bytes in a generated secret (hex-encoded: twice as many chars).
const SECRET_BYTES: usize = 16;
/// triremed refuses shorter secrets in a multi-node cluster.
const MIN_SECRET_CHARS: usize = 16;
const READY_DEADLINE: Duration = Duration::from_secs(30);
const LEADER_DEADLINE: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Short, because a local listener that is up answers at once and a poll
/// must not outlast the readiness deadline by much.
const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// After SIGKILL the kernel reaps promptly; this only bounds the wait in case
/// a process is stuck in uninterruptible sleep.
const KILL_DEADLINE: Duration = Duration::from_secs(5);
const LOG_TAIL_LINES: usize = 20;
/// Enough for 20 lines of any sane log without reading a huge file whole.
const LOG_TAIL_MAX_BYTES: u64 = 64 * 1024;

pub struct DevUpArgs {
    pub nodes: u32,
    pub data_dir: PathBuf,
    pub base_port: u16,
    pub volume_size_bytes: u64,
    pub triremed: Option<PathBuf>,
}

/// Ports of node `id` (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePorts {
    pub admin: u16,
    pub nbd: u16,
    pub metrics: u16,
    pub peer: u16,
}

/// The port scheme; `None` if any port of any of the `nodes` nodes would
/// fall outside 1..=65535.
pub fn node_ports(base_port: u16, nodes: u32, id: u32) -> Option<NodePorts> {
    let base = u32::from(base_port);
    let highest = base.checked_add(NBD_PORT_OFFSET)?.checked_add(nodes)?;
    if nodes == 0 || id == 0 || id > nodes || highest > u32::from(u16::MAX) {
        return None;
    }
    let port = |offset: u32| u16::try_from(base + offset + id).ok();
    Some(NodePorts {
        admin: port(0)?,
        nbd: port(NBD_PORT_OFFSET)?,
        metrics: port(METRICS_PORT_OFFSET)?,
        peer: port(PEER_PORT_OFFSET)?,
    })
}

/// Everything about one node that is known before it starts.
#[derive(Debug, Clone)]
struct NodePlan {
    id: u32,
    admin: String,
    nbd: String,
    metrics: String,
    peer: String,
    dir: String,
    data_dir: String,
    config: String,
    unix_socket: String,
    log: String,
    argv: Vec<String>,
}

impl NodePlan {
    fn new(root: &str, triremed: &str, ports: NodePorts, id: u32) -> Self {
        let dir = format!("{root}/node-{id}");
        let config = format!("{dir}/triremed.toml");
        Self {
            id,
            admin: format!("{HOST}:{}", ports.admin),
            nbd: format!("{HOST}:{}", ports.nbd),
            metrics: format!("{HOST}:{}", ports.metrics),
            peer: format!("{HOST}:{}", ports.peer),
            data_dir: format!("{dir}/data"),
            unix_socket: format!("{dir}/nbd.sock"),
            log: format!("{dir}/triremed.log"),
            argv: vec![triremed.to_owned(), "--config".to_owned(), config.clone()],
            config,
            dir,
        }
    }

    /// `cluster` is every node of the cluster, this one included;
    /// `workers` the node's runtime threads.
    fn config_toml(&self, secret: &str, cluster: &[NodePlan], workers: usize) -> String {
        let mut out = format!(
            "node_id = {id}\n\
             cluster_id = {cluster}\n\
             data_dir = {data_dir}\n\
             \n\
             [nbd]\n\
             listen = {nbd}\n\
             unix_socket = {unix_socket}\n\
             \n\
             [admin]\n\
             listen = {admin}\n\
             \n\
             [metrics]\n\
             listen = {metrics}\n\
             \n\
             [runtime]\n\
             worker_threads = {workers}\n\
             \n\
             [cluster]\n\
             secret = {secret}\n\
             peer_listen = {peer}\n",
            id = self.id,
            workers = workers,
            cluster = toml_string(CLUSTER_ID),
            data_dir = toml_string(&self.data_dir),
            nbd = toml_string(&self.nbd),
            unix_socket = toml_string(&self.unix_socket),
            admin = toml_string(&self.admin),
            metrics = toml_string(&self.metrics),
            secret = toml_string(secret),
            peer = toml_string(&self.peer),
        );
        for node in cluster {
            out.push_str(&format!(
                "\n[[cluster.nodes]]\nid = {}\npeer = {}\n",
                node.id,
                toml_string(&node.peer)
            ));
        }
        out
    }
}

/// Each node's share of this host's CPUs, at least one: the nodes of a dev
/// cluster share the host, and more runtime threads than CPUs make every
/// hand-off between tasks a wake-up of a parked thread (README: W1 ran
/// about a third faster with one worker per node on two CPUs).
fn worker_threads(nodes: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    (cpus / nodes.max(1)).max(1)
}

/// A TOML basic string. Paths come from the user, so quotes, backslashes and
/// control characters must be escaped to keep the config parseable.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[derive(Serialize)]
struct DevUpJson<'a> {
    nodes: Vec<DevNodeJson<'a>>,
    volume: &'a str,
    nbd_uri: String,
}

#[derive(Serialize)]
struct DevNodeJson<'a> {
    id: u32,
    pid: u32,
    admin: &'a str,
    nbd: &'a str,
    unix_socket: &'a str,
    metrics: &'a str,
    data_dir: &'a str,
    log: &'a str,
    argv: &'a [String],
}

struct RunningNode {
    plan: NodePlan,
    /// `None` once the process has been reaped.
    child: Option<Child>,
    pid: u32,
}

/// The spawned nodes. Dropping it kills whatever still runs, so no error
/// path can leave orphaned daemons holding the ports.
struct Cluster {
    nodes: Vec<RunningNode>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Cluster {
    /// Reaps nodes that exited by themselves, returning `(id, pid, status)`.
    fn reap_exited(&mut self) -> Vec<(u32, u32, ExitStatus)> {
        let mut exited = Vec::new();
        for node in &mut self.nodes {
            let Some(child) = node.child.as_mut() else {
                continue;
            };
            if let Ok(Some(status)) = child.try_wait() {
                node.child = None;
                exited.push((node.plan.id, node.pid, status));
            }
        }
        exited
    }

    /// SIGTERM every running node, wait for them within a deadline, then
    /// SIGKILL the stragglers; reports every exit on stderr.
    async fn stop(&mut self) {
        for node in &self.nodes {
            if node.child.is_some() {
                send_signal(node.pid, Signal::SIGTERM);
            }
        }
        self.wait_all(STOP_DEADLINE).await;
        let stragglers: Vec<u32> = self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.pid).collect();
        if stragglers.is_empty() {
            return;
        }
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            eprintln!(
                "node {} (pid {}) still running {} s after SIGTERM, sending SIGKILL",
                node.plan.id,
                node.pid,
                STOP_DEADLINE.as_secs()
            );
            send_signal(node.pid, Signal::SIGKILL);
        }
        self.wait_all(KILL_DEADLINE).await;
        for node in &mut self.nodes {
            if node.child.take().is_some() {
                eprintln!(
                    "node {} (pid {}) did not exit even after SIGKILL; giving up on it",
                    node.plan.id, node.pid
                );
            }
        }
    }

    async fn wait_all(&mut self, deadline: Duration) {
        let start = Instant::now();
        loop {
            for (id, pid, status) in self.reap_exited() {
                eprintln!("node {id} (pid {pid}) {}", describe_exit(status));
            }
            if self.nodes.iter().all(|n| n.child.is_none()) || start.elapsed() >= deadline {
                return;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

fn send_signal(pid: u32, signal: Signal) {
    // The pid is our own unreaped child, so it cannot have been recycled.
    if let Ok(raw) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(raw), signal);
    }
}

fn describe_exit(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("exited with status {code}")
    } else if let Some(sig) = status.signal() {
        match Signal::try_from(sig) {
            Ok(s) => format!("was killed by signal {s}"),
            Err(_) => format!("was killed by signal {sig}"),
        }
    } else {
        format!("exited: {status}")
    }
}

/// Runs `trireme dev up` until SIGINT/SIGTERM. Returns Ok once the nodes
/// are stopped after a signal.
pub async fn up(args: DevUpArgs) -> anyhow::Result<()> {
    if !(1..=MAX_NODES).contains(&args.nodes) {
        bail!("--nodes {}: expected 1 to {MAX_NODES}", args.nodes);
    }
    let ports: Vec<NodePorts> = (1..=args.nodes)
        .map(|id| node_ports(args.base_port, args.nodes, id))
        .collect::<Option<_>>()
        .ok_or_else(|| {
            anyhow!(
                "--base-port {}: with {} node(s) the NBD ports would reach {} (P+{NBD_PORT_OFFSET}+N), above 65535",
                args.base_port,
                args.nodes,
                u32::from(args.base_port) + NBD_PORT_OFFSET + args.nodes
            )
        })?;

    let triremed = find_triremed(args.triremed.as_deref())?;
    fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create --data-dir {}", args.data_dir.display()))?;
    let root = utf8(
        &fs::canonicalize(&args.data_dir)
            .with_context(|| format!("cannot resolve --data-dir {}", args.data_dir.display()))?,
        "--data-dir",
    )?;
    let secret = cluster_secret(Path::new(&root))?;

    let plans: Vec<NodePlan> = (1..=args.nodes)
        .zip(&ports)
        .map(|(id, &p)| NodePlan::new(&root, &triremed, p, id))
        .collect();

    // Installed before any child exists, so an early Ctrl-C still stops the
    // children instead of killing us and orphaning them.
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;

    let mut cluster = Cluster { nodes: Vec::new() };
    let started = tokio::select! {
        result = start(&mut cluster, &plans, &secret, args.volume_size_bytes) => Some(result),
        _ = sigint.recv() => None,
        _ = sigterm.recv() => None,
    };
    let volume = match started {
        Some(Ok(volume)) => volume,
        Some(Err(e)) => {
            cluster.stop().await;
            return Err(e);
        }
        None => {
            eprintln!("interrupted during startup, stopping nodes");
            cluster.stop().await;
            bail!("interrupted before the cluster was ready");
        }
    };

    print_ready(&cluster, &volume)?;

    let mut poll = tokio::time::interval(Duration::from_millis(200));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = poll.tick() => {
                for (id, pid, status) in cluster.reap_exited() {
                    // Tests kill nodes on purpose and restart them from argv,
                    // so this is news, not a reason to tear everything down.
                    eprintln!("node {id} (pid {pid}) {}; other nodes keep running", describe_exit(status));
                }
            }
        }
    }
    eprintln!("stopping nodes");
    cluster.stop().await;
    Ok(())
}

/// Starts every node, waits for all of them, then makes sure vol0 exists and
/// has a leader; returns vol0 as node 1 last saw it.
async fn start(cluster: &mut Cluster, plans: &[NodePlan], secret: &str, size_bytes: u64) -> anyhow::Result<Volume> {
    // All first: a replicated node may wait for its peers before it is ready.
    for plan in plans {
        let node = spawn(plan, secret, plans)?;
        cluster.nodes.push(node);
    }
    for node in &mut cluster.nodes {
        wait_ready(node).await?;
    }
    let admin = cluster
        .nodes
        .first()
        .map(|n| n.plan.admin.clone())
        .ok_or_else(|| anyhow!("no nodes to create {VOLUME_NAME} on"))?;
    let mut client = VolumeServiceClient::new(admin::connect(&admin, admin::CONNECT_TIMEOUT).await?);
    ensure_volume(&mut client, size_bytes).await?;
    wait_leader(cluster, &mut client).await
}

/// Writes `contents` readable by the owner only (it may hold the secret),
/// tightening the mode of a file left by an older run.
fn write_private(path: &str, contents: &str) -> anyhow::Result<()> {
    let write = || -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        file.set_permissions(Permissions::from_mode(0o600))?;
        file.write_all(contents.as_bytes())
    };
    write().with_context(|| format!("cannot write {path}"))
}

/// The secret in DIR/cluster.secret, generated (mode 0600) on first use.
fn cluster_secret(root: &Path) -> anyhow::Result<String> {
    let path = root.join(SECRET_FILE);
    let shown = path.display();
    match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
        Ok(mut file) => {
            let secret = random_hex(SECRET_BYTES)?;
            let written = writeln!(file, "{secret}").and_then(|()| file.sync_all());
            if let Err(e) = written {
                // A half-written secret would be read back next time.
                let _ = fs::remove_file(&path);
                return Err(anyhow!("cannot write {shown}: {e}"));
            }
            Ok(secret)
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            let text = fs::read_to_string(&path).with_context(|| format!("cannot read {shown}"))?;
            let secret = text.trim();
            if secret.chars().count() < MIN_SECRET_CHARS || !secret.chars().all(|c| c.is_ascii_graphic()) {
                bail!(
                    "{shown} does not hold a usable secret (at least {MIN_SECRET_CHARS} printable characters, \
                     no spaces); delete it to generate a new one"
                );
            }
            let mode = fs::metadata(&path)
                .with_context(|| format!("cannot read {shown}"))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                fs::set_permissions(&path, Permissions::from_mode(0o600))
                    .with_context(|| format!("cannot make {shown} private"))?;
            }
            Ok(secret.to_owned())
        }
        Err(e) => Err(anyhow!("cannot create {shown}: {e}")),
    }
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("cannot read /dev/urandom")?;
    Ok(hex(&buf))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn spawn(plan: &NodePlan, secret: &str, cluster: &[NodePlan]) -> anyhow::Result<RunningNode> {
    fs::create_dir_all(&plan.data_dir).with_context(|| format!("cannot create {}", plan.data_dir))?;
    write_private(
        &plan.config,
        &plan.config_toml(secret, cluster, worker_threads(cluster.len())),
    )?;
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&plan.log)
        .with_context(|| format!("cannot open {}", plan.log))?;
    // Runs on the same DIR append to one log; a marker shows where each starts.
    writeln!(log, "==== trireme dev up: starting {}", plan.argv.join(" "))
        .with_context(|| format!("cannot write {}", plan.log))?;
    let log_err = log.try_clone().with_context(|| format!("cannot open {}", plan.log))?;
    let (program, rest) = plan
        .argv
        .split_first()
        .ok_or_else(|| anyhow!("empty argv for node {}", plan.id))?;
    let child = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Own process group: a terminal Ctrl-C then reaches only us, and the
        // nodes get an orderly SIGTERM from stop() instead of a racing SIGINT.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {program} for node {}", plan.id))?;
    Ok(RunningNode {
        pid: child.id(),
        plan: plan.clone(),
        child: Some(child),
    })
}

/// Fails, showing the end of its log, if the node has exited.
fn check_running(node: &mut RunningNode) -> anyhow::Result<()> {
    if let Some(child) = node.child.as_mut()
        && let Some(status) = child.try_wait().context("cannot check node status")?
    {
        node.child = None;
        eprintln!(
            "node {} (pid {}) {} before the cluster was ready; last {LOG_TAIL_LINES} lines of {}:",
            node.plan.id,
            node.pid,
            describe_exit(status),
            node.plan.log
        );
        eprint!("{}", log_tail(Path::new(&node.plan.log)));
        bail!(
            "node {} {} during startup (log: {})",
            node.plan.id,
            describe_exit(status),
            node.plan.log
        );
    }
    Ok(())
}

async fn wait_ready(node: &mut RunningNode) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        check_running(node)?;
        match probe(&node.plan.admin).await {
            Ok(node_id) if node_id == u64::from(node.plan.id) => return Ok(()),
            Ok(node_id) => bail!(
                "admin {} answered as node {node_id}, expected node {}: is another triremed using this port?",
                node.plan.admin,
                node.plan.id
            ),
            Err(e) if start.elapsed() >= READY_DEADLINE => bail!(
                "node {} not ready after {} s (last probe: {e:#}); see {}",
                node.plan.id,
                READY_DEADLINE.as_secs(),
                node.plan.log
            ),
            Err(_) => {}
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

async fn probe(addr: &str) -> anyhow::Result<u64> {
    let channel = admin::connect(addr, PROBE_CONNECT_TIMEOUT).await?;
    let reply = NodeServiceClient::new(channel)
        .get_node(GetNodeRequest {})
        .await
        .map_err(status_error)?;
    Ok(reply.into_inner().node_id)
}

/// Creates vol0 (replica count left to the server), or accepts the one a
/// previous run on the same DIR left behind if it has the requested size.
async fn ensure_volume(client: &mut VolumeServiceClient<Channel>, size_bytes: u64) -> anyhow::Result<()> {
    let created = client
        .create_volume(CreateVolumeRequest {
            name: VOLUME_NAME.to_owned(),
            size_bytes,
            replica_count: 0,
            durability: String::new(),
        })
        .await;
    match created {
        Ok(_) => Ok(()),
        Err(status) if status.code() == tonic::Code::AlreadyExists => {
            let existing = client
                .get_volume(GetVolumeRequest {
                    name: VOLUME_NAME.to_owned(),
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .volume
                .ok_or_else(|| anyhow!("triremed answered GetVolume without a volume"))?;
            if existing.size_bytes != size_bytes {
                bail!(
                    "volume {VOLUME_NAME} already exists with {} bytes, not the {size_bytes} requested; \
                     pass --volume-size {} or use another --data-dir",
                    existing.size_bytes,
                    existing.size_bytes
                );
            }
            Ok(())
        }
        Err(status) => Err(status_error(status).context(format!("cannot create volume {VOLUME_NAME}"))),
    }
}

/// Polls GetVolume on node 1 until vol0 reports a leader, so the volume
/// takes I/O as soon as the ready line is out.
async fn wait_leader(cluster: &mut Cluster, client: &mut VolumeServiceClient<Channel>) -> anyhow::Result<Volume> {
    let start = Instant::now();
    loop {
        for node in &mut cluster.nodes {
            check_running(node)?;
        }
        // Bounded by the deadline, so one stuck request cannot outlast it.
        let remaining = LEADER_DEADLINE.saturating_sub(start.elapsed()).max(POLL_INTERVAL);
        let request = client.get_volume(GetVolumeRequest {
            name: VOLUME_NAME.to_owned(),
        });
        let last = match tokio::time::timeout(remaining, request).await {
            Ok(Ok(reply)) => match reply.into_inner().volume {
                Some(volume) if volume.leader != 0 => return Ok(volume),
                Some(_) => "no leader yet".to_owned(),
                None => "triremed answered GetVolume without a volume".to_owned(),
            },
            Ok(Err(status)) => format!("{:#}", status_error(status)),
            Err(_) => "GetVolume timed out".to_owned(),
        };
        if start.elapsed() >= LEADER_DEADLINE {
            bail!(
                "volume {VOLUME_NAME} has no leader after {} s ({last}); see the logs: {}",
                LEADER_DEADLINE.as_secs(),
                cluster
                    .nodes
                    .iter()
                    .map(|n| n.plan.log.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn print_ready(cluster: &Cluster, volume: &Volume) -> anyhow::Result<()> {
    let first = cluster.nodes.first().ok_or_else(|| anyhow!("no nodes running"))?;
    let nbd_uri = format!("nbd://{}/{VOLUME_NAME}", first.plan.nbd);
    let line = serde_json::to_string(&DevUpJson {
        nodes: cluster
            .nodes
            .iter()
            .map(|n| DevNodeJson {
                id: n.plan.id,
                pid: n.pid,
                admin: &n.plan.admin,
                nbd: &n.plan.nbd,
                unix_socket: &n.plan.unix_socket,
                metrics: &n.plan.metrics,
                data_dir: &n.plan.data_dir,
                log: &n.plan.log,
                argv: &n.plan.argv,
            })
            .collect(),
        volume: VOLUME_NAME,
        nbd_uri: nbd_uri.clone(),
    })?;

    eprintln!(
        "trireme dev: {} node(s) of cluster \"{CLUSTER_ID}\" up",
        cluster.nodes.len()
    );
    for n in &cluster.nodes {
        eprintln!(
            "  node {}: pid {}, admin {}, nbd {}, metrics {}, peer {}, dir {}",
            n.plan.id, n.pid, n.plan.admin, n.plan.nbd, n.plan.metrics, n.plan.peer, n.plan.dir
        );
        eprintln!("          log {}", n.plan.log);
    }
    let (host, port) = first.plan.nbd.rsplit_once(':').unwrap_or((first.plan.nbd.as_str(), ""));
    eprintln!(
        "volume {VOLUME_NAME} ({}, {} replica(s), leader node {}) is ready; attach with one of:",
        human_size(volume.size_bytes),
        volume.replica_count,
        volume.leader
    );
    eprintln!("  qemu-io -f raw {nbd_uri}");
    eprintln!("  qemu-img info {nbd_uri}");
    eprintln!("  nbdinfo {nbd_uri}");
    eprintln!("  sudo nbd-client -N {VOLUME_NAME} {host} {port} /dev/nbd0");
    eprintln!(
        "  qemu-img info 'nbd+unix:///{VOLUME_NAME}?socket={}'",
        first.plan.unix_socket
    );
    eprintln!("admin: trireme --admin {} volume list", first.plan.admin);
    eprintln!("Ctrl-C or SIGTERM stops the nodes.");

    // The JSON line is what scripts wait for, so it must not sit in a buffer.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").context("cannot write to stdout")?;
    stdout.flush().context("cannot write to stdout")?;
    Ok(())
}

/// The triremed binary: `--triremed` if given, else the one built next to
/// this executable (cargo puts all workspace binaries in one directory).
fn find_triremed(explicit: Option<&Path>) -> anyhow::Result<String> {
    let (looked_at, how) = match explicit {
        Some(path) => (path.to_path_buf(), "--triremed"),
        None => {
            let exe = std::env::current_exe().context("cannot locate the trireme executable")?;
            let dir = exe
                .parent()
                .ok_or_else(|| anyhow!("trireme executable {} has no directory", exe.display()))?;
            (dir.join("triremed"), "next to trireme")
        }
    };
    let resolved = fs::canonicalize(&looked_at).map_err(|e| {
        anyhow!(
            "triremed not found at {} ({how}): {e}; build it with `cargo build --bins` or pass --triremed PATH",
            looked_at.display()
        )
    })?;
    if !resolved.is_file() {
        bail!("triremed at {} is not a file", resolved.display());
    }
    utf8(&resolved, "triremed path")
}

/// Paths end up in TOML and JSON, both UTF-8 only.
fn utf8(path: &Path, what: &str) -> anyhow::Result<String> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{what} {} is not valid UTF-8", path.display()))
}

/// The last lines of a log, read from its end so a big log costs little.
fn log_tail(path: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        let start = len.saturating_sub(LOG_TAIL_MAX_BYTES);
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => tail_lines(&text, LOG_TAIL_LINES),
        Err(e) => format!("(cannot read {}: {e})\n", path.display()),
    }
}

fn tail_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines[lines.len().saturating_sub(count)..].join("\n");
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ports() {
        assert_eq!(
            node_ports(DEFAULT_BASE_PORT, 1, 1),
            Some(NodePorts {
                admin: 7101,
                nbd: 10801,
                metrics: 7301,
                peer: 7401
            })
        );
        assert_eq!(
            node_ports(17100, 3, 3),
            Some(NodePorts {
                admin: 17103,
                nbd: 20803,
                metrics: 17303,
                peer: 17403
            })
        );
        // The largest cluster keeps every range apart.
        let all: Vec<NodePorts> = (1..=MAX_NODES)
            .map(|id| node_ports(DEFAULT_BASE_PORT, MAX_NODES, id).expect("ports"))
            .collect();
        let mut seen: Vec<u16> = all.iter().flat_map(|p| [p.admin, p.nbd, p.metrics, p.peer]).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 4 * MAX_NODES as usize);
        assert_eq!(all[8].peer, 7409);
    }

    #[test]
    fn ports_must_fit() {
        // 61835 + 3700 + 1 = 65536.
        assert_eq!(node_ports(61835, 1, 1), None);
        assert!(node_ports(61834, 1, 1).is_some_and(|p| p.nbd == 65535));
        assert_eq!(node_ports(61834, 2, 1), None);
        assert_eq!(node_ports(0, 1, 1).map(|p| p.admin), Some(1));
        assert_eq!(node_ports(u16::MAX, 1, 1), None);
        assert_eq!(node_ports(7100, 1, 2), None);
        assert_eq!(node_ports(7100, 1, 0), None);
        assert_eq!(node_ports(7100, 0, 0), None);
    }

    #[test]
    fn plan_layout_and_config() {
        let plans: Vec<NodePlan> = (1..=3)
            .map(|id| {
                NodePlan::new(
                    "/abs/DIR",
                    "/abs/path/triremed",
                    node_ports(7100, 3, id).expect("ports"),
                    id,
                )
            })
            .collect();
        let plan = &plans[1];
        assert_eq!(
            plan.argv,
            ["/abs/path/triremed", "--config", "/abs/DIR/node-2/triremed.toml"]
        );
        assert_eq!(plan.log, "/abs/DIR/node-2/triremed.log");
        assert_eq!(
            plan.config_toml("00112233445566778899aabbccddeeff", &plans, 1),
            "node_id = 2\n\
             cluster_id = \"dev\"\n\
             data_dir = \"/abs/DIR/node-2/data\"\n\
             \n\
             [nbd]\n\
             listen = \"127.0.0.1:10802\"\n\
             unix_socket = \"/abs/DIR/node-2/nbd.sock\"\n\
             \n\
             [admin]\n\
             listen = \"127.0.0.1:7102\"\n\
             \n\
             [metrics]\n\
             listen = \"127.0.0.1:7302\"\n\
             \n\
             [runtime]\n\
             worker_threads = 1\n\
             \n\
             [cluster]\n\
             secret = \"00112233445566778899aabbccddeeff\"\n\
             peer_listen = \"127.0.0.1:7402\"\n\
             \n\
             [[cluster.nodes]]\n\
             id = 1\n\
             peer = \"127.0.0.1:7401\"\n\
             \n\
             [[cluster.nodes]]\n\
             id = 2\n\
             peer = \"127.0.0.1:7402\"\n\
             \n\
             [[cluster.nodes]]\n\
             id = 3\n\
             peer = \"127.0.0.1:7403\"\n"
        );

        let single = NodePlan::new("/d", "/t", node_ports(7100, 1, 1).expect("ports"), 1);
        let text = single.config_toml("s", std::slice::from_ref(&single), 2);
        assert!(
            text.ends_with(
                "[cluster]\nsecret = \"s\"\npeer_listen = \"127.0.0.1:7401\"\n\n\
                 [[cluster.nodes]]\nid = 1\npeer = \"127.0.0.1:7401\"\n"
            ),
            "{text}"
        );
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let dir = std::env::temp_dir().join(format!("trireme-cli-{tag}-{}-{nanos}", std::process::id()));
            fs::create_dir_all(&dir).expect("create temp dir");
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn secret_is_made_once_private_and_reused() {
        let dir = TempDir::new("secret");
        let secret = cluster_secret(&dir.0).expect("generate");
        assert_eq!(secret.len(), 2 * SECRET_BYTES);
        assert!(
            secret.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "{secret}"
        );
        let path = dir.0.join(SECRET_FILE);
        let mode = fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(fs::read_to_string(&path).expect("read"), format!("{secret}\n"));
        assert_eq!(cluster_secret(&dir.0).expect("reuse"), secret);

        // Left world-readable by hand: reused, and made private again.
        fs::set_permissions(&path, Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(cluster_secret(&dir.0).expect("reuse"), secret);
        let mode = fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        fs::write(&path, "short\n").expect("write");
        let err = cluster_secret(&dir.0).expect_err("too short").to_string();
        assert!(err.contains("delete it to generate a new one"), "{err}");

        let other = TempDir::new("secret2");
        assert_ne!(cluster_secret(&other.0).expect("generate"), secret);
    }

    #[test]
    fn configs_are_private() {
        let dir = TempDir::new("config");
        let path = dir.0.join("triremed.toml");
        let path = path.to_str().expect("utf8");
        fs::write(path, "old, longer contents\n").expect("write");
        fs::set_permissions(path, Permissions::from_mode(0o644)).expect("chmod");
        write_private(path, "new\n").expect("write");
        assert_eq!(fs::read_to_string(path).expect("read"), "new\n");
        let mode = fs::metadata(path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn hex_encoding() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string(r#"/a "b"\c"#), r#""/a \"b\"\\c""#);
        assert_eq!(toml_string("x\ny\u{7}"), "\"x\\ny\\u0007\"");
    }

    #[test]
    fn ready_json_shape() {
        let ports = node_ports(7100, 1, 1).expect("ports");
        let plan = NodePlan::new("/d", "/bin/triremed", ports, 1);
        let line = serde_json::to_string(&DevUpJson {
            nodes: vec![DevNodeJson {
                id: 1,
                pid: 4242,
                admin: &plan.admin,
                nbd: &plan.nbd,
                unix_socket: &plan.unix_socket,
                metrics: &plan.metrics,
                data_dir: &plan.data_dir,
                log: &plan.log,
                argv: &plan.argv,
            }],
            volume: VOLUME_NAME,
            nbd_uri: format!("nbd://{}/{VOLUME_NAME}", plan.nbd),
        })
        .expect("serialize");
        assert_eq!(
            line,
            r#"{"nodes":[{"id":1,"pid":4242,"admin":"127.0.0.1:7101","nbd":"127.0.0.1:10801","unix_socket":"/d/node-1/nbd.sock","metrics":"127.0.0.1:7301","data_dir":"/d/node-1/data","log":"/d/node-1/triremed.log","argv":["/bin/triremed","--config","/d/node-1/triremed.toml"]}],"volume":"vol0","nbd_uri":"nbd://127.0.0.1:10801/vol0"}"#
        );
    }

    #[test]
    fn tails() {
        let text: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        let tail = tail_lines(&text, 20);
        assert!(tail.starts_with("line 11\n"), "{tail}");
        assert!(tail.ends_with("line 30\n"), "{tail}");
        assert_eq!(tail_lines("a\nb", 20), "a\nb\n");
    }
}
