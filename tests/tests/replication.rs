//! Acceptance: replication. Three real `triremed` nodes (`trireme dev up
//! --nodes 3`) serve `vol0` with three replicas, and real NBD clients check
//! the promises of the README:
//!
//! - "Failover": SIGKILL the leader under a libnbd writer attached through a
//!   surviving node; the writer sees a pause (< 3 s), never an error, and every
//!   acknowledged write reads back from every replica, including the killed
//!   node once it has caught up.
//! - "Acknowledged means durable on a quorum": a stopped (SIGSTOP) follower
//!   does not block writes, and once resumed catches up from the log to the
//!   same bytes as the others.
//! - "Fencing": after `volume attach`, a session of the old epoch gets EPERM
//!   on its next write and is closed; sessions on other nodes can read but not
//!   write.
//! - Snapshot catch-up: a follower that lost its log and image is rebuilt
//!   while the leader's log has been compacted, and then serves the same
//!   bytes as part of a majority.
//!
//! The tests are serialized (`serial_lock`): each runs three debug daemons,
//! and two clusters at once on a 2-core CI machine would distort the timings
//! they measure (the failover pause). Measured figures go to stderr.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use trireme_tests::{
    ChildGuard, Cluster, PYTHON, Sig, VolumeInfo, count_lines, describe, metric_sum, nbd, nbd_sha256, pattern,
    qemu_io_ok, qemu_io_ok_opts, run_fio_checked, run_with_timeout, scripts_dir, seed, serial_lock, tail, verify_acked,
    volume_dir, wait_for_acks, wait_until,
};

/// Every test here takes this lock first (see the module comment).
const SERIAL: &str = "replication";
const SERIAL_WAIT: Duration = Duration::from_secs(600);
const VOLUME_SIZE: &str = "64MiB";
const VOLUME_BYTES: u64 = 64 << 20;
const BLOCK: u64 = 4096;
/// A fresh cluster has a leader when dev up is ready; all three replicas are
/// healthy a heartbeat later.
const SETTLE: Duration = Duration::from_secs(20);
/// The README: survivors elect a new leader within about 1-2 s.
const MAX_FAILOVER_PAUSE: Duration = Duration::from_secs(3);
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(60);
const REBUILD_DEADLINE: Duration = Duration::from_secs(120);
const SHA_TIMEOUT: Duration = Duration::from_secs(120);
const FIO_TIMEOUT: Duration = Duration::from_secs(180);

/// Starts a 3-node cluster with a 64 MiB vol0 and waits until every replica
/// is healthy with no lag; returns the cluster and that volume info.
fn three_nodes(name: &str) -> Result<(Cluster, VolumeInfo)> {
    let cluster = Cluster::start_nodes(name, 3, Some(VOLUME_SIZE))?;
    let ids = cluster.node_ids();
    let info = cluster.wait_volume(SETTLE, "a leader and 3 healthy replicas", |v| {
        v.leader != 0 && v.replicas.len() == 3 && v.all_caught_up(&ids)
    })?;
    ensure!(
        info.size_bytes == VOLUME_BYTES,
        "vol0 has {} bytes, expected {VOLUME_BYTES}",
        info.size_bytes
    );
    eprintln!("[{name}] cluster up: {}", info.summary());
    Ok((cluster, info))
}

/// The ids of the nodes other than `leader`, in id order.
fn followers(cluster: &Cluster, leader: u64) -> Vec<u64> {
    cluster.node_ids().into_iter().filter(|&i| i != leader).collect()
}

/// Parses an `ack_writer.py --timestamps` record: (block index, seconds).
fn read_timed_record(path: &Path) -> Result<Vec<(u64, f64)>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut it = l.split_whitespace();
            let index = it.next().ok_or_else(|| anyhow!("empty record line"))?.parse()?;
            let t = it
                .next()
                .ok_or_else(|| anyhow!("record line {l:?} has no timestamp"))?
                .parse()?;
            Ok((index, t))
        })
        .collect()
}

/// The longest gap between consecutive acknowledgements from record line
/// `from` on: (gap in seconds, line index where it ends).
fn longest_gap(acks: &[(u64, f64)], from: usize) -> (f64, usize) {
    let mut best = (0.0, from);
    for i in from.max(1)..acks.len() {
        let gap = acks[i].1 - acks[i - 1].1;
        if gap > best.0 {
            best = (gap, i);
        }
    }
    best
}

/// The states a replica went through while a test waited on it, with the
/// time each was first seen (for the printed figures).
struct StateLog {
    node: u64,
    since: Instant,
    seen: Vec<(u128, String)>,
}

impl StateLog {
    fn new(node: u64, since: Instant) -> Self {
        Self {
            node,
            since,
            seen: Vec::new(),
        }
    }

    fn observe(&mut self, v: &VolumeInfo) {
        let state = v.replica(self.node).map_or("missing", |r| r.state.as_str());
        if self.seen.last().is_none_or(|(_, s)| s != state) {
            self.seen.push((self.since.elapsed().as_millis(), state.to_string()));
        }
    }

