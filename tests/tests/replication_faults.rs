//! Fault acceptance tests for replication, against real `triremed` processes
//! (`trireme dev up`) and real NBD clients:
//!
//! - Every node SIGKILLed at once under a libnbd writer: after all three
//!   restart from their argv, every acknowledged write reads back through
//!   every node ("Acknowledged means durable on a quorum").
//! - Fencing of a writer frozen (SIGSTOP) while the volume was attached to
//!   another node: the writes queued on its old session meanwhile are, once
//!   it resumes, refused or cut off by a close, never acknowledged, and none
//!   of them ever lands ("Fencing").
//! - A five-replica volume keeps serving I/O through a surviving node after
//!   two nodes (the leader among them) are SIGKILLed at once ("Failover").
//!
//! Every wait is bounded; figures go to stderr. The tests take the same
//! serial lock as tests/replication.rs: each runs 3 to 5 debug daemons, and
//! two clusters at once on a small CI machine would distort the pauses they
//! measure.

use std::fs::File;
use std::io::ErrorKind;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use trireme_tests::{
    ChildGuard, Cluster, PYTHON, Sig, VolumeInfo, count_lines, describe, nbd, nbd_sha256, pattern, pid_alive,
    qemu_io_ok, run_with_timeout, scripts_dir, seed, serial_lock, signal_pid, tail, verify_acked, wait_for_acks,
    wait_until,
};

const SERIAL: &str = "replication";
const SERIAL_WAIT: Duration = Duration::from_secs(600);
const VOLUME_SIZE: &str = "64MiB";
const VOLUME_BYTES: u64 = 64 << 20;
const BLOCK: u64 = 4096;
/// A fresh cluster has a leader when dev up is ready; all replicas are
/// healthy a heartbeat later.
const SETTLE: Duration = Duration::from_secs(30);
const SHA_TIMEOUT: Duration = Duration::from_secs(60);
/// dev up reaps a killed node within ~200 ms; until then it is a zombie.
const GONE_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts `nodes` nodes with a 64 MiB vol0 and waits until it has a leader
/// and every replica is healthy with no lag.
fn cluster_up(name: &str, nodes: usize) -> Result<(Cluster, VolumeInfo)> {
    let started = Instant::now();
    let cluster = Cluster::start_nodes(name, nodes, Some(VOLUME_SIZE))?;
    let ids = cluster.node_ids();
    let info = cluster.wait_volume(SETTLE, "a leader and every replica healthy", |v| {
        v.leader != 0
            && !v.replicas.is_empty()
            && v.all_caught_up(&v.replicas.iter().map(|r| r.node_id).collect::<Vec<_>>())
    })?;
    ensure!(
        info.size_bytes == VOLUME_BYTES,
        "vol0 has {} bytes, expected {VOLUME_BYTES}",
        info.size_bytes
    );
    eprintln!(
        "[{name}] {} nodes {ids:?} up in {} ms: {}",
        nodes,
        started.elapsed().as_millis(),
        info.summary()
    );
    Ok((cluster, info))
}

