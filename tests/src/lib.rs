//! Shared helpers for the Trireme integration tests.
//!
//! Rule: the tests start REAL `triremed` processes (through `trireme dev up`)
//! and drive them with REAL NBD clients (nbdinfo, qemu-io, qemu-img, nbdcopy,
//! fio, libnbd's Python bindings) plus raw TCP sockets for malformed input.
//! Everything here is bounded: every external command runs with a timeout and
//! is killed when it overruns, every wait polls a condition against a
//! deadline, and every process a test starts is killed by a `Drop` impl, so
//! a panicking test still cleans up.
//!
//! Environment: `TRIREME_BIN_DIR` overrides where `triremed`/`trireme` are
//! looked up (default: the target dir of the test executable);
//! `TRIREME_KEEP_TEST_DIRS=1` keeps each test's temp dir (data, logs).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde::Deserialize;

pub use nix::sys::signal::Signal as Sig;

pub mod nemesis;

/// libnbd's Python bindings (`import nbd`) only load in the system Python.
pub const PYTHON: &str = "/usr/bin/python3";

/// Default timeout for a short external command (nbdinfo, qemu-io, the CLI).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `trireme dev up` may take to print its ready line.
pub const DEV_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// Size of the default volume `vol0` created by `dev up`.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;

// ---------------------------------------------------------------------------
// Binaries and paths
// ---------------------------------------------------------------------------

/// Directory holding `triremed` and `trireme`: `$TRIREME_BIN_DIR` if set,
/// else `target/<profile>/` derived from the running executable
/// (`target/<profile>/deps/NAME-HASH` for a test).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TRIREME_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    // Tests run from target/<profile>/deps/, binaries (the soak's
    // `nemesis`) from target/<profile>/.
    let dir = exe
        .parent()
        .and_then(|d| if d.ends_with("deps") { d.parent() } else { Some(d) })
        .ok_or_else(|| anyhow!("cannot derive the target dir from {}", exe.display()))?;
    Ok(dir.to_path_buf())
}

/// Absolute path of a project binary, failing with a hint when missing.
pub fn bin(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(name);
    ensure!(
        path.is_file(),
        "{} does not exist: run `cargo build --bins` first (or set TRIREME_BIN_DIR)",
        path.display()
    );
    Ok(path)
}

pub fn triremed_bin() -> Result<PathBuf> {
    bin("triremed")
}

pub fn trireme_bin() -> Result<PathBuf> {
    bin("trireme")
}

/// `tests/scripts/`.
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

/// A fresh temporary directory for one test, named after it.
pub fn test_dir(test_name: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("trireme-{test_name}-"))
        .tempdir()
        .context("creating temp dir")
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

fn poll_sleep(iteration: u32) {
    // 1ms, 2ms, 4ms, ... capped at 20ms.
    let ms = 1u64 << iteration.min(4);
    thread::sleep(Duration::from_millis(ms.min(20)));
}

fn spawn_reader<R: Read + Send + 'static>(r: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        let _ = tx.send(buf);
    });
    rx
}

/// Runs `cmd` (stdin null, stdout/stderr captured) in its own process group
/// and waits at most `timeout`. On overrun the whole group is SIGKILLed and an
/// error carrying the partial output is returned. A non-zero exit is NOT an
/// error here; check `output.status`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let desc = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().with_context(|| format!("spawning {desc}"))?;
    let pid = Pid::from_raw(child.id() as i32);
    let out_rx = spawn_reader(child.stdout.take());
    let err_rx = spawn_reader(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut i = 0;
    let finished = loop {
        if let Some(status) = child.try_wait().context("try_wait")? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            // Still unreaped, so the group id cannot have been reused.
            let _ = killpg(pid, Signal::SIGKILL);
            break None;
        }
        poll_sleep(i);
        i += 1;
    };
    let status = match finished {
        Some(s) => s,
        None => child.wait().context("wait after kill")?,
    };
    // Grandchildren that kept the pipes open would block the readers; give
    // them a bounded grace period.
    let grace = Duration::from_secs(5);
    let stdout = out_rx.recv_timeout(grace).unwrap_or_default();
    let stderr = err_rx.recv_timeout(grace).unwrap_or_default();
    if finished.is_none() {
        bail!(
            "command overran its {timeout:?} timeout and was killed: {desc}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    }
    Ok(Output { status, stdout, stderr })
}

/// Human description of a finished command for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs the command with a timeout and requires exit status 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let desc = format!("{cmd:?}");
    let out = run_with_timeout(cmd, timeout)?;
    ensure!(out.status.success(), "command failed: {desc}\n{}", describe(&out));
    Ok(out)
}

/// Polls `cond` until it returns `Ok(true)`, failing after `timeout`.
/// An `Err` from `cond` aborts the wait immediately (use it for "the thing we
/// are waiting on died").
pub fn wait_until<F>(timeout: Duration, what: &str, mut cond: F) -> Result<()>
where
    F: FnMut() -> Result<bool>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut i = 0;
    loop {
        if cond().with_context(|| format!("while waiting for {what}"))? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        poll_sleep(i);
        i += 1;
    }
}

fn proc_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

/// True if `pid` exists (kill(pid, 0) succeeds) and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    !matches!(proc_state(pid), Some('Z') | Some('X'))
}

fn pid_is_triremed(pid: i32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("triremed"))
        .unwrap_or(false)
}

pub fn signal_pid(pid: i32, sig: Signal) -> Result<()> {
    kill(Pid::from_raw(pid), sig).with_context(|| format!("kill({pid}, {sig})"))
}

/// A child process that is killed (with its process group) when dropped.
pub struct ChildGuard {
    child: Child,
    label: String,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `cmd` in a new process group. Configure stdio before calling.
    pub fn spawn(cmd: &mut Command, label: &str) -> Result<Self> {
        cmd.process_group(0);
        let child = cmd.spawn().with_context(|| format!("spawning {label}: {cmd:?}"))?;
        Ok(Self {
            child,
            label: label.to_string(),
            status: None,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("try_wait {}", self.label))?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let mut i = 0;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            poll_sleep(i);
            i += 1;
        }
    }

