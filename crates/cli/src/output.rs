//! What the admin commands print: the JSON shapes (a stable contract for
//! scripts and tests, so mapped field by field here rather than derived from
//! the generated proto types) and the human layout.

use serde::Serialize;
use trireme_proto::v1::{GetClusterStatusResponse, GetNodeResponse, Replica, Volume};

use crate::size::{bytes_and_human, human_size};

#[derive(Debug, Serialize, PartialEq)]
pub struct VolumeJson {
    pub name: String,
    pub id: String,
    pub size_bytes: u64,
    pub replica_count: u32,
    pub leader: u64,
    pub replicas: Vec<ReplicaJson>,
    pub open_sessions: u32,
    pub created_at_unix_s: u64,
    pub durability: String,
    pub allocated_bytes: u64,
    pub epoch: u64,
    pub attached_node: u64,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub rpo_exposure_seconds: f64,
    pub replicas_in_sync: u32,
    pub last_failover_pause_seconds: f64,
    pub leader_changes: u64,
    pub hibernating: bool,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ReplicaJson {
    pub node_id: u64,
    pub role: String,
    pub state: String,
    pub match_index: u64,
    pub lag_entries: u64,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct VolumeListJson {
    pub volumes: Vec<VolumeJson>,
}

#[derive(Debug, Serialize)]
pub struct DeletedJson<'a> {
    pub deleted: &'a str,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct NodeJson {
    pub node_id: u64,
    pub cluster_id: String,
    pub nbd_address: String,
    pub nbd_unix_socket: String,
    pub version: String,
    pub uptime_s: u64,
}

impl From<&Replica> for ReplicaJson {
    fn from(r: &Replica) -> Self {
        Self {
            node_id: r.node_id,
            role: r.role.clone(),
            state: r.state.clone(),
            match_index: r.match_index,
            lag_entries: r.lag_entries,
            lag_bytes: r.lag_bytes,
            lag_seconds: r.lag_seconds,
        }
    }
}

impl From<&Volume> for VolumeJson {
    fn from(v: &Volume) -> Self {
        Self {
            name: v.name.clone(),
            id: v.id.clone(),
            size_bytes: v.size_bytes,
            replica_count: v.replica_count,
            leader: v.leader,
            replicas: v.replicas.iter().map(ReplicaJson::from).collect(),
            open_sessions: v.open_sessions,
            created_at_unix_s: v.created_at_unix_s,
            durability: v.durability.clone(),
            allocated_bytes: v.allocated_bytes,
            epoch: v.epoch,
            attached_node: v.attached_node,
            term: v.term,
            commit_index: v.commit_index,
            applied_index: v.applied_index,
            rpo_exposure_seconds: v.rpo_exposure_seconds,
            replicas_in_sync: v.replicas_in_sync,
            last_failover_pause_seconds: v.last_failover_pause_seconds,
            leader_changes: v.leader_changes,
            hibernating: v.hibernating,
        }
    }
}

impl From<&GetNodeResponse> for NodeJson {
    fn from(n: &GetNodeResponse) -> Self {
        Self {
            node_id: n.node_id,
            cluster_id: n.cluster_id.clone(),
            nbd_address: n.nbd_address.clone(),
            nbd_unix_socket: n.nbd_unix_socket.clone(),
            version: n.version.clone(),
            uptime_s: n.uptime_s,
        }
    }
}

/// One line, so a script can read exactly one line per command.
pub fn json_line<T: Serialize>(value: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string(value)?)
}

/// `key: value` lines with the values aligned in one column.
fn key_values(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (key, value) in rows {
        out.push_str(&format!("{:<width$} {value}\n", format!("{key}:")));
    }
    out
}

/// Left-aligned columns separated by two spaces; no trailing spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// "node N", or "none" for 0 (no leader, not attached).
fn node_text(node: u64) -> String {
    if node == 0 {
        "none".to_owned()
    } else {
        format!("node {node}")
    }
}

