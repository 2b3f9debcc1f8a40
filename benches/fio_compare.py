#!/usr/bin/env python3
"""Trireme's benchmark suite: fio (nbd engine) against triremed and two unreplicated baselines,
then a failover pause and a resync rate, in one run, on one disk.

Usage: python3 benches/fio_compare.py [--quick] [--runtime-s 10] [--nodes 3] [--dir DIR]
                                      [--json OUT] [--base-port P] [--failover-s 20]
                                      [--resync-s 30] [--skip-build]

Builds release binaries, starts `trireme dev up` (3 nodes: vol0 has 3 replicas, all on this
machine's disk, attached to node 1), creates vol1 (the same, with `--durability quorum-receipt`,
also attached to node 1), and, on raw files in the same directory, `nbdkit file` and
`qemu-nbd --cache=none --aio=io_uring`. Each workload runs against all four targets; the table
shows IOPS, MiB/s, mean and p99 completion latency, and each Trireme volume's IOPS over the best
baseline's. Every job starts after a `sync`, so that no target pays for the page cache an
earlier one left dirty (nbdkit's W2 leaves up to the whole region dirty, in 4k pieces).
A fio job whose JSON reports a non-zero `error` fails the run instead of printing a figure. This
is a benchmark, not a test: nothing here asserts a speed.

Workloads (fio 3.33's nbd engine rejects --fdatasync, so fsync is --fsync=N, which sends an NBD
FLUSH after every N writes):
  W1  4k randwrite, iodepth 1, --fsync=1   (durable QD1 latency)
  W2  4k randwrite, iodepth 32
  W4  1M sequential write, iodepth 8 (also fills the region W3 reads)
  W3  4k randread, iodepth 32
  W5  4k randrw 70% reads, iodepth 16, --fsync=64. IOPS and MiB/s are reads + writes; the
      latency columns show "r <reads> / w <writes>"; the JSON has both sides in full.

Then, with the cluster still up:
  failover  A second volume, "failover" (3 replicas, never attached: a session on a node other
            than an attached volume's node may not write), gets W2 through a node that does not
            lead it, so every write is forwarded, with a per-I/O latency log; its leader is
            SIGKILLed a third of the way in. The pause is the longest gap between consecutive I/O
            completions. fio must end with error 0 (the node retries across the leader change).
            The killed node is restarted from its argv and the run waits until every replica of
            both volumes has lag 0.
  resync    vol0 attached back to node 1; one follower is SIGSTOPped while 1M sequential writes
            (QD8) run through node 1; the writes stop, the follower's lag_bytes is read from the
            leader, the follower is SIGCONTed, and its catch-up time gives MiB/s (log replay, or a
            snapshot install if the leader had compacted past it: reported as `path`).

A disk probe (fio next to the images: 1M sequential writes from three jobs, O_DIRECT and
buffered with fdatasync over written blocks, and buffered into sparse files) runs before the
workloads and after the resync, because this disk's rate drifts and W4 on three replicas is bound
by it.

Results also go to bench-results/fio_compare.json (fio_compare-quick.json with --quick; --json to
change), with raw fio figures per target, so runs can be compared. Missing fio, nbdkit or qemu-nbd
are installed with apt-get. benches/idle_scale.py imports the process helpers from here.
"""

import argparse
import datetime
import json
import os
import platform
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, "target/release/trireme")
MIB = 1 << 20

# (id, description, fio args, kind): kind is the fio JSON side reported, or "mixed" for both.
WORKLOADS = [
    ("W1", "4k randwrite QD1 fsync=1", ["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"], "write"),
    ("W2", "4k randwrite QD32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"], "write"),
    ("W4", "1M seq write QD8", ["--rw=write", "--bs=1M", "--iodepth=8"], "write"),
    ("W3", "4k randread QD32", ["--rw=randread", "--bs=4k", "--iodepth=32"], "read"),
    ("W5", "4k randrw 70/30 QD16 fsync=64",
     ["--rw=randrw", "--rwmixread=70", "--bs=4k", "--iodepth=16", "--fsync=64"], "mixed"),
]
W2_ARGS = WORKLOADS[1][2]
W4_ARGS = WORKLOADS[2][2]
TARGETS = ("triremed", "triremed-receipt", "nbdkit-file", "qemu-nbd")
# vol0 (quorum-fsync, the default) and vol1 (quorum-receipt), on the same cluster.
TRIREME_TARGETS = ("triremed", "triremed-receipt")
BASELINES = ("nbdkit-file", "qemu-nbd")