    /// Waits up to `timeout`, failing if the process is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.wait_timeout(timeout)?
            .ok_or_else(|| anyhow!("{} (pid {}) still running after {timeout:?}", self.label, self.pid()))
    }

    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        ensure!(self.try_wait()?.is_none(), "{} already exited", self.label);
        signal_pid(self.pid(), sig)
    }

    /// SIGKILLs the process group and reaps the child.
    pub fn kill(&mut self) {
        if self.status.is_none() {
            // The leader is unreaped, so its pid/pgid cannot have been reused.
            let _ = killpg(Pid::from_raw(self.pid()), Signal::SIGKILL);
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------

/// A reserved base port P. Node i uses admin P+i, metrics P+200+i, peer
/// P+300+i and NBD P+3700+i (the `trireme dev up` scheme). P is restricted to
/// 20000 + 1000*k + 10*j (k < 8, j < 10): within one thousand, the admin
/// ports of every base fall in 1..=99, metrics in 201..=299, peer in
/// 301..=399 and NBD (three thousands up) in 701..=799, so the ranges of two
/// different bases never overlap and the flock on a per-P lock file is an
/// exact cross-process reservation (held until the lease is dropped or the
/// process dies).
pub struct PortLease {
    pub base: u16,
    _lock: Flock<File>,
}

impl PortLease {
    pub fn admin(&self, node: u16) -> u16 {
        self.base + node
    }
    pub fn metrics(&self, node: u16) -> u16 {
        self.base + 200 + node
    }
    pub fn peer(&self, node: u16) -> u16 {
        self.base + 300 + node
    }
    pub fn nbd(&self, node: u16) -> u16 {
        self.base + 3700 + node
    }
}

const SLOTS_PER_THOUSAND: u64 = 10;
const PORT_SLOTS: u64 = 8 * SLOTS_PER_THOUSAND;

fn slot_base(slot: u64) -> u16 {
    let slot = slot % PORT_SLOTS;
    (20000 + (slot / SLOTS_PER_THOUSAND) * 1000 + (slot % SLOTS_PER_THOUSAND) * 10) as u16
}

pub fn port_bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

static LOCAL_PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
static ALLOC_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Picks a base port whose 36 ports (admin, metrics, peer and NBD of nodes
/// 1..=9) are all bindable right now and reserves it. Starts from a hash of the test name, the pid and an
/// attempt counter, stepping by one slot (10 ports) until a free one is found.
pub fn alloc_ports(test_name: &str) -> Result<PortLease> {
    let lock_dir = std::env::temp_dir().join("trireme-tests-ports");
    fs::create_dir_all(&lock_dir).context("creating port lock dir")?;
    let salt = ALLOC_COUNTER.fetch_add(1, Ordering::Relaxed);
    let start = fnv1a(format!("{test_name}:{}:{salt}", std::process::id()).as_bytes());
    for step in 0..PORT_SLOTS {
        let base = slot_base(start.wrapping_add(step));
        {
            let mut local = LOCAL_PORTS.lock().map_err(|_| anyhow!("port mutex poisoned"))?;
            if local.get_or_insert_with(HashSet::new).contains(&base) {
                continue;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(lock_dir.join(format!("{base}.lock")))
            .context("opening port lock file")?;
        let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        let all_free = (1..=9u16)
            .flat_map(|i| [base + i, base + 200 + i, base + 300 + i, base + 3700 + i])
            .all(port_bindable);
        if !all_free {
            continue;
        }
        let mut local = LOCAL_PORTS.lock().map_err(|_| anyhow!("port mutex poisoned"))?;
        local.get_or_insert_with(HashSet::new).insert(base);
        return Ok(PortLease { base, _lock: lock });
    }
    bail!("no free base port in 20000..28000")
}

impl Drop for PortLease {
    fn drop(&mut self) {
        if let Ok(mut local) = LOCAL_PORTS.lock()
            && let Some(set) = local.as_mut()
        {
            set.remove(&self.base);
        }
    }
}

// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

/// Removes ANSI escape sequences (colored log lines).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // parameters and intermediates, then one final byte
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Last `n` lines of a text file (or a note saying it is unreadable).
pub fn tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = strip_ansi(&String::from_utf8_lossy(&bytes));
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Writes `len` bytes from /dev/urandom into `path`.
pub fn random_file(path: &Path, len: u64) -> Result<()> {
    let mut src = File::open("/dev/urandom").context("open /dev/urandom")?;
    let mut dst = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let copied = std::io::copy(&mut (&mut src).take(len), &mut dst)?;
    ensure!(copied == len, "short copy from /dev/urandom: {copied}");
    Ok(())
}

/// Compares two files with `cmp` (bounded), failing with cmp's output.
pub fn cmp_files(a: &Path, b: &Path) -> Result<()> {
    let out = run_with_timeout(Command::new("cmp").arg(a).arg(b), CMD_TIMEOUT)?;
    ensure!(
        out.status.success(),
        "files differ: {} vs {}\n{}",
        a.display(),
        b.display(),
        describe(&out)
    );
    Ok(())
}

/// Deterministic test pattern: `len` bytes derived from (seed, index).
pub fn pattern(seed: u64, index: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(index.wrapping_mul(0xbf58_476d_1ce4_e5b9))
        | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------
// Cluster (`trireme dev up`)
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize)]
pub struct NodeInfo {
    pub id: u64,
    pub pid: i32,
    pub admin: String,
    pub nbd: String,
    pub unix_socket: PathBuf,
    /// host:port of the node's Prometheus /metrics endpoint.
    pub metrics: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub argv: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DevUpInfo {
    pub nodes: Vec<NodeInfo>,
    pub volume: String,
    pub nbd_uri: String,
}

/// One replica of a volume as `trireme volume info --output json` reports it
/// (the leader's view).
#[derive(Debug, Clone, Deserialize)]
pub struct ReplicaInfo {
    pub node_id: u64,
    pub role: String,
    /// "healthy", "catching-up", "snapshot", "down" or "unknown".
    pub state: String,
    pub match_index: u64,
    pub lag_entries: u64,
    pub lag_bytes: u64,
}

/// `trireme volume info NAME --output json` (the fields the tests use).
#[derive(Debug, Clone, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub size_bytes: u64,
    /// 0 when there is no leader right now.
    pub leader: u64,
    pub replicas: Vec<ReplicaInfo>,
    pub epoch: u64,
    pub attached_node: u64,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    #[serde(default)]
    pub allocated_bytes: u64,
    #[serde(default)]
    pub open_sessions: u64,
}

impl VolumeInfo {
    pub fn replica(&self, node_id: u64) -> Option<&ReplicaInfo> {
        self.replicas.iter().find(|r| r.node_id == node_id)
    }

    /// True if `node_id` is reported healthy with no lag.
    pub fn caught_up(&self, node_id: u64) -> bool {
        self.replica(node_id)
            .is_some_and(|r| r.state == "healthy" && r.lag_entries == 0)
    }

    /// True if every one of `nodes` is reported healthy with no lag.
    pub fn all_caught_up(&self, nodes: &[u64]) -> bool {
        nodes.iter().all(|&n| self.caught_up(n))
    }

    /// One line for logs and assertion messages.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "leader {} term {} epoch {} attached {} commit {} applied {}; replicas:",
            self.leader, self.term, self.epoch, self.attached_node, self.commit_index, self.applied_index
        );
        for r in &self.replicas {
            let _ = write!(
                s,
                " [node {} {} {} match {} lag {} ({} B)]",
                r.node_id, r.role, r.state, r.match_index, r.lag_entries, r.lag_bytes
            );
        }
        s
    }
}

/// How long one `volume info` CLI call may take.
const VOLUME_INFO_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between `volume info` polls (each one spawns the CLI).
const VOLUME_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// One `trireme dev up --nodes N` plus whatever the test restarted.
/// Dropping it kills everything it started.
pub struct Cluster {
    pub info: DevUpInfo,
    /// Current pid of each node, in the order of `info.nodes` (changes after
    /// a restart).
    pids: Vec<i32>,
    dev_up: Option<ChildGuard>,
    /// Nodes the test restarted from their argv: (node id, process).
    restarted: Vec<(u64, ChildGuard)>,
    dev_up_stderr: PathBuf,
    root: PathBuf,
    /// Filesystems mounted for this cluster (see `start_nodes_prepared`).
    mounts: Vec<PathBuf>,
    // Dropped last (declaration order): ports stay reserved and the dir
    // stays until every process is gone.
    _ports: PortLease,
    dir: Option<tempfile::TempDir>,
    /// Keep `dir` when dropped, whatever TRIREME_KEEP_TEST_DIRS says.
    keep_dir: bool,
}

/// Unmounts each of `mounts` (lazily, so a straggler cannot keep it busy).
pub fn unmount_all(mounts: &[PathBuf]) {
    for m in mounts {
        let _ = run_with_timeout(Command::new("umount").arg("-l").arg(m), Duration::from_secs(10));
    }
}

fn mentions_addr_in_use(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("in use") || t.contains("addrinuse") || t.contains("eaddrinuse")
}

impl Cluster {
    /// `dev up` (one node) with the default 1 GiB `vol0`.
    pub fn start(test_name: &str) -> Result<Self> {
        Self::start_with(test_name, None)
    }

    /// `dev up` (one node), optionally with `--volume-size SIZE`.
    pub fn start_with(test_name: &str, volume_size: Option<&str>) -> Result<Self> {
        Self::start_nodes(test_name, 1, volume_size)
    }

    /// Keeps this cluster's temp dir (data, node logs) when it is dropped,
    /// as evidence for a test that found a problem.
    pub fn keep_dir_on_drop(&mut self) {
        self.keep_dir = true;
    }

    /// `dev up --nodes N`, optionally with `--volume-size SIZE`. Retries with
    /// another base port when the failure says an address was in use.
    pub fn start_nodes(test_name: &str, nodes: usize, volume_size: Option<&str>) -> Result<Self> {
        Self::start_nodes_prepared(test_name, nodes, volume_size, &|_| Ok(Vec::new()))
    }

    /// Like `start_nodes`, but first calls `prepare` with the data dir that
    /// `dev up` will use (its `node-N` subdirectories do not exist yet), for
    /// example to mount a small filesystem under one node. `prepare` returns
    /// the mount points it made; they are unmounted once every process of
    /// the cluster is gone.
    pub fn start_nodes_prepared(
        test_name: &str,
        nodes: usize,
        volume_size: Option<&str>,
        prepare: &dyn Fn(&Path) -> Result<Vec<PathBuf>>,
    ) -> Result<Self> {
        ensure!((1..=9).contains(&nodes), "dev up supports 1 to 9 nodes, not {nodes}");
        let dir = test_dir(test_name)?;
        let mut last_err = None;
        for attempt in 1..=3 {
            let ports = alloc_ports(test_name)?;
            let root = dir.path().join(format!("cluster-{attempt}"));
            fs::create_dir_all(&root)?;
            let mounts = prepare(&root.join("data"))?;
            match Self::try_start(&root, ports, nodes, volume_size) {
                Ok((info, dev_up, ports)) => {
                    return Ok(Self {
                        mounts,
                        pids: info.nodes.iter().map(|n| n.pid).collect(),
                        info,
                        dev_up: Some(dev_up),
                        restarted: Vec::new(),
                        dev_up_stderr: root.join("devup.stderr"),
                        root,
                        _ports: ports,
                        dir: Some(dir),
                        keep_dir: false,
                    });
                }
                Err((e, in_use)) => {
                    unmount_all(&mounts);
                    if !in_use {
                        return Err(e);
                    }
                    eprintln!("dev up attempt {attempt} hit an address in use; retrying: {e:#}");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("dev up failed")))
    }

    #[allow(clippy::type_complexity)]
    fn try_start(
        root: &Path,
        ports: PortLease,
        nodes: usize,
        volume_size: Option<&str>,
    ) -> std::result::Result<(DevUpInfo, ChildGuard, PortLease), (anyhow::Error, bool)> {
        let fail = |e: anyhow::Error| (e, false);
        let trireme = trireme_bin().map_err(fail)?;
        let data_dir = root.join("data");
        let stderr_path = root.join("devup.stderr");
        let stderr = File::create(&stderr_path).map_err(|e| fail(e.into()))?;
        let mut cmd = Command::new(&trireme);
        cmd.args(["dev", "up", "--nodes", &nodes.to_string(), "--data-dir"])
            .arg(&data_dir)
            .arg("--base-port")
            .arg(ports.base.to_string());
        if let Some(size) = volume_size {
            cmd.args(["--volume-size", size]);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr);
        let mut guard = ChildGuard::spawn(&mut cmd, "trireme dev up").map_err(fail)?;
        let stdout = guard.child_mut().stdout.take();
        let (tx, rx) = mpsc::channel::<String>();
        thread::spawn(move || {
            let Some(stdout) = stdout else { return };
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && line.trim_start().starts_with('{') {
                    sent = true;
                    let _ = tx.send(line);
                }
                // keep draining so dev up never blocks on a full pipe
            }
        });
        let diag = |why: String| {
            let stderr_text = tail(&stderr_path, 40);
            let mut logs = String::new();
            let mut in_use = mentions_addr_in_use(&stderr_text);
            for i in 1..=nodes {
                let log = data_dir.join(format!("node-{i}")).join("triremed.log");
                let log_text = tail(&log, 40);
                in_use |= mentions_addr_in_use(&log_text);
                let _ = write!(logs, "\n--- {} (tail) ---\n{log_text}", log.display());
            }
            (
                anyhow!(
                    "`trireme dev up --nodes {nodes}` (base port {}) failed: {why}\n--- dev up stderr (tail) ---\n{stderr_text}{logs}",
                    ports.base,
                ),
                in_use,
            )
        };
        let deadline = Instant::now() + DEV_UP_TIMEOUT;
        let line = loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(line) => break line,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = guard.wait_timeout(Duration::from_secs(5)).ok().flatten();
                    return Err(diag(format!("exited ({st:?}) without printing the ready JSON line")));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if let Ok(Some(st)) = guard.try_wait() {
                return Err(diag(format!("exited with {st} before it was ready")));
            }
            if Instant::now() >= deadline {
                return Err(diag(format!("no ready line within {DEV_UP_TIMEOUT:?}")));
            }
        };
        let info: DevUpInfo = match serde_json::from_str(&line) {
            Ok(i) => i,
            Err(e) => return Err(diag(format!("bad ready line {line:?}: {e}"))),
        };
        if info.nodes.len() != nodes {
            return Err(diag(format!("expected exactly {nodes} node(s) in {line}")));
        }
        Ok((info, guard, ports))
    }

    /// Node 1 (the first node dev up printed).
    pub fn node(&self) -> &NodeInfo {
        &self.info.nodes[0]
    }

    pub fn nodes(&self) -> &[NodeInfo] {
        &self.info.nodes
    }

    pub fn node_ids(&self) -> Vec<u64> {
        self.info.nodes.iter().map(|n| n.id).collect()
    }

    fn index_of(&self, id: u64) -> Result<usize> {
        self.info
            .nodes
            .iter()
            .position(|n| n.id == id)
            .ok_or_else(|| anyhow!("no node {id} in this cluster"))
    }

    pub fn node_by_id(&self, id: u64) -> Result<&NodeInfo> {
        Ok(&self.info.nodes[self.index_of(id)?])
    }

    /// Current pid of node 1.
    pub fn node_pid(&self) -> i32 {
        self.pids[0]
    }

    /// Current pid of node `id`.
    pub fn pid_of(&self, id: u64) -> Result<i32> {
        Ok(self.pids[self.index_of(id)?])
    }

    pub fn node_alive(&self) -> bool {
        pid_alive(self.node_pid())
    }

    /// True if node `id`'s current process exists (running or stopped).
    pub fn is_alive(&self, id: u64) -> bool {
        self.pid_of(id).is_ok_and(pid_alive)
    }

    /// True if node `id` is alive and not stopped (SIGSTOP), i.e. it can answer.
    pub fn is_running(&self, id: u64) -> bool {
        self.pid_of(id)
            .is_ok_and(|pid| pid_alive(pid) && !matches!(proc_state(pid), Some('T') | Some('t')))
    }

    pub fn dev_up_pid(&self) -> Option<i32> {
        self.dev_up.as_ref().map(ChildGuard::pid)
    }

    /// Admin address of node 1.
    pub fn admin(&self) -> &str {
        &self.node().admin
    }

    pub fn admin_of(&self, id: u64) -> Result<&str> {
        Ok(&self.node_by_id(id)?.admin)
    }

    /// NBD address of node 1.
    pub fn nbd_addr(&self) -> &str {
        &self.node().nbd
    }

    /// `nbd://HOST:PORT/vol0` of node 1, as printed by dev up.
    pub fn nbd_uri(&self) -> &str {
        &self.info.nbd_uri
    }

    /// `nbd://HOST:PORT/vol0` of node `id`.
    pub fn nbd_uri_of(&self, id: u64) -> Result<String> {
        Ok(format!("nbd://{}/{}", self.node_by_id(id)?.nbd, self.info.volume))
    }

    pub fn volume(&self) -> &str {
        &self.info.volume
    }

    /// `nbd+unix:///vol0?socket=PATH` of node 1.
    pub fn unix_uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.info.volume,
            self.node().unix_socket.display()
        )
    }

    /// Scratch directory of this test (inside the temp dir).
    pub fn scratch(&self) -> &Path {
        &self.root
    }

    /// Log tails of every node and dev up's stderr, for failure messages.
    pub fn diag(&self) -> String {
        let lines = if self.info.nodes.len() > 1 { 20 } else { 30 };
        let mut s = String::new();
        for n in &self.info.nodes {
            let _ = writeln!(
                s,
                "--- node {} {} (tail) ---\n{}",
                n.id,
                n.log.display(),
                tail(&n.log, lines)
            );
        }
        let _ = write!(s, "--- dev up stderr (tail) ---\n{}", tail(&self.dev_up_stderr, 15));
        s
    }

    /// Sends `sig` to node 1's current process.
    pub fn signal_node(&self, sig: Signal) -> Result<()> {
        signal_pid(self.node_pid(), sig)
    }

    /// Sends `sig` to node `id`'s current process.
    pub fn signal_node_id(&self, id: u64, sig: Signal) -> Result<()> {
        signal_pid(self.pid_of(id)?, sig)
    }

    /// SIGKILLs node 1 and waits (bounded) until it is gone.
    pub fn kill_node(&mut self) -> Result<()> {
        let id = self.node().id;
        self.kill_node_id(id)
    }

    /// SIGKILLs node `id` and waits (bounded) until it is gone.
    pub fn kill_node_id(&mut self, id: u64) -> Result<()> {
        let pid = self.pid_of(id)?;
        if let Some((_, g)) = self.restarted.iter_mut().find(|(_, g)| g.pid() == pid) {
            g.kill();
            return Ok(());
        }
        signal_pid(pid, Signal::SIGKILL)?;
        // dev up reaps its children within ~200 ms; until then it is a zombie.
        wait_until(
            Duration::from_secs(10),
            &format!("killed node {id} to disappear"),
            || Ok(!pid_alive(pid)),
        )
    }

    /// Restarts node 1 from its `argv` (see `restart_node_id`).
    pub fn restart_node(&mut self) -> Result<()> {
        let id = self.node().id;
        self.restart_node_id(id)
    }

    /// Adds TOML (a whole table, say `[log]` and its keys) to node `id`'s
    /// config file, for its next restart. `dev up` writes no `[log]` table.
    pub fn append_node_config(&self, id: u64, toml: &str) -> Result<()> {
        let node = self.node_by_id(id)?;
        let path = node
            .argv
            .iter()
            .skip_while(|a| *a != "--config")
            .nth(1)
            .ok_or_else(|| anyhow!("node {id}'s argv names no --config: {:?}", node.argv))?;
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("opening {path}"))?;
        std::io::Write::write_all(&mut f, format!("\n{toml}\n").as_bytes())
            .with_context(|| format!("appending to {path}"))?;
        Ok(())
    }

    /// SIGKILLs node `id`, adds `toml` to its config
    /// ([`Cluster::append_node_config`]) and restarts it.
    pub fn restart_node_with_config(&mut self, id: u64, toml: &str) -> Result<()> {
        self.kill_node_id(id)?;
        self.append_node_config(id, toml)?;
        self.restart_node_id(id)
    }

    /// Restarts node `id` from its `argv` as a test-owned child and waits
    /// until its NBD port completes a handshake for the volume.
    pub fn restart_node_id(&mut self, id: u64) -> Result<()> {
        let idx = self.index_of(id)?;
        let node = self.info.nodes[idx].clone();
        let (prog, args) = node.argv.split_first().ok_or_else(|| anyhow!("empty argv"))?;
        let n = self.restarted.len() + 1;
        let out = File::create(self.root.join(format!("restart-{n}-node-{id}.stdout")))?;
        let err_path = self.root.join(format!("restart-{n}-node-{id}.stderr"));
        let err = File::create(&err_path)?;
        let mut cmd = Command::new(prog);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        let guard = ChildGuard::spawn(&mut cmd, &format!("restarted triremed node {id}"))?;
        self.pids[idx] = guard.pid();
        self.restarted.push((id, guard));
        let volume = self.info.volume.clone();
        let g = self.restarted.len() - 1;
        let res = wait_until(
            Duration::from_secs(30),
            &format!("restarted node {id} to serve NBD"),
            || {
                if let Some(st) = self.restarted[g].1.try_wait()? {
                    bail!("restarted triremed (node {id}) exited with {st}");
                }
                Ok(nbd::open(&node.nbd, &volume).is_ok())
            },
        );
        res.with_context(|| format!("{}\n--- restart stderr ---\n{}", self.diag(), tail(&err_path, 20)))
    }

    /// The most recently restarted node's guard (to SIGTERM it and read its
    /// exit status).
    pub fn restarted_node(&mut self) -> Option<&mut ChildGuard> {
        self.restarted.last_mut().map(|(_, g)| g)
    }

    /// The guard of node `id` if the test restarted it (latest restart).
    pub fn restarted_node_id(&mut self, id: u64) -> Option<&mut ChildGuard> {
        self.restarted.iter_mut().rev().find(|(i, _)| *i == id).map(|(_, g)| g)
    }

    /// SIGTERMs `dev up` and waits for its exit status.
    pub fn stop_dev_up(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let g = self.dev_up.as_mut().ok_or_else(|| anyhow!("dev up not running"))?;
        g.signal(Signal::SIGTERM)?;
        g.wait_exit(timeout)
    }

    /// Runs `trireme --admin ADDR ARGS...` against node 1 with a timeout.
    pub fn cli<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        self.cli_at(self.admin(), args, CMD_TIMEOUT)
    }

    /// Runs `trireme --admin ADDR ARGS...` against node `id` with a timeout.
    pub fn cli_on<S: AsRef<OsStr>>(&self, id: u64, args: &[S]) -> Result<Output> {
        self.cli_at(self.admin_of(id)?, args, CMD_TIMEOUT)
    }

    fn cli_at<S: AsRef<OsStr>>(&self, admin: &str, args: &[S], timeout: Duration) -> Result<Output> {
        let mut cmd = Command::new(trireme_bin()?);
        cmd.arg("--admin").arg(admin).args(args);
        run_with_timeout(&mut cmd, timeout)
    }

    /// Runs `trireme --admin ADDR --output json ARGS...` against node 1,
    /// requires success and parses stdout as JSON.
    pub fn cli_json<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<serde_json::Value> {
        self.cli_json_at(self.admin(), args, CMD_TIMEOUT)
    }

    /// Like `cli_json`, against node `id`.
    pub fn cli_json_on<S: AsRef<OsStr>>(&self, id: u64, args: &[S]) -> Result<serde_json::Value> {
        self.cli_json_at(self.admin_of(id)?, args, CMD_TIMEOUT)
    }

    fn cli_json_at<S: AsRef<OsStr>>(&self, admin: &str, args: &[S], timeout: Duration) -> Result<serde_json::Value> {
        let mut cmd = Command::new(trireme_bin()?);
        cmd.arg("--admin").arg(admin).args(["--output", "json"]).args(args);
        let desc = format!("{cmd:?}");
        let out = run_with_timeout(&mut cmd, timeout)?;
        ensure!(
            out.status.success(),
            "{desc} failed\n{}\n{}",
            describe(&out),
            self.diag()
        );
        serde_json::from_slice(&out.stdout).with_context(|| format!("{desc}: stdout is not JSON\n{}", describe(&out)))
    }

    /// `volume info` of the cluster's volume, asked of node `id`.
    pub fn volume_info_on(&self, id: u64) -> Result<VolumeInfo> {
        let mut cmd = Command::new(trireme_bin()?);
        cmd.arg("--admin")
            .arg(self.admin_of(id)?)
            .args(["--output", "json", "volume", "info"])
            .arg(self.volume());
        let desc = format!("{cmd:?}");
        let out = run_with_timeout(&mut cmd, VOLUME_INFO_TIMEOUT)?;
        ensure!(out.status.success(), "{desc} failed\n{}", describe(&out));
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("{desc}: stdout is not volume info JSON\n{}", describe(&out)))
    }

    /// `volume info` asked of the first node (in id order) that is running
    /// (not killed, not stopped) and answers.
    pub fn volume_info(&self) -> Result<VolumeInfo> {
        let mut errors = Vec::new();
        for id in self.node_ids() {
            if !self.is_running(id) {
                continue;
            }
            match self.volume_info_on(id) {
                Ok(info) => return Ok(info),
                Err(e) => errors.push(format!("node {id}: {e:#}")),
            }
        }
        bail!("no running node answered volume info: {}", errors.join("; "))
    }

    /// Polls `volume_info` every 100 ms until `cond` holds and returns that
    /// info. A failing `volume info` only counts as "not yet" (it is normal
    /// during an election); the timeout error carries the last answer or
    /// error and the node logs.
    pub fn wait_volume<F>(&self, timeout: Duration, what: &str, mut cond: F) -> Result<VolumeInfo>
    where
        F: FnMut(&VolumeInfo) -> bool,
    {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.volume_info() {
                Ok(info) if cond(&info) => return Ok(info),
                Ok(info) => info.summary(),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what}; last volume info: {last}\n{}",
                    self.diag()
                );
            }
            thread::sleep(VOLUME_POLL_INTERVAL);
        }
    }

    /// Waits until the volume has a leader and returns its node id.
    pub fn wait_leader(&self, timeout: Duration) -> Result<u64> {
        Ok(self
            .wait_volume(timeout, "the volume to have a leader", |v| v.leader != 0)?
            .leader)
    }

    /// Asserts node 1 is alive and a fresh qemu-io client can write and
    /// read back a pattern (in a scratch area at 768 MiB).
    pub fn assert_healthy(&self) -> Result<()> {
        static ROUND: AtomicU64 = AtomicU64::new(1);
        ensure!(
            self.node_alive(),
            "triremed (pid {}) is not alive\n{}",
            self.node_pid(),
            self.diag()
        );
        let round = ROUND.fetch_add(1, Ordering::Relaxed);
        let pat = 0x11 + (round % 200) as u8;
        let off = (768u64 << 20) + (round % 64) * 65536;
        qemu_io_ok(
            self.nbd_uri(),
            &[
                format!("write -P {pat:#x} {off} 64k"),
                format!("read -P {pat:#x} {off} 64k"),
            ],
        )
        .with_context(|| format!("fresh qemu-io client failed\n{}", self.diag()))?;
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = thread::panicking();
        if panicking {
            eprintln!(
                "[trireme-tests] cluster at {} — diagnostics:\n{}",
                self.root.display(),
                self.diag()
            );
        }
        for (_, g) in &mut self.restarted {
            g.kill();
        }
        // A SIGSTOPped node cannot act on dev up's SIGTERM; let it run first.
        for &pid in &self.pids {
            if pid > 0 && pid_alive(pid) && pid_is_triremed(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
            }
        }
        if let Some(mut g) = self.dev_up.take() {
            // Prefer a clean stop so dev up reaps its nodes (no zombies are
            // left for a non-reaping init); SIGKILL the group if it lingers.
            if g.signal(Signal::SIGTERM).is_ok() {
                let _ = g.wait_timeout(Duration::from_secs(5));
            }
            g.kill();
        }
        // Nodes may live in their own process group; kill them explicitly
        // (only if the pid still is a triremed, in case it was reused).
        let mut pids: Vec<i32> = self.info.nodes.iter().map(|n| n.pid).collect();
        pids.extend(&self.pids);
        for pid in pids {
            if pid > 0 && pid_alive(pid) && pid_is_triremed(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if !self.mounts.is_empty() {
            // A killed process's files stay open until it is reaped; wait
            // (bounded) so the unmount is not refused as busy.
            for &pid in &self.pids {
                let _ = wait_until(Duration::from_secs(10), "a killed node to be reaped", || {
                    Ok(!pid_alive(pid))
                });
            }
            // Keep each mounted node's log beside its mount point, for
            // TRIREME_KEEP_TEST_DIRS and the diagnostics.
            for m in &self.mounts {
                if let Some(name) = m.file_name() {
                    let mut kept = name.to_os_string();
                    kept.push(".triremed.log");
                    let _ = fs::copy(m.join("triremed.log"), m.with_file_name(kept));
                }
            }
            unmount_all(&self.mounts);
        }
        if let Some(dir) = self.dir.take()
            && (self.keep_dir || std::env::var_os("TRIREME_KEEP_TEST_DIRS").is_some())
        {
            eprintln!("[trireme-tests] keeping {}", dir.keep().display());
        }
    }
}

// ---------------------------------------------------------------------------
// NBD clients
// ---------------------------------------------------------------------------

/// Runs `qemu-io -f raw URI -c CMD...` with a timeout.
pub fn qemu_io<S: AsRef<str>>(uri: &str, cmds: &[S]) -> Result<Output> {
    qemu_io_opts(&[], uri, cmds)
}

/// `qemu_io` with extra options before the URI (such as `-t writeback`:
/// qemu-io's default cache mode, writethrough, sets FUA on every write).
pub fn qemu_io_opts<S: AsRef<str>>(opts: &[&str], uri: &str, cmds: &[S]) -> Result<Output> {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]).args(opts).arg(uri);
    for c in cmds {
        cmd.arg("-c").arg(c.as_ref());
    }
    run_with_timeout(&mut cmd, CMD_TIMEOUT)
}

