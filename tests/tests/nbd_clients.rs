//! Acceptance: real NBD clients interoperate with triremed.
//! nbdinfo (TCP, list, unix socket) sees vol0 with the advertised size and
//! capability flags; qemu-io reads back what it wrote (aligned, unaligned,
//! last block, last byte); qemu-img convert and nbdcopy round-trip data
//! bit-exactly; fio with the nbd engine runs multi-connection random writes
//! with crc32c verification without errors.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use serde_json::Value;
use trireme_tests::{
    CMD_TIMEOUT, Cluster, DEFAULT_VOLUME_SIZE, cmp_files, describe, qemu_io, qemu_io_ok, random_file, run_fio_checked,
    run_ok,
};

const BIG_TIMEOUT: Duration = Duration::from_secs(180);

fn nbdinfo_json(cluster: &Cluster, args: &[&str]) -> Result<Value> {
    let mut cmd = Command::new("nbdinfo");
    cmd.args(args);
    let out = run_ok(&mut cmd, CMD_TIMEOUT).with_context(|| cluster.diag())?;
    serde_json::from_slice(&out.stdout).with_context(|| format!("nbdinfo output is not JSON\n{}", describe(&out)))
}

fn find_export<'a>(doc: &'a Value, name: &str) -> Result<&'a Value> {
    doc["exports"]
        .as_array()
        .ok_or_else(|| anyhow!("no exports array in {doc}"))?
        .iter()
        .find(|e| e["export-name"] == name)
        .ok_or_else(|| anyhow!("export {name:?} not listed in {doc}"))
}

fn check_export(export: &Value, size: u64) -> Result<()> {
    ensure!(
        export["export-size"] == size,
        "export-size is {}, expected {size}",
        export["export-size"]
    );
    ensure!(export["is_read_only"] == false, "export is read-only: {export}");
    for key in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
        "can_cache",
    ] {
        ensure!(
            export[key] == true,
            "{key} is {} (expected true) in {export}",
            export[key]
        );
    }
    Ok(())
}

#[test]
fn nbdinfo_reports_vol0_over_tcp_list_and_unix() -> Result<()> {
    let cluster = Cluster::start("nbdinfo")?;

    // TCP URI, --json
    let doc = nbdinfo_json(&cluster, &["--json", cluster.nbd_uri()])?;
    ensure!(doc["protocol"] == "newstyle-fixed", "protocol: {}", doc["protocol"]);
    let export = find_export(&doc, "vol0")?;
    check_export(export, DEFAULT_VOLUME_SIZE)?;
    // NBD_INFO_BLOCK_SIZE: min 1, preferred 4096, max 32 MiB
    ensure!(export["block_size_minimum"] == 1, "block_size_minimum: {export}");
    ensure!(export["block_size_preferred"] == 4096, "block_size_preferred: {export}");
    ensure!(export["block_size_maximum"] == 32 << 20, "block_size_maximum: {export}");

    // --list (NBD_OPT_LIST), human and JSON
    let base = format!("nbd://{}/", cluster.nbd_addr());
    let out = run_ok(Command::new("nbdinfo").args(["--list", &base]), CMD_TIMEOUT)?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains("export=\"vol0\""),
        "nbdinfo --list does not show vol0:\n{text}"
    );
    let doc = nbdinfo_json(&cluster, &["--list", "--json", &base])?;
    check_export(find_export(&doc, "vol0")?, DEFAULT_VOLUME_SIZE)?;

    // Unix socket URI
    let doc = nbdinfo_json(&cluster, &["--json", &cluster.unix_uri()])?;
    check_export(find_export(&doc, "vol0")?, DEFAULT_VOLUME_SIZE)?;
    Ok(())
}

#[test]
fn qemu_io_writes_and_reads_back() -> Result<()> {
    let cluster = Cluster::start("qemu-io")?;
    let uri = cluster.nbd_uri();
    let last4k = DEFAULT_VOLUME_SIZE - 4096;
    let last1 = DEFAULT_VOLUME_SIZE - 1;
    let cmds = [
        "write -P 0xab 0 64k".to_string(),
        "read -P 0xab 0 64k".to_string(),
        // unaligned offset and length
        "write -P 0x5c 1000 3000".to_string(),
        "read -P 0x5c 1000 3000".to_string(),
        // the unaligned write left its neighbours alone
        "read -P 0xab 0 1000".to_string(),
        "read -P 0xab 4000 61536".to_string(),
        // the last 4 KiB and the last byte
        format!("write -P 0x77 {last4k} 4096"),
        format!("read -P 0x77 {last4k} 4096"),
        format!("write -P 0x3e {last1} 1"),
        format!("read -P 0x3e {last1} 1"),
        format!("read -P 0x77 {last4k} 4095"),
    ];
    let stdout = qemu_io_ok(uri, &cmds).with_context(|| cluster.diag())?;
    ensure!(
        stdout.matches("read ").count() == 7 && stdout.matches("wrote ").count() == 4,
        "unexpected qemu-io output:\n{stdout}"
    );

    // A fresh process sees the same data (nothing was only cached client-side).
    qemu_io_ok(
        uri,
        &[
            "read -P 0xab 0 1000",
            "read -P 0x5c 1000 3000",
            &format!("read -P 0x3e {last1} 1"),
        ],
    )?;

    // The check can fail: reading with the wrong pattern must be reported.
    let out = qemu_io(uri, &["read -P 0xcd 0 64k"])?;
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !out.status.success() && all.contains("Pattern verification failed"),
        "qemu-io did not detect a wrong pattern:\n{}",
        describe(&out)
    );
    // Reading past the end through qemu-io fails too.
    let out = qemu_io(uri, &[format!("read {last1} 2")])?;
    ensure!(
        !out.status.success(),
        "read past the end succeeded:\n{}",
        describe(&out)
    );
    ensure!(cluster.node_alive(), "node died\n{}", cluster.diag());
    Ok(())
}