    fn timeline(&self) -> String {
        self.seen
            .iter()
            .map(|(ms, s)| format!("{s}@{ms}ms"))
            .collect::<Vec<_>>()
            .join(" -> ")
    }
}

/// A replica catching up should not cost the volume its leader (every
/// election pauses I/O); not part of the promises the tests assert, so it
/// is only reported.
fn warn_if_leader_changed(name: &str, before: &VolumeInfo, after: &VolumeInfo) {
    if after.term != before.term || after.leader != before.leader {
        eprintln!(
            "[{name}] NOTE: leadership changed while a replica caught up: leader {} term {} -> leader {} term {}",
            before.leader, before.term, after.leader, after.term
        );
    }
}

// ---------------------------------------------------------------------------
// 1. Leader SIGKILL under load
// ---------------------------------------------------------------------------

#[test]
fn leader_sigkill_failover_under_fio() -> Result<()> {
    const NAME: &str = "repl-failover";
    const MIN_ACKED_BEFORE_KILL: usize = 1000;
    /// How long the writer keeps going once writes resumed after the kill.
    const WRITE_AFTER_RESUME: Duration = Duration::from_secs(3);
    let _serial = serial_lock(SERIAL, SERIAL_WAIT)?;
    let (mut cluster, info) = three_nodes(NAME)?;
    let leader = info.leader;
    let via = followers(&cluster, leader)[0];
    let uri = cluster.nbd_uri_of(via)?;
    let dir = cluster.scratch().to_path_buf();
    let record = dir.join("acked.txt");
    let stop = dir.join("stop-writing");
    let writer_err = dir.join("ack_writer.stderr");
    let seed = seed()?;

    // The writer goes through a follower, so its connection survives the
    // leader's death; it may write the whole volume (16384 blocks).
    let mut cmd = Command::new(PYTHON);
    cmd.arg(scripts_dir().join("ack_writer.py"))
        .arg("--timestamps")
        .arg("--stop-file")
        .arg(&stop)
        .arg(&uri)
        .arg(&record)
        .arg(seed.to_string())
        .arg("16")
        .arg((VOLUME_BYTES / BLOCK).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&writer_err)?);
    let mut writer = ChildGuard::spawn(&mut cmd, "ack_writer.py")?;
    eprintln!("[{NAME}] leader is node {leader}; writing through node {via} ({uri})");

    wait_for_acks(
        &mut writer,
        &record,
        MIN_ACKED_BEFORE_KILL,
        Duration::from_secs(120),
        &writer_err,
        &cluster,
    )?;

    // SIGKILL the leader mid-stream.
    let acked_before_kill = count_lines(&record);
    let killed_pid = cluster.pid_of(leader)?;
    let kill_at = Instant::now();
    cluster.kill_node_id(leader)?;
    let acked_at_kill = count_lines(&record);
    eprintln!(
        "[{NAME}] SIGKILLed leader node {leader} (pid {killed_pid}) after {acked_before_kill} acknowledged writes"
    );

    // Writes must resume: more acknowledgements than the writer had in flight.
    let mut finished = None;
    wait_until(Duration::from_secs(20), "writes to resume after the kill", || {
        if let Some(st) = writer.try_wait()? {
            finished = Some(st);
            return Ok(true);
        }
        Ok(count_lines(&record) > acked_at_kill + 32)
    })
    .with_context(|| format!("writer: {}\n{}", tail(&writer_err, 20), cluster.diag()))?;
    let resumed_ms = kill_at.elapsed().as_millis();

    // Keep writing a while on the new leader, then stop the writer.
    let until = Instant::now() + WRITE_AFTER_RESUME;
    while finished.is_none() && Instant::now() < until {
        finished = writer.try_wait()?;
        thread::sleep(Duration::from_millis(50));
    }
    File::create(&stop)?;
    let st = writer
        .wait_exit(Duration::from_secs(30))
        .with_context(|| format!("writer did not stop: {}", tail(&writer_err, 20)))?;
    let writer_tail = tail(&writer_err, 5);
    eprintln!("[{NAME}] writer exited with {st}: {writer_tail}");
    // The writer's forwarded writes are retried across the leader change,
    // as long as no overlapping write is in flight with them (its blocks
    // are all different): none may fail.
    ensure!(
        st.success(),
        "the writer attached through surviving node {via} saw an error ({st}): {writer_tail}\n{}",
        cluster.diag()
    );

    // The pause: the longest gap between consecutive acknowledgements from
    // the last one before the kill on.
    let acks = read_timed_record(&record)?;
    let total = acks.len();
    ensure!(
        total > acked_at_kill + 32,
        "only {} writes acknowledged after the kill",
        total.saturating_sub(acked_at_kill)
    );
    let (pause_s, at) = longest_gap(&acks, acked_before_kill.saturating_sub(1));
    let (overall_s, _) = longest_gap(&acks, 1);
    let first = acks.first().map_or(0.0, |a| a.1);
    let last = acks.last().map_or(0.0, |a| a.1);
    let rate = total as f64 / (last - first).max(1e-3);
    eprintln!(
        "failover pause: {:.0} ms (ack {at} of {total}; writes seen resuming {resumed_ms} ms after the kill; \
         longest gap over the whole run {:.0} ms; {total} writes acknowledged at {rate:.0}/s on average)",
        pause_s * 1000.0,
        overall_s * 1000.0
    );
    ensure!(
        pause_s < MAX_FAILOVER_PAUSE.as_secs_f64(),
        "failover pause {:.0} ms is not under {MAX_FAILOVER_PAUSE:?}\n{}",
        pause_s * 1000.0,
        cluster.diag()
    );

    // A new leader, not the dead one.
    let after = cluster.wait_volume(Duration::from_secs(10), "a new leader", |v| {
        v.leader != 0 && v.leader != leader
    })?;
    eprintln!("[{NAME}] new leader: node {} ({})", after.leader, after.summary());

    // Every acknowledged block, from every surviving replica.
    for id in followers(&cluster, leader) {
        verify_acked(&cluster, &cluster.nbd_uri_of(id)?, &record, seed, total)?;
    }

    // The killed node comes back from its argv and catches up.
    let restart_at = Instant::now();
    cluster.restart_node_id(leader)?;
    let ids = cluster.node_ids();
    let mut states = StateLog::new(leader, restart_at);
    let caught = cluster.wait_volume(
        CATCH_UP_DEADLINE,
        "the restarted node to catch up (3 healthy replicas, lag 0)",
        |v| {
            states.observe(v);
            v.replicas.len() == 3 && v.all_caught_up(&ids)
        },
    )?;
    eprintln!(
        "restarted node {leader} caught up in {} ms (replica states seen: {}): {}",
        restart_at.elapsed().as_millis(),
        states.timeline(),
        caught.summary()
    );
    warn_if_leader_changed(NAME, &after, &caught);
    verify_acked(&cluster, &cluster.nbd_uri_of(leader)?, &record, seed, total)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. A stopped follower catches up from the log