/// qemu-io that must succeed: exit 0 and no "error"/"failed" in its output.
/// Returns stdout.
pub fn qemu_io_ok<S: AsRef<str>>(uri: &str, cmds: &[S]) -> Result<String> {
    qemu_io_ok_opts(&[], uri, cmds)
}

/// `qemu_io_ok` with extra options (see `qemu_io_opts`).
pub fn qemu_io_ok_opts<S: AsRef<str>>(opts: &[&str], uri: &str, cmds: &[S]) -> Result<String> {
    let out = qemu_io_opts(opts, uri, cmds)?;
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lower = all.to_ascii_lowercase();
    let list: Vec<&str> = cmds.iter().map(AsRef::as_ref).collect();
    ensure!(
        out.status.success() && !lower.contains("error") && !lower.contains("failed"),
        "qemu-io {uri} {list:?} failed\n{}",
        describe(&out)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// SHA-256 (hex) of a whole export, read with `nbdcopy URI -` piped into
/// `sha256sum` (bounded by `timeout`; any failure in the pipe is an error).
pub fn nbd_sha256(uri: &str, timeout: Duration) -> Result<String> {
    let out = run_with_timeout(
        Command::new("bash")
            .arg("-c")
            .arg("set -o pipefail; nbdcopy -- \"$1\" - | sha256sum")
            .arg("nbd_sha256")
            .arg(uri),
        timeout,
    )?;
    ensure!(
        out.status.success(),
        "nbdcopy {uri} - | sha256sum failed\n{}",
        describe(&out)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let sum = text.split_whitespace().next().unwrap_or_default().to_string();
    ensure!(
        sum.len() == 64 && sum.chars().all(|c| c.is_ascii_hexdigit()),
        "unexpected sha256sum output {text:?}"
    );
    Ok(sum)
}

/// Serializes tests that share `name` across threads AND processes
/// (cargo test runs tests on threads, nextest in processes): an flock on a
/// file in the temp dir, held until the guard is dropped. Waits at most
/// `timeout` for the lock.
pub fn serial_lock(name: &str, timeout: Duration) -> Result<Flock<File>> {
    let dir = std::env::temp_dir().join("trireme-tests-serial");
    fs::create_dir_all(&dir).context("creating the serial lock dir")?;
    let path = dir.join(format!("{name}.lock"));
    let deadline = Instant::now() + timeout;
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(100)),
            Err((_, e)) => bail!("could not lock {} within {timeout:?}: {e}", path.display()),
        }
    }
}