#[test]
fn qemu_img_convert_round_trip() -> Result<()> {
    const SIZE: u64 = 64 << 20;
    let cluster = Cluster::start_with("qemu-img", Some("64MiB"))?;
    let uri = cluster.nbd_uri();
    let dir = cluster.scratch();

    // First fill the volume with random data A.
    let a = dir.join("a.raw");
    random_file(&a, SIZE)?;
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&a)
            .arg(uri),
        BIG_TIMEOUT,
    )
    .with_context(|| cluster.diag())?;

    // Then write B over it: random data with an 8 MiB zero hole in the
    // middle (qemu-img sends WRITE_ZEROES/TRIM there; A's data must vanish).
    let b = dir.join("b.raw");
    random_file(&b, SIZE)?;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&b)?;
        f.write_all_at(&vec![0u8; 8 << 20], 24 << 20)?;
    }
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&b)
            .arg(uri),
        BIG_TIMEOUT,
    )
    .with_context(|| cluster.diag())?;

    let out = dir.join("out.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(uri)
            .arg(&out),
        BIG_TIMEOUT,
    )
    .with_context(|| cluster.diag())?;
    let len = std::fs::metadata(&out)?.len();
    ensure!(len == SIZE, "exported image is {len} bytes, expected {SIZE}");
    cmp_files(&b, &out)?;
    Ok(())
}

#[test]
fn nbdcopy_both_ways() -> Result<()> {
    const SIZE: u64 = 64 << 20;
    let cluster = Cluster::start_with("nbdcopy", Some("64MiB"))?;
    let dir = cluster.scratch();
    let src = dir.join("src.raw");
    random_file(&src, SIZE)?;

    // file -> TCP URI (nbdcopy uses several connections: multi-conn)
    run_ok(Command::new("nbdcopy").arg(&src).arg(cluster.nbd_uri()), BIG_TIMEOUT).with_context(|| cluster.diag())?;
    // unix socket URI -> file
    let out = dir.join("out.raw");
    run_ok(Command::new("nbdcopy").arg(cluster.unix_uri()).arg(&out), BIG_TIMEOUT).with_context(|| cluster.diag())?;
    cmp_files(&src, &out)?;

    // and TCP URI -> file too
    let out2 = dir.join("out2.raw");
    run_ok(Command::new("nbdcopy").arg(cluster.nbd_uri()).arg(&out2), BIG_TIMEOUT).with_context(|| cluster.diag())?;
    cmp_files(&src, &out2)?;
    Ok(())
}

#[test]
fn fio_multi_connection_randwrite_verify() -> Result<()> {
    const JOBS: u64 = 4;
    let cluster = Cluster::start("fio")?;
    let json_path = cluster.scratch().join("fio.json");
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=trireme",
        "--ioengine=nbd",
        &format!("--uri={}", cluster.nbd_uri()),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        &format!("--numjobs={JOBS}"),
        "--size=32m",
        // each job (= its own NBD connection) owns a distinct 32 MiB region,
        // so the verification is not confused by another job's writes
        "--offset_increment=32m",
        "--verify=crc32c",
        "--do_verify=1",
        "--group_reporting",
        "--output-format=json",
    ])
    .arg(format!("--output={}", json_path.display()))
    // fio drops verify state files into its working directory
    .current_dir(cluster.scratch());
    let (writes, reads) = run_fio_checked(&mut cmd, BIG_TIMEOUT, &json_path, &cluster)?;
    // 4 jobs x 32 MiB / 4 KiB
    let expected = JOBS * (32 << 20) / 4096;
    ensure!(writes == expected, "fio wrote {writes} ios, expected {expected}");
    ensure!(reads > 0, "fio verify phase read nothing");
    ensure!(cluster.node_alive(), "node died\n{}", cluster.diag());
    Ok(())
}
