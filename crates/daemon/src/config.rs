//! triremed's configuration: a TOML file, overridden by command-line flags,
//! validated as a whole before anything starts. Every refusal names the
//! field and the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{DaemonError, Result};

/// Longest Unix socket path the kernel accepts (sun_path is 108 bytes with the NUL).
const MAX_UNIX_SOCKET_PATH_BYTES: usize = 107;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's id, >= 1, unique in the cluster.
    pub node_id: u64,
    /// Cluster name; a data dir created for one cluster refuses another.
    #[serde(default = "default_cluster_id")]
    pub cluster_id: String,
    /// Where the node keeps node.toml, volumes/ and (later) raft-log/.
    pub data_dir: PathBuf,
    #[serde(default)]
    pub nbd: NbdConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// How long SIGTERM waits for NBD sessions to finish in-flight requests.
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    #[serde(default = "default_nbd_listen")]
    pub listen: String,
    /// Unix socket for consumers on this host: nbd+unix:///VOLUME?socket=PATH.
    #[serde(default)]
    pub unix_socket: Option<PathBuf>,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_max_inflight_requests")]
    pub max_inflight_requests_per_connection: usize,
    #[serde(default = "default_max_inflight_bytes")]
    pub max_inflight_bytes_per_connection: usize,
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
}

/// The node-wide Raft log (raft-engine, in DATA_DIR/raft-log).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Bytes of empty log files written once, at the first start, for the
    /// log to recycle: appends then overwrite written blocks instead of
    /// growing new files, which costs about half the CPU per byte on the
    /// write path. Non-zero also zero-fills each new log file before use, so
    /// no append lands in fallocated space (whose fdatasync must commit the
    /// file system journal). 0 turns both off (files are still recycled
    /// once purged).
    #[serde(default = "default_log_prefill_bytes")]
    pub prefill_bytes: u64,
    /// Longest time between a volume's checkpoints: its image made durable
    /// and its log compacted (README: "Checkpoints"). Between them the log
    /// holds the writes and a restart replays them.
    #[serde(default = "default_checkpoint_interval_ms")]
    pub checkpoint_interval_ms: u64,
    /// Bytes of log a volume writes before its next checkpoint is due: the
    /// most a restart replays for it, and its share of the log on disk.
    #[serde(default = "default_checkpoint_bytes")]
    pub checkpoint_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            prefill_bytes: default_log_prefill_bytes(),
            checkpoint_interval_ms: default_checkpoint_interval_ms(),
            checkpoint_bytes: default_checkpoint_bytes(),
        }
    }
}

fn default_log_prefill_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_checkpoint_interval_ms() -> u64 {
    30_000
}
/// Below the log's purge threshold (256 MiB, node.rs), so one busy volume
/// checkpoints on its own bound before the purge asks it to.
fn default_checkpoint_bytes() -> u64 {
    192 * 1024 * 1024
}
/// Refuses `value` of config key `key` outside `range`, naming both.
fn in_range(key: &str, value: u64, range: &std::ops::RangeInclusive<u64>) -> std::result::Result<(), String> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(format!("{key} {value} must be {}-{}", range.start(), range.end()))
    }
}
/// Accepted `log.checkpoint_interval_ms`: one destage round at the least, an
/// hour at the most.
pub const CHECKPOINT_INTERVAL_MS_RANGE: std::ops::RangeInclusive<u64> = 500..=3_600_000;
/// Accepted `log.checkpoint_bytes`: 1 MiB to 4 GiB (a restart holds what it
/// replays in memory).
pub const CHECKPOINT_BYTES_RANGE: std::ops::RangeInclusive<u64> = (1 << 20)..=(4 << 30);

