//! `trireme fault`: fault injection in the node answering on --admin, for
//! fault-injection tests (the daemon must be built with its `failpoints`
//! feature; otherwise it refuses every call, and so do we, with its words).

use clap::Subcommand;
use serde::Serialize;
use trireme_proto::v1::fault_service_client::FaultServiceClient;
use trireme_proto::v1::{
    ClearFailpointsRequest, ClearNetFaultsRequest, GetFaultsRequest, GetFaultsResponse, NetFault, SetFailpointRequest,
    SetNetFaultRequest,
};

use crate::admin::{self, status_error};
use crate::output::json_line;

#[derive(Debug, Subcommand)]
pub enum FaultCommand {
    /// Network faults on the node's outgoing traffic to its peers (Raft
    /// batches, node heartbeats, forwarded I/O, catalog changes, snapshot
    /// copies). Outbound only: a two-way partition needs a rule on both
    /// nodes.
    #[command(subcommand)]
    Net(NetCommand),
    /// Failpoints: named places in the node's disk and commit paths that
    /// fail or crash on demand.
    #[command(subcommand)]
    Point(PointCommand),
    /// The network rules and failpoints in force on the node, one per line.
    List,
}

#[derive(Debug, Subcommand)]
pub enum NetCommand {
    /// Replace the rule for traffic to the given peers; with no fault flag
    /// the rule is removed.
    Set {
        /// Destination node ids, comma-separated (configured peers, not the
        /// node itself).
        #[arg(long, value_name = "IDS", value_delimiter = ',', required = true, num_args = 1..)]
        to: Vec<u64>,
        /// Lose everything (calls fail at once as unavailable).
        #[arg(long)]
        drop: bool,
        /// Lose each batch or call with this probability (0-100).
        #[arg(long, value_name = "N", default_value_t = 0)]
        loss_percent: u32,
        /// Hold each batch or call back this long, plus up to 20% jitter
        /// (at most 60000; batches stay in order).
        #[arg(long, value_name = "N", default_value_t = 0)]
        delay_ms: u32,
        /// Send each Raft batch twice with this probability (0-100).
        #[arg(long, value_name = "N", default_value_t = 0)]
        dup_percent: u32,
    },
    /// Remove every network rule of the node.
    Clear,
}

#[derive(Debug, Subcommand)]
pub enum PointCommand {
    /// Configure a failpoint, e.g. `log::fsync return`, `log::write
    /// return(enospc)`, `crash::after_apply 1*return`; `off` removes it.
    Set {
        /// Failpoint name; the node's error lists the known ones.
        name: String,
        /// fail crate actions: `return`, `return(enospc)`, `N*return`,
        /// `P%return`, `sleep(MS)`, `pause`, `off`, joined by `->`.
        actions: String,
    },
    /// Remove every failpoint of the node.
    Clear,
}