pub fn volume_human(v: &Volume) -> String {
    let mut out = key_values(&[
        ("name", v.name.clone()),
        ("id", v.id.clone()),
        ("size", bytes_and_human(v.size_bytes)),
        ("replicas", v.replica_count.to_string()),
        ("leader", node_text(v.leader)),
        ("attached", node_text(v.attached_node)),
        ("epoch", v.epoch.to_string()),
        ("term", v.term.to_string()),
        ("commit index", v.commit_index.to_string()),
        ("applied index", v.applied_index.to_string()),
        ("durability", v.durability.clone()),
        ("open sessions", v.open_sessions.to_string()),
        ("allocated", bytes_and_human(v.allocated_bytes)),
        ("created", unix_time_human(v.created_at_unix_s)),
    ]);
    if !v.replicas.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = v
            .replicas
            .iter()
            .map(|r| {
                vec![
                    r.node_id.to_string(),
                    r.role.clone(),
                    r.state.clone(),
                    r.match_index.to_string(),
                    r.lag_entries.to_string(),
                    human_size(r.lag_bytes),
                ]
            })
            .collect();
        out.push_str(&table(
            &["NODE", "ROLE", "STATE", "MATCH", "LAG(entries)", "LAG(bytes)"],
            &rows,
        ));
    }
    out
}

pub fn volume_list_human(volumes: &[Volume]) -> String {
    if volumes.is_empty() {
        return "no volumes\n".to_owned();
    }
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                human_size(v.size_bytes),
                v.replica_count.to_string(),
                node_text(v.leader),
                v.open_sessions.to_string(),
            ]
        })
        .collect();
    table(&["NAME", "SIZE", "REPLICAS", "LEADER", "SESSIONS"], &rows)
}

pub fn node_human(n: &GetNodeResponse) -> String {
    let unix_socket = if n.nbd_unix_socket.is_empty() {
        "disabled".to_owned()
    } else {
        n.nbd_unix_socket.clone()
    };
    key_values(&[
        ("node id", n.node_id.to_string()),
        ("cluster id", n.cluster_id.clone()),
        ("nbd address", n.nbd_address.clone()),
        ("nbd unix socket", unix_socket),
        ("version", n.version.clone()),
        ("uptime", format!("{} s", n.uptime_s)),
    ])
}