/// SIGKILLs the current processes of `ids` back to back, then waits until
/// every one of them is gone.
fn sigkill_at_once(cluster: &Cluster, ids: &[u64]) -> Result<()> {
    let pids: Vec<(u64, i32)> = ids
        .iter()
        .map(|&id| Ok((id, cluster.pid_of(id)?)))
        .collect::<Result<_>>()?;
    for &(_, pid) in &pids {
        signal_pid(pid, Sig::SIGKILL)?;
    }
    for &(id, pid) in &pids {
        wait_until(
            GONE_TIMEOUT,
            &format!("killed node {id} (pid {pid}) to disappear"),
            || Ok(!pid_alive(pid)),
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 1. Every node SIGKILLed at once
// ---------------------------------------------------------------------------

#[test]
fn all_three_sigkilled_during_writes_lose_nothing() -> Result<()> {
    const NAME: &str = "faults-allkill";
    const MIN_ACKED_BEFORE_KILL: usize = 1000;
    let _serial = serial_lock(SERIAL, SERIAL_WAIT)?;
    let (mut cluster, info) = cluster_up(NAME, 3)?;
    let ids = cluster.node_ids();
    let uri = cluster.nbd_uri_of(1)?;
    let dir = cluster.scratch().to_path_buf();
    let record = dir.join("acked.txt");
    let writer_err = dir.join("ack_writer.stderr");
    let seed = seed()?;

    let mut cmd = Command::new(PYTHON);
    cmd.arg(scripts_dir().join("ack_writer.py"))
        .arg(&uri)
        .arg(&record)
        .arg(seed.to_string())
        .arg("16")
        .arg((VOLUME_BYTES / BLOCK).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&writer_err)?);
    let mut writer = ChildGuard::spawn(&mut cmd, "ack_writer.py")?;
    eprintln!(
        "[{NAME}] writing through node 1 ({uri}); leader is node {}",
        info.leader
    );
    let write_at = Instant::now();
    wait_for_acks(
        &mut writer,
        &record,
        MIN_ACKED_BEFORE_KILL,
        Duration::from_secs(90),
        &writer_err,
        &cluster,
    )?;
    let write_ms = write_at.elapsed().as_millis();

    // Every node at once, the writer still going.
    let before = count_lines(&record);
    sigkill_at_once(&cluster, &ids)?;
    let st = writer
        .wait_exit(Duration::from_secs(30))
        .with_context(|| format!("the writer did not exit after the kill: {}", tail(&writer_err, 10)))?;
    let acked = count_lines(&record);
    eprintln!(
        "[{NAME}] SIGKILLed nodes {ids:?} after {before} acknowledged writes ({write_ms} ms of writing); \
         the writer exited with {st} having {acked} acknowledged: {}",
        tail(&writer_err, 3)
    );
    ensure!(acked >= MIN_ACKED_BEFORE_KILL, "only {acked} writes were acknowledged");

    // All three back from their argv.
    let restart_at = Instant::now();
    for &id in &ids {
        cluster.restart_node_id(id)?;
    }
    let serving_ms = restart_at.elapsed().as_millis();
    let led = cluster.wait_volume(Duration::from_secs(30), "a leader after the restart", |v| v.leader != 0)?;
    eprintln!(
        "[{NAME}] all {} nodes restarted and serving NBD in {serving_ms} ms; leader elected {} ms after the \
         restarts began: {}",
        ids.len(),
        restart_at.elapsed().as_millis(),
        led.summary()
    );

    // Every acknowledged block through every node.
    for &id in &ids {
        verify_acked(&cluster, &cluster.nbd_uri_of(id)?, &record, seed, acked)?;
    }
    // And the nodes agree on the whole volume (no writes are going on).
    let mut sums = Vec::new();
    for &id in &ids {
        let sum = nbd_sha256(&cluster.nbd_uri_of(id)?, SHA_TIMEOUT).with_context(|| cluster.diag())?;
        sums.push((id, sum));
    }
    ensure!(
        sums.windows(2).all(|w| w[0].1 == w[1].1),
        "the nodes serve different volumes after the restart: {sums:?}\n{}",
        cluster.diag()
    );
    eprintln!("[{NAME}] all nodes serve the same 64 MiB (sha256 {})", sums[0].1);
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. Fencing a writer frozen while the volume moved
// ---------------------------------------------------------------------------

/// `trireme --admin <node via> volume attach vol0 --node NODE`.
fn attach_via(cluster: &Cluster, via: u64, node: u64) -> Result<()> {
    let out = cluster.cli_on(
        via,
        &["volume", "attach", cluster.volume(), "--node", &node.to_string()],
    )?;
    ensure!(
        out.status.success(),
        "volume attach --node {node} via node {via} failed\n{}",
        describe(&out)
    );
    Ok(())
}

/// What became of one WRITE on the old session.
#[derive(Debug)]
enum Outcome {
    /// An error reply with this errno.
    Refused(u32),
    /// The connection closed before its reply (how the read ended).
    Closed(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Refused(e) if *e == nbd::EPERM => write!(f, "refused with EPERM"),
            Outcome::Refused(e) => write!(f, "refused with errno {e}"),
            Outcome::Closed(why) => write!(f, "connection closed first ({why})"),
        }
    }
}

/// Reads the replies to `handles` on `conn`: each must be an error, or the
/// connection must close before any success arrives. Fails at once on a
/// success reply or on a reply for an unknown handle.
fn expect_no_success(conn: &mut nbd::Conn, handles: &[u64], within: Duration) -> Result<Vec<(u64, Outcome)>> {
    let deadline = Instant::now() + within;
    let mut outcomes: Vec<(u64, Outcome)> = Vec::new();
    while outcomes.len() < handles.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(
            !left.is_zero(),
            "no reply and no close within {within:?} for the old session's writes (so far: {outcomes:?})"
        );
        conn.stream.set_read_timeout(Some(left))?;
        match conn.read_reply() {
            Ok(nbd::Reply::Simple { error, handle }) => {
                ensure!(
                    handles.contains(&handle) && !outcomes.iter().any(|(h, _)| *h == handle),
                    "reply for unexpected handle {handle} (expected one of {handles:?}, have {outcomes:?})"
                );
                ensure!(
                    error != 0,
                    "the fenced session's WRITE (handle {handle}) was acknowledged with success"
                );
                outcomes.push((handle, Outcome::Refused(error)));
            }
            Ok(other) => bail!("unexpected reply on a simple-reply session: {other:?}"),
            Err(e) => {
                let io = e.chain().find_map(|c| c.downcast_ref::<std::io::Error>());
                match io.map(std::io::Error::kind) {
                    Some(ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                        let why = format!("{e:#}");
                        for &h in handles {
                            if !outcomes.iter().any(|(x, _)| *x == h) {
                                outcomes.push((h, Outcome::Closed(why.clone())));
                            }
                        }
                    }
                    Some(ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        bail!(
                            "no reply and no close within {within:?} for the old session's writes (so far: {outcomes:?})"
                        )
                    }
                    _ => return Err(e).context("reading the old session's replies"),
                }
            }
        }
    }
    Ok(outcomes)
}

/// Reads `len` bytes at `offset` through node `id` (a fresh raw session),
/// retrying failed attempts until `within` passes (a node that just
/// resumed may still be catching up).
fn read_through(cluster: &Cluster, id: u64, offset: u64, len: u32, within: Duration) -> Result<Vec<u8>> {
    let addr = cluster.node_by_id(id)?.nbd.clone();
    let deadline = Instant::now() + within;
    loop {
        let attempt = nbd::open(&addr, cluster.volume()).and_then(|(mut c, _)| {
            let data = c.pread(1, offset, len)?;
            let _ = c.disconnect();
            Ok(data)
        });
        match attempt {
            Ok(d) => return Ok(d),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("reading {len} bytes at {offset} through node {id}"));
            }
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    }
}