/// The threads that run the node's tasks.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads of the async runtime (NBD sessions, Raft groups, peer
    /// links, the admin API); 0, the default, is one per CPU. Nodes that
    /// share a host (`trireme dev up` puts a whole cluster on one) each do
    /// better with their share of its CPUs: more runnable threads than CPUs
    /// make every hand-off between tasks a wake-up of a parked thread.
    /// The log writer and the image I/O have threads of their own.
    #[serde(default)]
    pub worker_threads: usize,
}

/// Accepted `runtime.worker_threads`.
pub const WORKER_THREADS_RANGE: std::ops::RangeInclusive<u64> = 0..=1024;

/// The volume images (DATA_DIR/volumes/*/image).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Images are sparse files that get their blocks in units of this many
    /// bytes: the first write into a unit allocates all of it and writes the
    /// rest as zeroes, so each unit stays contiguous on disk whatever order
    /// it is written in (README: "Allocation units"). A power of two from
    /// 64 KiB to 4 MiB, or 0 for block-by-block allocation.
    #[serde(default = "default_allocation_unit_bytes")]
    pub allocation_unit_bytes: u64,
}

impl Default for StorageConfig {
    fn default() -> StorageConfig {
        StorageConfig {
            allocation_unit_bytes: default_allocation_unit_bytes(),
        }
    }
}

fn default_allocation_unit_bytes() -> u64 {
    1024 * 1024
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// gRPC admin API address.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Prometheus /metrics address, 127.0.0.1:7300 by default; "" turns
    /// the endpoint off.
    #[serde(default = "default_metrics_listen")]
    pub listen: Option<String>,
}

impl Default for MetricsConfig {
    fn default() -> MetricsConfig {
        MetricsConfig {
            listen: default_metrics_listen(),
        }
    }
}

fn default_metrics_listen() -> Option<String> {
    Some("127.0.0.1:7300".into())
}

/// The nodes of the cluster and how they reach each other.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Shared secret every peer must present; required with more than one node.
    #[serde(default)]
    pub secret: String,
    /// This node's peer listener (Raft messages, forwarded I/O, catalog changes).
    #[serde(default = "default_peer_listen")]
    pub peer_listen: String,
    /// Every node of the cluster, this one included. Empty: a one-node cluster.
    #[serde(default)]
    pub nodes: Vec<ClusterNode>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterNode {
    pub id: u64,
    /// The node's peer listener, IP:PORT.
    pub peer: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            secret: String::new(),
            peer_listen: default_peer_listen(),
            nodes: Vec::new(),
        }
    }
}

fn default_peer_listen() -> String {
    "127.0.0.1:7400".into()
}

/// Shortest secret accepted: long enough not to be guessed on a LAN.
const MIN_SECRET_CHARS: usize = 16;

fn default_cluster_id() -> String {
    "trireme".into()
}
fn default_shutdown_timeout_ms() -> u64 {
    30_000
}
fn default_nbd_listen() -> String {
    "127.0.0.1:10809".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:7100".into()
}
fn default_max_connections() -> usize {
    256
}
fn default_max_inflight_requests() -> usize {
    128
}
fn default_max_inflight_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_handshake_timeout_ms() -> u64 {
    30_000
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            listen: default_nbd_listen(),
            unix_socket: None,
            max_connections: default_max_connections(),
            max_inflight_requests_per_connection: default_max_inflight_requests(),
            max_inflight_bytes_per_connection: default_max_inflight_bytes(),
            handshake_timeout_ms: default_handshake_timeout_ms(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
        }
    }
}

/// Values given on the command line; each replaces the file's.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub node_id: Option<u64>,
    pub cluster_id: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub nbd_listen: Option<String>,
    pub nbd_unix_socket: Option<PathBuf>,
    pub admin_listen: Option<String>,
    pub metrics_listen: Option<String>,
}

