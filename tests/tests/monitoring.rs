//! deploy/monitoring/ stays valid and in step with the daemon:
//!
//! - promtool accepts the alert rules and the Prometheus scrape config;
//! - the Grafana dashboard is well formed (titled panels with unique ids,
//!   the `${datasource}` variable, a non-empty expr on every target), and
//!   every `trireme_*` metric the dashboard and the rules name is one a
//!   live cluster really exports after some I/O.
//!
//! The live check runs a 3-node cluster: the per-follower series (replica
//! lag and state) and the per-peer ones (node up, transport) only exist
//! where a node has peers. It shares the replication tests' serial lock.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use trireme_tests::{Cluster, describe, qemu_io_ok, run_with_timeout, serial_lock, wait_until};

const SERIAL: &str = "replication";
const SERIAL_WAIT: Duration = Duration::from_secs(600);
const DASHBOARD: &str = "grafana/trireme-dashboard.json";
const ROWS: [&str; 3] = ["Executive (SLIs)", "On-call", "Debug"];

/// Metrics the dashboard or the rules may name although a healthy cluster
/// with some I/O does not export them yet.
const AFTER_AN_EVENT: &[&str] = &[
    // Created by the first NBD request that fails.
    "trireme_io_errors_total",
    // Created by the first snapshot transfer to a replica too far behind.
    "trireme_snapshot_sent_bytes_total",
    "trireme_snapshot_received_bytes_total",
];

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring")
}

fn read(file: &str) -> Result<String> {
    let path = monitoring_dir().join(file);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

#[test]
fn promtool_accepts_the_alert_rules() -> Result<()> {
    let on_path =
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("promtool").is_file()));
    if !on_path {
        bail!(
            "promtool is not installed: install Debian's `prometheus` package \
             (apt-get install -y --no-install-recommends prometheus), which provides /usr/bin/promtool"
        );
    }
    for args in [["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"]] {
        let mut cmd = Command::new("promtool");
        cmd.args(args).current_dir(monitoring_dir());
        let out = run_with_timeout(&mut cmd, Duration::from_secs(60))?;
        eprintln!("promtool {}:\n{}", args.join(" "), describe(&out));
        ensure!(
            out.status.success(),
            "promtool {} failed:\n{}",
            args.join(" "),
            describe(&out)
        );
    }
    Ok(())
}

/// Every `trireme_...` name in `text` (at a word boundary).
fn metric_names(text: &str) -> BTreeSet<String> {
    let b = text.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut names = BTreeSet::new();
    let mut from = 0;
    while let Some(off) = text[from..].find("trireme_") {
        let start = from + off;
        let mut end = start + "trireme_".len();
        while end < b.len() && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'_') {
            end += 1;
        }
        if start == 0 || !word(b[start - 1]) {
            names.insert(text[start..end].to_string());
        }
        from = end;
    }
    names
}

/// The dashboard's panels, rows included, nested ones too.
fn all_panels(panels: &Value, out: &mut Vec<Value>) {
    for p in panels.as_array().into_iter().flatten() {
        out.push(p.clone());
        all_panels(&p["panels"], out);
    }
}

fn uses_datasource_variable(ds: &Value) -> bool {
    ds.as_str() == Some("${datasource}") || ds["uid"].as_str() == Some("${datasource}")
}