#[test]
fn fencing_sigstopped_old_writer() -> Result<()> {
    const NAME: &str = "faults-fence";
    let _serial = serial_lock(SERIAL, SERIAL_WAIT)?;
    let (cluster, _) = cluster_up(NAME, 3)?;
    let vol = cluster.volume().to_string();
    let b = BLOCK as usize;
    let (x, y, z) = (10 * BLOCK, 11 * BLOCK, 12 * BLOCK);
    let a_pat = pattern(0xa, 10, b);
    let b_pat = pattern(0xb, 11, b);
    let c_pat = pattern(0xc, 12, b);

    // Attached to node 1; a raw session there writes X.
    attach_via(&cluster, 1, 1)?;
    let attached = cluster.wait_volume(Duration::from_secs(15), "vol0 attached to and led by node 1", |v| {
        v.attached_node == 1 && v.leader == 1
    })?;
    eprintln!("[{NAME}] attached to node 1: {}", attached.summary());
    let addr1 = cluster.node_by_id(1)?.nbd.clone();
    let (mut old, _) = nbd::open(&addr1, &vol)?;
    old.pwrite(1, x, &a_pat, 0).context("writing A to X through node 1")?;

    // Node 1 freezes; the volume moves to node 2.
    cluster.signal_node_id(1, Sig::SIGSTOP)?;
    let stopped_at = Instant::now();
    let result = fenced_while_stopped(&cluster, &mut old, stopped_at, (x, y, z), (&a_pat, &b_pat, &c_pat));
    // Never leave node 1 stopped, whatever happened.
    let cont = cluster.signal_node_id(1, Sig::SIGCONT);
    result?;
    cont?;
    Ok(())
}