/// Raw NBD protocol over `TcpStream`: constants and a minimal client used by
/// the malformed-input tests (and to hold sessions open).
pub mod nbd {
    use super::*;
    use std::io::{ErrorKind, Write};

    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

    // handshake flags (server) / client flags
    pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const FLAG_NO_ZEROES: u16 = 1 << 1;
    pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

    // options
    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_INFO: u32 = 6;
    pub const OPT_GO: u32 = 7;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;

    // option reply types
    pub const REP_ACK: u32 = 1;
    pub const REP_SERVER: u32 = 2;
    pub const REP_INFO: u32 = 3;
    pub const REP_FLAG_ERROR: u32 = 1 << 31;
    pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR + 1;
    pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR + 2;
    pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR + 3;
    pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR + 6;

    // info types
    pub const INFO_EXPORT: u16 = 0;
    pub const INFO_NAME: u16 = 1;
    pub const INFO_DESCRIPTION: u16 = 2;
    pub const INFO_BLOCK_SIZE: u16 = 3;

    // transmission flags
    pub const TF_HAS_FLAGS: u16 = 1 << 0;
    pub const TF_READ_ONLY: u16 = 1 << 1;
    pub const TF_SEND_FLUSH: u16 = 1 << 2;
    pub const TF_SEND_FUA: u16 = 1 << 3;
    pub const TF_ROTATIONAL: u16 = 1 << 4;
    pub const TF_SEND_TRIM: u16 = 1 << 5;
    pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const TF_SEND_DF: u16 = 1 << 7;
    pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
    pub const TF_SEND_RESIZE: u16 = 1 << 9;
    pub const TF_SEND_CACHE: u16 = 1 << 10;
    pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