/// "2024-03-01 12:00:00 UTC"; UTC because the CLI may run far from the node
/// and a fixed zone keeps output comparable.
fn unix_time_human(unix_s: u64) -> String {
    if unix_s == 0 {
        return "unknown".to_owned();
    }
    let days = unix_s / 86_400;
    let secs = unix_s % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// algorithm), to avoid a date crate for one line of output.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_volume() -> Volume {
        Volume {
            name: "vol0".into(),
            id: "00ab".into(),
            size_bytes: 1 << 30,
            replica_count: 3,
            leader: 1,
            replicas: vec![
                Replica {
                    node_id: 1,
                    role: "leader".into(),
                    state: "healthy".into(),
                    match_index: 120,
                    lag_entries: 0,
                    lag_bytes: 0,
                    lag_seconds: 0.0,
                },
                Replica {
                    node_id: 2,
                    role: "follower".into(),
                    state: "healthy".into(),
                    match_index: 120,
                    lag_entries: 0,
                    lag_bytes: 0,
                    lag_seconds: 0.0,
                },
                Replica {
                    node_id: 3,
                    role: "follower".into(),
                    state: "catching-up".into(),
                    match_index: 100,
                    lag_entries: 20,
                    lag_bytes: 1536 << 10,
                    lag_seconds: 0.25,
                },
            ],
            open_sessions: 2,
            created_at_unix_s: 1_709_294_400,
            durability: "quorum-fsync".into(),
            allocated_bytes: 8192,
            epoch: 4,
            attached_node: 1,
            term: 7,
            commit_index: 120,
            applied_index: 119,
            rpo_exposure_seconds: 0.25,
            replicas_in_sync: 2,
            last_failover_pause_seconds: 1.5,
            leader_changes: 3,
            hibernating: false,
        }
    }

    #[test]
    fn volume_json_has_exactly_the_contract_keys() {
        let value = serde_json::to_value(VolumeJson::from(&sample_volume())).expect("serialize");
        let want = serde_json::json!({
            "name": "vol0",
            "id": "00ab",
            "size_bytes": 1073741824u64,
            "replica_count": 3,
            "leader": 1,
            "replicas": [
                {"node_id": 1, "role": "leader", "state": "healthy",
                 "match_index": 120, "lag_entries": 0, "lag_bytes": 0, "lag_seconds": 0.0},
                {"node_id": 2, "role": "follower", "state": "healthy",
                 "match_index": 120, "lag_entries": 0, "lag_bytes": 0, "lag_seconds": 0.0},
                {"node_id": 3, "role": "follower", "state": "catching-up",
                 "match_index": 100, "lag_entries": 20, "lag_bytes": 1572864, "lag_seconds": 0.25},
            ],
            "open_sessions": 2,
            "created_at_unix_s": 1709294400u64,
            "durability": "quorum-fsync",
            "allocated_bytes": 8192,
            "epoch": 4,
            "attached_node": 1,
            "term": 7,
            "commit_index": 120,
            "applied_index": 119,
            "rpo_exposure_seconds": 0.25,
            "replicas_in_sync": 2,
            "last_failover_pause_seconds": 1.5,
            "leader_changes": 3,
            "hibernating": false,
        });
        assert_eq!(value, want);
    }

    #[test]
    fn volume_status_shows_the_slis() {
        let text = volume_status_human(&sample_volume());
        assert!(text.contains("health:           degraded"), "{text}");
        assert!(text.contains("replicas in sync: 2 of 3"), "{text}");
        assert!(text.contains("rpo exposure:     250 ms"), "{text}");
        assert!(text.contains("last failover:    1.5 s"), "{text}");
        assert!(
            text.contains("3     follower  catching-up  20            1.5 MiB     250 ms"),
            "{text}"
        );
    }

    #[test]
    fn cluster_status_lists_trouble_first() {
        use trireme_proto::v1::{ClusterNode, VolumeHealth};
        let c = GetClusterStatusResponse {
            answered_by: 1,
            nodes: vec![
                ClusterNode {
                    node_id: 1,
                    address: "127.0.0.1:1".into(),
                    state: "up".into(),
                },
                ClusterNode {
                    node_id: 2,
                    address: "127.0.0.1:2".into(),
                    state: "down".into(),
                },
            ],
            volumes: vec![
                VolumeHealth {
                    name: "a".into(),
                    leader: 1,
                    replica_count: 3,
                    replicas_in_sync: 3,
                    state: "healthy".into(),
                    ..Default::default()
                },
                VolumeHealth {
                    name: "b".into(),
                    leader: 1,
                    replica_count: 3,
                    replicas_in_sync: 2,
                    rpo_exposure_seconds: 4.0,
                    state: "degraded".into(),
                    ..Default::default()
                },
            ],
            under_replicated: 1,
            unavailable: 0,
            max_rpo_exposure_seconds: 4.0,
        };
        let text = cluster_status_human(&c);
        let row = |name: &str| {
            text.lines()
                .position(|l| l.split_whitespace().next() == Some(name))
                .unwrap_or_else(|| panic!("no row for {name}: {text}"))
        };
        assert!(row("b") < row("a"), "trouble first: {text}");
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["2", "127.0.0.1:2", "down"]),
            "{text}"
        );
        assert!(text.contains("max rpo exposure: 4.0 s"), "{text}");
        let json = serde_json::to_value(ClusterStatusJson::from(&c)).expect("json");
        assert_eq!(json["volumes"][1]["state"], "degraded");
    }

    #[test]
    fn list_delete_and_node_json() {
        let list = VolumeListJson {
            volumes: vec![VolumeJson::from(&sample_volume())],
        };
        let line = json_line(&list).expect("serialize");
        assert!(!line.contains('\n'));
        let value: serde_json::Value = serde_json::from_str(&line).expect("parse");
        assert_eq!(value["volumes"][0]["name"], "vol0");
        assert_eq!(value.as_object().map(|o| o.len()), Some(1));

        let line = json_line(&DeletedJson { deleted: "vol0" }).expect("serialize");
        assert_eq!(line, r#"{"deleted":"vol0"}"#);

        let node = GetNodeResponse {
            node_id: 3,
            cluster_id: "dev".into(),
            nbd_address: "127.0.0.1:10801".into(),
            nbd_unix_socket: String::new(),
            version: "0.1.0".into(),
            uptime_s: 42,
        };
        let value = serde_json::to_value(NodeJson::from(&node)).expect("serialize");
        assert_eq!(
            value,
            serde_json::json!({
                "node_id": 3,
                "cluster_id": "dev",
                "nbd_address": "127.0.0.1:10801",
                "nbd_unix_socket": "",
                "version": "0.1.0",
                "uptime_s": 42,
            })
        );
    }

    #[test]
    fn human_volume_info() {
        let text = volume_human(&sample_volume());
        assert!(text.contains("size:          1073741824 (1.0 GiB)\n"), "{text}");
        assert!(text.contains("open sessions: 2\n"), "{text}");
        assert!(text.contains("created:       2024-03-01 12:00:00 UTC\n"), "{text}");
        assert!(text.contains("leader:        node 1\n"), "{text}");
        assert!(text.contains("attached:      node 1\n"), "{text}");
        assert!(text.contains("epoch:         4\n"), "{text}");
        assert!(text.contains("term:          7\n"), "{text}");
        assert!(text.contains("commit index:  120\n"), "{text}");
        assert!(text.contains("applied index: 119\n"), "{text}");
        assert!(
            text.ends_with(
                "\n\
                 NODE  ROLE      STATE        MATCH  LAG(entries)  LAG(bytes)\n\
                 1     leader    healthy      120    0             0 B\n\
                 2     follower  healthy      120    0             0 B\n\
                 3     follower  catching-up  100    20            1.5 MiB\n"
            ),
            "{text}"
        );

        let mut detached = sample_volume();
        detached.attached_node = 0;
        detached.leader = 0;
        detached.replicas.clear();
        let text = volume_human(&detached);
        assert!(text.contains("leader:        none\n"), "{text}");
        assert!(text.contains("attached:      none\n"), "{text}");
        assert!(!text.contains("NODE"), "{text}");
    }

    #[test]
    fn human_volume_list() {
        let mut big = sample_volume();
        big.name = "a-longer-name".into();
        big.leader = 0;
        let text = volume_list_human(&[sample_volume(), big]);
        assert_eq!(
            text,
            "NAME           SIZE     REPLICAS  LEADER  SESSIONS\n\
             vol0           1.0 GiB  3         node 1  2\n\
             a-longer-name  1.0 GiB  3         none    2\n"
        );
        assert_eq!(volume_list_human(&[]), "no volumes\n");
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(unix_time_human(86_399), "1970-01-01 23:59:59 UTC");
        assert_eq!(unix_time_human(0), "unknown");
    }
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ClusterNodeJson {
    pub node_id: u64,
    pub address: String,
    pub state: String,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct VolumeHealthJson {
    pub name: String,
    pub leader: u64,
    pub replica_count: u32,
    pub replicas_in_sync: u32,
    pub rpo_exposure_seconds: f64,
    pub state: String,
    pub last_failover_pause_seconds: f64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ClusterStatusJson {
    pub answered_by: u64,
    pub nodes: Vec<ClusterNodeJson>,
    pub volumes: Vec<VolumeHealthJson>,
    pub under_replicated: u32,
    pub unavailable: u32,
    pub max_rpo_exposure_seconds: f64,
}

impl From<&GetClusterStatusResponse> for ClusterStatusJson {
    fn from(c: &GetClusterStatusResponse) -> Self {
        Self {
            answered_by: c.answered_by,
            nodes: c
                .nodes
                .iter()
                .map(|n| ClusterNodeJson {
                    node_id: n.node_id,
                    address: n.address.clone(),
                    state: n.state.clone(),
                })
                .collect(),
            volumes: c
                .volumes
                .iter()
                .map(|v| VolumeHealthJson {
                    name: v.name.clone(),
                    leader: v.leader,
                    replica_count: v.replica_count,
                    replicas_in_sync: v.replicas_in_sync,
                    rpo_exposure_seconds: v.rpo_exposure_seconds,
                    state: v.state.clone(),
                    last_failover_pause_seconds: v.last_failover_pause_seconds,
                })
                .collect(),
            under_replicated: c.under_replicated,
            unavailable: c.unavailable,
            max_rpo_exposure_seconds: c.max_rpo_exposure_seconds,
        }
    }
}

/// Seconds with a unit a person reads at a glance: "0 s" when in sync.
fn seconds_human(s: f64) -> String {
    if s <= 0.0 {
        "0 s".to_owned()
    } else if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else {
        format!("{s:.1} s")
    }
}

/// `volume status`: the replication SLIs of one volume.
pub fn volume_status_human(v: &Volume) -> String {
    let in_sync = format!("{} of {}", v.replicas_in_sync, v.replica_count);
    let health = if v.leader == 0 {
        "unavailable (no leader)"
    } else if v.replicas.iter().any(|r| r.state == "snapshot") {
        "rebuilding"
    } else if v.replicas_in_sync < v.replica_count {
        "degraded"
    } else {
        "healthy"
    };
    let mut out = key_values(&[
        ("name", v.name.clone()),
        ("health", health.to_owned()),
        ("leader", node_text(v.leader)),
        ("replicas in sync", in_sync),
        ("rpo exposure", seconds_human(v.rpo_exposure_seconds)),
        ("last failover", seconds_human(v.last_failover_pause_seconds)),
        ("leader changes", v.leader_changes.to_string()),
        ("commit index", v.commit_index.to_string()),
        (
            "idle",
            if v.hibernating { "yes (hibernating)" } else { "no" }.to_owned(),
        ),
    ]);
    if !v.replicas.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = v
            .replicas
            .iter()
            .map(|r| {
                vec![
                    r.node_id.to_string(),
                    r.role.clone(),
                    r.state.clone(),
                    r.lag_entries.to_string(),
                    human_size(r.lag_bytes),
                    seconds_human(r.lag_seconds),
                ]
            })
            .collect();
        out.push_str(&table(
            &["NODE", "ROLE", "STATE", "LAG(entries)", "LAG(bytes)", "LAG(time)"],
            &rows,
        ));
    }
    out
}

/// `cluster status`: nodes, then volumes that need attention first.
pub fn cluster_status_human(c: &GetClusterStatusResponse) -> String {
    let mut out = key_values(&[
        ("answered by", node_text(c.answered_by)),
        ("volumes", c.volumes.len().to_string()),
        ("under-replicated", c.under_replicated.to_string()),
        ("unavailable", c.unavailable.to_string()),
        ("max rpo exposure", seconds_human(c.max_rpo_exposure_seconds)),
    ]);
    out.push('\n');
    let nodes: Vec<Vec<String>> = c
        .nodes
        .iter()
        .map(|n| vec![n.node_id.to_string(), n.address.clone(), n.state.clone()])
        .collect();
    out.push_str(&table(&["NODE", "PEER ADDRESS", "STATE"], &nodes));
    if !c.volumes.is_empty() {
        out.push('\n');
        let mut vols: Vec<_> = c.volumes.iter().collect();
        // Trouble first, then by name.
        vols.sort_by_key(|v| (v.state == "healthy", v.name.clone()));
        let rows: Vec<Vec<String>> = vols
            .iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    v.state.clone(),
                    node_text(v.leader),
                    format!("{}/{}", v.replicas_in_sync, v.replica_count),
                    seconds_human(v.rpo_exposure_seconds),
                ]
            })
            .collect();
        out.push_str(&table(
            &["VOLUME", "HEALTH", "LEADER", "IN SYNC", "RPO EXPOSURE"],
            &rows,
        ));
    }
    out
}
