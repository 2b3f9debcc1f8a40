//! Acceptance: an acknowledged write survives a crash. A libnbd writer
//! (scripts/ack_writer.py) streams asynchronous 4 KiB writes to distinct
//! blocks and records every acknowledged one; triremed is SIGKILLed mid-stream,
//! restarted from its argv, and scripts/verify_blocks.py must read back every
//! recorded block with its exact pattern (zero mismatches).

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use trireme_tests::{ChildGuard, Cluster, PYTHON, count_lines, scripts_dir, tail, verify_acked, wait_until};

const MIN_ACKED: usize = 2000;

#[test]
fn acknowledged_writes_survive_sigkill() -> Result<()> {
    let mut cluster = Cluster::start("durability")?;
    let dir = cluster.scratch().to_path_buf();
    let record = dir.join("acked.txt");
    let writer_err = dir.join("ack_writer.stderr");
    let seed = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64 % 1_000_000_007;

    let mut cmd = Command::new(PYTHON);
    cmd.arg(scripts_dir().join("ack_writer.py"))
        .arg(cluster.nbd_uri())
        .arg(&record)
        .arg(seed.to_string())
        .arg("16")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&writer_err)?);
    let mut writer = ChildGuard::spawn(&mut cmd, "ack_writer.py")?;

    // Wait until enough writes are acknowledged (the writer must still be
    // streaming: it has 262144 blocks to go).
    wait_until(Duration::from_secs(120), "2000 acknowledged writes", || {
        if let Some(st) = writer.try_wait()? {
            anyhow::bail!(
                "ack_writer exited early ({st}): {}\n{}",
                tail(&writer_err, 20),
                cluster.diag()
            );
        }
        Ok(count_lines(&record) >= MIN_ACKED)
    })?;
    ensure!(writer.try_wait()?.is_none(), "writer finished before the crash");

    // Crash the node (not dev up) mid-stream.
    let old_pid = cluster.node_pid();
    cluster.kill_node()?;
    let st = writer
        .wait_exit(Duration::from_secs(30))
        .with_context(|| format!("writer did not exit after the crash: {}", tail(&writer_err, 20)))?;
    let acked = count_lines(&record);
    eprintln!(
        "node {old_pid} killed; writer exited with {st}; {acked} writes acknowledged; {}",
        tail(&writer_err, 3)
    );
    ensure!(acked >= MIN_ACKED, "only {acked} acknowledged writes recorded");

    // Restart from argv (test-owned) and verify every acknowledged block.
    cluster.restart_node()?;
    ensure!(cluster.node_pid() != old_pid);
    verify_acked(&cluster, cluster.nbd_uri(), &record, seed, acked)?;
    eprintln!("verified {acked} acknowledged blocks after the crash");

    // Stop the restarted node (Drop would SIGKILL it anyway).
    if let Some(node) = cluster.restarted_node() {
        node.signal(trireme_tests::Sig::SIGTERM)?;
        node.wait_exit(Duration::from_secs(20))?;
    }
    Ok(())
}