    // commands
    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_TRIM: u16 = 4;
    pub const CMD_CACHE: u16 = 5;
    pub const CMD_WRITE_ZEROES: u16 = 6;

    // command flags
    pub const CMD_FLAG_FUA: u16 = 1 << 0;
    pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
    pub const CMD_FLAG_DF: u16 = 1 << 2;
    pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
    pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

    // structured replies
    pub const REPLY_FLAG_DONE: u16 = 1 << 0;
    pub const REPLY_TYPE_NONE: u16 = 0;
    pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
    pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
    pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
    pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

    // errors
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;

    pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
    pub const MAX_PAYLOAD: u32 = 32 << 20;

    #[derive(Debug, Clone)]
    pub struct OptReply {
        pub option: u32,
        pub reply_type: u32,
        pub data: Vec<u8>,
    }

    #[derive(Debug, Clone, Default)]
    pub struct ExportInfo {
        pub size: u64,
        pub flags: u16,
        /// (minimum, preferred, maximum) if NBD_INFO_BLOCK_SIZE was sent.
        pub block_sizes: Option<(u32, u32, u32)>,
    }

    /// One reply message in the transmission phase.
    #[derive(Debug, Clone)]
    pub enum Reply {
        Simple {
            error: u32,
            handle: u64,
        },
        Chunk {
            flags: u16,
            typ: u16,
            handle: u64,
            payload: Vec<u8>,
        },
    }

