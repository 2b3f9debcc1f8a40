//! Acceptance: observability. Real `triremed` nodes, real fio, and their
//! Prometheus `/metrics` scraped over HTTP and parsed strictly:
//!
//! - a fio run of a known number of writes moves the write counter, the
//!   byte counter and the latency histogram's count by exactly that much;
//! - a stopped follower (SIGSTOP) shows rising lag and a positive RPO
//!   exposure on the leader, and both return to 0 once it has caught up;
//! - killing the leader moves the leader-change counter and sets the
//!   failover-pause gauge on the new leader;
//! - an idle volume hibernates (no ticking), wakes on I/O, and a
//!   hibernating follower still takes over when its leader dies.
//!
//! The 3-node tests share the replication tests' serial lock: two clusters
//! at once on 2 cores would distort each other's timings.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use trireme_tests::{
    ChildGuard, Cluster, Sample, Sig, metric_max, metric_sum, qemu_io_ok, run_fio_checked, serial_lock, wait_until,
};

const SERIAL: &str = "replication";
const SERIAL_WAIT: Duration = Duration::from_secs(600);
const SETTLE: Duration = Duration::from_secs(20);
const VOL: &str = "vol0";

fn sum(s: &[Sample], name: &str, op: &str) -> f64 {
    metric_sum(s, name, &[("volume", VOL), ("op", op)])
}

fn vol_gauge(s: &[Sample], name: &str) -> f64 {
    metric_max(s, name, &[("volume", VOL)]).unwrap_or(f64::NAN)
}

fn follower_gauge(s: &[Sample], name: &str, replica: u64) -> f64 {
    let r = replica.to_string();
    metric_max(s, name, &[("volume", VOL), ("replica", r.as_str())]).unwrap_or(f64::NAN)
}

/// Sequential 4 KiB writes of `size_bytes`: exactly size/4096 NBD writes.
fn fio_exact_writes(cluster: &Cluster, uri: &str, size_bytes: u64, json: &Path) -> Result<u64> {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=exact",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=write",
        "--bs=4k",
        "--iodepth=8",
        &format!("--size={size_bytes}"),
        "--output-format=json",
    ])
    .arg(format!("--output={}", json.display()))
    .current_dir(cluster.scratch());
    let (writes, _) = run_fio_checked(&mut cmd, Duration::from_secs(120), json, cluster)?;
    Ok(writes)
}

#[test]
fn write_counters_and_histograms_count_exactly() -> Result<()> {
    const NAME: &str = "obs-counters";
    let cluster = Cluster::start(NAME)?;
    let node = cluster.node().id;
    let uri = cluster.nbd_uri_of(node)?;
    // A first write creates the series; the baseline is taken after it.
    qemu_io_ok(&uri, &["write -P 1 0 4k"])?;
    let before = cluster.metrics_of(node)?;
    let size_bytes: u64 = 4 << 20;
    let writes = fio_exact_writes(&cluster, &uri, size_bytes, &cluster.scratch().join("fio.json"))?;
    ensure!(writes == size_bytes / 4096, "fio reported {writes} writes");
    let after = cluster.metrics_of(node)?;
    let d = |name: &str| sum(&after, name, "write") - sum(&before, name, "write");
    let requests = d("trireme_io_requests_total");
    let observations = d("trireme_io_request_duration_seconds_count");
    let bytes = d("trireme_io_bytes_total");
    eprintln!("[{NAME}] fio wrote {writes}: requests +{requests}, histogram count +{observations}, bytes +{bytes}");
    ensure!(
        requests == writes as f64,
        "write counter moved by {requests}, fio wrote {writes}"
    );
    ensure!(
        observations == writes as f64,
        "write latency histogram moved by {observations}, fio wrote {writes}"
    );
    ensure!(
        bytes == size_bytes as f64,
        "write byte counter moved by {bytes}, fio wrote {size_bytes}"
    );
    // The +Inf bucket of a histogram is its count.
    let inf = metric_sum(
        &after,
        "trireme_io_request_duration_seconds_bucket",
        &[("volume", VOL), ("op", "write"), ("le", "+Inf")],
    );
    ensure!(
        inf == sum(&after, "trireme_io_request_duration_seconds_count", "write"),
        "the +Inf bucket {inf} differs from the count"
    );
    let proposals = metric_sum(&after, "trireme_raft_proposals_total", &[("volume", VOL)])
        - metric_sum(&before, "trireme_raft_proposals_total", &[("volume", VOL)]);
    ensure!(
        proposals >= writes as f64,
        "only {proposals} raft proposals for {writes} writes"
    );
    let commits = metric_sum(&after, "trireme_raft_commit_duration_seconds_count", &[("volume", VOL)])
        - metric_sum(
            &before,
            "trireme_raft_commit_duration_seconds_count",
            &[("volume", VOL)],
        );
    ensure!(
        commits >= writes as f64,
        "only {commits} commit-latency observations for {writes} writes"
    );
    let synced = metric_sum(&after, "trireme_log_sync_duration_seconds_count", &[])
        - metric_sum(&before, "trireme_log_sync_duration_seconds_count", &[]);
    ensure!(synced >= 1.0, "no log sync was observed");
    // Every series carries the node label.
    ensure!(
        after.iter().all(|s| s.label("node") == Some(node.to_string().as_str())),
        "a series lacks node=\"{node}\""
    );
    Ok(())
}

