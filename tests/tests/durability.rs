//! Acceptance: an acknowledged write survives a crash. A libnbd writer
//! (scripts/ack_writer.py) streams asynchronous 4 KiB writes to distinct
//! blocks and records every acknowledged one; triremed is SIGKILLed mid-stream,
//! restarted from its argv, and scripts/verify_blocks.py must read back every
//! recorded block with its exact pattern (zero mismatches).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use trireme_tests::{
    ChildGuard, Cluster, PYTHON, Sig, count_lines, metric_max, metric_sum, qemu_io_ok, scripts_dir, tail, verify_acked,
    volume_dir, wait_until,
};

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

/// Node 1's volume.state (written at checkpoints only).
fn volume_state(cluster: &Cluster) -> Result<std::path::PathBuf> {
    Ok(volume_dir(&cluster.node_by_id(1)?.data_dir)?.join("volume.state"))
}

/// Whether `len` bytes of the image file at `offset` are all `byte`.
fn image_holds(image: &std::path::Path, offset: u64, len: usize, byte: u8) -> Result<bool> {
    let mut buf = vec![0u8; len];
    File::open(image)?.read_exact_at(&mut buf, offset)?;
    Ok(buf.iter().all(|b| *b == byte))
}

/// SIGTERMs the node the test restarted last and checks it stopped cleanly
/// (a clean stop checkpoints every volume).
fn stop_cleanly(cluster: &mut Cluster) -> Result<()> {
    let node = cluster.restarted_node().context("the restarted node's guard")?;
    node.signal(Sig::SIGTERM)?;
    let status = node.wait_exit(Duration::from_secs(60))?;
    ensure!(status.success(), "clean stop failed: {status}");
    Ok(())
}

/// Between checkpoints the image file is written without an fdatasync, so a
/// power loss may leave any of those writes out of it. A restart must not
/// trust the image past the last checkpoint (volume.state) and replays the
/// log from there. Here the node writes blocks back to its image (its
/// write-back cache empties) with no checkpoint since; it is SIGKILLed, the
/// image loses those blocks (garbage over them, as a lost or torn page
/// cache leaves them), and after a restart they read back as written.
#[test]
fn writes_after_the_last_checkpoint_come_back_from_the_log() -> Result<()> {
    const NAME: &str = "checkpoint-replay";
    let mut cluster = Cluster::start(NAME)?;
    // No checkpoint inside the test, whatever the machine's pace.
    cluster.restart_node_with_config(1, "[log]\ncheckpoint_interval_ms = 3600000")?;
    let uri = cluster.nbd_uri().to_string();
    qemu_io_ok(&uri, &["write -P 0x5c 0 1M", "write -P 0x7e 4M 256k", "flush"])?;
    let vdir = volume_dir(&cluster.node_by_id(1)?.data_dir)?;
    let image = vdir.join("image");
    let state = vdir.join("volume.state");
    let holds = |offset: u64, len: usize, byte: u8| image_holds(&image, offset, len, byte);
    // The destage (every 500 ms) writes the blocks into the image file.
    wait_until(Duration::from_secs(30), "the image file to hold the writes", || {
        Ok(holds(0, 1 << 20, 0x5c)? && holds(4 << 20, 256 << 10, 0x7e)?)
    })?;
    ensure!(
        !state.exists(),
        "{} exists: a checkpoint ran, so this test would not check the replay",
        state.display()
    );

    cluster.kill_node()?;
    let f = std::fs::OpenOptions::new().write(true).open(&image)?;
    f.write_all_at(&vec![0xee; 1 << 20], 0)?;
    f.write_all_at(&vec![0xee; 256 << 10], 4 << 20)?;
    f.sync_all()?;
    drop(f);
    cluster.restart_node()?;
    qemu_io_ok(&uri, &["read -P 0x5c 0 1M", "read -P 0x7e 4M 256k"])
        .with_context(|| format!("reading after the restart\n{}", cluster.diag()))?;
    eprintln!("[{NAME}] blocks lost from the image past the last checkpoint came back from the log");
    Ok(())
}