    impl Reply {
        pub fn handle(&self) -> u64 {
            match self {
                Reply::Simple { handle, .. } | Reply::Chunk { handle, .. } => *handle,
            }
        }
    }

    pub fn encode_request(flags: u16, typ: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    pub fn hex(bytes: &[u8]) -> String {
        let mut s = String::new();
        for b in bytes.iter().take(64) {
            let _ = write!(s, "{b:02x}");
        }
        if bytes.len() > 64 {
            s.push_str("...");
        }
        s
    }

    /// A raw NBD connection.
    pub struct Conn {
        pub stream: TcpStream,
    }

    impl Conn {
        pub fn connect(addr: &str) -> Result<Self> {
            let sa = addr
                .to_socket_addrs()
                .with_context(|| format!("resolving {addr}"))?
                .next()
                .ok_or_else(|| anyhow!("no address for {addr}"))?;
            let stream = TcpStream::connect_timeout(&sa, IO_TIMEOUT).with_context(|| format!("connect {addr}"))?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            stream.set_write_timeout(Some(IO_TIMEOUT))?;
            stream.set_nodelay(true)?;
            Ok(Self { stream })
        }

        pub fn read_exact_vec(&mut self, n: usize) -> Result<Vec<u8>> {
            let mut buf = vec![0u8; n];
            self.stream
                .read_exact(&mut buf)
                .with_context(|| format!("reading {n} bytes"))?;
            Ok(buf)
        }

        fn read_u16(&mut self) -> Result<u16> {
            let mut b = [0u8; 2];
            self.stream.read_exact(&mut b)?;
            Ok(u16::from_be_bytes(b))
        }

        fn read_u32(&mut self) -> Result<u32> {
            let mut b = [0u8; 4];
            self.stream.read_exact(&mut b)?;
            Ok(u32::from_be_bytes(b))
        }

        fn read_u64(&mut self) -> Result<u64> {
            let mut b = [0u8; 8];
            self.stream.read_exact(&mut b)?;
            Ok(u64::from_be_bytes(b))
        }

        pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
            self.stream.write_all(bytes).context("write to server")
        }

        /// Reads NBDMAGIC, IHAVEOPT and the handshake flags.
        pub fn read_greeting(&mut self) -> Result<u16> {
            let m = self.read_u64().context("reading NBDMAGIC")?;
            ensure!(m == NBDMAGIC, "bad NBDMAGIC {m:#x}");
            let m = self.read_u64().context("reading IHAVEOPT")?;
            ensure!(m == IHAVEOPT, "bad IHAVEOPT {m:#x}");
            self.read_u16().context("reading handshake flags")
        }

        pub fn send_client_flags(&mut self, flags: u32) -> Result<()> {
            self.send(&flags.to_be_bytes())
        }

        /// Greeting + client flags FIXED_NEWSTYLE|NO_ZEROES; checks that the
        /// server offers exactly those handshake flags.
        pub fn greet(&mut self) -> Result<u16> {
            let hf = self.read_greeting()?;
            ensure!(
                hf == FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
                "handshake flags {hf:#x}, expected FIXED_NEWSTYLE|NO_ZEROES"
            );
            self.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)?;
            Ok(hf)
        }

        pub fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
            let mut b = Vec::with_capacity(16 + data.len());
            b.extend_from_slice(&IHAVEOPT.to_be_bytes());
            b.extend_from_slice(&option.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            self.send(&b)
        }

        pub fn read_option_reply(&mut self) -> Result<OptReply> {
            let m = self.read_u64().context("reading option reply magic")?;
            ensure!(m == OPT_REPLY_MAGIC, "bad option reply magic {m:#x}");
            let option = self.read_u32()?;
            let reply_type = self.read_u32()?;
            let len = self.read_u32()?;
            ensure!(len <= 1 << 20, "absurd option reply length {len}");
            let data = self.read_exact_vec(len as usize)?;
            Ok(OptReply {
                option,
                reply_type,
                data,
            })
        }

