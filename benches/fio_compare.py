#!/usr/bin/env python3
"""fio (nbd engine) against triremed and against `nbdkit file`, in one run, on one disk.

Usage: python3 benches/fio_compare.py [--nodes 3] [--runtime-s 10] [--dir DIR] [--json OUT] [--quick]

Builds release binaries, starts a dev cluster (3 nodes: vol0 has 3 replicas, all on this
machine's disk) and an nbdkit file server on a raw file in the same directory, runs each
workload against both, and prints IOPS, MiB/s, mean and p99 latency, and Trireme's ratio to
the baseline. A job whose fio JSON reports a non-zero `error` fails the run instead of printing
a figure. This is a benchmark, not a test: nothing here asserts a speed.

Workloads (fio 3.33's nbd engine rejects --fdatasync, so W1 uses --fsync=1, which sends an
NBD FLUSH after every write):
  W1  4k randwrite, iodepth 1, --fsync=1   (durable QD1 latency)
  W2  4k randwrite, iodepth 32
  W4  1M sequential write, iodepth 8 (also fills the region W3 reads)
  W3  4k randread, iodepth 32
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKLOADS = [
    ("W1 4k randwrite QD1 fsync=1", ["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"], "write"),
    ("W2 4k randwrite QD32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"], "write"),
    ("W4 1M seq write QD8", ["--rw=write", "--bs=1M", "--iodepth=8"], "write"),
    ("W3 4k randread QD32", ["--rw=randread", "--bs=4k", "--iodepth=32"], "read"),
]


def wait_port(host, port, deadline_s=30):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {host}:{port} after {deadline_s}s")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fio(uri, args, runtime_s, size, direction):
    cmd = [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--size={size}",
        "--time_based", f"--runtime={runtime_s}", "--ramp_time=1", "--norandommap",
        "--randrepeat=0", "--output-format=json", *args,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime_s + 120)
    out = p.stdout
    # The nbd engine prints "fio: connected to NBD server" on stdout before the JSON.
    start = out.find("{")
    if p.returncode != 0 or start < 0:
        raise SystemExit(f"fio failed ({p.returncode}): {p.stderr[-2000:]}")
    job = json.loads(out[start:])["jobs"][0]
    if job["error"] != 0:
        raise SystemExit(f"fio job reported error {job['error']} for {uri} {args}")
    w = job[direction]
    return {
        "iops": w["iops"],
        "mib_s": w["bw_bytes"] / (1 << 20),
        "mean_us": w["lat_ns"]["mean"] / 1000,
        "p99_us": w["clat_ns"]["percentile"].get("99.000000", 0) / 1000,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime-s", type=int, default=10)
    ap.add_argument("--nodes", type=int, default=3, help="dev cluster size (vol0 gets min(nodes, 3) replicas)")
    ap.add_argument("--dir", default=None, help="where images live (default: a temp dir under the repo's target/)")
    ap.add_argument("--json", default=os.path.join(ROOT, "bench-results", "fio_compare.json"))
    ap.add_argument("--quick", action="store_true", help="2 s per workload, for CI")
    a = ap.parse_args()
    runtime = 2 if a.quick else a.runtime_s
    size = "256m"

    missing = [pkg for tool, pkg in (("fio", "fio"), ("nbdkit", "nbdkit")) if shutil.which(tool) is None]
    if missing:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run(sudo + ["apt-get", "update", "-q"], check=True)
        subprocess.run(sudo + ["apt-get", "install", "-y", "-q", *missing], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    subprocess.run(["cargo", "build", "--release", "--bins", "--locked"], cwd=ROOT, check=True)
    base = a.dir or tempfile.mkdtemp(prefix="bench-", dir=os.path.join(ROOT, "target"))
    os.makedirs(base, exist_ok=True)
    procs = []
    try:
        dev_dir = os.path.join(base, "trireme")
        shutil.rmtree(dev_dir, ignore_errors=True)
        base_port = 27000
        dev = subprocess.Popen(
            [os.path.join(ROOT, "target/release/trireme"), "dev", "up", "--data-dir", dev_dir,
             "--base-port", str(base_port), "--volume-size", "1GiB", "--nodes", str(a.nodes)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(dev)
        line = dev.stdout.readline()
        if not line:
            raise SystemExit("trireme dev up exited before it was ready")
        info = json.loads(line)
        trireme_uri = info["nbd_uri"]
        # Leadership follows the consumer: attach vol0 where fio connects
        # (node 1), so its reads are local and its writes need no forwarding.
        admin = info["nodes"][0]["admin"]
        cli = os.path.join(ROOT, "target/release/trireme")
        subprocess.run([cli, "--admin", admin, "volume", "attach", "vol0", "--node", "1"], check=True,
                       stdout=subprocess.DEVNULL, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = subprocess.run([cli, "--admin", admin, "--output", "json", "volume", "info", "vol0"],
                                 capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and json.loads(out.stdout).get("leader") == 1:
                break
            time.sleep(0.1)
        else:
            raise SystemExit("vol0's leadership did not move to node 1 after attach")

        raw = os.path.join(base, "nbdkit.raw")
        with open(raw, "wb") as f:
            f.truncate(1 << 30)
        nbdkit_port = free_port()
        nk = subprocess.Popen(["nbdkit", "--foreground", "--exit-with-parent", "-p", str(nbdkit_port),
                               "-i", "127.0.0.1", "file", raw], stderr=subprocess.DEVNULL)
        procs.append(nk)
        wait_port("127.0.0.1", nbdkit_port)
        nbdkit_uri = f"nbd://127.0.0.1:{nbdkit_port}/"

        results = []
        for name, args, direction in WORKLOADS:
            row = {"workload": name}
            for target, uri in (("triremed", trireme_uri), ("nbdkit-file", nbdkit_uri)):
                row[target] = run_fio(uri, args, runtime, size, direction)
            row["ratio_iops"] = row["triremed"]["iops"] / max(row["nbdkit-file"]["iops"], 1e-9)
            results.append(row)

        print(f"\nfio --ioengine=nbd, {runtime} s per job, {a.nodes}-node cluster, data in {base}\n")
        print(f"| workload | target | IOPS | MiB/s | mean lat (us) | p99 lat (us) | triremed / nbdkit |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in results:
            for target in ("triremed", "nbdkit-file"):
                m = r[target]
                ratio = f"{r['ratio_iops']:.2f}x" if target == "triremed" else ""
                print(f"| {r['workload']} | {target} | {m['iops']:,.0f} | {m['mib_s']:.1f} | "
                      f"{m['mean_us']:.0f} | {m['p99_us']:.0f} | {ratio} |")
        os.makedirs(os.path.dirname(a.json), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"runtime_s": runtime, "time": time.time(), "results": results}, f, indent=2)
        print(f"\nresults written to {a.json}")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        if a.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