// ---------------------------------------------------------------------------

/// fio randwrite with crc32c verification through `uri`; returns the number
/// of writes. Fails unless fio exits 0 and every job reports error 0.
fn fio_randwrite_verify(cluster: &Cluster, uri: &str) -> Result<u64> {
    let json_path = cluster.scratch().join("fio.json");
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=replication",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=32m",
        "--verify=crc32c",
        "--do_verify=1",
        "--output-format=json",
    ])
    .arg(format!("--output={}", json_path.display()))
    // fio drops verify state files into its working directory
    .current_dir(cluster.scratch());
    let (writes, reads) = run_fio_checked(&mut cmd, FIO_TIMEOUT, &json_path, cluster)?;
    ensure!(writes == (32 << 20) / BLOCK, "fio wrote {writes} ios, expected 8192");
    ensure!(reads > 0, "fio's verify phase read nothing");
    Ok(writes)
}

#[test]
fn follower_sigstop_catches_up() -> Result<()> {
    const NAME: &str = "repl-sigstop";
    let _serial = serial_lock(SERIAL, SERIAL_WAIT)?;
    let (cluster, info) = three_nodes(NAME)?;
    let leader = info.leader;
    let stopped = followers(&cluster, leader)[0];
    let leader_uri = cluster.nbd_uri_of(leader)?;

    cluster.signal_node_id(stopped, Sig::SIGSTOP)?;
    eprintln!("[{NAME}] SIGSTOPped follower node {stopped}; fio through leader node {leader}");
    let fio_at = Instant::now();
    let fio = fio_randwrite_verify(&cluster, &leader_uri);
    let fio_ms = fio_at.elapsed().as_millis();
    // Resume the follower before any `?` so it does not stay stopped.
    let lagging = cluster.volume_info();
    cluster.signal_node_id(stopped, Sig::SIGCONT)?;
    let resumed_at = Instant::now();
    let writes = fio?;
    eprintln!("[{NAME}] fio: {writes} verified random writes with node {stopped} stopped in {fio_ms} ms");
    let lagging = lagging?;
    let lag = lagging
        .replica(stopped)
        .ok_or_else(|| anyhow!("node {stopped} missing from {}", lagging.summary()))?
        .clone();
    eprintln!("[{NAME}] while stopped: {}", lagging.summary());
    ensure!(
        lag.lag_entries > 0,
        "the stopped follower shows no lag, so it was not left behind: {}",
        lagging.summary()
    );

    let mut states = StateLog::new(stopped, resumed_at);
    let caught = cluster.wait_volume(
        CATCH_UP_DEADLINE,
        "the resumed follower to be healthy with lag 0",
        |v| {
            states.observe(v);
            v.caught_up(stopped)
        },
    )?;
    eprintln!(
        "follower catch-up: {} ms for {} entries ({} bytes); replica states seen: {} ({})",
        resumed_at.elapsed().as_millis(),
        lag.lag_entries,
        lag.lag_bytes,
        states.timeline(),
        caught.summary()
    );
    warn_if_leader_changed(NAME, &lagging, &caught);

    // The same bytes on every replica: each node serves reads from its own
    // replica.
    let mut sums = Vec::new();
    for id in cluster.node_ids() {
        let uri = cluster.nbd_uri_of(id)?;
        let sum = nbd_sha256(&uri, SHA_TIMEOUT).with_context(|| cluster.diag())?;
        eprintln!("[{NAME}] sha256 through node {id}: {sum}");
        sums.push((id, sum));
    }
    let distinct: BTreeSet<&str> = sums.iter().map(|(_, s)| s.as_str()).collect();
    ensure!(
        distinct.len() == 1,
        "replicas differ after catch-up: {sums:?}\n{}",
        cluster.diag()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. Fencing by attach epochs
// ---------------------------------------------------------------------------

/// Sends one WRITE on a raw session and returns the error field of its reply.
fn write_errno(conn: &mut nbd::Conn, handle: u64, offset: u64, data: &[u8]) -> Result<u32> {
    let mut b = nbd::encode_request(0, nbd::CMD_WRITE, handle, offset, data.len() as u32);
    b.extend_from_slice(data);
    conn.send(&b)?;
    conn.simple_reply(handle)
}

/// The session was fenced: its next write gets EPERM, and the server then
/// closes the connection (a following READ gets no reply, only EOF or a
/// reset).
fn assert_fenced(conn: &mut nbd::Conn, what: &str, offset: u64) -> Result<()> {
    let data = pattern(0xfe, offset, BLOCK as usize);
    let errno = write_errno(conn, 100, offset, &data).with_context(|| format!("{what}: write after the new epoch"))?;
    ensure!(
        errno == nbd::EPERM,
        "{what}: a write of the old epoch got error {errno}, expected EPERM ({})",
        nbd::EPERM
    );
    // The READ may not even go out if the close already arrived.
    let _ = conn.request(0, nbd::CMD_READ, 101, 0, BLOCK as u32);
    conn.expect_closed(Duration::from_secs(5))
        .with_context(|| format!("{what}: the server did not close the fenced session"))
}

/// A write on a raw session must be refused with EPERM (session may stay).
fn assert_write_refused(conn: &mut nbd::Conn, what: &str, offset: u64) -> Result<()> {
    let data = pattern(0xfd, offset, BLOCK as usize);
    let errno = write_errno(conn, 200, offset, &data).with_context(|| format!("{what}: write"))?;
    ensure!(
        errno == nbd::EPERM,
        "{what}: write got error {errno}, expected EPERM ({})",
        nbd::EPERM
    );
    Ok(())
}

fn attach(cluster: &Cluster, node: u64, epoch: u64) -> Result<VolumeInfo> {
    let out = cluster.cli(&["volume", "attach", cluster.volume(), "--node", &node.to_string()])?;
    ensure!(
        out.status.success(),
        "volume attach --node {node} failed\n{}\n{}",
        describe(&out),
        cluster.diag()
    );
    let info = cluster.volume_info()?;
    ensure!(
        info.epoch == epoch && info.attached_node == node,
        "after attach --node {node}: epoch {} attached {}, expected epoch {epoch} attached {node}",
        info.epoch,
        info.attached_node
    );
    let moved_at = Instant::now();
    let info = cluster.wait_volume(
        Duration::from_secs(10),
        &format!("leadership to move to node {node}"),
        |v| v.leader == node,
    )?;
    eprintln!(
        "attached to node {node}: epoch {epoch}, leader {node} {} ms after attach returned",
        moved_at.elapsed().as_millis()
    );
    Ok(info)
}

/// Back-to-back reads on the leader are served under its read lease, not a
/// ReadIndex round each; moving the leadership (attach elsewhere) ends that
/// lease: the deposed leader's node then reads what the new leader
/// acknowledged, and the new leader reads on a lease of its own.
#[test]
fn leader_reads_ride_the_lease_until_leadership_moves() -> Result<()> {
    const NAME: &str = "repl-lease";
    const READS: u64 = 20;
    let _serial = serial_lock(SERIAL, SERIAL_WAIT)?;
    let (cluster, info) = three_nodes(NAME)?;
    let vol = cluster.volume().to_string();
    let old = info.leader;
    let new = followers(&cluster, old)[0];
    let lease_reads = |id: u64| -> Result<f64> {
        Ok(metric_sum(
            &cluster.metrics_of(id)?,
            "trireme_reads_on_lease_total",
            &[("volume", vol.as_str())],
        ))
    };
    let b = BLOCK as usize;
    let reads_on_lease = |conn: &mut nbd::Conn, id: u64, want: &[u8], what: &str| -> Result<f64> {
        let before = lease_reads(id)?;
        for h in 0..READS {
            ensure!(
                conn.pread(10 + h, 0, BLOCK as u32)? == want,
                "{what}: read {h} on node {id} did not return the last write"
            );
        }
        let on_lease = lease_reads(id)? - before;
        ensure!(
            on_lease >= (READS / 2) as f64,
            "{what}: only {on_lease} of {READS} back-to-back reads on leader {id} used its read lease"
        );
        Ok(on_lease)
    };

    let (mut s_old, _) = nbd::open(&cluster.node_by_id(old)?.nbd, &vol)?;
    let a = pattern(1, 0, b);
    s_old.pwrite(1, 0, &a, 0).context("write on the first leader")?;
    let n = reads_on_lease(&mut s_old, old, &a, "first leader")?;
    eprintln!("[{NAME}] {n} of {READS} reads on leader {old} served on its lease");

    attach(&cluster, new, 1)?;
    let (mut s_new, _) = nbd::open(&cluster.node_by_id(new)?.nbd, &vol)?;
    let c = pattern(2, 1, b);
    s_new.pwrite(1, 0, &c, 0).context("write on the new leader")?;
    let (mut s_old2, _) = nbd::open(&cluster.node_by_id(old)?.nbd, &vol)?;
    ensure!(
        s_old2.pread(1, 0, BLOCK as u32)? == c,
        "stale read: node {old}, leader until the move, did not return the new leader's write"
    );
    let n = reads_on_lease(&mut s_new, new, &c, "new leader")?;
    eprintln!("[{NAME}] after the move: {n} of {READS} reads on leader {new} served on its lease");
    Ok(())
}

/// Leadership follows the consumer after a failover too, not only at
/// attach: the attached node is SIGSTOPped until another replica is elected,
/// then resumed; once its replica has caught up, leadership comes back to it
/// without a new attach, and its session's writes and reads still work.
#[test]
fn leadership_returns_to_the_attached_node() -> Result<()> {
    const NAME: &str = "repl-return";
    let _serial = serial_lock(SERIAL, SERIAL_WAIT)?;
    let (cluster, info) = three_nodes(NAME)?;
    let vol = cluster.volume().to_string();
    let home = followers(&cluster, info.leader)[0];
    attach(&cluster, home, 1)?;
    let b = BLOCK as usize;
    let a = pattern(3, 0, b);
    {
        let (mut s, _) = nbd::open(&cluster.node_by_id(home)?.nbd, &vol)?;
        s.pwrite(1, 0, &a, 0).context("write on the attached node")?;
    }

    cluster.signal_node_id(home, Sig::SIGSTOP)?;
    let away = cluster.wait_volume(Duration::from_secs(20), "a leader other than the stopped node", |v| {
        v.leader != 0 && v.leader != home
    });
    cluster.signal_node_id(home, Sig::SIGCONT)?;
    let away = away?;
    eprintln!(
        "[{NAME}] node {home} stopped: node {} took over (term {}); resumed",
        away.leader, away.term
    );
    ensure!(
        away.attached_node == home,
        "the stop moved the attachment to node {}",
        away.attached_node
    );

    let back_at = Instant::now();
    let back = cluster.wait_volume(
        Duration::from_secs(30),
        &format!("leadership to come back to attached node {home}"),
        |v| v.leader == home,
    )?;
    eprintln!(
        "[{NAME}] leadership back on node {home} {} ms after it resumed (term {})",
        back_at.elapsed().as_millis(),
        back.term
    );
    let (mut s, _) = nbd::open(&cluster.node_by_id(home)?.nbd, &vol)?;
    ensure!(
        s.pread(1, 0, BLOCK as u32)? == a,
        "node {home} lost the write it acknowledged before the stop"
    );
    let c = pattern(3, 1, b);
    s.pwrite(2, 0, &c, 0)
        .context("write on the attached node after leadership came back")?;
    ensure!(
        s.pread(3, 0, BLOCK as u32)? == c,
        "node {home} did not read back its own write"
    );
    Ok(())
}

#[test]
fn fencing_old_session_gets_eperm() -> Result<()> {
    const NAME: &str = "repl-fencing";
    let _serial = serial_lock(SERIAL, SERIAL_WAIT)?;
    let (cluster, info) = three_nodes(NAME)?;
    ensure!(
        info.epoch == 0 && info.attached_node == 0,
        "a fresh volume should be unattached at epoch 0: {}",
        info.summary()
    );
    let vol = cluster.volume().to_string();
    let addr1 = cluster.node_by_id(1)?.nbd.clone();
    let addr2 = cluster.node_by_id(2)?.nbd.clone();
    let b = BLOCK as usize;

    // Epoch 0, not attached: a session on node 1 writes.
    let (mut old1, _) = nbd::open(&addr1, &vol)?;
    let a = pattern(1, 0, b);
    old1.pwrite(1, 0, &a, 0).context("epoch 0 write on node 1")?;
    ensure!(old1.pread(2, 0, BLOCK as u32)? == a, "epoch 0 write did not read back");

    // Attach to node 2: epoch 1.
    attach(&cluster, 2, 1)?;
    assert_fenced(&mut old1, "epoch-0 session on node 1", 8 * BLOCK)?;

    // A new session on node 2 writes and reads back.
    let (mut s2, _) = nbd::open(&addr2, &vol)?;
    let c = pattern(2, 1, b);
    s2.pwrite(1, BLOCK, &c, 0).context("epoch 1 write on node 2")?;
    ensure!(s2.pread(2, BLOCK, BLOCK as u32)? == c, "node 2 write did not read back");
    ensure!(
        s2.pread(3, 0, BLOCK as u32)? == a,
        "node 2 does not see the epoch 0 write"
    );

    // A new session on node 1 reads but cannot write.
    let (mut s1, _) = nbd::open(&addr1, &vol)?;
    ensure!(
        s1.pread(1, BLOCK, BLOCK as u32)? == c,
        "node 1 does not read node 2's write"
    );
    assert_write_refused(&mut s1, "new session on node 1 while attached to node 2", 9 * BLOCK)?;
    drop(s1);

    // Refused writes left nothing behind.
    for off in [8 * BLOCK, 9 * BLOCK] {
        ensure!(
            s2.pread(4, off, BLOCK as u32)? == vec![0u8; b],
            "a refused write at {off} is visible"
        );
    }

    // Attach back to node 1: epoch 2; node 2's session is fenced likewise.
    attach(&cluster, 1, 2)?;
    assert_fenced(&mut s2, "epoch-1 session on node 2", 10 * BLOCK)?;
    let (mut n1, _) = nbd::open(&addr1, &vol)?;
    let d = pattern(3, 2, b);
    n1.pwrite(1, 2 * BLOCK, &d, 0).context("epoch 2 write on node 1")?;
    let (mut n2, _) = nbd::open(&addr2, &vol)?;
    assert_write_refused(&mut n2, "new session on node 2 while attached to node 1", 11 * BLOCK)?;
    drop(n2);
    let mut expect = Vec::new();
    expect.extend_from_slice(&a);
    expect.extend_from_slice(&c);
    expect.extend_from_slice(&d);
    ensure!(
        n1.pread(2, 0, 3 * BLOCK as u32)? == expect,
        "node 1 does not read back blocks 0-2"
    );
    for off in [10 * BLOCK, 11 * BLOCK] {
        ensure!(
            n1.pread(3, off, BLOCK as u32)? == vec![0u8; b],
            "a refused write at {off} is visible"
        );
    }
    n1.disconnect()?;
    let end = cluster.volume_info()?;
    eprintln!("[{NAME}] final: {}", end.summary());
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. Snapshot catch-up after the loss of a follower's log and image
// ---------------------------------------------------------------------------

/// qemu-io writes of 2 MiB with pattern `pat + i` at each offset (MiB).
fn write_patterns(uri: &str, offsets_mib: &[u64], pat: u8) -> Result<()> {
    let cmds: Vec<String> = offsets_mib
        .iter()
        .enumerate()
        .map(|(i, off)| format!("write -P {:#x} {}M 2M", pat.wrapping_add(i as u8), off))
        .collect();
    qemu_io_ok(uri, &cmds)?;
    Ok(())
}

#[test]
fn follower_rebuilt_by_snapshot_after_log_loss() -> Result<()> {
    const NAME: &str = "repl-snapshot";
    let _serial = serial_lock(SERIAL, SERIAL_WAIT)?;
    let (mut cluster, info) = three_nodes(NAME)?;
    let leader = info.leader;
    let f = followers(&cluster, leader);
    let (lost, other) = (f[0], f[1]);
    let leader_uri = cluster.nbd_uri_of(leader)?;

    // 16 MiB of known data through the leader.
    write_patterns(&leader_uri, &[0, 4, 8, 12, 16, 20, 24, 28], 0x21)?;

    // The follower loses its raft log, its image and its volume state.
    cluster.kill_node_id(lost)?;
    let data_dir = cluster.node_by_id(lost)?.data_dir.clone();
    let raft_log = data_dir.join("raft-log");
    let vdir = volume_dir(&data_dir)?;
    for p in [&raft_log, &vdir.join("image"), &vdir.join("volume.meta")] {
        ensure!(p.exists(), "{} does not exist: unexpected data dir layout", p.display());
    }
    fs::remove_dir_all(&raft_log)?;
    fs::remove_file(vdir.join("image"))?;
    // volume.state appears with the replica's first destage (every 500 ms),
    // which may not have happened yet.
    let state = vdir.join("volume.state");
    let had_state = state.exists();
    if had_state {
        fs::remove_file(&state)?;
    }
    eprintln!(
        "[{NAME}] killed follower node {lost}; deleted {}, {}/image{}; kept volume.meta",
        raft_log.display(),
        vdir.display(),
        if had_state {
            " and volume.state"
        } else {
            " (no volume.state written yet)"
        }
    );

    // More data while it is down (16 MiB new, 2 MiB overwritten), then give
    // the leader time to destage (every 500 ms) and compact its log past
    // everything the lost follower would need.
    write_patterns(&leader_uri, &[32, 36, 40, 44, 48, 52, 56, 62], 0x41)?;
    write_patterns(&leader_uri, &[2], 0x61)?;
    thread::sleep(Duration::from_secs(2));
    let down = cluster.volume_info()?;
    eprintln!("[{NAME}] while down: {}", down.summary());
    let sum_before = nbd_sha256(&leader_uri, SHA_TIMEOUT)?;
    eprintln!("[{NAME}] sha256 through leader node {leader}: {sum_before}");

    // Restart it and time the rebuild, while a writer keeps writing
    // through the leader (distinct blocks in the second half of the volume,
    // beyond the patterns above, so every acknowledged block can be checked).
    let dir = cluster.scratch().to_path_buf();
    let record = dir.join("acked-during-rebuild.txt");
    let stop = dir.join("stop-writing");
    let writer_err = dir.join("ack_writer.stderr");
    let seed = seed()?;
    let mut cmd = Command::new(PYTHON);
    cmd.arg(scripts_dir().join("ack_writer.py"))
        .arg("--stop-file")
        .arg(&stop)
        .arg(&leader_uri)
        .arg(&record)
        .arg(seed.to_string())
        .arg("8")
        .arg((VOLUME_BYTES / BLOCK).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&writer_err)?);
    let mut writer = ChildGuard::spawn(&mut cmd, "ack_writer.py")?;
    let restart_at = Instant::now();
    cluster.restart_node_id(lost)?;
    let mut states = StateLog::new(lost, restart_at);
    let rebuilt = cluster.wait_volume(
        REBUILD_DEADLINE,
        &format!("node {lost} to be rebuilt (healthy, lag 0)"),
        |v| {
            states.observe(v);
            v.caught_up(lost)
        },
    )?;
    let rebuild_s = restart_at.elapsed().as_secs_f64();
    let allocated = cluster.volume_info_on(lost).map(|v| v.allocated_bytes).unwrap_or(0);
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    eprintln!(
        "snapshot rebuild: {:.0} ms for a {:.0} MiB volume ({:.1} MiB/s; {:.1} MiB allocated on node {lost}: {:.1} MiB/s) \
         while a writer kept writing; replica states seen: {}; {}",
        rebuild_s * 1000.0,
        mib(VOLUME_BYTES),
        mib(VOLUME_BYTES) / rebuild_s,
        mib(allocated),
        mib(allocated) / rebuild_s,
        states.timeline(),
        rebuilt.summary()
    );
    warn_if_leader_changed(NAME, &info, &rebuilt);
    fs::write(&stop, b"stop")?;
    let st = writer
        .wait_exit(Duration::from_secs(60))
        .context("the writer did not stop")?;
    ensure!(
        st.success(),
        "ack_writer failed ({st}) during the rebuild: {}",
        tail(&writer_err, 20)
    );
    let acked = count_lines(&record);
    ensure!(acked > 0, "no write was acknowledged during the rebuild");
    // The writer's blocks overwrite part of the patterns, so take the
    // reference checksum after it stopped.
    let reference = nbd_sha256(&leader_uri, SHA_TIMEOUT)?;
    eprintln!(
        "[{NAME}] {acked} writes acknowledged during the rebuild; sha256 through leader node {leader}: {reference}"
    );

    // Then the other two nodes are killed one at a time (the previous one
    // restarted and caught up first), so each time the data must come
    // through the rebuilt node, which serves reads from its own replica.
    let verify_through_rebuilt = |cluster: &Cluster, killed: u64| -> Result<()> {
        let uri = cluster.nbd_uri_of(lost)?;
        let sum = nbd_sha256(&uri, SHA_TIMEOUT).with_context(|| cluster.diag())?;
        eprintln!("[{NAME}] sha256 through rebuilt node {lost} (node {killed} killed): {sum}");
        ensure!(
            sum == reference,
            "the rebuilt node serves different data with node {killed} down: {sum} vs {reference}\n{}",
            cluster.diag()
        );
        let out = run_with_timeout(
            Command::new(PYTHON)
                .arg(scripts_dir().join("verify_blocks.py"))
                .arg(&uri)
                .arg(&record)
                .arg(seed.to_string()),
            Duration::from_secs(180),
        )?;
        ensure!(
            out.status.success(),
            "acknowledged writes missing through the rebuilt node with node {killed} down\n{}",
            describe(&out)
        );
        Ok(())
    };
    cluster.kill_node_id(other)?;
    verify_through_rebuilt(&cluster, other)?;
    cluster.restart_node_id(other)?;
    cluster.wait_volume(REBUILD_DEADLINE, &format!("node {other} to catch up again"), |v| {
        v.caught_up(other)
    })?;
    cluster.kill_node_id(leader)?;
    verify_through_rebuilt(&cluster, leader)?;
    Ok(())
}

/// Polls `volume info NAME` until `cond` holds; returns the JSON.
fn wait_named_volume(
    cluster: &Cluster,
    name: &str,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let mut last = serde_json::Value::Null;
    wait_until(SETTLE, what, || {
        if let Ok(v) = cluster.cli_json(&["volume", "info", name]) {
            let ok = cond(&v);
            last = v;
            return Ok(ok);
        }
        Ok(false)
    })
    .with_context(|| format!("last volume info: {last}"))?;
    Ok(last)
}

/// Quorum-receipt mode (DRBD's protocol B, with honest flushes): a volume
/// created with `--durability quorum-receipt` says so, acknowledges writes
/// on receipt (the counter moves), reads them back through every node (the
/// non-leaders forward their reads), and everything flushed or written
/// with FUA survives a SIGKILL of every node at once.
#[test]
fn quorum_receipt_volume_acks_on_receipt_and_keeps_what_was_flushed() -> Result<()> {
    let _serial = serial_lock(SERIAL, SERIAL_WAIT)?;
    let (mut cluster, _) = three_nodes("repl-receipt")?;
    let ids = cluster.node_ids();
    const VOL: &str = "fastvol";

    let v0 = cluster.cli_json(&["volume", "info", "vol0"])?;
    ensure!(
        v0["durability"] == "quorum-fsync",
        "vol0 is not quorum-fsync by default: {v0}"
    );
    let bad = cluster.cli(&["volume", "create", "x", "--size", "16MiB", "--durability", "protocol-a"])?;
    ensure!(
        !bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("quorum-receipt"),
        "an unknown durability mode was not refused by name: {}",
        describe(&bad)
    );
    let made = cluster.cli(&[
        "volume",
        "create",
        VOL,
        "--size",
        "16MiB",
        "--durability",
        "quorum-receipt",
    ])?;
    ensure!(made.status.success(), "volume create failed: {}", describe(&made));
    let info = wait_named_volume(&cluster, VOL, "fastvol to have a leader and 3 healthy replicas", |v| {
        v["leader"].as_u64().unwrap_or(0) != 0
            && v["replicas"]
                .as_array()
                .is_some_and(|r| r.len() == 3 && r.iter().all(|r| r["state"] == "healthy" && r["lag_entries"] == 0))
    })?;
    ensure!(
        info["durability"] == "quorum-receipt",
        "volume info does not state the mode: {info}"
    );
    let leader = info["leader"].as_u64().unwrap_or(0);
    let uris: std::collections::HashMap<u64, String> = ids
        .iter()
        .map(|&id| Ok((id, format!("nbd://{}/{VOL}", cluster.node_by_id(id)?.nbd))))
        .collect::<Result<_>>()?;
    let uri_of = |id: u64| -> Result<String> { uris.get(&id).cloned().ok_or_else(|| anyhow!("no node {id}")) };
    let acked_before: f64 = metric_sum(
        &cluster.metrics_of(leader)?,
        "trireme_writes_acked_on_receipt_total",
        &[("volume", VOL)],
    );

    // Plain writes then a FLUSH, and a FUA write, through the leader.
    // qemu-io's default cache mode (writethrough) sets FUA on every write:
    // writeback sends plain ones.
    let writeback = |uri: &str, cmds: &[&str]| qemu_io_ok_opts(&["-t", "writeback"], uri, cmds).map(|_| ());
    writeback(
        &uri_of(leader)?,
        &[
            "write -P 0x5a 0 1M",
            "write -P 0xa5 1M 1M",
            "flush",
            "write -f -P 0x3c 2M 64k",
        ],
    )?;
    let acked = metric_sum(
        &cluster.metrics_of(leader)?,
        "trireme_writes_acked_on_receipt_total",
        &[("volume", VOL)],
    ) - acked_before;
    ensure!(acked >= 1.0, "no write was acknowledged on receipt ({acked})");
    eprintln!("[repl-receipt] {acked} writes acknowledged on quorum receipt");
    // Read-your-writes through every node, at once after the writes.
    for &id in &ids {
        qemu_io_ok(
            &uri_of(id)?,
            &["read -P 0x5a 0 1M", "read -P 0xa5 1M 1M", "read -P 0x3c 2M 64k"],
        )
        .with_context(|| format!("reading fastvol back through node {id}"))?;
    }
    // Writes then a FLUSH, then every node dies at once.
    writeback(&uri_of(leader)?, &["write -P 0x77 4M 512k", "flush"])?;
    for &id in &ids {
        cluster.kill_node_id(id)?;
    }
    for &id in &ids {
        cluster.restart_node_id(id)?;
    }
    wait_named_volume(&cluster, VOL, "fastvol to have a leader after the restart", |v| {
        v["leader"].as_u64().unwrap_or(0) != 0
    })?;
    for &id in &ids {
        qemu_io_ok(
            &uri_of(id)?,
            &[
                "read -P 0x5a 0 1M",
                "read -P 0xa5 1M 1M",
                "read -P 0x3c 2M 64k",
                "read -P 0x77 4M 512k",
            ],
        )
        .with_context(|| format!("flushed data lost after every node was killed (read through node {id})"))?;
    }
    Ok(())
}