impl Config {
    /// Reads the file (if any), applies the flags, validates the result.
    pub fn load(path: Option<&Path>, o: &Overrides) -> Result<Config> {
        let source = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(command line)".into());
        let err = |reason: String| DaemonError::Config {
            path: source.clone(),
            reason,
        };
        let mut c = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| err(format!("cannot read: {e}")))?;
                toml::from_str::<Config>(&text).map_err(|e| err(e.to_string().trim_end().to_string()))?
            }
            None => {
                let node_id = o
                    .node_id
                    .ok_or_else(|| err("missing field `node_id` (give --config or --node-id)".into()))?;
                let data_dir = o
                    .data_dir
                    .clone()
                    .ok_or_else(|| err("missing field `data_dir` (give --config or --data-dir)".into()))?;
                Config {
                    node_id,
                    cluster_id: default_cluster_id(),
                    data_dir,
                    nbd: NbdConfig::default(),
                    admin: AdminConfig::default(),
                    metrics: MetricsConfig::default(),
                    cluster: ClusterConfig::default(),
                    log: LogConfig::default(),
                    storage: StorageConfig::default(),
                    runtime: RuntimeConfig::default(),
                    shutdown_timeout_ms: default_shutdown_timeout_ms(),
                }
            }
        };
        if let Some(v) = o.node_id {
            c.node_id = v;
        }
        if let Some(v) = &o.cluster_id {
            c.cluster_id = v.clone();
        }
        if let Some(v) = &o.data_dir {
            c.data_dir = v.clone();
        }
        if let Some(v) = &o.nbd_listen {
            c.nbd.listen = v.clone();
        }
        if let Some(v) = &o.nbd_unix_socket {
            c.nbd.unix_socket = Some(v.clone());
        }
        if let Some(v) = &o.admin_listen {
            c.admin.listen = v.clone();
        }
        if let Some(v) = &o.metrics_listen {
            c.metrics.listen = Some(v.clone());
        }
        c.validate().map_err(err)?;
        Ok(c)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.node_id == 0 {
            return Err("node_id must be at least 1".into());
        }
        if self.cluster_id.is_empty()
            || self.cluster_id.len() > 64
            || !self
                .cluster_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(format!(
                "cluster_id \"{}\" must be 1-64 characters of [A-Za-z0-9._-]",
                self.cluster_id
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err("data_dir must not be empty".into());
        }
        parse_addr("nbd.listen", &self.nbd.listen)?;
        parse_addr("admin.listen", &self.admin.listen)?;
        if let Some(m) = self.metrics.listen.as_deref().filter(|m| !m.is_empty()) {
            parse_addr("metrics.listen", m)?;
        }
        if let Some(s) = &self.nbd.unix_socket {
            let n = s.as_os_str().len();
            if n == 0 || n > MAX_UNIX_SOCKET_PATH_BYTES {
                return Err(format!(
                    "nbd.unix_socket \"{}\" is {n} bytes; it must be 1-{MAX_UNIX_SOCKET_PATH_BYTES}",
                    s.display()
                ));
            }
        }
        if self.nbd.max_connections == 0 || self.nbd.max_connections > 65_536 {
            return Err(format!(
                "nbd.max_connections {} must be 1-65536",
                self.nbd.max_connections
            ));
        }
        if self.nbd.max_inflight_requests_per_connection == 0 || self.nbd.max_inflight_requests_per_connection > 4096 {
            return Err(format!(
                "nbd.max_inflight_requests_per_connection {} must be 1-4096",
                self.nbd.max_inflight_requests_per_connection
            ));
        }
        let min_bytes = trireme_nbd::codec::MAX_PAYLOAD_BYTES as usize;
        if self.nbd.max_inflight_bytes_per_connection < min_bytes
            || self.nbd.max_inflight_bytes_per_connection > 1 << 32
        {
            return Err(format!(
                "nbd.max_inflight_bytes_per_connection {} must be {min_bytes} (one maximum payload) to 4294967296",
                self.nbd.max_inflight_bytes_per_connection
            ));
        }
        if self.nbd.handshake_timeout_ms == 0 {
            return Err("nbd.handshake_timeout_ms must be positive".into());
        }
        in_range(
            "log.checkpoint_interval_ms",
            self.log.checkpoint_interval_ms,
            &CHECKPOINT_INTERVAL_MS_RANGE,
        )?;
        in_range(
            "log.checkpoint_bytes",
            self.log.checkpoint_bytes,
            &CHECKPOINT_BYTES_RANGE,
        )?;
        trireme_storage::alloc::validate_unit_bytes(self.storage.allocation_unit_bytes)
            .map_err(|e| format!("storage.allocation_unit_bytes {e}"))?;
        in_range(
            "runtime.worker_threads",
            self.runtime.worker_threads as u64,
            &WORKER_THREADS_RANGE,
        )?;
        parse_addr("cluster.peer_listen", &self.cluster.peer_listen)?;
        let mut seen = std::collections::BTreeSet::new();
        for (i, n) in self.cluster.nodes.iter().enumerate() {
            if n.id == 0 {
                return Err(format!("cluster.nodes[{i}].id must be at least 1"));
            }
            if !seen.insert(n.id) {
                return Err(format!("cluster.nodes[{i}].id {} appears twice", n.id));
            }
            parse_addr(&format!("cluster.nodes[{i}].peer"), &n.peer)?;
        }
        if !self.cluster.nodes.is_empty() && !seen.contains(&self.node_id) {
            return Err(format!(
                "cluster.nodes does not list this node (node_id {})",
                self.node_id
            ));
        }
        if self.cluster.nodes.len() > 1 && self.cluster.secret.chars().count() < MIN_SECRET_CHARS {
            return Err(format!(
                "cluster.secret must be at least {MIN_SECRET_CHARS} characters when the cluster has more than one node"
            ));
        }
        Ok(())
    }

    pub fn nbd_addr(&self) -> SocketAddr {
        parse_addr("nbd.listen", &self.nbd.listen).expect("validated in Config::load")
    }
    pub fn admin_addr(&self) -> SocketAddr {
        parse_addr("admin.listen", &self.admin.listen).expect("validated in Config::load")
    }
    pub fn peer_addr(&self) -> SocketAddr {
        parse_addr("cluster.peer_listen", &self.cluster.peer_listen).expect("validated in Config::load")
    }

    /// Every node's peer address, this one included; a one-node cluster
    /// when none are configured.
    pub fn cluster_nodes(&self) -> std::collections::BTreeMap<u64, SocketAddr> {
        let mut m: std::collections::BTreeMap<u64, SocketAddr> = self
            .cluster
            .nodes
            .iter()
            .map(|n| {
                (
                    n.id,
                    parse_addr("cluster.nodes.peer", &n.peer).expect("validated in Config::load"),
                )
            })
            .collect();
        m.entry(self.node_id).or_insert_with(|| self.peer_addr());
        m
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
            .listen
            .as_deref()
            .filter(|m| !m.is_empty())
            .map(|m| parse_addr("metrics.listen", m).expect("validated in Config::load"))
    }
}