/// A checkpoint is also due after `log.checkpoint_bytes` of log, however
/// long the interval: with a 1 MiB bound and an hour's interval, writing
/// 4 MiB makes volume.state appear (it is written at checkpoints only).
#[test]
fn a_checkpoint_follows_the_log_bytes_bound() -> Result<()> {
    let mut cluster = Cluster::start("checkpoint-bytes")?;
    cluster.restart_node_with_config(1, "[log]\ncheckpoint_interval_ms = 3600000\ncheckpoint_bytes = 1048576")?;
    let state = volume_state(&cluster)?;
    ensure!(!state.exists(), "{} exists before any write", state.display());
    qemu_io_ok(cluster.nbd_uri(), &["write -P 0x3a 0 4M", "flush"])?;
    wait_until(Duration::from_secs(30), "a checkpoint (volume.state written)", || {
        Ok(state.exists())
    })
    .with_context(|| cluster.diag())?;
    // The metrics count it, and the log since it is what a restart replays.
    wait_until(Duration::from_secs(10), "trireme_checkpoints_total to count it", || {
        let samples = cluster.metrics_of(1)?;
        Ok(
            metric_sum(&samples, "trireme_checkpoints_total", &[("volume", "vol0")]) >= 1.0
                && metric_max(&samples, "trireme_checkpoint_lag_bytes", &[("volume", "vol0")]).is_some(),
        )
    })?;
    Ok(())
}

/// A clean stop (SIGTERM) checkpoints every volume first, so a restart has
/// no log to replay: with an hour's interval and no byte bound reached,
/// volume.state appears only at the stop, and the data reads back after.
#[test]
fn a_clean_stop_checkpoints_first() -> Result<()> {
    let mut cluster = Cluster::start("checkpoint-at-stop")?;
    cluster.restart_node_with_config(1, "[log]\ncheckpoint_interval_ms = 3600000")?;
    let state = volume_state(&cluster)?;
    qemu_io_ok(cluster.nbd_uri(), &["write -P 0x4d 0 2M", "flush"])?;
    ensure!(!state.exists(), "{} exists before the stop", state.display());
    stop_cleanly(&mut cluster)?;
    ensure!(state.exists(), "{} missing after a clean stop", state.display());
    cluster.restart_node()?;
    qemu_io_ok(cluster.nbd_uri(), &["read -P 0x4d 0 2M"])?;
    Ok(())
}

/// Allocation units (`storage.allocation_unit_bytes`, 1 MiB by default): a
/// 4 KiB write allocates its whole unit, and data the image holds when a
/// node starts is never filled over by a later first write into the same
/// unit. A clean stop checkpoints, so nothing is replayed after the restart
/// and only the image scan protects the first block.
#[test]
fn allocation_units_never_fill_over_data() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut cluster = Cluster::start("allocation-units")?;
    cluster.restart_node_with_config(1, "[storage]\nallocation_unit_bytes = 1048576")?;
    let uri = cluster.nbd_uri().to_string();
    let image = volume_dir(&cluster.node_by_id(1)?.data_dir)?.join("image");
    let holds = |offset: u64, byte: u8| image_holds(&image, offset, 4096, byte);
    qemu_io_ok(&uri, &["write -P 0x41 4k 4k", "flush"])?;
    wait_until(Duration::from_secs(30), "the image file to hold the write", || {
        holds(4096, 0x41)
    })?;
    let allocated = std::fs::metadata(&image)?.blocks() * 512;
    ensure!(
        allocated >= 1 << 20,
        "a 4 KiB write allocated {allocated} bytes, not its 1 MiB unit"
    );

    stop_cleanly(&mut cluster)?;
    // Data the node never wrote itself: the scan at open must see it too.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)?
        .write_all_at(&[0x43; 4096], (2 << 20) + 8192)?;
    cluster.restart_node()?;
    qemu_io_ok(&uri, &["write -P 0x42 512k 4k", "write -P 0x44 2M 4k", "flush"])?;
    wait_until(Duration::from_secs(30), "the image file to hold the new writes", || {
        Ok(holds(512 << 10, 0x42)? && holds(2 << 20, 0x44)?)
    })?;
    ensure!(holds(4096, 0x41)?, "the first block was filled over in the image");
    ensure!(holds((2 << 20) + 8192, 0x43)?, "data found at open was filled over");
    qemu_io_ok(
        &uri,
        &[
            "read -P 0 0 4k",
            "read -P 0x41 4k 4k",
            "read -P 0 8k 504k",
            "read -P 0x42 512k 4k",
            "read -P 0x44 2M 4k",
        ],
    )?;
    Ok(())
}