        /// NBD_OPT_GO (or INFO) for `export`, requesting `infos`. Returns the
        /// export info on ACK, or the error reply as `Ok(Err(reply))`.
        pub fn go_with(
            &mut self,
            option: u32,
            export: &str,
            infos: &[u16],
        ) -> Result<std::result::Result<ExportInfo, OptReply>> {
            let mut data = Vec::new();
            data.extend_from_slice(&(export.len() as u32).to_be_bytes());
            data.extend_from_slice(export.as_bytes());
            data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
            for i in infos {
                data.extend_from_slice(&i.to_be_bytes());
            }
            self.send_option(option, &data)?;
            let mut info = ExportInfo::default();
            let mut saw_export = false;
            loop {
                let r = self.read_option_reply()?;
                ensure!(
                    r.option == option,
                    "reply for option {} while waiting for {option}",
                    r.option
                );
                match r.reply_type {
                    REP_ACK => {
                        ensure!(saw_export, "ACK without NBD_INFO_EXPORT");
                        return Ok(Ok(info));
                    }
                    REP_INFO => {
                        ensure!(r.data.len() >= 2, "short NBD_REP_INFO");
                        let ty = u16::from_be_bytes([r.data[0], r.data[1]]);
                        let d = &r.data[2..];
                        match ty {
                            INFO_EXPORT => {
                                ensure!(d.len() == 10, "NBD_INFO_EXPORT length {}", d.len());
                                info.size = u64::from_be_bytes(d[0..8].try_into()?);
                                info.flags = u16::from_be_bytes(d[8..10].try_into()?);
                                saw_export = true;
                            }
                            INFO_BLOCK_SIZE => {
                                ensure!(d.len() == 12, "NBD_INFO_BLOCK_SIZE length {}", d.len());
                                info.block_sizes = Some((
                                    u32::from_be_bytes(d[0..4].try_into()?),
                                    u32::from_be_bytes(d[4..8].try_into()?),
                                    u32::from_be_bytes(d[8..12].try_into()?),
                                ));
                            }
                            _ => {}
                        }
                    }
                    t if t & REP_FLAG_ERROR != 0 => return Ok(Err(r)),
                    t => bail!("unexpected option reply type {t:#x}"),
                }
            }
        }

        pub fn go(&mut self, export: &str) -> Result<std::result::Result<ExportInfo, OptReply>> {
            self.go_with(OPT_GO, export, &[INFO_BLOCK_SIZE])
        }

        /// Negotiates NBD_OPT_STRUCTURED_REPLY (must be ACKed).
        pub fn structured_reply(&mut self) -> Result<()> {
            self.send_option(OPT_STRUCTURED_REPLY, &[])?;
            let r = self.read_option_reply()?;
            ensure!(
                r.option == OPT_STRUCTURED_REPLY && r.reply_type == REP_ACK,
                "STRUCTURED_REPLY not acked: {r:?}"
            );
            Ok(())
        }

        pub fn request(&mut self, flags: u16, typ: u16, handle: u64, offset: u64, len: u32) -> Result<()> {
            self.send(&encode_request(flags, typ, handle, offset, len))
        }

        /// Reads one reply message. For a successful simple reply the caller
        /// must read the READ payload itself (it knows the length).
        pub fn read_reply(&mut self) -> Result<Reply> {
            let magic = self.read_u32().context("reading reply magic")?;
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let error = self.read_u32()?;
                    let handle = self.read_u64()?;
                    Ok(Reply::Simple { error, handle })
                }
                STRUCTURED_REPLY_MAGIC => {
                    let flags = self.read_u16()?;
                    let typ = self.read_u16()?;
                    let handle = self.read_u64()?;
                    let len = self.read_u32()?;
                    ensure!(len <= MAX_PAYLOAD + 64, "absurd chunk length {len}");
                    let payload = self.read_exact_vec(len as usize)?;
                    Ok(Reply::Chunk {
                        flags,
                        typ,
                        handle,
                        payload,
                    })
                }
                m => bail!("bad reply magic {m:#x}"),
            }
        }

        /// Reads a simple reply and requires it to be for `handle`; returns
        /// the error field.
        pub fn simple_reply(&mut self, handle: u64) -> Result<u32> {
            match self.read_reply()? {
                Reply::Simple { error, handle: h } => {
                    ensure!(h == handle, "reply for handle {h}, expected {handle}");
                    Ok(error)
                }
                r => bail!("expected a simple reply, got {r:?}"),
            }
        }

        /// READ with simple replies; fails on a non-zero error.
        pub fn pread(&mut self, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>> {
            self.request(0, CMD_READ, handle, offset, len)?;
            let e = self.simple_reply(handle)?;
            ensure!(e == 0, "READ {offset}+{len} failed with error {e}");
            self.read_exact_vec(len as usize)
        }

        /// WRITE with simple replies; fails on a non-zero error.
        pub fn pwrite(&mut self, handle: u64, offset: u64, data: &[u8], flags: u16) -> Result<()> {
            let mut b = encode_request(flags, CMD_WRITE, handle, offset, data.len() as u32);
            b.extend_from_slice(data);
            self.send(&b)?;
            let e = self.simple_reply(handle)?;
            ensure!(e == 0, "WRITE {offset}+{} failed with error {e}", data.len());
            Ok(())
        }

        pub fn flush(&mut self, handle: u64) -> Result<()> {
            self.request(0, CMD_FLUSH, handle, 0, 0)?;
            let e = self.simple_reply(handle)?;
            ensure!(e == 0, "FLUSH failed with error {e}");
            Ok(())
        }

        /// Soft disconnect.
        pub fn disconnect(mut self) -> Result<()> {
            self.request(0, CMD_DISC, 0, 0, 0)
        }

        /// Asserts the server closes the connection within `within` without
        /// sending anything (read returns 0 or the connection is reset).
        pub fn expect_closed(&mut self, within: Duration) -> Result<()> {
            self.stream.set_read_timeout(Some(within))?;
            let mut buf = [0u8; 4096];
            let res = self.stream.read(&mut buf);
            self.stream.set_read_timeout(Some(IO_TIMEOUT))?;
            match res {
                Ok(0) => Ok(()),
                Ok(n) => bail!(
                    "expected the server to close, but it sent {n} bytes: {}",
                    hex(&buf[..n])
                ),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!("the server did not close the connection within {within:?}")
                }
                Err(e) => Err(e).context("reading while expecting a close"),
            }
        }
    }

    /// Connects, greets and GOes to `export` (simple replies).
    pub fn open(addr: &str, export: &str) -> Result<(Conn, ExportInfo)> {
        let mut c = Conn::connect(addr)?;
        c.greet()?;
        let info = c.go(export)?.map_err(|r| anyhow!("GO {export} refused: {r:?}"))?;
        Ok((c, info))
    }

    /// Like `open` but negotiates structured replies first.
    pub fn open_structured(addr: &str, export: &str) -> Result<(Conn, ExportInfo)> {
        let mut c = Conn::connect(addr)?;
        c.greet()?;
        c.structured_reply()?;
        let info = c.go(export)?.map_err(|r| anyhow!("GO {export} refused: {r:?}"))?;
        Ok((c, info))
    }
}

// ---------------------------------------------------------------------------
// Acknowledged-write records (scripts/ack_writer.py) shared by the fault tests
// ---------------------------------------------------------------------------

/// A seed for one run's block patterns (scripts/blockpattern.py).
pub fn seed() -> Result<u64> {
    Ok(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        % 1_000_000_007)
}

/// Lines in a record file (one acknowledged write each).
pub fn count_lines(path: &Path) -> usize {
    fs::read(path)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}