/// fio writing in the background until killed.
fn background_writer(cluster: &Cluster, uri: &str) -> Result<ChildGuard> {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=bg",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=8",
        "--size=32m",
        "--time_based",
        "--runtime=120",
        // Jobs as threads of the one process, so killing it stops the writes.
        "--thread",
    ])
    .current_dir(cluster.scratch())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    ChildGuard::spawn(&mut cmd, "fio background writer")
}

#[test]
fn lag_rpo_exposure_and_failover_metrics_follow_the_faults() -> Result<()> {
    const NAME: &str = "obs-rpo";
    let _serial = serial_lock(SERIAL, SERIAL_WAIT)?;
    let mut cluster = Cluster::start_nodes(NAME, 3, Some("64MiB"))?;
    let ids = cluster.node_ids();
    let info = cluster.wait_volume(SETTLE, "a leader and 3 healthy replicas", |v| {
        v.leader != 0 && v.all_caught_up(&ids)
    })?;
    let leader = info.leader;
    let stopped = *ids
        .iter()
        .find(|&&i| i != leader)
        .ok_or_else(|| anyhow!("no follower"))?;
    let uri = cluster.nbd_uri_of(leader)?;

    let mut writer = background_writer(&cluster, &uri)?;
    wait_until(Duration::from_secs(20), "writes to reach the leader", || {
        Ok(sum(&cluster.metrics_of(leader)?, "trireme_io_requests_total", "write") > 0.0)
    })?;
    cluster.signal_node_id(stopped, Sig::SIGSTOP)?;
    let stopped_at = Instant::now();
    let mut seen = None;
    let lagging = wait_until(
        Duration::from_secs(20),
        "lag and RPO exposure to rise on the leader",
        || {
            let m = cluster.metrics_of(leader)?;
            let lag = follower_gauge(&m, "trireme_replica_lag_entries", stopped);
            let lag_s = follower_gauge(&m, "trireme_replica_lag_seconds", stopped);
            let rpo = vol_gauge(&m, "trireme_rpo_exposure_seconds");
            let in_sync = vol_gauge(&m, "trireme_replicas_in_sync");
            seen = Some((lag, lag_s, rpo, in_sync));
            Ok(lag > 0.0 && lag_s > 0.0 && rpo > 0.0 && in_sync == 2.0)
        },
    );
    let status = cluster.cli_json_on(leader, &["volume", "status", VOL]);
    // Resume before any `?`, so the follower does not stay stopped.
    let resumed = cluster.signal_node_id(stopped, Sig::SIGCONT);
    let (lag, lag_s, rpo, in_sync) = seen.unwrap_or((f64::NAN, f64::NAN, f64::NAN, f64::NAN));
    eprintln!(
        "[{NAME}] {} ms after SIGSTOP of node {stopped}: lag {lag} entries, {lag_s:.3} s; rpo_exposure {rpo:.3} s; in sync {in_sync}",
        stopped_at.elapsed().as_millis()
    );
    lagging.with_context(|| cluster.diag())?;
    resumed?;
    let status = status?;
    let status_rpo = status["rpo_exposure_seconds"].as_f64().unwrap_or(0.0);
    ensure!(
        status_rpo > 0.0,
        "volume status shows no RPO exposure while a follower is stopped: {status}"
    );
    writer.kill();

    let resumed_at = Instant::now();
    wait_until(Duration::from_secs(60), "lag and RPO exposure back to 0", || {
        let m = cluster.metrics_of(leader)?;
        Ok(follower_gauge(&m, "trireme_replica_lag_entries", stopped) == 0.0
            && follower_gauge(&m, "trireme_replica_lag_seconds", stopped) == 0.0
            && vol_gauge(&m, "trireme_rpo_exposure_seconds") == 0.0
            && vol_gauge(&m, "trireme_replicas_in_sync") == 3.0)
    })
    .with_context(|| cluster.diag())?;
    eprintln!(
        "[{NAME}] back in sync {} ms after SIGCONT",
        resumed_at.elapsed().as_millis()
    );
    let status = cluster.cli_json_on(leader, &["volume", "status", VOL])?;
    ensure!(
        status["rpo_exposure_seconds"].as_f64() == Some(0.0),
        "volume status after catch-up: {status}"
    );
    let cs = cluster.cli_json_on(leader, &["cluster", "status"])?;
    ensure!(
        cs["under_replicated"].as_u64() == Some(0),
        "cluster status after catch-up: {cs}"
    );

    // Kill the leader: a survivor takes over, counts the change and
    // reports the pause.
    let survivors: Vec<u64> = ids.iter().copied().filter(|&i| i != leader).collect();
    let mut changes_before = Vec::new();
    for &id in &survivors {
        changes_before.push(metric_sum(
            &cluster.metrics_of(id)?,
            "trireme_raft_leader_changes_total",
            &[("volume", VOL)],
        ));
    }
    cluster.kill_node_id(leader)?;
    let killed_at = Instant::now();
    let mut report = String::new();
    wait_until(
        Duration::from_secs(20),
        "a survivor to lead and report its failover pause",
        || {
            for (i, &id) in survivors.iter().enumerate() {
                let m = cluster.metrics_of(id)?;
                let changes = metric_sum(&m, "trireme_raft_leader_changes_total", &[("volume", VOL)]);
                let pause = vol_gauge(&m, "trireme_failover_pause_seconds");
                if vol_gauge(&m, "trireme_raft_is_leader") == 1.0 && pause > 0.0 && changes > changes_before[i] {
                    report = format!(
                        "node {id} leads; failover pause {pause:.3} s; leader changes {} -> {changes}",
                        changes_before[i]
                    );
                    return Ok(true);
                }
            }
            Ok(false)
        },
    )
    .with_context(|| cluster.diag())?;
    eprintln!(
        "[{NAME}] {} ms after SIGKILL of leader {leader}: {report}",
        killed_at.elapsed().as_millis()
    );
    let down = cluster.cli_json_on(survivors[0], &["cluster", "status"])?;
    let node_state = down["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["node_id"].as_u64() == Some(leader)))
        .map(|n| n["state"].clone());
    ensure!(
        node_state == Some(serde_json::json!("down")),
        "cluster status does not show the killed node down: {down}"
    );
    Ok(())
}

#[test]
fn idle_volumes_hibernate_and_wake() -> Result<()> {
    const NAME: &str = "obs-hibernate";
    let _serial = serial_lock(SERIAL, SERIAL_WAIT)?;
    let mut cluster = Cluster::start_nodes(NAME, 3, Some("64MiB"))?;
    let ids = cluster.node_ids();
    let all_hibernating = |cluster: &Cluster, nodes: &[u64]| -> Result<bool> {
        for &id in nodes {
            if vol_gauge(&cluster.metrics_of(id)?, "trireme_raft_hibernating") != 1.0 {
                return Ok(false);
            }
        }
        Ok(true)
    };
    // Leaders hibernate after 3 s idle; followers a few ticks later.
    wait_until(
        Duration::from_secs(30),
        "every replica of the idle volume to hibernate",
        || all_hibernating(&cluster, &ids),
    )
    .with_context(|| cluster.diag())?;
    let leader = cluster.volume_info()?.leader;
    let other = *ids
        .iter()
        .find(|&&i| i != leader)
        .ok_or_else(|| anyhow!("no follower"))?;
    // I/O through a follower's node wakes the group: the write is
    // forwarded, committed by a quorum and read back.
    let uri = cluster.nbd_uri_of(other)?;
    qemu_io_ok(&uri, &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"])?;
    wait_until(Duration::from_secs(30), "the volume to hibernate again", || {
        all_hibernating(&cluster, &ids)
    })?;
    // The leader dies while everything sleeps: node liveness wakes the
    // followers, one takes over, and the data is there.
    cluster.kill_node_id(leader)?;
    let killed_at = Instant::now();
    let uri = cluster.nbd_uri_of(other)?;
    qemu_io_ok(
        &uri,
        &["read -P 0x5a 0 64k", "write -P 0x6b 64k 4k", "read -P 0x6b 64k 4k"],
    )?;
    eprintln!(
        "[{NAME}] hibernating leader {leader} killed: a write through node {other} succeeded after {} ms",
        killed_at.elapsed().as_millis()
    );
    Ok(())
}
