//! Fault injection in real `triremed` processes (`trireme dev up`, debug
//! binaries built with the `failpoints` feature, which every workspace
//! build turns on), driven only through `trireme fault`:
//!
//! - The FaultService refuses bad input with INVALID_ARGUMENT naming it (an
//!   unknown failpoint, an action the fail crate refuses, a rule towards the
//!   node itself or a stranger, a percent over 100, a delay over a minute),
//!   and `fault list --output json` shows exactly what was set.
//! - A follower whose Raft log fdatasync fails stops (exit status 70, its
//!   log naming the failed fdatasync) rather than acknowledge anything
//!   more; the other two keep acknowledging writes, and the node catches up
//!   once restarted (README, "A log write failure stops the node"). The
//!   same follower then stops the same way when its image's fdatasync
//!   fails during a destage, and catches up again.
//! - A two-way partition of the leader's node (drop rules on both sides):
//!   the majority elects a leader, takes the volume (`volume attach
//!   --node`) and acknowledges writes; after `fault net clear` the old
//!   leader catches up (README, "Failover", "Catch-up").
//!
//! Every wait is bounded and polls its condition. The tests take the same
//! serial lock as the other replication tests: three debug daemons each.

use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use trireme_tests::{Cluster, VolumeInfo, describe, pid_alive, qemu_io_ok, serial_lock, tail, wait_until};

const SERIAL: &str = "replication";
const SERIAL_WAIT: Duration = Duration::from_secs(600);
const VOLUME_SIZE: &str = "64MiB";
/// A fresh cluster has a leader when dev up is ready; all replicas are
/// healthy a heartbeat later.
const SETTLE: Duration = Duration::from_secs(30);
/// Elections take 1-2 s; generous for three debug daemons on two cores.
const ELECTION: Duration = Duration::from_secs(30);
/// A replica catching up from the leader's log.
const CATCH_UP: Duration = Duration::from_secs(60);
/// What triremed exits with on a disk error (`exit_on_disk_error`).
const DISK_ERROR_EXIT_STATUS: i32 = 70;

/// Starts three nodes with a 64 MiB vol0, waits until every replica is
/// healthy, and checks the daemons can inject faults at all.
fn cluster_up(name: &str) -> Result<(Cluster, VolumeInfo)> {
    let started = Instant::now();
    let cluster = Cluster::start_nodes(name, 3, Some(VOLUME_SIZE))?;
    let info = cluster.wait_volume(SETTLE, "a leader and every replica healthy", |v| {
        v.leader != 0 && v.replicas.len() == 3 && v.all_caught_up(&[1, 2, 3])
    })?;
    let out = fault(&cluster, 1, &["list"])?;
    ensure!(
        out.status.success(),
        "`trireme fault list` failed; was target/debug/triremed built by a workspace build (`cargo build \
         --workspace --bins`), which turns on its `failpoints` feature?\n{}",
        describe(&out)
    );
    eprintln!(
        "[{name}] 3 nodes up in {} ms: {}",
        started.elapsed().as_millis(),
        info.summary()
    );
    Ok((cluster, info))
}

/// `trireme --admin <node id> fault ARGS...`, whatever its exit status.
fn fault(cluster: &Cluster, id: u64, args: &[&str]) -> Result<Output> {
    let mut all = vec!["fault"];
    all.extend_from_slice(args);
    cluster.cli_on(id, &all)
}