BUILD_TIMEOUT_S = 7200
CLI_TIMEOUT_S = 30
READY_DEADLINE_S = 120
STOP_GRACE_S = 40
POLL_S = 0.05


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


class Procs:
    """Every long-running process this script starts, stopped in reverse order by stop_all()."""

    def __init__(self):
        self.items = []  # (name, Popen)
        self.stopped = set()  # pids we SIGSTOPped and have not SIGCONTed yet
        self.foreign = {}  # pid -> name: processes we did not spawn (dev up's nodes)

    def start(self, name, argv, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        # Own session: a terminal Ctrl-C reaches only this script, which then stops everything
        # in order (dev up stops its nodes on SIGTERM).
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(argv, **kw)
        self.items.append((name, p))
        return p

    def sigstop(self, pid):
        os.kill(pid, signal.SIGSTOP)
        self.stopped.add(pid)

    def sigcont(self, pid):
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        self.stopped.discard(pid)

    def stop(self, p, grace=STOP_GRACE_S):
        if p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log(f"pid {p.pid} did not exit after SIGKILL")

    def stop_all(self):
        for pid in list(self.stopped):
            self.sigcont(pid)
        live = [(n, p) for n, p in reversed(self.items) if p.poll() is None]
        for _, p in live:
            p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        deadline = t0 + STOP_GRACE_S
        for name, p in live:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
                if time.monotonic() - t0 > 5:
                    log(f"{name} (pid {p.pid}) took {time.monotonic() - t0:.1f} s to stop")
            except subprocess.TimeoutExpired:
                log(f"{name} (pid {p.pid}) still running {STOP_GRACE_S} s after SIGTERM: SIGKILL")
                p.kill()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    log(f"{name} (pid {p.pid}) did not exit after SIGKILL")
        # dev up stops its nodes itself; if it could not (killed), do not leave them behind.
        for pid, name in self.foreign.items():
            if pid_is(pid, "triremed"):
                log(f"{name} (pid {pid}) outlived dev up: SIGKILL")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def pid_is(pid, needle):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return needle.encode() in f.read()
    except OSError:
        return False


def sigterm_to_interrupt():
    """SIGTERM behaves like Ctrl-C, so `finally` blocks clean up either way."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def ignore_interrupts():
    """During cleanup: a second Ctrl-C must not abandon half-stopped processes (cleanup is bounded)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def run_main(main):
    """Runs a benchmark's main() as the script: its return value is the exit status, and Ctrl-C
    (or SIGTERM, see sigterm_to_interrupt) exits 130 once main's cleanup has stopped everything."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything this script started has been stopped")
        sys.exit(130)


def apt_install(tools):
    """tools: [(command, package)]; installs the packages whose command is missing."""
    missing = sorted({pkg for tool, pkg in tools if shutil.which(tool) is None})
    if not missing:
        return
    log(f"== installing {' '.join(missing)}")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(sudo + ["apt-get", "update", "-q"], check=True, timeout=900, env=env)
    subprocess.run(sudo + ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                   check=True, timeout=1800, env=env)


def build(skip):
    if skip:
        for b in ("trireme", "triremed"):
            if not os.access(os.path.join(ROOT, "target/release", b), os.X_OK):
                raise SystemExit(f"--skip-build: target/release/{b} does not exist")
        return
    log("== cargo build --release --locked -p triremed -p trireme-cli")
    p = subprocess.run(["cargo", "build", "--release", "--locked", "-p", "triremed", "-p", "trireme-cli"],
                       cwd=ROOT, timeout=BUILD_TIMEOUT_S)
    if p.returncode != 0:
        raise SystemExit(f"cargo build --release failed ({p.returncode}); see above")


def write_json(path, doc):
    """Writes a run's results where later runs can be compared with it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)


def git_info():
    def git(*args):
        try:
            p = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
            return p.stdout.strip() if p.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def host_info():
    return {"hostname": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count()}


def port_free(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host, port, deadline_s=30, proc=None):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"process for {host}:{port} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(POLL_S)
    raise SystemExit(f"nothing listens on {host}:{port} after {deadline_s}s")


def tail(path, lines=20):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(cannot read {path})"


def show_logs(base):
    """After a failure: the end of every log under base, so the cause is visible before cleanup."""
    for dirpath, _, files in sorted(os.walk(base)):
        for name in sorted(files):
            if name.endswith(".log") and "_lat." not in name and "_clat." not in name and "_slat." not in name:
                path = os.path.join(dirpath, name)
                log(f"--- last lines of {path}:\n{tail(path, 15)}")


# ---------------------------------------------------------------- trireme


def dev_up(procs, data_dir, base_port, nodes, volume_size):
    """Starts `trireme dev up`; returns its JSON line (dict). Its stderr goes to data_dir/../dev-up.log."""
    ports = [base_port + off + i for i in range(1, nodes + 1) for off in (0, 200, 300, 3700)]
    busy = [p for p in ports if not port_free(p)]
    if busy:
        raise SystemExit(f"ports {busy} are in use; pick another --base-port")
    shutil.rmtree(data_dir, ignore_errors=True)
    os.makedirs(data_dir)
    err_path = os.path.join(os.path.dirname(data_dir), "dev-up.log")
    err = open(err_path, "w")
    dev = procs.start("trireme dev up",
                      [CLI, "dev", "up", "--data-dir", data_dir, "--base-port", str(base_port),
                       "--volume-size", volume_size, "--nodes", str(nodes)],
                      stdout=subprocess.PIPE, stderr=err)
    err.close()
    buf = b""
    deadline = time.monotonic() + READY_DEADLINE_S
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SystemExit(f"trireme dev up not ready after {READY_DEADLINE_S} s:\n{tail(err_path)}")
        ready, _, _ = select.select([dev.stdout], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(dev.stdout.fileno(), 65536)
            if not chunk:
                dev.wait(timeout=30)
                raise SystemExit(f"trireme dev up exited ({dev.returncode}) before it was ready:\n"
                                 f"{tail(err_path)}")
            buf += chunk
    info = json.loads(buf.split(b"\n", 1)[0])
    for n in info["nodes"]:
        procs.foreign[n["pid"]] = f"node {n['id']}"
    return dev, info


def cli(admin, *args, check=True, timeout=CLI_TIMEOUT_S):
    """Runs `trireme --admin ADMIN --output json ARGS`; returns the parsed JSON (None on failure
    if not check)."""
    p = subprocess.run([CLI, "--admin", admin, "--output", "json", *args], capture_output=True,
                       text=True, timeout=timeout)
    if p.returncode != 0:
        if check:
            raise SystemExit(f"trireme {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
        return None
    return json.loads(p.stdout) if p.stdout.strip() else {}


def volume_info(admin, name="vol0"):
    try:
        return cli(admin, "volume", "info", name, check=False)
    except subprocess.TimeoutExpired:
        return None


def poll(what, deadline_s, fn, interval=POLL_S):
    """Calls fn() until it returns something truthy; fails after deadline_s."""
    end = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < end:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise SystemExit(f"timed out after {deadline_s} s waiting for {what}")


def attach(admin, node, deadline_s=60, name="vol0"):
    cli(admin, "volume", "attach", name, "--node", str(node), timeout=60)

    def led():
        v = volume_info(admin, name)
        return v if v and v.get("leader") == node else None

    return poll(f"{name}'s leadership to move to node {node}", deadline_s, led)


def all_caught_up(v):
    return bool(v) and v.get("leader", 0) != 0 and all(
        r["lag_entries"] == 0 and r["state"] == "healthy" for r in v["replicas"])


# ---------------------------------------------------------------- fio


def fio_cmd(uri, args, runtime_s, size, ramp=True, extra=()):
    return ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--size={size}", "--time_based",
            f"--runtime={runtime_s}", *(["--ramp_time=1"] if ramp else []), "--norandommap",
            "--randrepeat=0", "--output-format=json", *args, *extra]


def parse_fio(stdout, stderr, returncode, what):
    # The nbd engine prints "fio: connected to NBD server" on stdout before the JSON.
    start = stdout.find("{")
    if returncode != 0 or start < 0:
        raise SystemExit(f"fio failed ({returncode}) for {what}: {stderr[-2000:]}")
    job = json.loads(stdout[start:])["jobs"][0]
    if job["error"] != 0:
        raise SystemExit(f"fio job reported error {job['error']} for {what}: {stderr[-2000:]}")
    return job


def run_fio(uri, args, runtime_s, size, what, extra=()):
    p = subprocess.run(fio_cmd(uri, args, runtime_s, size, extra=extra), capture_output=True,
                       text=True, timeout=runtime_s + 120)
    return parse_fio(p.stdout, p.stderr, p.returncode, what)


def disk_probe(directory, seconds):
    """The disk's own write rate, next to the images: 1M sequential writes from three jobs (as
    three replicas write). O_DIRECT at iodepth 8, and buffered with an fdatasync every 32 MiB (as
    the log and the destage write), both over 256 MiB files they keep overwriting; and the
    buffered kind again as first writes into sparse 2 GiB files (fallocate off), as an image's
    first pass is. Run at the start and at the end: this shared disk drifts during a run, and W4
    on three replicas is bound by it."""
    path = os.path.join(directory, "disk-probe")
    os.makedirs(path, exist_ok=True)
    buffered = ["--ioengine=psync", "--fdatasync=32"]
    out = {}
    try:
        for name, size, args in (("direct_mib_s", "256M", ["--direct=1", "--ioengine=io_uring", "--iodepth=8"]),
                                 ("buffered_fdatasync_mib_s", "256M", buffered),
                                 ("sparse_first_write_mib_s", "2G", [*buffered, "--fallocate=none"])):
            p = subprocess.run(["fio", "--name=probe", f"--directory={path}", "--rw=write", "--bs=1M",
                                f"--size={size}", "--numjobs=3", "--time_based", f"--runtime={seconds}",
                                "--group_reporting", "--output-format=json", *args], capture_output=True,
                               text=True, timeout=seconds + 120)
            job = parse_fio(p.stdout, p.stderr, p.returncode, f"the disk probe ({name})")
            out[name] = job["write"]["bw_bytes"] / MIB
            for f in os.listdir(path):
                os.remove(os.path.join(path, f))
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return out


def side(d):
    return {
        "iops": d["iops"],
        "mib_s": d["bw_bytes"] / MIB,
        "mean_us": d["lat_ns"]["mean"] / 1000,
        "p99_us": d["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000,
    }


def summarize(job, kind):
    if kind != "mixed":
        return side(job[kind])
    r, w = side(job["read"]), side(job["write"])
    # Headline figures are the sum of both directions; latency is kept per direction.
    return {"iops": r["iops"] + w["iops"], "mib_s": r["mib_s"] + w["mib_s"], "read": r, "write": w}


def raw_fio(job):
    keep = {k: job[k] for k in ("error", "job_runtime", "usr_cpu", "sys_cpu", "ctx") if k in job}
    for d in ("read", "write", "sync"):
        if d in job and job[d].get("total_ios", 0):
            keep[d] = job[d]
    return keep


def fmt_lat(m, key):
    if "read" in m:
        return f"r {m['read'][key]:,.0f} / w {m['write'][key]:,.0f}"
    return f"{m[key]:,.0f}"


# ---------------------------------------------------------------- phases


def fio_table(targets, runtime, size, leader_of=None):
    """`leader_of`: target -> a function giving its volume's leader now, checked after each job.
    Reads and writes through node 1 are served there only while node 1 leads; if leadership
    moved during a job (an election under load), its requests were forwarded and its figure is
    not comparable: the row says so."""
    leader_of = leader_of or {}
    results = []
    for wid, desc, args, kind in WORKLOADS:
        row = {"workload": wid, "description": desc, "fio_args": args, "kind": kind, "targets": {}}
        for target in TARGETS:
            # Every job starts with the disk idle: without this, the page cache that nbdkit's W2
            # leaves dirty (up to the whole region, in 4k pieces) is written back during the
            # next jobs, and the W4 that follows measured 204 MiB/s against 327 on a quiet disk.
            started = time.monotonic()
            os.sync()
            log(f"== {wid} {desc}: {target} (after sync: {time.monotonic() - started:.1f} s)")
            job = run_fio(targets[target], args, runtime, size, f"{wid} on {target}")
            row["targets"][target] = {**summarize(job, kind), "raw": raw_fio(job)}
            if target in leader_of:
                leader = leader_of[target]()
                row["targets"][target]["leader_after"] = leader
                if leader != 1:
                    log(f"!! {wid} on {target}: the volume's leader is node {leader} after the job, "
                        "not node 1 where fio connects: requests were forwarded")
        best = max(BASELINES, key=lambda t: row["targets"][t]["iops"])
        row["best_baseline"] = best
        row["ratio_iops"] = row["targets"]["triremed"]["iops"] / max(row["targets"][best]["iops"], 1e-9)
        row["ratio_iops_receipt"] = (row["targets"]["triremed-receipt"]["iops"]
                                     / max(row["targets"][best]["iops"], 1e-9))
        results.append(row)
    return results


def read_completion_times(path):
    times = []
    with open(path) as f:
        for line in f:
            head = line.split(",", 1)[0].strip()
            if head:
                times.append(int(head))
    times.sort()
    return times


def restart_node(procs, node, pids):
    with open(node["log"], "a") as f:
        f.write(f"==== fio_compare.py: restarting {' '.join(node['argv'])}\n")
    out = open(node["log"], "a")
    p = procs.start(f"node {node['id']} (restarted)", node["argv"], stdout=out, stderr=subprocess.STDOUT)
    out.close()
    pids[node["id"]] = p.pid
    return p


def failover_phase(procs, info, pids, base, seconds, size, volume_size):
    """vol0 is attached to node 1, and a session on any other node may not write to an attached
    volume, so this phase uses its own, never-attached volume: writes through a non-leader node
    are forwarded to the leader, and that node retries them across the leader change."""
    nodes = {n["id"]: n for n in info["nodes"]}
    admin1 = nodes[1]["admin"]
    vol = "failover"
    cli(admin1, "volume", "create", vol, "--size", volume_size, "--replicas", "3", timeout=60)
    v = poll(f"volume {vol} to have a leader and 3 healthy replicas", 60,
             lambda: (lambda v: v if all_caught_up(v) else None)(volume_info(admin1, vol)), 0.1)
    leader = v["leader"]
    via = 2 if leader != 2 else 3
    uri = f"nbd://{nodes[via]['nbd']}/{vol}"
    prefix = os.path.join(base, "failover")
    cmd = fio_cmd(uri, W2_ARGS, seconds, size, ramp=False,
                  extra=[f"--write_lat_log={prefix}", "--log_avg_msec=0"])
    log(f"== failover: W2 on volume {vol} through node {via} for {seconds} s, "
        f"SIGKILL node {leader} (its leader) at ~{seconds / 3:.1f} s")
    out_path, err_path = prefix + ".fio.json", prefix + ".fio.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        fio = procs.start("fio (failover)", cmd, stdout=out, stderr=err)
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds / 3:
        if fio.poll() is not None:
            raise SystemExit(f"fio exited early ({fio.returncode}): {tail(err_path)}")
        time.sleep(POLL_S)
    os.kill(pids[leader], signal.SIGKILL)
    kill_at = time.monotonic() - t0
    procs.foreign.pop(pids[leader], None)
    try:
        fio.wait(timeout=seconds + 120)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"fio did not finish within {seconds + 120} s of starting the failover run")
    with open(out_path) as f:
        job = parse_fio(f.read(), tail(err_path), fio.returncode, "the failover run")
    times = read_completion_times(prefix + "_lat.1.log")
    if len(times) < 2:
        raise SystemExit("the failover run logged fewer than 2 completions")
    gap, at = max((b - a, a) for a, b in zip(times, times[1:]))
    new_leader = (volume_info(nodes[via]["admin"], vol) or {}).get("leader")

    log(f"== failover: restarting node {leader} from its argv, waiting for every replica to reach lag 0")
    t1 = time.monotonic()
    restart_node(procs, nodes[leader], pids)
    for name in (vol, info["volume"]):
        poll(f"every replica of {name} to catch up after node {leader}'s restart", 180,
             lambda: (lambda v: v if all_caught_up(v) else None)(volume_info(nodes[via]["admin"], name)), 0.2)
    rejoin_s = time.monotonic() - t1
    return {
        "volume": vol,
        "endpoint": uri,
        "via_node": via,
        "workload": "W2 " + " ".join(W2_ARGS),
        "runtime_s": seconds,
        "killed_node": leader,
        "kill_at_s": kill_at,
        "pause_ms": gap,
        "pause_from_ms": at,
        "pause_to_ms": at + gap,
        "completions": len(times),
        "fio_error": job["error"],
        "write": side(job["write"]),
        "max_lat_ms": job["write"]["lat_ns"]["max"] / 1e6,
        "new_leader": new_leader,
        "rejoin_s": rejoin_s,
        "raw": raw_fio(job),
    }


def resync_phase(procs, info, pids, seconds, size):
    n1 = info["nodes"][0]
    admin = n1["admin"]
    log("== resync: attach vol0 to node 1")
    v = attach(admin, 1)
    followers = [r["node_id"] for r in v["replicas"] if r["node_id"] != v["leader"]]
    victim = max(followers)
    pid = pids[victim]
    uri = f"nbd://{n1['nbd']}/{info['volume']}"
    log(f"== resync: SIGSTOP node {victim}, W4 (1M seq write QD8) through node 1 for {seconds} s")
    procs.sigstop(pid)
    # No ramp: every byte fio writes is one the stopped follower misses.
    p = subprocess.run(fio_cmd(uri, W4_ARGS, seconds, size, ramp=False), capture_output=True, text=True,
                       timeout=seconds + 120)
    job = parse_fio(p.stdout, p.stderr, p.returncode, "the resync run")
    # Writes have stopped: the lag is now a fixed amount.
    v = volume_info(admin)
    rep = next((r for r in (v or {}).get("replicas", []) if r["node_id"] == victim), None)
    if rep is None:
        raise SystemExit("no volume info from the leader before SIGCONT")
    lag_bytes, lag_entries, state_before = rep["lag_bytes"], rep["lag_entries"], rep["state"]
    procs.sigcont(pid)
    t0 = time.monotonic()
    states = {state_before}
    samples = 0
    deadline = 120
    while True:
        elapsed = time.monotonic() - t0
        if elapsed > deadline:
            raise SystemExit(f"node {victim} did not catch up within {deadline} s of SIGCONT")
        v = volume_info(admin)
        samples += 1
        r = next((r for r in (v or {}).get("replicas", []) if r["node_id"] == victim), None)
        if r is not None:
            states.add(r["state"])
            if r["lag_entries"] == 0 and r["state"] == "healthy":
                break
        time.sleep(POLL_S)
    catch_up_s = time.monotonic() - t0
    path = "snapshot" if "snapshot" in states else "log"
    written = job["write"]["io_bytes"]
    return {
        "stopped_node": victim,
        "leader": 1,
        "workload": "W4 " + " ".join(W4_ARGS),
        "write_s": seconds,
        "written_bytes": written,
        "write_mib_s": job["write"]["bw_bytes"] / MIB,
        "lag_bytes": lag_bytes,
        "lag_entries": lag_entries,
        "state_at_sigcont": state_before,
        "states_seen": sorted(states),
        "path": path,
        "catch_up_s": catch_up_s,
        "catch_up_mib_s": lag_bytes / MIB / catch_up_s if catch_up_s > 0 else None,
        "polls": samples,
        "writes_during_catch_up": False,
        "raw": raw_fio(job),
    }


# ---------------------------------------------------------------- main


def print_report(doc):
    print(f"\nfio --ioengine=nbd, {doc['runtime_s']} s per job (+1 s ramp), {doc['nodes']}-node cluster, "
          f"{doc['fio_size']} region, data in {doc['dir']}\n")
    print("| workload | target | IOPS | MiB/s | mean lat (us) | p99 clat (us) | triremed / best baseline |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in doc["results"]:
        for target in TARGETS:
            m = r["targets"][target]
            ratio = {"triremed": f"{r['ratio_iops']:.2f}x vs {r['best_baseline']}",
                     "triremed-receipt": f"{r.get('ratio_iops_receipt', 0):.2f}x vs {r['best_baseline']}"
                     }.get(target, "")
            if m.get("leader_after", 1) != 1:
                ratio += f" (leader moved to node {m['leader_after']})"
            print(f"| {r['workload']} {r['description']} | {target} | {m['iops']:,.0f} | {m['mib_s']:,.1f} | "
                  f"{fmt_lat(m, 'mean_us')} | {fmt_lat(m, 'p99_us')} | {ratio} |")
    print("\nW5: IOPS and MiB/s are reads + writes; latency shows reads / writes.")
    d = doc.get("disk_probe", {})
    for when in ("start", "end"):
        if when in d:
            print(f"disk ({when} of the run): 1M sequential writes from 3 jobs: O_DIRECT "
                  f"{d[when]['direct_mib_s']:,.0f} MiB/s; buffered with fdatasync every 32 MiB "
                  f"{d[when]['buffered_fdatasync_mib_s']:,.0f} MiB/s over written blocks, "
                  f"{d[when]['sparse_first_write_mib_s']:,.0f} MiB/s into a sparse file")
    f = doc.get("failover")
    if f:
        print(f"\nfailover: longest completion gap {f['pause_ms']} ms (fio clock {f['pause_from_ms']}-"
              f"{f['pause_to_ms']} ms; leader node {f['killed_node']} SIGKILLed at ~{f['kill_at_s'] * 1000:.0f} ms), "
              f"W2 on volume {f['volume']} via node {f['via_node']}, {f['write']['iops']:,.0f} IOPS over "
              f"{f['runtime_s']} s, max latency {f['max_lat_ms']:,.0f} ms, fio error {f['fio_error']}, new leader "
              f"node {f['new_leader']}; node {f['killed_node']} restarted, all replicas at lag 0 after "
              f"{f['rejoin_s']:.1f} s")
    s = doc.get("resync")
    if s:
        rate = f"{s['catch_up_mib_s']:,.1f} MiB/s" if s["catch_up_mib_s"] is not None else "n/a"
        print(f"resync: node {s['stopped_node']} SIGSTOPped during {s['write_s']} s of W4 "
              f"({s['written_bytes'] / MIB:,.0f} MiB written at {s['write_mib_s']:,.1f} MiB/s; writes stop at "
              f"SIGCONT); lag at SIGCONT {s['lag_bytes'] / MIB:,.1f} MiB / {s['lag_entries']} entries "
              f"(state {s['state_at_sigcont']}); caught up in {s['catch_up_s']:.2f} s = {rate} via {s['path']} "
              f"(states seen: {', '.join(s['states_seen'])})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--runtime-s", type=int, default=10, help="seconds per fio job (default 10)")
    ap.add_argument("--nodes", type=int, default=3, help="dev cluster size (vol0 gets min(nodes, 3) replicas)")
    ap.add_argument("--dir", default=None, help="where images live (default: a temp dir under the repo's target/)")
    ap.add_argument("--json", default=None,
                    help="results file (default bench-results/fio_compare.json, or fio_compare-quick.json with --quick)")
    ap.add_argument("--base-port", type=int, default=27000, help="dev up's port base (default 27000)")
    ap.add_argument("--failover-s", type=int, default=None, help="failover run length (default 20, quick 8)")
    ap.add_argument("--resync-s", type=int, default=None, help="writes while a follower is stopped (default 30, quick 5)")
    ap.add_argument("--quick", action="store_true", help="2 s per workload, short failover/resync, 256 MiB volume (CI)")
    ap.add_argument("--skip-build", action="store_true", help="use the existing target/release binaries")
    a = ap.parse_args()
    if a.json is None:
        a.json = os.path.join(ROOT, "bench-results", "fio_compare" + ("-quick" if a.quick else "") + ".json")
    if a.nodes < 3:
        raise SystemExit("--nodes must be at least 3 (the failover and resync phases need followers)")
    runtime = 2 if a.quick else a.runtime_s
    failover_s = a.failover_s or (8 if a.quick else 20)
    resync_s = a.resync_s or (5 if a.quick else 30)
    probe_s = 1 if a.quick else 3
    volume_size = "256MiB" if a.quick else "1GiB"
    volume_bytes = (256 if a.quick else 1024) * MIB
    size = "256m"
    started = time.monotonic()
    sigterm_to_interrupt()

    apt_install([("fio", "fio"), ("nbdkit", "nbdkit"), ("qemu-nbd", "qemu-utils")])
    build(a.skip_build)
    base = a.dir or tempfile.mkdtemp(prefix="bench-", dir=os.path.join(ROOT, "target"))
    os.makedirs(base, exist_ok=True)
    procs = Procs()
    doc = {
        "script": "benches/fio_compare.py", "quick": a.quick, "timestamp": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds"), "time": time.time(), "git": git_info(),
        "host": host_info(), "fio_version": subprocess.run(["fio", "--version"], capture_output=True, text=True,
                                                           timeout=30).stdout.strip(),
        "runtime_s": runtime, "ramp_s": 1, "nodes": a.nodes, "volume_size": volume_size, "fio_size": size,
        "dir": base,
    }
    try:
        dev, info = dev_up(procs, os.path.join(base, "trireme"), a.base_port, a.nodes, volume_size)
        pids = {n["id"]: n["pid"] for n in info["nodes"]}
        # Leadership follows the consumer: attach vol0 where fio connects (node 1), so its reads
        # are local and its writes need no forwarding.
        attach(info["nodes"][0]["admin"], 1)

        targets = {"triremed": info["nbd_uri"]}
        # The same cluster serves vol1 in quorum-receipt mode (acknowledged once a quorum holds
        # a write; FLUSH waits for quorum fdatasync), also led from node 1.
        admin = info["nodes"][0]["admin"]
        cli(admin, "volume", "create", "vol1", "--size", volume_size, "--durability", "quorum-receipt")
        poll("vol1 to have a leader", 60, lambda: (volume_info(admin, "vol1") or {}).get("leader"))
        attach(admin, 1, name="vol1")
        targets["triremed-receipt"] = info["nbd_uri"].rsplit("/", 1)[0] + "/vol1"
        raw = os.path.join(base, "nbdkit.raw")
        with open(raw, "wb") as f:
            f.truncate(volume_bytes)
        port = free_port()
        nk = procs.start("nbdkit", ["nbdkit", "--foreground", "--exit-with-parent", "-p", str(port),
                                    "-i", "127.0.0.1", "file", raw], stdout=subprocess.DEVNULL,
                         stderr=open(os.path.join(base, "nbdkit.log"), "w"))
        wait_port("127.0.0.1", port, proc=nk)
        targets["nbdkit-file"] = f"nbd://127.0.0.1:{port}/"

        raw = os.path.join(base, "qemu-nbd.raw")
        with open(raw, "wb") as f:
            f.truncate(volume_bytes)
        port = free_port()
        qn = procs.start("qemu-nbd", ["qemu-nbd", "--cache=none", "--aio=io_uring", "-f", "raw", "-t", "-x", "",
                                      "-b", "127.0.0.1", "-p", str(port), raw], stdout=subprocess.DEVNULL,
                         stderr=open(os.path.join(base, "qemu-nbd.log"), "w"))
        wait_port("127.0.0.1", port, proc=qn)
        targets["qemu-nbd"] = f"nbd://127.0.0.1:{port}/"
        doc["targets"] = {
            "triremed": f"trireme dev up --nodes {a.nodes}, vol0 ({volume_size}, 3 replicas) attached to node 1",
            "triremed-receipt": f"the same cluster, vol1 ({volume_size}, 3 replicas, --durability quorum-receipt) "
                                "attached to node 1",
            "nbdkit-file": "nbdkit file (page cache)",
            "qemu-nbd": "qemu-nbd --cache=none --aio=io_uring -f raw",
        }

        log("== disk probe (start)")
        doc["disk_probe"] = {"start": disk_probe(base, probe_s)}
        doc["results"] = fio_table(targets, runtime, size, leader_of={
            "triremed": lambda: (volume_info(admin, "vol0") or {}).get("leader"),
            "triremed-receipt": lambda: (volume_info(admin, "vol1") or {}).get("leader"),
        })
        procs.stop(nk)
        procs.stop(qn)
        doc["failover"] = failover_phase(procs, info, pids, base, failover_s, size, volume_size)
        doc["resync"] = resync_phase(procs, info, pids, resync_s, size)
        if dev.poll() is not None:
            raise SystemExit(f"trireme dev up exited ({dev.returncode}) during the run")
        log("== disk probe (end)")
        doc["disk_probe"]["end"] = disk_probe(base, probe_s)
        doc["elapsed_s"] = time.monotonic() - started
        print_report(doc)
        write_json(a.json, doc)
        print(f"\nresults written to {a.json} ({doc['elapsed_s']:.0f} s in all)")
    except (SystemExit, Exception):
        show_logs(base)
        raise
    finally:
        ignore_interrupts()
        procs.stop_all()
        if a.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
