//! The triremed binary: parse flags, load and check the config, run the
//! node until SIGTERM or SIGINT, then shut down gracefully and exit 0.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;
use triremed::{Config, Node, Overrides};

/// The Trireme node daemon: serves volumes over NBD and the admin API over gRPC.
///
/// Settings come from the TOML file given with --config; each flag below
/// replaces the file's value. Without --config, --node-id and --data-dir are
/// required. SIGTERM or SIGINT stops the node gracefully (exit status 0).
/// Logging: to stderr, filtered by RUST_LOG (default "info"; e.g.
/// "info,triremed=debug,trireme_nbd=debug" follows each request through
/// proposal, log write and commit). No line per I/O at info level.
#[derive(Debug, Parser)]
#[command(name = "triremed", version)]
struct Args {
    /// TOML config file: node_id, cluster_id, data_dir, [nbd] listen /
    /// unix_socket / max_connections / max_inflight_requests_per_connection /
    /// max_inflight_bytes_per_connection / handshake_timeout_ms, [admin]
    /// listen, [metrics] listen, shutdown_timeout_ms. See deploy/triremed.toml.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// This node's id (>= 1, unique in the cluster).
    #[arg(long)]
    node_id: Option<u64>,
    /// Cluster name; the data dir remembers it and refuses another.
    #[arg(long)]
    cluster_id: Option<String>,
    /// Data directory (node.toml, volumes/). Created if missing.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// NBD TCP listener, IP:PORT (default 127.0.0.1:10809).
    #[arg(long, value_name = "ADDR")]
    nbd_listen: Option<String>,
    /// NBD Unix socket path for consumers on this host (nbd+unix:///VOL?socket=PATH).
    #[arg(long, value_name = "PATH")]
    nbd_unix_socket: Option<PathBuf>,
    /// gRPC admin listener, IP:PORT (default 127.0.0.1:7100).
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
    /// Prometheus /metrics listener, IP:PORT (default 127.0.0.1:7300; "" turns it off).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Log format on stderr: "human" lines, or "json" (one object per line,
    /// with the request span's fields) for log shippers.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let overrides = Overrides {
        node_id: args.node_id,
        cluster_id: args.cluster_id.clone(),
        data_dir: args.data_dir.clone(),
        nbd_listen: args.nbd_listen.clone(),
        nbd_unix_socket: args.nbd_unix_socket.clone(),
        admin_listen: args.admin_listen.clone(),
        metrics_listen: args.metrics_listen.clone(),
    };
    let config = match Config::load(args.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("triremed: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) => match tracing_subscriber::EnvFilter::try_new(&v) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("triremed: RUST_LOG={v:?} is not a valid log filter: {e}");
                return ExitCode::from(2);
            }
        },
        Err(_) => tracing_subscriber::EnvFilter::new("info"),
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Human => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(false).init(),
    }
    raise_open_files_limit();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().thread_name("triremed");
    if config.runtime.worker_threads > 0 {
        runtime.worker_threads(config.runtime.worker_threads);
    }
    let runtime = match runtime.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("triremed: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("triremed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let node = Node::start(config).await.context("starting the node")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    node.shutdown().await.context("shutting down")?;
    Ok(())
}

/// Every volume holds its image open, so a node with a thousand volumes
/// needs more than the usual soft limit of 1024 descriptors: raise the soft
/// limit to the hard one (what systemd's LimitNOFILE sets).
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open files limit"),
            Err(e) => tracing::warn!(soft, hard, "could not raise the open files limit: {e}"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!("could not read the open files limit: {e}"),
    }
}
