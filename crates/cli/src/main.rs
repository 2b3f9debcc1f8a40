//! `trireme`: the Trireme admin CLI.
//!
//! Owns the command line (volume and node administration over the
//! `trireme.v1` gRPC admin API, with human and JSON output), `trireme fault`
//! (fault injection in a triremed built with its `failpoints` feature, for
//! fault-injection tests) and `trireme dev up`, which launches local
//! triremed processes for development and for the acceptance tests.
//!
//! It must never depend on daemon internals (trireme-daemon, -storage,
//! -nbd): the gRPC API in trireme-proto and triremed's command line and
//! config file are its only contract with the daemon, so the CLI keeps
//! working against any daemon that speaks the API.

mod admin;
mod dev;
mod fault;
mod output;
mod size;

use std::error::Error as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use clap::{Args, Parser, Subcommand, ValueEnum};
use trireme_proto::v1::{
    AttachVolumeRequest, CreateVolumeRequest, DeleteVolumeRequest, GetClusterStatusRequest, GetNodeRequest,
    GetVolumeRequest, ListVolumesRequest, ResizeVolumeRequest, Volume,
};

use crate::admin::status_error;
use crate::output::{ClusterStatusJson, DeletedJson, NodeJson, VolumeJson, VolumeListJson, json_line};

/// Administer Trireme replicated block storage through a triremed admin
/// listener, or run a local development cluster.
///
/// SIZE arguments take plain bytes ("4096") or a whole number with a binary
/// unit: K/KiB, M/MiB, G/GiB, T/TiB, any letter case ("10GiB", "512m").
/// Volume sizes must be a multiple of 4096 bytes (checked by the server).
///
/// Errors go to stderr as `error: <message> (<gRPC code>)` with exit status 1.
#[derive(Debug, Parser)]
#[command(name = "trireme", version, propagate_version = true)]
struct Cli {
    /// host:port of a triremed admin gRPC listener.
    #[arg(
        long,
        global = true,
        env = "TRIREME_ADMIN",
        default_value = "127.0.0.1:7100",
        value_name = "ADDR",
        value_parser = admin::admin_arg
    )]
    admin: String,

    /// Output format: "human" for people, "json" for one line of JSON on
    /// stdout (a stable shape for scripts).
    #[arg(long, global = true, value_enum, default_value_t = Output::Human)]
    output: Output,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, inspect, resize, attach and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Inspect the node answering on --admin.
    #[command(subcommand)]
    Node(NodeCommand),
    /// The whole cluster's health.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Local development cluster.
    #[command(subcommand)]
    Dev(DevCommand),
    /// Inject faults into the node answering on --admin: network rules and
    /// failpoints, for fault-injection tests. Needs a triremed built with
    /// the `failpoints` cargo feature (any workspace debug build is).
    /// Nothing survives a restart of the node.
    #[command(subcommand)]
    Fault(fault::FaultCommand),
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create an empty volume (it reads as zeroes).
    Create {
        /// Volume name: 1-64 characters of [A-Za-z0-9._-], not starting with '.'.
        name: String,
        /// Size of the volume (SIZE, a multiple of 4096 bytes).
        #[arg(long, value_name = "SIZE", value_parser = size::size_arg)]
        size: u64,
        /// Number of replicas: 1, 3 or 5; 0 lets the server choose.
        #[arg(long, value_name = "N", default_value_t = 0, value_parser = replicas_arg)]
        replicas: u32,
        /// When writes are acknowledged: quorum-fsync (durable on a majority
        /// of replicas) or quorum-receipt (held by a majority, in memory or
        /// on disk; FLUSH and FUA wait for a majority's fdatasync, like
        /// DRBD's protocol B). Fixed at creation.
        #[arg(long, value_name = "MODE", default_value = "quorum-fsync",
              value_parser = ["quorum-fsync", "quorum-receipt"])]
        durability: String,
    },
    /// List all volumes, ordered by name.
    List,
    /// Show one volume's details and replicas.
    Info {
        /// Volume name.
        name: String,
    },
    /// Replication health of one volume: replicas in sync, each replica's
    /// lag in entries, bytes and time, and the RPO exposure (the age of the
    /// oldest acknowledged write some replica lacks).
    Status {
        /// Volume name.
        name: String,
    },
    /// Delete a volume and its data. Refused while NBD sessions are open,
    /// unless --force.
    Delete {
        /// Volume name.
        name: String,
        /// Close open NBD sessions on the volume instead of refusing.
        #[arg(long)]
        force: bool,
    },
    /// Grow a volume to a new size (shrinking is refused: it would destroy
    /// data).
    Resize {
        /// Volume name.
        name: String,
        /// New size of the volume (SIZE, a multiple of 4096 bytes, not
        /// smaller than the current size).
        #[arg(long, value_name = "SIZE", value_parser = size::size_arg)]
        size: u64,
    },
    /// Bind the volume's writer to a node: starts a new writer epoch, so NBD
    /// sessions of older epochs (on any node) can no longer write, and moves
    /// the volume's leadership to that node so its I/O stays local.
    Attach {
        /// Volume name.
        name: String,
        /// Node id to attach to (1 or more); it should hold a replica.
        #[arg(long, value_name = "ID", value_parser = node_id_arg)]
        node: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Nodes up or down, and every volume's replication health and RPO
    /// exposure, troubled volumes first.
    Status,
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Identity, listeners, version and uptime of the node.
    Info,
}

