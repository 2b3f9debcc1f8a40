//! Acceptance: triremed refuses bad configuration files quickly and names
//! the problem; the `trireme` CLI manages volumes (create/list/info/resize/
//! delete, human and JSON output) with exact error behaviour (exit 1 and the
//! documented message); delete of a volume with an open NBD session needs
//! --force; SIGTERM gives a graceful shutdown with exit status 0, both for
//! triremed under client load and for `trireme dev up`.

use std::fs::{self, File};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;
use trireme_tests::{
    CMD_TIMEOUT, ChildGuard, Cluster, PortLease, Sig, alloc_ports, describe, nbd, pid_alive, qemu_io_ok,
    run_with_timeout, tail, test_dir, trireme_bin, triremed_bin, wait_until,
};

const REFUSE_WITHIN: Duration = Duration::from_secs(15);
const SHUTDOWN_WITHIN: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Config refusal
// ---------------------------------------------------------------------------

/// A valid config body (without node_id) using leased ports under `dir`.
fn config_tail(dir: &Path, ports: &PortLease) -> String {
    format!(
        "data_dir = \"{data}\"\n\n[nbd]\nlisten = \"127.0.0.1:{nbd}\"\nunix_socket = \"{sock}\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n",
        data = dir.join("data").display(),
        sock = dir.join("nbd.sock").display(),
        nbd = ports.nbd(1),
        admin = ports.admin(1),
        metrics = ports.metrics(1),
    )
}