/// Runs scripts/verify_blocks.py against `uri` and requires that every one
/// of the `expected` recorded blocks reads back with its pattern.
pub fn verify_acked(cluster: &Cluster, uri: &str, record: &Path, seed: u64, expected: usize) -> Result<()> {
    let started = Instant::now();
    let out = run_with_timeout(
        Command::new(PYTHON)
            .arg(scripts_dir().join("verify_blocks.py"))
            .arg(uri)
            .arg(record)
            .arg(seed.to_string()),
        Duration::from_secs(120),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "verify_blocks.py {uri}: output is not JSON\n{}\n{}",
            describe(&out),
            cluster.diag()
        )
    })?;
    ensure!(
        report["mismatches"] == 0 && report["duplicates"] == 0,
        "acknowledged writes do not read back through {uri}: {report}\n{}",
        cluster.diag()
    );
    ensure!(
        report["verified"] == expected as u64,
        "verified {} of {expected} acknowledged blocks through {uri}: {report}",
        report["verified"]
    );
    ensure!(
        out.status.success(),
        "verify_blocks.py {uri} failed\n{}",
        describe(&out)
    );
    eprintln!(
        "verified {expected} acknowledged blocks through {uri} in {} ms",
        started.elapsed().as_millis()
    );
    Ok(())
}

/// Runs a fio command that writes its JSON to `json_path`, requires it to
/// succeed with `error == 0` in every job, and returns the total (write,
/// read) I/O counts. fio's nbd engine prints a line before the JSON.
pub fn run_fio_checked(
    cmd: &mut Command,
    timeout: Duration,
    json_path: &Path,
    cluster: &Cluster,
) -> Result<(u64, u64)> {
    let out = run_with_timeout(cmd, timeout)?;
    let text = fs::read_to_string(json_path).unwrap_or_default();
    ensure!(
        out.status.success(),
        "fio failed\n{}\n--- json ---\n{text}\n{}",
        describe(&out),
        cluster.diag()
    );
    let start = text.find('{').ok_or_else(|| anyhow!("no JSON in fio output: {text}"))?;
    let doc: serde_json::Value = serde_json::from_str(&text[start..]).context("parsing fio JSON")?;
    let jobs = doc["jobs"].as_array().ok_or_else(|| anyhow!("no jobs in fio JSON"))?;
    ensure!(!jobs.is_empty(), "fio reported no jobs");
    let mut writes = 0;
    let mut reads = 0;
    for job in jobs {
        ensure!(
            job["error"] == 0,
            "fio job {} reported error {}",
            job["jobname"],
            job["error"]
        );
        writes += job["write"]["total_ios"].as_u64().unwrap_or(0);
        reads += job["read"]["total_ios"].as_u64().unwrap_or(0);
    }
    Ok((writes, reads))
}

/// Waits until the ack writer has recorded `count` acknowledged writes,
/// failing at once if it exits first.
pub fn wait_for_acks(
    writer: &mut ChildGuard,
    record: &Path,
    count: usize,
    timeout: Duration,
    writer_err: &Path,
    cluster: &Cluster,
) -> Result<()> {
    wait_until(timeout, &format!("{count} acknowledged writes"), || {
        if let Some(st) = writer.try_wait()? {
            bail!(
                "ack_writer exited early ({st}): {}\n{}",
                tail(writer_err, 20),
                cluster.diag()
            );
        }
        Ok(count_lines(record) >= count)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `PortLease` claim: no two base ports share any admin, metrics,
    /// peer or NBD port of nodes 1..=9, so one flock per base is an exact
    /// reservation.
    #[test]
    fn port_ranges_of_different_bases_never_overlap() {
        let mut seen = HashSet::new();
        for slot in 0..PORT_SLOTS {
            let base = slot_base(slot);
            for i in 1..=9u16 {
                for port in [base + i, base + 200 + i, base + 300 + i, base + 3700 + i] {
                    assert!(seen.insert(port), "port {port} of base {base} is used twice");
                }
            }
        }
        assert_eq!(seen.len(), PORT_SLOTS as usize * 36);
        assert!(seen.iter().all(|&p| (20000..32768).contains(&p)));
    }
}

// ---------------------------------------------------------------------------
// Prometheus scraping
// ---------------------------------------------------------------------------

/// One sample of the Prometheus text format: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// GET http://addr/metrics with a plain HTTP/1.0 request (bounded by
/// `timeout`), returning the body.
pub fn scrape(addr: &str, timeout: Duration) -> Result<String> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr.parse().with_context(|| format!("metrics address {addr}"))?;
    let mut s =
        std::net::TcpStream::connect_timeout(&sock, timeout).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP header end in the reply from {addr}"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{addr}/metrics answered {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

/// Parses the Prometheus text exposition format strictly: every line is a
/// comment (# HELP / # TYPE), blank, or `name{labels} value`. A line that
/// does not parse is an error naming it.
pub fn parse_metrics(text: &str) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let kind = rest.split_whitespace().nth(1).unwrap_or("");
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                    bail!("line {}: unknown metric type in {line:?}", n + 1);
                }
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| anyhow!("line {}: no value in {line:?}", n + 1))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .with_context(|| format!("line {}: bad value in {line:?}", n + 1))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), Vec::new()),
            Some((name, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .ok_or_else(|| anyhow!("line {}: unterminated labels in {line:?}", n + 1))?;
                let mut labels = Vec::new();
                let mut rest = inner;
                while !rest.is_empty() {
                    let (k, after) = rest
                        .split_once("=\"")
                        .ok_or_else(|| anyhow!("line {}: bad label in {line:?}", n + 1))?;
                    // Values here never contain escaped quotes (names and ids only).
                    let (v, after) = after
                        .split_once('"')
                        .ok_or_else(|| anyhow!("line {}: unterminated label value in {line:?}", n + 1))?;
                    labels.push((k.trim_start_matches(',').to_string(), v.to_string()));
                    rest = after.trim_start_matches(',');
                }
                (name.to_string(), labels)
            }
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            bail!("line {}: bad metric name in {line:?}", n + 1);
        }
        out.push(Sample { name, labels, value });
    }
    Ok(out)
}

/// The one volume's directory under a node's data dir
/// (`DATA_DIR/volumes/ID`), skipping hidden staging dirs.
pub fn volume_dir(data_dir: &Path) -> Result<PathBuf> {
    let vols = data_dir.join("volumes");
    let dirs: Vec<PathBuf> = fs::read_dir(&vols)
        .with_context(|| format!("listing {}", vols.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    ensure!(
        dirs.len() == 1,
        "expected one volume under {}: {dirs:?}",
        vols.display()
    );
    Ok(dirs.into_iter().next().unwrap_or_default())
}

/// Sum of the samples named `name` whose labels include all of `labels`.
pub fn metric_sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

/// Largest sample named `name` with all of `labels` (None: no such series).
pub fn metric_max(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .reduce(f64::max)
}

impl Cluster {
    /// Scrapes and parses node `id`'s /metrics.
    pub fn metrics_of(&self, id: u64) -> Result<Vec<Sample>> {
        let node = self.node_by_id(id)?;
        parse_metrics(&scrape(&node.metrics, Duration::from_secs(5))?)
    }
}

#[cfg(test)]
mod metrics_parse_tests {
    use super::*;

    #[test]
    fn parses_the_text_format_and_refuses_garbage() {
        let text = "# HELP x help\n# TYPE x counter\nx{node=\"1\",volume=\"v\"} 3\ny 1.5\nz_bucket{le=\"+Inf\"} 7\n";
        let s = parse_metrics(text).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(metric_sum(&s, "x", &[("volume", "v")]), 3.0);
        assert_eq!(s[0].label("node"), Some("1"));
        assert_eq!(metric_max(&s, "y", &[]), Some(1.5));
        assert!(parse_metrics("x{a=\"1\" 3\n").is_err());
        assert!(parse_metrics("x notanumber\n").is_err());
        assert!(parse_metrics("# TYPE x weird\n").is_err());
    }
}