#[derive(Debug, Subcommand)]
enum DevCommand {
    /// Start triremed nodes on 127.0.0.1, create volume "vol0", print one
    /// line of JSON describing them on stdout, and stay in the foreground
    /// until SIGINT or SIGTERM, which stops the nodes.
    ///
    /// Node i (1-based) gets admin port P+i, metrics port P+200+i, peer port
    /// P+300+i and NBD port P+3700+i, and the directory DIR/node-i/ holding
    /// triremed.toml, data/, nbd.sock and triremed.log. Every node's config
    /// lists all nodes and the cluster secret kept in DIR/cluster.secret
    /// (generated on first use). vol0 is created on node 1 with the server's
    /// default replica count, and the command waits until it has a leader.
    /// Re-running on the same DIR reuses the data, the secret and the
    /// existing vol0 if its size matches.
    Up(DevUpCli),
}

#[derive(Debug, Args)]
struct DevUpCli {
    /// Number of nodes, 1-9 (3 or 5 for a replicated cluster).
    #[arg(long, value_name = "N", value_parser = nodes_arg)]
    nodes: u32,
    /// Directory for the nodes' configs, data, sockets and logs; created if
    /// missing.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Base of the port scheme (see above).
    #[arg(long, value_name = "P", default_value_t = dev::DEFAULT_BASE_PORT)]
    base_port: u16,
    /// Size of vol0 (SIZE).
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = size::volume_size_arg)]
    volume_size: u64,
    /// The triremed binary [default: triremed next to this executable].
    #[arg(long, value_name = "PATH")]
    triremed: Option<PathBuf>,
}

/// Checked here rather than left to the server so a typo fails before any
/// network round trip.
fn replicas_arg(input: &str) -> Result<u32, String> {
    match input.parse::<u32>() {
        Ok(n @ (0 | 1 | 3 | 5)) => Ok(n),
        _ => Err("--replicas must be 1, 3 or 5".to_owned()),
    }
}

fn node_id_arg(input: &str) -> Result<u64, String> {
    match input.parse::<u64>() {
        Ok(id) if id >= 1 => Ok(id),
        _ => Err(format!("invalid --node \"{input}\": expected a node id (1 or more)")),
    }
}

