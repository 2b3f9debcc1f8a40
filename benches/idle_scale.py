#!/usr/bin/env python3
"""Idle scale: what N idle volumes cost each node of a 3-node cluster.

Usage: python3 benches/idle_scale.py [--quick] [--volumes 1000] [--settle-s 10] [--window-s 30]
                                     [--json OUT] [--dir DIR] [--base-port P] [--check] [--skip-build]

Builds release binaries, starts `trireme dev up --nodes 3 --volume-size 64MiB` (which makes vol0),
creates volumes v0001.. until there are N (64 MiB, 3 replicas each, 4 `trireme volume create`
at a time), waits until `trireme volume list` shows N volumes that all have a leader, lets the
cluster settle, then measures each triremed over a window with no I/O: CPU (utime + stime from
/proc/PID/stat) as % of one core, and at the end VmRSS, threads and open fds.

Goals per node: CPU < 5% of one core and RSS < 1 GiB. The table says PASS or MISS; the exit status
is 0 either way unless something broke, or 1 on a miss with --check. Results also go to
bench-results/idle_scale.json (idle_scale-quick.json with --quick; --json to change).
--quick: 50 volumes, 3 s settle, 5 s window.
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True  # no benches/__pycache__ from the import below
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fio_compare import (CLI, ROOT, Procs, build, dev_up, git_info, host_info, ignore_interrupts, run_main, write_json,  # noqa: E402
                         log, show_logs, sigterm_to_interrupt)

NODES = 3
VOLUME_SIZE = "64MiB"
WORKERS = 4
CREATE_TIMEOUT_S = 120
CPU_GOAL_PCT = 5.0
RSS_GOAL_BYTES = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        # The command name may contain spaces or parentheses: fields start after the last ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) + int(fields[12])


def status_fields(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def create_volumes(admin, names):
    """Creates the volumes, WORKERS at a time; returns (seconds, per-create latencies)."""
    done = 0
    lock = threading.Lock()
    latencies = []
    started = time.monotonic()

    def create(name):
        nonlocal done
        t = time.monotonic()
        p = subprocess.run([CLI, "--admin", admin, "--output", "json", "volume", "create", name,
                            "--size", VOLUME_SIZE, "--replicas", "3"], capture_output=True, text=True,
                           timeout=CREATE_TIMEOUT_S)
        if p.returncode != 0:
            raise SystemExit(f"volume create {name} failed ({p.returncode}): {p.stderr.strip()}")
        with lock:
            latencies.append(time.monotonic() - t)
            done += 1
            if done % 100 == 0 or done == len(names):
                el = time.monotonic() - started
                log(f"   created {done}/{len(names)} in {el:.1f} s ({done / el:.1f}/s)")

    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        futures = [pool.submit(create, n) for n in names]
        try:
            for fut in concurrent.futures.as_completed(futures):
                fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return time.monotonic() - started, sorted(latencies)


def list_volumes(admin):
    try:
        p = subprocess.run([CLI, "--admin", admin, "--output", "json", "volume", "list"], capture_output=True,
                           text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    if p.returncode != 0:
        return None
    return json.loads(p.stdout)["volumes"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--volumes", type=int, default=None, help="total volumes, vol0 included (default 1000, quick 50)")
    ap.add_argument("--settle-s", type=float, default=None, help="wait before measuring (default 10, quick 3)")
    ap.add_argument("--window-s", type=float, default=None, help="CPU measurement window (default 30, quick 5)")
    ap.add_argument("--json", default=None,
                    help="results file (default bench-results/idle_scale.json, or idle_scale-quick.json with --quick)")
    ap.add_argument("--dir", default=None, help="cluster data dir (default: a temp dir under the repo's target/)")
    ap.add_argument("--base-port", type=int, default=28000, help="dev up's port base (default 28000)")
    ap.add_argument("--quick", action="store_true", help="50 volumes, 3 s settle, 5 s window (CI)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a node misses a goal")
    ap.add_argument("--skip-build", action="store_true", help="use the existing target/release binaries")
    a = ap.parse_args()
    if a.json is None:
        a.json = os.path.join(ROOT, "bench-results", "idle_scale" + ("-quick" if a.quick else "") + ".json")
    volumes = a.volumes or (50 if a.quick else 1000)
    settle = a.settle_s if a.settle_s is not None else (3 if a.quick else 10)
    window = a.window_s if a.window_s is not None else (5 if a.quick else 30)
    if volumes < 1 or window <= 0:
        raise SystemExit("--volumes must be at least 1 and --window-s positive")
    started = time.monotonic()
    sigterm_to_interrupt()

    build(a.skip_build)
    base = a.dir or tempfile.mkdtemp(prefix="idle-", dir=os.path.join(ROOT, "target"))
    os.makedirs(base, exist_ok=True)
    procs = Procs()
    doc = {
        "script": "benches/idle_scale.py", "quick": a.quick,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "time": time.time(), "git": git_info(), "host": host_info(), "nodes": NODES, "volumes": volumes,
        "volume_size": VOLUME_SIZE, "replicas": 3, "settle_s": settle, "window_s": window, "dir": base,
        "goals": {"cpu_pct_of_one_core": CPU_GOAL_PCT, "rss_bytes": RSS_GOAL_BYTES},
    }
    missed = False
    try:
        dev, info = dev_up(procs, os.path.join(base, "trireme"), a.base_port, NODES, VOLUME_SIZE)
        admin = info["nodes"][0]["admin"]
        pids = {n["id"]: n["pid"] for n in info["nodes"]}

        names = [f"v{i:04d}" for i in range(1, volumes)]
        log(f"== creating {len(names)} volumes ({VOLUME_SIZE}, 3 replicas, {WORKERS} at a time)")
        create_s, lat = create_volumes(admin, names) if names else (0.0, [])
        doc["create"] = {
            "count": len(names), "seconds": create_s, "per_s": len(names) / create_s if create_s else None,
            "workers": WORKERS,
            "latency_s": {"median": lat[len(lat) // 2], "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
                          "max": lat[-1]} if lat else None,
        }

        log(f"== waiting until volume list shows {volumes} volumes, each with a leader")
        t = time.monotonic()
        deadline = t + max(60, volumes * 0.2)
        while True:
            vols = list_volumes(admin)
            ready = [v for v in vols or [] if v.get("leader", 0) != 0]
            if vols is not None and len(vols) >= volumes and len(ready) == len(vols):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"after {deadline - t:.0f} s: {len(vols or [])} volumes listed, "
                                 f"{len(ready)} with a leader; expected {volumes}")
            time.sleep(0.5)
        doc["leaders_wait_s"] = time.monotonic() - t
        leaders = {}
        for v in vols:
            leaders[v["leader"]] = leaders.get(v["leader"], 0) + 1

        log(f"== settling {settle} s, then measuring for {window} s")
        time.sleep(settle)
        for nid, pid in pids.items():
            if not os.path.exists(f"/proc/{pid}"):
                raise SystemExit(f"node {nid} (pid {pid}) is gone")
        t0 = time.monotonic()
        before = {nid: cpu_ticks(pid) for nid, pid in pids.items()}
        time.sleep(window)
        after = {nid: cpu_ticks(pid) for nid, pid in pids.items()}
        wall = time.monotonic() - t0
        rows = []
        for nid, pid in pids.items():
            st = status_fields(pid)
            cpu = (after[nid] - before[nid]) / CLK_TCK / wall * 100
            rss = int(st["VmRSS"].split()[0]) * 1024
            row = {
                "node": nid, "pid": pid, "cpu_pct": cpu, "rss_bytes": rss, "threads": int(st["Threads"]),
                "fds": len(os.listdir(f"/proc/{pid}/fd")), "leader_of": leaders.get(nid, 0),
                "cpu_ok": cpu < CPU_GOAL_PCT, "rss_ok": rss < RSS_GOAL_BYTES,
            }
            missed |= not (row["cpu_ok"] and row["rss_ok"])
            rows.append(row)
        doc["measured_wall_s"] = wall
        doc["per_node"] = rows
        doc["pass"] = not missed
        if dev.poll() is not None:
            raise SystemExit(f"trireme dev up exited ({dev.returncode}) during the run")
        doc["elapsed_s"] = time.monotonic() - started

        c = doc["create"]
        print(f"\nidle scale: {volumes} volumes x 3 replicas ({VOLUME_SIZE}) on {NODES} nodes, no I/O; "
              f"{settle:g} s settle, {wall:.1f} s window")
        if names:
            print(f"created {c['count']} volumes in {c['seconds']:.1f} s ({c['per_s']:.1f}/s, {WORKERS} concurrent; "
                  f"per create median {c['latency_s']['median'] * 1000:.0f} ms, max {c['latency_s']['max'] * 1000:.0f} ms); "
                  f"all had leaders {doc['leaders_wait_s']:.1f} s later\n")
        print(f"| node | leader of | CPU (% of one core) | RSS (MiB) | threads | fds | CPU < {CPU_GOAL_PCT:g}% | RSS < 1 GiB |")
        print("|---|---:|---:|---:|---:|---:|---|---|")
        for r in rows:
            print(f"| {r['node']} | {r['leader_of']} | {r['cpu_pct']:.1f} | {r['rss_bytes'] / (1 << 20):,.0f} | "
                  f"{r['threads']} | {r['fds']} | {'PASS' if r['cpu_ok'] else 'MISS'} | "
                  f"{'PASS' if r['rss_ok'] else 'MISS'} |")
        print(f"\noverall: {'PASS' if not missed else 'MISS'}")
        write_json(a.json, doc)
        print(f"results written to {a.json} ({doc['elapsed_s']:.0f} s in all)")
    except (SystemExit, Exception):
        show_logs(base)
        raise
    finally:
        ignore_interrupts()
        procs.stop_all()
        if a.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    return 1 if (a.check and missed) else 0


if __name__ == "__main__":
    run_main(main)