fn fenced_while_stopped(
    cluster: &Cluster,
    old: &mut nbd::Conn,
    stopped_at: Instant,
    (x, y, z): (u64, u64, u64),
    (a_pat, b_pat, c_pat): (&[u8], &[u8], &[u8]),
) -> Result<()> {
    const NAME: &str = "faults-fence";
    let vol = cluster.volume().to_string();
    let len = BLOCK as u32;

    // 2 and 3 must elect a leader before the attach can commit.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut tries = 0;
    loop {
        tries += 1;
        match attach_via(cluster, 2, 2) {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                if tries == 1 {
                    eprintln!("[{NAME}] attach to node 2 not yet possible: {e:#}");
                }
                thread::sleep(Duration::from_millis(250));
            }
            Err(e) => return Err(e).with_context(|| cluster.diag()),
        }
    }
    let attach_ms = stopped_at.elapsed().as_millis();
    let info = cluster.volume_info_on(2)?;
    ensure!(
        info.attached_node == 2 && info.epoch >= 2,
        "after attach --node 2: {}",
        info.summary()
    );
    eprintln!(
        "[{NAME}] node 1 stopped; attached to node 2 {attach_ms} ms later after {tries} tries: {}",
        info.summary()
    );

    // The new writer writes Y through node 2 and reads it back.
    let addr2 = cluster.node_by_id(2)?.nbd.clone();
    let (mut new, _) = nbd::open(&addr2, &vol)?;
    new.pwrite(1, y, b_pat, 0).context("writing B to Y through node 2")?;
    ensure!(new.pread(2, y, len)? == b_pat, "Y does not read back B through node 2");
    new.disconnect()?;

    // The frozen writer's session queues C to X and Z in node 1's socket.
    let handles = [101u64, 102];
    for (h, off) in handles.iter().zip([x, z]) {
        let mut req = nbd::encode_request(0, nbd::CMD_WRITE, *h, off, len);
        req.extend_from_slice(c_pat);
        old.send(&req)
            .with_context(|| format!("queueing C at {off} on the old session"))?;
    }
    cluster.signal_node_id(1, Sig::SIGCONT)?;
    let resumed_at = Instant::now();
    eprintln!(
        "[{NAME}] queued 2 writes of C on the old epoch's session; node 1 resumed after {} ms stopped",
        stopped_at.elapsed().as_millis()
    );
    let outcomes = expect_no_success(old, &handles, Duration::from_secs(20)).with_context(|| cluster.diag())?;
    let summary: Vec<String> = outcomes.iter().map(|(h, o)| format!("handle {h}: {o}")).collect();
    eprintln!(
        "[{NAME}] old session, {} ms after node 1 resumed: {}",
        resumed_at.elapsed().as_millis(),
        summary.join("; ")
    );
    if outcomes
        .iter()
        .any(|(_, o)| matches!(o, Outcome::Refused(e) if *e != nbd::EPERM))
    {
        eprintln!("[{NAME}] note: a refusal was not EPERM ({})", nbd::EPERM);
    }

    // X holds A, Y holds B, Z zeroes, through every node; C nowhere.
    let zero = vec![0u8; BLOCK as usize];
    for id in [2u64, 3, 1] {
        let within = if id == 1 {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(10)
        };
        let got_x = read_through(cluster, id, x, len, within)?;
        let got_y = read_through(cluster, id, y, len, within)?;
        let got_z = read_through(cluster, id, z, len, within)?;
        for (what, got) in [("X", &got_x), ("Y", &got_y), ("Z", &got_z)] {
            ensure!(
                got.as_slice() != c_pat,
                "the fenced writer's pattern C is in {what} through node {id}\n{}",
                cluster.diag()
            );
        }
        ensure!(got_x == a_pat, "X through node {id} is not A: {}", nbd::hex(&got_x));
        ensure!(got_y == b_pat, "Y through node {id} is not B: {}", nbd::hex(&got_y));
        ensure!(got_z == zero, "Z through node {id} is not zeroes: {}", nbd::hex(&got_z));
    }
    eprintln!("[{NAME}] X=A, Y=B, Z=0 through nodes 2, 3 and 1; C nowhere");
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. Five replicas survive two kills
// ---------------------------------------------------------------------------

fn vol_info(cluster: &Cluster, id: u64, name: &str) -> Result<VolumeInfo> {
    let v = cluster.cli_json_on(id, &["volume", "info", name])?;
    serde_json::from_value(v.clone()).with_context(|| format!("volume info {name}: {v}"))
}

/// qemu-io through `uri` that must succeed within `timeout`.
fn qemu_io_within(uri: &str, cmds: &[String], timeout: Duration) -> Result<()> {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = run_with_timeout(&mut cmd, timeout)?;
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .to_ascii_lowercase();
    ensure!(
        out.status.success() && !all.contains("error") && !all.contains("failed"),
        "qemu-io {uri} {cmds:?} failed\n{}",
        describe(&out)
    );
    Ok(())
}