/// Runs `triremed --config FILE` with `body` and asserts it exits non-zero
/// within the deadline with every `needles` string in stderr.
fn assert_refused(name: &str, body: impl FnOnce(&Path, &PortLease) -> String, needles: &[&str]) -> Result<()> {
    let dir = test_dir(name)?;
    let ports = alloc_ports(name)?;
    let path = dir.path().join("triremed.toml");
    fs::write(&path, body(dir.path(), &ports))?;
    let mut cmd = Command::new(triremed_bin()?);
    cmd.arg("--config").arg(&path);
    let out = run_with_timeout(&mut cmd, REFUSE_WITHIN)
        .with_context(|| format!("triremed did not refuse {name} within {REFUSE_WITHIN:?}"))?;
    ensure!(
        !out.status.success(),
        "triremed accepted the {name} config\n{}",
        describe(&out)
    );
    ensure!(
        out.status.code().is_some(),
        "triremed died from a signal instead of exiting: {}",
        describe(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        ensure!(
            stderr.contains(n),
            "stderr for the {name} config does not mention {n:?}\n{}",
            describe(&out)
        );
    }
    Ok(())
}

#[test]
fn config_refuses_unparsable_toml() -> Result<()> {
    let dir = test_dir("cfg-unparsable")?;
    let path = dir.path().join("broken.toml");
    fs::write(&path, "node_id = 1\ndata_dir = \"/tmp/x\n[nbd\nlisten = \n")?;
    let out = run_with_timeout(Command::new(triremed_bin()?).arg("--config").arg(&path), REFUSE_WITHIN)?;
    ensure!(
        !out.status.success() && out.status.code().is_some(),
        "unparsable TOML accepted\n{}",
        describe(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.contains(&path.display().to_string()),
        "stderr does not name the file {}\n{}",
        path.display(),
        describe(&out)
    );
    Ok(())
}

#[test]
fn config_refuses_missing_node_id() -> Result<()> {
    assert_refused("cfg-missing-node-id", config_tail, &["node_id"])
}

#[test]
fn config_refuses_unknown_top_level_field() -> Result<()> {
    assert_refused(
        "cfg-unknown-field",
        |d, p| format!("node_id = 1\nbogus_setting = 42\n{}", config_tail(d, p)),
        &["bogus_setting"],
    )
}

#[test]
fn config_refuses_unknown_field_in_table() -> Result<()> {
    assert_refused(
        "cfg-unknown-nbd-field",
        |d, p| format!("node_id = 1\n{}", config_tail(d, p)).replace("[nbd]\n", "[nbd]\nlisten_backlog_typo = 5\n"),
        &["listen_backlog_typo"],
    )
}

#[test]
fn config_refuses_wrong_type_for_node_id() -> Result<()> {
    assert_refused(
        "cfg-wrong-type",
        |d, p| format!("node_id = \"one\"\n{}", config_tail(d, p)),
        &["node_id"],
    )
}

#[test]
fn config_refuses_node_id_zero() -> Result<()> {
    assert_refused(
        "cfg-node-id-zero",
        |d, p| format!("node_id = 0\n{}", config_tail(d, p)),
        &["node_id"],
    )
}

// ---------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The CLI must fail with exit status 1 and `error: ...MESSAGE... (Code)`.
fn assert_cli_error(out: &Output, message: &str, what: &str) -> Result<()> {
    let (_, stderr) = text(out);
    ensure!(
        out.status.code() == Some(1),
        "{what}: expected exit status 1\n{}",
        describe(out)
    );
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .ok_or_else(|| anyhow!("{what}: no `error: ` line on stderr\n{}", describe(out)))?;
    ensure!(
        line.contains(message),
        "{what}: error line {line:?} does not contain {message:?}"
    );
    ensure!(
        line.trim_end().ends_with(')') && line.contains(" ("),
        "{what}: error line {line:?} lacks the `(Code)` suffix"
    );
    Ok(())
}

fn volume_names(list: &Value) -> Result<Vec<String>> {
    Ok(list["volumes"]
        .as_array()
        .ok_or_else(|| anyhow!("no volumes array in {list}"))?
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect())
}

fn check_volume_json(v: &Value, name: &str, size: u64) -> Result<()> {
    ensure!(v["name"] == name, "name in {v}");
    ensure!(
        v["size_bytes"] == size,
        "size_bytes {} expected {size} in {v}",
        v["size_bytes"]
    );
    ensure!(!v["id"].is_null(), "no id in {v}");
    ensure!(v["replica_count"].as_u64().unwrap_or(0) >= 1, "replica_count in {v}");
    let replicas = v["replicas"].as_array().ok_or_else(|| anyhow!("no replicas in {v}"))?;
    ensure!(!replicas.is_empty(), "empty replicas in {v}");
    for r in replicas {
        ensure!(
            r["node_id"].is_u64() && r["role"].is_string() && r["state"].is_string(),
            "bad replica {r}"
        );
    }
    ensure!(v["open_sessions"].is_u64(), "open_sessions in {v}");
    ensure!(
        v["created_at_unix_s"].as_u64().unwrap_or(0) > 1_600_000_000,
        "created_at_unix_s in {v}"
    );
    ensure!(
        v.get("durability").is_some() && v.get("allocated_bytes").is_some() && v.get("leader").is_some(),
        "missing fields in {v}"
    );
    Ok(())
}

fn cli_ok(cluster: &Cluster, args: &[&str]) -> Result<String> {
    let out = cluster.cli(args)?;
    ensure!(
        out.status.success(),
        "trireme {args:?} failed\n{}\n{}",
        describe(&out),
        cluster.diag()
    );
    Ok(text(&out).0)
}

#[test]
fn cli_volume_lifecycle_human_and_json() -> Result<()> {
    let cluster = Cluster::start("cli-lifecycle")?;

    // create: human and JSON
    cli_ok(&cluster, &["volume", "create", "v1", "--size", "64MiB"])?;
    let v2 = cluster.cli_json(&["volume", "create", "v2", "--size", "128MiB"])?;
    check_volume_json(&v2, "v2", 128 << 20)?;
    ensure!(v2["open_sessions"] == 0, "fresh volume has sessions: {v2}");

    // list: human and JSON
    let human = cli_ok(&cluster, &["volume", "list"])?;
    for n in ["vol0", "v1", "v2"] {
        ensure!(human.contains(n), "human list lacks {n}:\n{human}");
    }
    let list = cluster.cli_json(&["volume", "list"])?;
    let mut names = volume_names(&list)?;
    names.sort();
    ensure!(names == ["v1", "v2", "vol0"], "list JSON names {names:?}");
    for v in list["volumes"].as_array().into_iter().flatten() {
        let size = match v["name"].as_str() {
            Some("vol0") => 1 << 30,
            Some("v1") => 64 << 20,
            _ => 128 << 20,
        };
        check_volume_json(v, v["name"].as_str().unwrap_or(""), size)?;
    }

    // info: human and JSON
    let human = cli_ok(&cluster, &["volume", "info", "v1"])?;
    ensure!(human.contains("v1"), "human info lacks the name:\n{human}");
    check_volume_json(&cluster.cli_json(&["volume", "info", "v1"])?, "v1", 64 << 20)?;

    // resize (grow), visible to the CLI and to NBD clients
    cli_ok(&cluster, &["volume", "resize", "v1", "--size", "96MiB"])?;
    check_volume_json(&cluster.cli_json(&["volume", "info", "v1"])?, "v1", 96 << 20)?;
    cluster.cli_json(&["volume", "resize", "v2", "--size", "1GiB"])?;
    check_volume_json(&cluster.cli_json(&["volume", "info", "v2"])?, "v2", 1 << 30)?;
    let (_, info) = nbd::open(cluster.nbd_addr(), "v1")?;
    ensure!(info.size == 96 << 20, "NBD size of v1 after resize: {}", info.size);
    // KiB/TiB suffixes parse too
    cli_ok(&cluster, &["volume", "resize", "v1", "--size", "131072KiB"])?;
    check_volume_json(&cluster.cli_json(&["volume", "info", "v1"])?, "v1", 128 << 20)?;

    // delete: JSON and human
    let d = cluster.cli_json(&["volume", "delete", "v1"])?;
    ensure!(d == serde_json::json!({"deleted": "v1"}), "delete JSON: {d}");
    cli_ok(&cluster, &["volume", "delete", "v2"])?;
    let names = volume_names(&cluster.cli_json(&["volume", "list"])?)?;
    ensure!(names == ["vol0"], "after deletes: {names:?}");
    assert_cli_error(
        &cluster.cli(&["volume", "info", "v1"])?,
        "not found",
        "info of a deleted volume",
    )?;
    match nbd::Conn::connect(cluster.nbd_addr()).and_then(|mut c| {
        c.greet()?;
        c.go("v1")
    })? {
        Ok(i) => bail!("deleted volume still exported: {i:?}"),
        Err(r) => ensure!(r.reply_type == nbd::REP_ERR_UNKNOWN, "GO on deleted volume: {r:?}"),
    }
    Ok(())
}

#[test]
fn cli_error_cases() -> Result<()> {
    let cluster = Cluster::start("cli-errors")?;
    assert_cli_error(
        &cluster.cli(&["volume", "info", "nosuch"])?,
        "not found",
        "info unknown",
    )?;
    assert_cli_error(
        &cluster.cli(&["volume", "delete", "nosuch"])?,
        "not found",
        "delete unknown",
    )?;
    assert_cli_error(
        &cluster.cli(&["volume", "resize", "nosuch", "--size", "1GiB"])?,
        "not found",
        "resize unknown",
    )?;
    assert_cli_error(
        &cluster.cli(&["volume", "create", "vol0", "--size", "1GiB"])?,
        "already exists",
        "create taken name",
    )?;
    assert_cli_error(
        &cluster.cli(&["volume", "create", "odd", "--size", "5000"])?,
        "is not a multiple of 4096",
        "size 5000",
    )?;
    assert_cli_error(
        &cluster.cli(&["volume", "resize", "vol0", "--size", "512MiB"])?,
        "shrink refused",
        "shrink",
    )?;
    // JSON mode reports errors the same way
    assert_cli_error(
        &cluster.cli(&["--output", "json", "volume", "info", "nosuch"])?,
        "not found",
        "info unknown (json)",
    )?;

    // A bad size suffix is rejected client side: exit 1, the bad value named.
    let out = cluster.cli(&["volume", "create", "badsuffix", "--size", "12XB"])?;
    let (_, stderr) = text(&out);
    ensure!(
        out.status.code() == Some(1),
        "bad size suffix: expected exit 1\n{}",
        describe(&out)
    );
    ensure!(
        stderr.contains("12XB"),
        "bad size suffix: stderr does not name the value\n{}",
        describe(&out)
    );

    // Nothing was created or changed by the failed commands.
    let list = cluster.cli_json(&["volume", "list"])?;
    ensure!(volume_names(&list)? == ["vol0"], "volumes after errors: {list}");
    check_volume_json(&cluster.cli_json(&["volume", "info", "vol0"])?, "vol0", 1 << 30)?;
    Ok(())
}

#[test]
fn delete_with_open_session_needs_force() -> Result<()> {
    let cluster = Cluster::start("cli-delete-busy")?;
    cluster.cli_json(&["volume", "create", "busy", "--size", "64MiB"])?;
    let (held, _) = nbd::open(cluster.nbd_addr(), "busy")?;
    wait_until(Duration::from_secs(10), "open_sessions >= 1 on busy", || {
        Ok(cluster.cli_json(&["volume", "info", "busy"])?["open_sessions"]
            .as_u64()
            .unwrap_or(0)
            >= 1)
    })?;

    let out = cluster.cli(&["volume", "delete", "busy"])?;
    ensure!(
        out.status.code() == Some(1),
        "delete with an open session: expected exit 1\n{}",
        describe(&out)
    );
    ensure!(text(&out).1.contains("error: "), "no error line\n{}", describe(&out));
    let names = volume_names(&cluster.cli_json(&["volume", "list"])?)?;
    ensure!(
        names.iter().any(|n| n == "busy"),
        "refused delete removed the volume: {names:?}"
    );

    let d = cluster.cli_json(&["volume", "delete", "busy", "--force"])?;
    ensure!(d == serde_json::json!({"deleted": "busy"}), "forced delete JSON: {d}");
    let names = volume_names(&cluster.cli_json(&["volume", "list"])?)?;
    ensure!(
        !names.iter().any(|n| n == "busy"),
        "forced delete left the volume: {names:?}"
    );
    drop(held);

    // Once the session is closed, a plain delete works.
    cluster.cli_json(&["volume", "create", "idle", "--size", "64MiB"])?;
    let (c, _) = nbd::open(cluster.nbd_addr(), "idle")?;
    c.disconnect()?;
    wait_until(Duration::from_secs(10), "open_sessions == 0 on idle", || {
        Ok(cluster.cli_json(&["volume", "info", "idle"])?["open_sessions"] == 0)
    })?;
    cluster.cli_json(&["volume", "delete", "idle"])?;
    ensure!(cluster.node_alive(), "node died\n{}", cluster.diag());
    Ok(())
}

// ---------------------------------------------------------------------------
// Graceful shutdown
// ---------------------------------------------------------------------------

#[test]
fn sigterm_triremed_under_qemu_io_load_exits_zero() -> Result<()> {
    let dir = test_dir("sigterm-node")?;
    let ports = alloc_ports("sigterm-node")?;
    let cfg = dir.path().join("triremed.toml");
    fs::write(&cfg, format!("node_id = 1\n{}", config_tail(dir.path(), &ports)))?;
    let log = dir.path().join("triremed.stderr");
    let mut cmd = Command::new(triremed_bin()?);
    cmd.arg("--config")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(File::create(dir.path().join("triremed.stdout"))?)
        .stderr(File::create(&log)?);
    let mut node = ChildGuard::spawn(&mut cmd, "triremed")?;
    let admin = format!("127.0.0.1:{}", ports.admin(1));
    let nbd_addr = format!("127.0.0.1:{}", ports.nbd(1));
    let cli = |args: &[&str]| -> Result<Output> {
        run_with_timeout(
            Command::new(trireme_bin()?).arg("--admin").arg(&admin).args(args),
            CMD_TIMEOUT,
        )
    };
    wait_until(Duration::from_secs(30), "triremed admin API", || {
        if let Some(st) = node.try_wait()? {
            bail!("triremed exited with {st}: {}", tail(&log, 20));
        }
        Ok(cli(&["volume", "list"])?.status.success())
    })?;
    let out = cli(&["volume", "create", "vol0", "--size", "64MiB"])?;
    ensure!(
        out.status.success(),
        "create failed\n{}\n{}",
        describe(&out),
        tail(&log, 20)
    );
    let uri = format!("nbd://{nbd_addr}/vol0");
    qemu_io_ok(&uri, &["write -P 0x5a 0 1M"])?;

    // A long qemu-io read loop.
    let mut q = Command::new("qemu-io");
    q.args(["-f", "raw", &uri]);
    for _ in 0..5000 {
        q.args(["-c", "read -P 0x5a 0 1M"]);
    }
    q.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut reader = ChildGuard::spawn(&mut q, "qemu-io read loop")?;
    wait_until(Duration::from_secs(20), "the qemu-io session to be open", || {
        if let Some(st) = reader.try_wait()? {
            bail!("qemu-io exited early with {st}");
        }
        let out = cli(&["--output", "json", "volume", "info", "vol0"])?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        Ok(v["open_sessions"].as_u64().unwrap_or(0) >= 1)
    })?;
    ensure!(reader.try_wait()?.is_none(), "qemu-io finished before SIGTERM");

    node.signal(Sig::SIGTERM)?;
    let st = node
        .wait_exit(SHUTDOWN_WITHIN)
        .with_context(|| format!("triremed ignored SIGTERM under load: {}", tail(&log, 20)))?;
    ensure!(
        st.code() == Some(0),
        "triremed exited with {st} after SIGTERM\n{}",
        tail(&log, 30)
    );
    reader
        .wait_exit(SHUTDOWN_WITHIN)
        .context("qemu-io kept running after the server exited")?;
    Ok(())
}

#[test]
fn sigterm_dev_up_stops_node_and_exits_zero() -> Result<()> {
    let mut cluster = Cluster::start("sigterm-devup")?;
    qemu_io_ok(cluster.nbd_uri(), &["write -P 0x6b 4096 64k"])?;
    let node_pid = cluster.node_pid();
    let nbd_addr = cluster.nbd_addr().to_string();
    let st = cluster.stop_dev_up(SHUTDOWN_WITHIN).with_context(|| cluster.diag())?;
    ensure!(
        st.code() == Some(0),
        "dev up exited with {st} after SIGTERM\n{}",
        cluster.diag()
    );
    wait_until(Duration::from_secs(10), "the node to exit with dev up", || {
        Ok(!pid_alive(node_pid))
    })
    .with_context(|| cluster.diag())?;
    ensure!(
        nbd::Conn::connect(&nbd_addr).is_err(),
        "NBD port still accepting after dev up exited"
    );

    // The cleanly stopped node kept the data: restart it from argv.
    cluster.restart_node()?;
    qemu_io_ok(cluster.nbd_uri(), &["read -P 0x6b 4096 64k"])?;
    let node = cluster.restarted_node().ok_or_else(|| anyhow!("no restarted node"))?;
    node.signal(Sig::SIGTERM)?;
    let st = node.wait_exit(SHUTDOWN_WITHIN)?;
    ensure!(
        st.code() == Some(0),
        "restarted triremed exited with {st} after SIGTERM"
    );
    Ok(())
}