fn nodes_arg(input: &str) -> Result<u32, String> {
    match input.parse::<u32>() {
        Ok(n) if (1..=dev::MAX_NODES).contains(&n) => Ok(n),
        _ => Err(format!("invalid --nodes \"{input}\": expected 1 to {}", dev::MAX_NODES)),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => exit_on_parse_error(&e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Our own argument checks (sizes, --admin, --replicas) already word their
/// message fully, so print it as-is with status 1 like every other error;
/// everything else (usage errors, --help, --version) is clap's business.
fn exit_on_parse_error(e: &clap::Error) -> ! {
    if e.kind() == clap::error::ErrorKind::ValueValidation
        && let Some(source) = e.source()
    {
        eprintln!("error: {source}");
        std::process::exit(1);
    }
    e.exit()
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let addr = cli.admin.as_str();
    let json = cli.output == Output::Json;
    match cli.command {
        Command::Volume(cmd) => volume(addr, json, cmd).await,
        Command::Node(NodeCommand::Info) => {
            let node = admin::node_client(addr)
                .await?
                .get_node(GetNodeRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                println!("{}", json_line(&NodeJson::from(&node))?);
            } else {
                print!("{}", output::node_human(&node));
            }
            Ok(())
        }
        Command::Cluster(ClusterCommand::Status) => {
            let status = admin::node_client(addr)
                .await?
                .get_cluster_status(GetClusterStatusRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                println!("{}", json_line(&ClusterStatusJson::from(&status))?);
            } else {
                print!("{}", output::cluster_status_human(&status));
            }
            Ok(())
        }
        Command::Fault(cmd) => fault::run(addr, json, cmd).await,
        Command::Dev(DevCommand::Up(up)) => {
            dev::up(dev::DevUpArgs {
                nodes: up.nodes,
                data_dir: up.data_dir,
                base_port: up.base_port,
                volume_size_bytes: up.volume_size,
                triremed: up.triremed,
            })
            .await
        }
    }
}

async fn volume(addr: &str, json: bool, cmd: VolumeCommand) -> anyhow::Result<()> {
    let mut client = admin::volume_client(addr).await?;
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            replicas,
            durability,
        } => {
            let volume = client
                .create_volume(CreateVolumeRequest {
                    name,
                    size_bytes: size,
                    replica_count: replicas,
                    durability,
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .volume;
            print_volume(json, volume, "created volume", "")
        }
        VolumeCommand::List => {
            let volumes = client
                .list_volumes(ListVolumesRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .volumes;
            if json {
                let list = VolumeListJson {
                    volumes: volumes.iter().map(VolumeJson::from).collect(),
                };
                println!("{}", json_line(&list)?);
            } else {
                print!("{}", output::volume_list_human(&volumes));
            }
            Ok(())
        }
        VolumeCommand::Info { name } => {
            let volume = client
                .get_volume(GetVolumeRequest { name })
                .await
                .map_err(status_error)?
                .into_inner()
                .volume;
            print_volume(json, volume, "", "")
        }
        VolumeCommand::Status { name } => {
            let volume = client
                .get_volume(GetVolumeRequest { name })
                .await
                .map_err(status_error)?
                .into_inner()
                .volume
                .ok_or_else(|| anyhow::anyhow!("the server's reply carries no volume"))?;
            if json {
                println!("{}", json_line(&VolumeJson::from(&volume))?);
            } else {
                print!("{}", output::volume_status_human(&volume));
            }
            Ok(())
        }
        VolumeCommand::Delete { name, force } => {
            client
                .delete_volume(DeleteVolumeRequest {
                    name: name.clone(),
                    force,
                })
                .await
                .map_err(status_error)?;
            if json {
                println!("{}", json_line(&DeletedJson { deleted: &name })?);
            } else {
                println!("deleted volume {name}");
            }
            Ok(())
        }
        VolumeCommand::Resize { name, size } => {
            let volume = client
                .resize_volume(ResizeVolumeRequest {
                    name,
                    new_size_bytes: size,
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .volume;
            print_volume(json, volume, "resized volume", "")
        }
        VolumeCommand::Attach { name, node } => {
            let volume = client
                .attach_volume(AttachVolumeRequest { name, node_id: node })
                .await
                .map_err(status_error)?
                .into_inner()
                .volume;
            print_volume(json, volume, "attached volume", &format!(" to node {node}"))
        }
    }
}

/// `headline` (then the volume name, then `detail`) introduces the details in
/// human output after a change, so the user sees what happened and the
/// resulting state.
fn print_volume(json: bool, volume: Option<Volume>, headline: &str, detail: &str) -> anyhow::Result<()> {
    // A reply without the volume is a server bug; say so rather than print
    // an empty object that looks like a real one.
    let volume = volume
        .ok_or_else(|| anyhow!("triremed answered without a volume"))
        .context("unexpected reply")?;
    if json {
        println!("{}", json_line(&VolumeJson::from(&volume))?);
    } else {
        if !headline.is_empty() {
            println!("{headline} {}{detail}", volume.name);
        }
        print!("{}", output::volume_human(&volume));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli =
            Cli::try_parse_from(["trireme", "volume", "list", "--output", "json", "--admin", "h:1"]).expect("parse");
        assert_eq!(cli.output, Output::Json);
        assert_eq!(cli.admin, "h:1");
        let cli = Cli::try_parse_from(["trireme", "--output", "json", "node", "info"]).expect("parse");
        assert_eq!(cli.output, Output::Json);
    }

    #[test]
    fn replicas_and_sizes_are_checked() {
        assert_eq!(replicas_arg("3"), Ok(3));
        assert_eq!(replicas_arg("0"), Ok(0));
        for bad in ["2", "4", "-1", "x", "7"] {
            assert_eq!(replicas_arg(bad), Err("--replicas must be 1, 3 or 5".into()));
        }
        let err = Cli::try_parse_from(["trireme", "volume", "create", "v", "--size", "12XB"]).expect_err("bad size");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert_eq!(
            err.source().map(|s| s.to_string()),
            Some("invalid --size \"12XB\": expected bytes or a number with KiB/MiB/GiB/TiB".into())
        );
    }

    #[test]
    fn attach_needs_a_real_node_id() {
        let cli = Cli::try_parse_from(["trireme", "volume", "attach", "vol0", "--node", "2"]).expect("parse");
        let Command::Volume(VolumeCommand::Attach { name, node }) = cli.command else {
            panic!("not volume attach");
        };
        assert_eq!((name.as_str(), node), ("vol0", 2));
        for bad in ["0", "-1", "x", ""] {
            assert_eq!(
                node_id_arg(bad),
                Err(format!("invalid --node \"{bad}\": expected a node id (1 or more)"))
            );
        }
        let err = Cli::try_parse_from(["trireme", "volume", "attach", "vol0"]).expect_err("no --node");
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn fault_commands_parse() {
        let cli = Cli::try_parse_from([
            "trireme",
            "fault",
            "net",
            "set",
            "--to",
            "2,3",
            "--drop",
            "--delay-ms",
            "50",
        ])
        .expect("parse");
        let Command::Fault(fault::FaultCommand::Net(fault::NetCommand::Set { to, drop, delay_ms, .. })) = cli.command
        else {
            panic!("not fault net set");
        };
        assert_eq!((to, drop, delay_ms), (vec![2, 3], true, 50));
        let err = Cli::try_parse_from(["trireme", "fault", "net", "set", "--drop"]).expect_err("no --to");
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let cli =
            Cli::try_parse_from(["trireme", "fault", "point", "set", "log::write", "return(enospc)"]).expect("parse");
        assert!(matches!(
            cli.command,
            Command::Fault(fault::FaultCommand::Point(fault::PointCommand::Set { .. }))
        ));
        let cli = Cli::try_parse_from(["trireme", "fault", "list", "--output", "json"]).expect("parse");
        assert_eq!(cli.output, Output::Json);
    }

    #[test]
    fn dev_up_node_counts() {
        for ok in ["1", "3", "5", "9"] {
            assert_eq!(nodes_arg(ok), ok.parse::<u32>().map_err(|e| e.to_string()));
        }
        for bad in ["0", "10", "-1", "x"] {
            assert_eq!(
                nodes_arg(bad),
                Err(format!("invalid --nodes \"{bad}\": expected 1 to 9"))
            );
        }
    }

    #[test]
    fn dev_up_defaults() {
        let cli = Cli::try_parse_from(["trireme", "dev", "up", "--nodes", "1", "--data-dir", "d"]).expect("parse");
        let Command::Dev(DevCommand::Up(up)) = cli.command else {
            panic!("not dev up");
        };
        assert_eq!(up.base_port, 7100);
        assert_eq!(up.volume_size, 1 << 30);
        assert!(up.triremed.is_none());
    }
}