#[test]
fn five_replicas_survive_two_kills() -> Result<()> {
    const NAME: &str = "faults-five";
    const VOL: &str = "vol5";
    const PAUSE_DEADLINE: Duration = Duration::from_secs(15);
    let _serial = serial_lock(SERIAL, SERIAL_WAIT)?;
    let (cluster, _) = cluster_up(NAME, 5)?;
    let out = cluster.cli(&["volume", "create", VOL, "--replicas", "5", "--size", "64MiB"])?;
    ensure!(out.status.success(), "volume create {VOL} failed\n{}", describe(&out));
    let ids = cluster.node_ids();
    let info = wait_vol(
        &cluster,
        1,
        VOL,
        Duration::from_secs(30),
        "a leader and 5 healthy replicas",
        |v| v.leader != 0 && v.replicas.len() == 5 && v.all_caught_up(&ids),
    )?;
    eprintln!("[{NAME}] {VOL}: {}", info.summary());

    let uri = format!("nbd://{}/{VOL}", cluster.node_by_id(1)?.nbd);
    let before: Vec<String> = (0..4u64)
        .map(|i| format!("write -P {:#x} {}M 1M", 0x31 + i, 4 * i))
        .collect();
    let check_before: Vec<String> = (0..4u64)
        .map(|i| format!("read -P {:#x} {}M 1M", 0x31 + i, 4 * i))
        .collect();
    qemu_io_ok(&uri, &before)?;
    qemu_io_ok(&uri, &check_before)?;

    // So that the kill is a failover, the leader must not be node 1: if it
    // is, node 1 is frozen until the others elect another, then rejoins.
    if info.leader == 1 {
        let frozen_at = Instant::now();
        cluster.signal_node_id(1, Sig::SIGSTOP)?;
        let moved = wait_vol(
            &cluster,
            2,
            VOL,
            Duration::from_secs(20),
            "a leader other than node 1",
            |v| v.leader != 0 && v.leader != 1,
        );
        let cont = cluster.signal_node_id(1, Sig::SIGCONT);
        let moved = moved?;
        cont?;
        eprintln!(
            "[{NAME}] node 1 led {VOL}: froze it for {} ms until node {} took over",
            frozen_at.elapsed().as_millis(),
            moved.leader
        );
    }
    let info = wait_vol(
        &cluster,
        1,
        VOL,
        Duration::from_secs(30),
        "5 healthy replicas led by a node other than node 1",
        |v| v.leader != 0 && v.leader != 1 && v.all_caught_up(&ids),
    )?;
    eprintln!("[{NAME}] before the kill: {}", info.summary());

    // Two others die at once, the leader among them.
    let leader = info.leader;
    let mut victims: Vec<u64> = Vec::new();
    if leader != 1 {
        victims.push(leader);
    }
    victims.extend(
        ids.iter()
            .copied()
            .filter(|&i| i != 1 && i != leader)
            .take(2 - victims.len()),
    );
    let kill_at = Instant::now();
    sigkill_at_once(&cluster, &victims)?;
    eprintln!("[{NAME}] SIGKILLed nodes {victims:?} (leader was node {leader}); I/O through node 1");

    // A new write and read through node 1, started at once: a pause, not an error.
    let after = vec!["write -P 0x77 32M 1M".to_string(), "read -P 0x77 32M 1M".to_string()];
    let left = PAUSE_DEADLINE.saturating_sub(kill_at.elapsed());
    qemu_io_within(&uri, &after, left).with_context(|| {
        format!(
            "I/O through node 1 within {PAUSE_DEADLINE:?} of killing {victims:?}\n{}",
            cluster.diag()
        )
    })?;
    let pause = kill_at.elapsed();
    qemu_io_ok(&uri, &check_before).context("the data written before the kill")?;
    let now = vol_info(&cluster, 1, VOL)?;
    eprintln!(
        "five replicas, two killed: I/O through node 1 resumed within {} ms; earlier data intact; {}",
        pause.as_millis(),
        now.summary()
    );
    ensure!(
        now.leader != 0 && !victims.contains(&now.leader),
        "{VOL} leader is {} after killing {victims:?}",
        now.leader
    );
    Ok(())
}

/// Polls `volume info NAME` (asked of node `via`) every 200 ms until `cond`
/// holds; a failing poll only counts as "not yet".
fn wait_vol<F>(
    cluster: &Cluster,
    via: u64,
    name: &str,
    timeout: Duration,
    what: &str,
    mut cond: F,
) -> Result<VolumeInfo>
where
    F: FnMut(&VolumeInfo) -> bool,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match vol_info(cluster, via, name) {
            Ok(v) if cond(&v) => return Ok(v),
            Ok(v) => v.summary(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "timed out after {timeout:?} waiting for {name}: {what}; last: {last}\n{}",
                cluster.diag()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}