fn check_dashboard(dash: &Value) -> Result<()> {
    let vars = dash["templating"]["list"].as_array().context("no templating list")?;
    let var = |name: &str| vars.iter().find(|v| v["name"] == name);
    let ds = var("datasource").context("no `datasource` variable")?;
    ensure!(
        ds["type"] == "datasource" && ds["query"] == "prometheus",
        "bad datasource variable: {ds}"
    );
    for name in ["volume", "node"] {
        let v = var(name).with_context(|| format!("no `{name}` variable"))?;
        ensure!(uses_datasource_variable(&v["datasource"]), "variable {name}: {v}");
    }
    let mut panels = Vec::new();
    all_panels(&dash["panels"], &mut panels);
    let mut ids = HashSet::new();
    let mut rows = Vec::new();
    for p in &panels {
        let title = p["title"].as_str().filter(|t| !t.is_empty());
        let title = title.with_context(|| format!("a panel without a title: {p}"))?;
        let id = p["id"]
            .as_u64()
            .with_context(|| format!("panel {title:?} has no numeric id"))?;
        ensure!(ids.insert(id), "panel {title:?}: id {id} is not unique");
        ensure!(p["gridPos"]["w"].is_u64(), "panel {title:?} has no gridPos");
        if p["type"] == "row" {
            rows.push(title);
            continue;
        }
        ensure!(
            uses_datasource_variable(&p["datasource"]),
            "panel {title:?} does not use ${{datasource}}"
        );
        let targets = p["targets"].as_array().filter(|t| !t.is_empty());
        for t in targets.with_context(|| format!("panel {title:?} has no targets"))? {
            let expr = t["expr"].as_str().unwrap_or("").trim();
            ensure!(!expr.is_empty(), "panel {title:?}: a target without an expr");
            ensure!(
                t["legendFormat"].is_string(),
                "panel {title:?}: {expr} has no legendFormat"
            );
            ensure!(
                t["datasource"].is_null() || uses_datasource_variable(&t["datasource"]),
                "panel {title:?}: a target's datasource is not ${{datasource}}"
            );
        }
    }
    ensure!(rows == ROWS, "dashboard rows {rows:?}, expected {ROWS:?}");
    eprintln!("dashboard: {} panels in rows {rows:?}", panels.len() - rows.len());
    Ok(())
}

#[test]
fn dashboard_and_rules_reference_real_metrics() -> Result<()> {
    const NAME: &str = "monitoring";
    let dash_text = read(DASHBOARD)?;
    let dash: Value = serde_json::from_str(&dash_text).with_context(|| format!("parsing {DASHBOARD}"))?;
    check_dashboard(&dash)?;
    let rules = read("alerts.yml")?;
    let wanted: BTreeSet<String> = metric_names(&dash_text)
        .into_iter()
        .chain(metric_names(&rules))
        .collect();
    ensure!(
        wanted.len() >= 20,
        "only {} metric names found: {wanted:?}",
        wanted.len()
    );

    let _serial = serial_lock(SERIAL, SERIAL_WAIT)?;
    let cluster = Cluster::start_nodes(NAME, 3, Some("64MiB"))?;
    let ids = cluster.node_ids();
    let info = cluster.wait_volume(Duration::from_secs(20), "a leader and 3 healthy replicas", |v| {
        v.leader != 0 && v.all_caught_up(&ids)
    })?;
    let uri = cluster.nbd_uri_of(info.leader)?;
    qemu_io_ok(&uri, &["write -P 7 0 256k", "read -P 7 0 256k", "flush"])?;

    // Series appear as the daemon first touches them: poll until all do.
    let mut missing = Vec::new();
    let mut exported = BTreeSet::new();
    wait_until(
        Duration::from_secs(20),
        "every referenced metric to be exported",
        || {
            for &id in &ids {
                for s in cluster.metrics_of(id)? {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        if let Some(family) = s.name.strip_suffix(suffix) {
                            exported.insert(family.to_string());
                        }
                    }
                    exported.insert(s.name);
                }
            }
            missing = wanted
                .iter()
                .filter(|n| !exported.contains(*n) && !AFTER_AN_EVENT.contains(&n.as_str()))
                .cloned()
                .collect();
            Ok(missing.is_empty())
        },
    )
    .with_context(|| format!("deploy/monitoring uses metrics triremed does not export: {missing:?}"))?;
    eprintln!(
        "[{NAME}] all {} metrics named by the dashboard and the rules are exported ({} allowed to be absent)",
        wanted.len(),
        AFTER_AN_EVENT.len()
    );
    Ok(())
}