fn parse_addr(field: &str, value: &str) -> std::result::Result<SocketAddr, String> {
    value
        .parse()
        .map_err(|_| format!("{field} \"{value}\" is not an IP:port address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Result<Config> {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("t.toml");
        std::fs::write(&p, text).expect("write");
        Config::load(Some(&p), &Overrides::default())
    }

    #[test]
    fn a_minimal_file_gets_defaults() {
        let c = load_str("node_id = 3\ndata_dir = \"/tmp/x\"\n").expect("valid");
        assert_eq!(c.node_id, 3);
        assert_eq!(c.nbd.listen, "127.0.0.1:10809");
        assert_eq!(c.admin.listen, "127.0.0.1:7100");
        assert_eq!(c.metrics_addr(), Some("127.0.0.1:7300".parse().expect("addr")));
        let off = load_str("node_id = 3\ndata_dir = \"/tmp/x\"\n[metrics]\nlisten = \"\"\n").expect("valid");
        assert_eq!(
            off.metrics_addr(),
            None,
            "an empty metrics.listen turns the endpoint off"
        );
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            ("data_dir = \"/x\"\n", "node_id"),
            ("node_id = 1\n", "data_dir"),
            ("node_id = \"one\"\ndata_dir = \"/x\"\n", "node_id"),
            ("node_id = 0\ndata_dir = \"/x\"\n", "node_id"),
            ("node_id = 1\ndata_dir = \"/x\"\nbogus = 2\n", "bogus"),
            (
                "node_id = 1\ndata_dir = \"/x\"\n[nbd]\nlisten = \"nowhere\"\n",
                "nbd.listen",
            ),
            (
                "node_id = 1\ndata_dir = \"/x\"\n[nbd]\nmax_connections = 0\n",
                "nbd.max_connections",
            ),
            ("node_id = 1\ndata_dir = \"/x\"\ncluster_id = \"a b\"\n", "cluster_id"),
            ("node_id = [\n", "TOML"),
            (
                "node_id = 1\ndata_dir = \"/x\"\n[log]\ncheckpoint_interval_ms = 0\n",
                "log.checkpoint_interval_ms",
            ),
            (
                "node_id = 1\ndata_dir = \"/x\"\n[log]\ncheckpoint_bytes = 1024\n",
                "log.checkpoint_bytes",
            ),
            (
                "node_id = 1\ndata_dir = \"/x\"\n[storage]\nallocation_unit_bytes = 3000000\n",
                "storage.allocation_unit_bytes 3000000",
            ),
            (
                "node_id = 1\ndata_dir = \"/x\"\n[runtime]\nworker_threads = 5000\n",
                "runtime.worker_threads 5000 must be 0-1024",
            ),
            (
                "node_id = 1\ndata_dir = \"/x\"\n[runtime]\nworker_threads = -1\n",
                "worker_threads",
            ),
            (
                "node_id = 1\ndata_dir = \"/x\"\n[cluster]\nsecret = \"0123456789abcdef\"\n[[cluster.nodes]]\nid = 2\npeer = \"127.0.0.1:1\"\n",
                "does not list this node",
            ),
            (
                "node_id = 1\ndata_dir = \"/x\"\n[cluster]\nsecret = \"short\"\n[[cluster.nodes]]\nid = 1\npeer = \"127.0.0.1:1\"\n[[cluster.nodes]]\nid = 2\npeer = \"127.0.0.1:2\"\n",
                "cluster.secret",
            ),
        ];
        for (text, field) in cases {
            let e = load_str(text).expect_err(text).to_string();
            assert!(e.contains(field), "error for {text:?} should name {field}: {e}");
        }
    }

    #[test]
    fn the_documented_example_config_is_valid() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/triremed.toml");
        let c = Config::load(Some(&p), &Overrides::default()).expect("deploy/triremed.toml must stay valid");
        assert_eq!(c.metrics.listen.as_deref(), Some("127.0.0.1:7300"));
        assert_eq!(c.log.prefill_bytes, 256 * 1024 * 1024);
        assert_eq!(c.log.checkpoint_interval_ms, 30_000);
        assert_eq!(c.log.checkpoint_bytes, 192 * 1024 * 1024);
        assert_eq!(c.storage.allocation_unit_bytes, 1024 * 1024);
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("t.toml");
        std::fs::write(&p, "node_id = 1\ndata_dir = \"/x\"\n").expect("write");
        let o = Overrides {
            node_id: Some(7),
            nbd_listen: Some("127.0.0.1:1".into()),
            ..Overrides::default()
        };
        let c = Config::load(Some(&p), &o).expect("valid");
        assert_eq!((c.node_id, c.nbd.listen.as_str()), (7, "127.0.0.1:1"));
    }
}