/// `fault list --output json`, also printed after a change in JSON mode.
#[derive(Debug, Serialize, PartialEq)]
pub struct FaultsJson {
    pub net: Vec<NetFaultJson>,
    pub failpoints: Vec<FailpointJson>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct NetFaultJson {
    pub peer: u64,
    pub drop: bool,
    pub loss_percent: u32,
    pub delay_ms: u32,
    pub dup_percent: u32,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct FailpointJson {
    pub name: String,
    pub actions: String,
}

impl From<&GetFaultsResponse> for FaultsJson {
    fn from(r: &GetFaultsResponse) -> Self {
        FaultsJson {
            net: r
                .net
                .iter()
                .map(|n| NetFaultJson {
                    peer: n.peer,
                    drop: n.drop,
                    loss_percent: n.loss_percent,
                    delay_ms: n.delay_ms,
                    dup_percent: n.dup_percent,
                })
                .collect(),
            failpoints: r
                .failpoints
                .iter()
                .map(|f| FailpointJson {
                    name: f.name.clone(),
                    actions: f.actions.clone(),
                })
                .collect(),
        }
    }
}

fn rule_human(n: &NetFault) -> String {
    format!(
        "drop {}, loss {}%, delay {} ms, dup {}%",
        if n.drop { "yes" } else { "no" },
        n.loss_percent,
        n.delay_ms,
        n.dup_percent
    )
}

fn peers_human(peers: &[u64]) -> String {
    let ids: Vec<String> = peers.iter().map(u64::to_string).collect();
    format!("node{} {}", if peers.len() == 1 { "" } else { "s" }, ids.join(", "))
}

/// One line per rule, then one per failpoint.
pub fn faults_human(r: &GetFaultsResponse) -> String {
    if r.net.is_empty() && r.failpoints.is_empty() {
        return "no network faults and no failpoints\n".to_string();
    }
    let mut out = String::new();
    for n in &r.net {
        out.push_str(&format!("net to node {}: {}\n", n.peer, rule_human(n)));
    }
    for f in &r.failpoints {
        out.push_str(&format!("failpoint {}: {}\n", f.name, f.actions));
    }
    out
}

pub async fn run(addr: &str, json: bool, cmd: FaultCommand) -> anyhow::Result<()> {
    let mut client = FaultServiceClient::new(admin::connect(addr, admin::CONNECT_TIMEOUT).await?);
    let done = match cmd {
        FaultCommand::List => None,
        FaultCommand::Net(NetCommand::Set {
            to,
            drop,
            loss_percent,
            delay_ms,
            dup_percent,
        }) => {
            let req = SetNetFaultRequest {
                peers: to.clone(),
                drop,
                loss_percent,
                delay_ms,
                dup_percent,
            };
            client.set_net_fault(req.clone()).await.map_err(status_error)?;
            let rule = NetFault {
                peer: 0,
                drop,
                loss_percent,
                delay_ms,
                dup_percent,
            };
            Some(if rule == NetFault::default() {
                format!("removed the network fault to {}", peers_human(&to))
            } else {
                format!("network fault to {}: {}", peers_human(&to), rule_human(&rule))
            })
        }
        FaultCommand::Net(NetCommand::Clear) => {
            client
                .clear_net_faults(ClearNetFaultsRequest {})
                .await
                .map_err(status_error)?;
            Some("removed every network fault".to_string())
        }
        FaultCommand::Point(PointCommand::Set { name, actions }) => {
            client
                .set_failpoint(SetFailpointRequest {
                    name: name.clone(),
                    actions: actions.clone(),
                })
                .await
                .map_err(status_error)?;
            Some(if actions.trim() == "off" {
                format!("removed failpoint {name}")
            } else {
                format!("failpoint {name}: {}", actions.trim())
            })
        }
        FaultCommand::Point(PointCommand::Clear) => {
            client
                .clear_failpoints(ClearFailpointsRequest {})
                .await
                .map_err(status_error)?;
            Some("removed every failpoint".to_string())
        }
    };
    if let (Some(line), false) = (&done, json) {
        println!("{line}");
        return Ok(());
    }
    let faults = client
        .get_faults(GetFaultsRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        // After a change too: scripts get the state it left, in one shape.
        println!("{}", json_line(&FaultsJson::from(&faults))?);
    } else {
        print!("{}", faults_human(&faults));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use trireme_proto::v1::Failpoint;

    use super::*;

    #[test]
    fn list_json_has_the_documented_shape() {
        let r = GetFaultsResponse {
            net: vec![NetFault {
                peer: 2,
                drop: true,
                ..NetFault::default()
            }],
            failpoints: vec![Failpoint {
                name: "log::fsync".into(),
                actions: "return".into(),
            }],
        };
        assert_eq!(
            json_line(&FaultsJson::from(&r)).unwrap(),
            r#"{"net":[{"peer":2,"drop":true,"loss_percent":0,"delay_ms":0,"dup_percent":0}],"failpoints":[{"name":"log::fsync","actions":"return"}]}"#
        );
        assert_eq!(
            faults_human(&r),
            "net to node 2: drop yes, loss 0%, delay 0 ms, dup 0%\nfailpoint log::fsync: return\n"
        );
        assert_eq!(
            faults_human(&GetFaultsResponse::default()),
            "no network faults and no failpoints\n"
        );
    }
}