/// `trireme fault ARGS...` on node `id`, which must succeed; returns stdout.
fn fault_ok(cluster: &Cluster, id: u64, args: &[&str]) -> Result<String> {
    let out = fault(cluster, id, args)?;
    ensure!(
        out.status.success(),
        "trireme fault {args:?} on node {id} failed\n{}",
        describe(&out)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `trireme fault ARGS...` on node `id`, which must fail with
/// INVALID_ARGUMENT and a message containing every one of `expected`.
fn fault_refused(cluster: &Cluster, id: u64, args: &[&str], expected: &[&str]) -> Result<()> {
    let out = fault(cluster, id, args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("(InvalidArgument)"),
        "trireme fault {args:?} was not refused as an invalid argument\n{}",
        describe(&out)
    );
    for e in expected {
        ensure!(
            stderr.contains(e),
            "trireme fault {args:?}: the error does not say {e:?}\n{}",
            describe(&out)
        );
    }
    Ok(())
}

/// `fault list --output json` of node `id`.
fn fault_list(cluster: &Cluster, id: u64) -> Result<serde_json::Value> {
    cluster.cli_json_on(id, &["fault", "list"])
}

fn no_faults() -> serde_json::Value {
    serde_json::json!({"net": [], "failpoints": []})
}

/// Polls `volume info` asked of node `id` (not of the first node that
/// answers: during a partition each side has its own view).
fn wait_volume_on<F>(cluster: &Cluster, id: u64, timeout: Duration, what: &str, mut cond: F) -> Result<VolumeInfo>
where
    F: FnMut(&VolumeInfo) -> bool,
{
    let mut last = String::from("no answer yet");
    let mut found = None;
    let waited = wait_until(timeout, what, || match cluster.volume_info_on(id) {
        Ok(v) if cond(&v) => {
            found = Some(v);
            Ok(true)
        }
        Ok(v) => {
            last = v.summary();
            Ok(false)
        }
        Err(e) => {
            last = format!("{e:#}");
            Ok(false)
        }
    });
    if let Err(e) = waited {
        bail!("{e:#}; last volume info from node {id}: {last}\n{}", cluster.diag());
    }
    found.context("wait_until returned without a volume info")
}

/// Writes 64 KiB blocks through `uri` until node `id`'s process (`pid`)
/// is gone; every write must be acknowledged. Returns how many it took.
fn write_until_stopped(cluster: &Cluster, uri: &str, id: u64, pid: i32, pattern: u8) -> Result<u64> {
    let mut round = 0u64;
    wait_until(
        Duration::from_secs(60),
        &format!("node {id} (pid {pid}) to stop on its failpoint"),
        || {
            if !pid_alive(pid) {
                return Ok(true);
            }
            let offset = (round % 16) << 20;
            round += 1;
            qemu_io_ok(uri, &[format!("write -P {pattern:#x} {offset} 64k")])
                .with_context(|| format!("a write through {uri} failed\n{}", cluster.diag()))?;
            Ok(false)
        },
    )?;
    Ok(round)
}

/// Fails unless `path` (a node's log) says every one of `needles`.
fn log_says(path: &std::path::Path, needles: &[&str]) -> Result<()> {
    let log = tail(path, 300);
    for needle in needles {
        ensure!(
            log.contains(needle),
            "{} does not say {needle:?}:\n{}",
            path.display(),
            tail(path, 30)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// (a), (d): validation and listing
// ---------------------------------------------------------------------------

#[test]
fn bad_fault_requests_are_refused_and_fault_list_shows_what_is_set() -> Result<()> {
    const NAME: &str = "fault-api";
    let _serial = serial_lock(SERIAL, SERIAL_WAIT)?;
    let (cluster, info) = cluster_up(NAME)?;

    fault_refused(
        &cluster,
        1,
        &["point", "set", "log::nope", "return"],
        &["unknown failpoint \"log::nope\"", "log::fsync", "crash::after_apply"],
    )?;
    fault_refused(
        &cluster,
        1,
        &["point", "set", "log::fsync", "retrun"],
        &["failpoint log::fsync", "refused", "unrecognized command"],
    )?;
    fault_refused(
        &cluster,
        1,
        &["net", "set", "--to", "1", "--drop"],
        &["peer 1 is this node"],
    )?;
    fault_refused(
        &cluster,
        2,
        &["net", "set", "--to", "3,9", "--drop"],
        &["peer 9 is not a peer of node 2"],
    )?;
    fault_refused(
        &cluster,
        1,
        &["net", "set", "--to", "2", "--loss-percent", "101"],
        &["loss_percent 101 is over 100"],
    )?;
    fault_refused(
        &cluster,
        1,
        &["net", "set", "--to", "2", "--dup-percent", "101"],
        &["dup_percent 101 is over 100"],
    )?;
    fault_refused(
        &cluster,
        1,
        &["net", "set", "--to", "2", "--delay-ms", "60001"],
        &["delay_ms 60001 is over the limit of 60000"],
    )?;
    ensure!(
        fault_list(&cluster, 1)? == no_faults() && fault_list(&cluster, 2)? == no_faults(),
        "a refused request changed something"
    );

    // Rules and points that do not stop the cluster: a short delay with
    // duplicates, some loss, and a crash point no snapshot will reach.
    fault_ok(
        &cluster,
        1,
        &["net", "set", "--to", "2,3", "--delay-ms", "20", "--dup-percent", "10"],
    )?;
    fault_ok(&cluster, 1, &["net", "set", "--to", "3", "--loss-percent", "5"])?;
    fault_ok(&cluster, 1, &["point", "set", "crash::snapshot_mid_copy", "1*return"])?;
    fault_ok(&cluster, 1, &["point", "set", "log::fsync", "off"])?;
    let listed = fault_list(&cluster, 1)?;
    let expected = serde_json::json!({
        "net": [
            {"peer": 2, "drop": false, "loss_percent": 0, "delay_ms": 20, "dup_percent": 10},
            {"peer": 3, "drop": false, "loss_percent": 5, "delay_ms": 0, "dup_percent": 0},
        ],
        "failpoints": [{"name": "crash::snapshot_mid_copy", "actions": "1*return"}],
    });
    ensure!(
        listed == expected,
        "fault list --output json: {listed}, expected {expected}"
    );
    let human = fault_ok(&cluster, 1, &["list"])?;
    ensure!(
        human.lines().count() == 3 && human.contains("net to node 2: drop no, loss 0%, delay 20 ms, dup 10%"),
        "fault list (human):\n{human}"
    );
    ensure!(fault_list(&cluster, 2)? == no_faults(), "rules are per node");

    // The cluster still serves I/O through node 1 with its rules in force.
    let uri = cluster.nbd_uri_of(1)?;
    qemu_io_ok(&uri, &["write -P 0x3c 0 256k", "read -P 0x3c 0 256k"])
        .with_context(|| format!("I/O through node 1 under its rules\n{}", cluster.diag()))?;

    let cleared = cluster.cli_json_on(1, &["fault", "net", "clear"])?;
    ensure!(
        cleared
            == serde_json::json!({"net": [], "failpoints": [{"name": "crash::snapshot_mid_copy", "actions": "1*return"}]}),
        "fault net clear --output json: {cleared}"
    );
    fault_ok(&cluster, 1, &["point", "clear"])?;
    ensure!(fault_list(&cluster, 1)? == no_faults(), "clear left something");
    eprintln!(
        "[{NAME}] refusals, listing and clearing checked; leader was node {}",
        info.leader
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// (b): a follower's log fdatasync fails
// ---------------------------------------------------------------------------

#[test]
fn a_follower_whose_log_fsync_fails_stops_and_catches_up_after_restart() -> Result<()> {
    const NAME: &str = "fault-log-fsync";
    let _serial = serial_lock(SERIAL, SERIAL_WAIT)?;
    let (mut cluster, info) = cluster_up(NAME)?;
    let leader = info.leader;
    let follower = (1..=3u64).rev().find(|&id| id != leader).context("no follower")?;
    let follower_pid = cluster.pid_of(follower)?;
    let leader_uri = cluster.nbd_uri_of(leader)?;

    fault_ok(&cluster, follower, &["point", "set", "log::fsync", "return"])?;
    ensure!(
        fault_list(&cluster, follower)?
            == serde_json::json!({"net": [], "failpoints": [{"name": "log::fsync", "actions": "return"}]}),
        "fault list does not show log::fsync"
    );

    // Writes through the leader: the follower's first synced append fails.
    let started = Instant::now();
    let round = write_until_stopped(&cluster, &leader_uri, follower, follower_pid, 0x5a)?;
    eprintln!(
        "[{NAME}] node {follower} stopped {} ms after its log::fsync failpoint was armed ({round} writes)",
        started.elapsed().as_millis()
    );
    let devup_stderr = cluster.scratch().join("devup.stderr");
    let exit_line = format!("node {follower} (pid {follower_pid}) exited with status {DISK_ERROR_EXIT_STATUS}");
    wait_until(Duration::from_secs(10), "dev up to report the exit status", || {
        Ok(std::fs::read_to_string(&devup_stderr).is_ok_and(|s| s.contains(&exit_line)))
    })
    .with_context(|| format!("dev up stderr:\n{}", tail(&devup_stderr, 20)))?;
    log_says(
        &cluster.node_by_id(follower)?.log,
        &[
            "failpoint log::fsync: injecting",
            "fdatasync failed",
            "raft log write failed, stopping the node",
        ],
    )?;

    // The other two still acknowledge writes.
    qemu_io_ok(&leader_uri, &["write -P 0x6b 16M 1M", "read -P 0x6b 16M 1M"])
        .with_context(|| format!("writes after node {follower} stopped\n{}", cluster.diag()))?;

    // A restarted process has no failpoints, and catches up. It
    // checkpoints every second (not every 30 s) for the image::fsync part.
    cluster.append_node_config(follower, "[log]\ncheckpoint_interval_ms = 1000")?;
    cluster.restart_node_id(follower)?;
    ensure!(
        fault_list(&cluster, follower)? == no_faults(),
        "the restarted node kept a failpoint"
    );
    let caught_up = wait_volume_on(&cluster, leader, CATCH_UP, "the restarted follower to catch up", |v| {
        v.all_caught_up(&[1, 2, 3])
    })?;
    qemu_io_ok(&cluster.nbd_uri_of(follower)?, &["read -P 0x6b 16M 1M"])
        .with_context(|| format!("reading through the restarted node\n{}", cluster.diag()))?;
    eprintln!(
        "[{NAME}] node {follower} restarted and caught up: {}",
        caught_up.summary()
    );

    // A failed fdatasync of the image in a checkpoint stops the node the same
    // way (rather than retry over an image that may have lost writes), and
    // the log it kept brings it back.
    let pid = cluster.pid_of(follower)?;
    fault_ok(&cluster, follower, &["point", "set", "image::fsync", "return"])?;
    let round = write_until_stopped(&cluster, &leader_uri, follower, pid, 0x7c)?;
    let status = cluster
        .restarted_node_id(follower)
        .context("the restarted node's guard")?
        .wait_exit(Duration::from_secs(10))?;
    ensure!(
        status.code() == Some(DISK_ERROR_EXIT_STATUS),
        "node {follower} exited with {status} on a failed image fdatasync"
    );
    log_says(
        &cluster.scratch().join(format!("restart-1-node-{follower}.stderr")),
        &[
            "failpoint image::fsync: injecting",
            "destage of volume vol0",
            "fdatasync failed",
            "stopping the node",
        ],
    )?;
    cluster.restart_node_id(follower)?;
    wait_volume_on(&cluster, leader, CATCH_UP, "the follower to catch up again", |v| {
        v.all_caught_up(&[1, 2, 3])
    })?;
    qemu_io_ok(&cluster.nbd_uri_of(follower)?, &["read -P 0x6b 16M 1M"])
        .with_context(|| format!("reading through the twice restarted node\n{}", cluster.diag()))?;
    eprintln!("[{NAME}] node {follower} stopped on image::fsync after {round} writes, restarted and caught up");
    Ok(())
}

// ---------------------------------------------------------------------------
// (c): the leader's node partitioned away, both ways
// ---------------------------------------------------------------------------

#[test]
fn a_partitioned_leader_loses_the_volume_to_the_majority_and_catches_up_after_heal() -> Result<()> {
    const NAME: &str = "fault-partition";
    let _serial = serial_lock(SERIAL, SERIAL_WAIT)?;
    let (cluster, info) = cluster_up(NAME)?;
    let old = info.leader;
    let others: Vec<u64> = (1..=3).filter(|&id| id != old).collect();
    let (a, b) = (others[0], others[1]);
    qemu_io_ok(&cluster.nbd_uri_of(old)?, &["write -P 0x11 0 1M"])?;

    // Two-way: the old leader drops what it sends to both others, and
    // they drop what they send to it.
    let started = Instant::now();
    fault_ok(&cluster, old, &["net", "set", "--to", &format!("{a},{b}"), "--drop"])?;
    fault_ok(&cluster, a, &["net", "set", "--to", &old.to_string(), "--drop"])?;
    fault_ok(&cluster, b, &["net", "set", "--to", &old.to_string(), "--drop"])?;

    let elected = wait_volume_on(&cluster, a, ELECTION, "a leader on the majority side", |v| {
        v.leader == a || v.leader == b
    })?;
    eprintln!(
        "[{NAME}] node {old} partitioned; node {} leads after {} ms: {}",
        elected.leader,
        started.elapsed().as_millis(),
        elected.summary()
    );

    // The volume moves to node a (a new writer epoch), and writes there are
    // acknowledged by the majority alone.
    let mut last = String::new();
    wait_until(ELECTION, &format!("volume attach --node {a} to succeed"), || {
        let out = cluster.cli_on(a, &["volume", "attach", cluster.volume(), "--node", &a.to_string()])?;
        last = describe(&out);
        Ok(out.status.success())
    })
    .with_context(|| format!("last attempt:\n{last}\n{}", cluster.diag()))?;
    let a_uri = cluster.nbd_uri_of(a)?;
    qemu_io_ok(
        &a_uri,
        &["write -P 0x22 4M 1M", "read -P 0x22 4M 1M", "read -P 0x11 0 1M"],
    )
    .with_context(|| format!("writes through node {a} during the partition\n{}", cluster.diag()))?;
    let during = wait_volume_on(&cluster, a, ELECTION, "node a to lead the attached volume", |v| {
        v.leader == a && v.attached_node == a
    })?;
    ensure!(
        !during.caught_up(old),
        "node {old} is reported caught up while cut off: {}",
        during.summary()
    );

    // Heal: the old leader catches up from the new leader's log.
    for id in [old, a, b] {
        fault_ok(&cluster, id, &["net", "clear"])?;
        ensure!(fault_list(&cluster, id)? == no_faults(), "node {id} kept a rule");
    }
    let healed = Instant::now();
    let caught_up = wait_volume_on(&cluster, a, CATCH_UP, "the old leader to catch up", |v| {
        v.all_caught_up(&[1, 2, 3])
    })?;
    qemu_io_ok(&cluster.nbd_uri_of(old)?, &["read -P 0x22 4M 1M"])
        .with_context(|| format!("reading through the old leader after the heal\n{}", cluster.diag()))?;
    eprintln!(
        "[{NAME}] healed; node {old} caught up in {} ms: {}",
        healed.elapsed().as_millis(),
        caught_up.summary()
    );
    Ok(())
}
