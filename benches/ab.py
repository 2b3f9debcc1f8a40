#!/usr/bin/env python3
"""A/B comparison of triremed builds: the same fio workloads on fresh 3-node clusters, interleaved.

Usage: python3 benches/ab.py --bin before=DIR --bin after=DIR[@KEY=VALUE,...] [--bin ...] [--rounds 3]
                             [--runtime-s 6] [--workloads W1,W2,W4] [--volume-size 1GiB]
                             [--base-port 27000] [--json OUT]

Each DIR holds a `trireme` and a `triremed` (for example a copy of target/release from each
commit); `@KEY=VALUE,...` after it sets environment variables for that build's nodes (for example
`@TOKIO_WORKER_THREADS=1`), so one build can be compared with itself under other settings. Every
round starts one fresh cluster per build (`trireme dev up --nodes 3`, vol0 with
three replicas attached to node 1), runs the chosen workloads of benches/fio_compare.py against
it, one after the other, and stops it. The builds take turns, in reverse order every other
round, so that drift of this machine's disk and CPU during the run falls on all of them alike.
The table gives every round's figure (IOPS; MiB/s for W4), the median per build, each
build's median over the first build's, and the median of its per-round ratios to the first build
(runs of one round are next to each other in time, so that ratio is the steadier one on a noisy
disk). Nothing is asserted: this is for deciding whether a
change is worth keeping, not a test. Results also go to bench-results/ab.json.
"""

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no benches/__pycache__ from the import below
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fio_compare  # noqa: E402
from fio_compare import (ROOT, WORKLOADS, Procs, attach, dev_up, git_info, host_info,  # noqa: E402
                         ignore_interrupts, log, run_fio, run_main, show_logs, sigterm_to_interrupt, summarize,
                         write_json)


def parse_bins(specs):
    bins = []
    for spec in specs:
        name, sep, rest = spec.partition("=")
        path, _, env_spec = rest.partition("@")
        if not sep or not name or not path:
            raise SystemExit(f"--bin {spec!r}: expected NAME=DIR[@KEY=VALUE,...]")
        env = {}
        for item in filter(None, env_spec.split(",")):
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise SystemExit(f"--bin {spec!r}: {item!r} is not KEY=VALUE")
            env[key] = value
        path = os.path.abspath(path)
        for exe in ("trireme", "triremed"):
            if not os.access(os.path.join(path, exe), os.X_OK):
                raise SystemExit(f"--bin {spec!r}: {os.path.join(path, exe)} is not an executable")
        if any(name == b[0] for b in bins):
            raise SystemExit(f"--bin {spec!r}: the name {name!r} is given twice")
        bins.append((name, path, env))
    if len(bins) < 2:
        raise SystemExit("give at least two --bin NAME=DIR to compare")
    return bins


def one_cluster(bin_dir, env, base, base_port, volume_size, workloads, runtime):
    """A fresh cluster of the build in bin_dir, its nodes started with `env` added; the
    workloads' figures, in order."""
    fio_compare.CLI = os.path.join(bin_dir, "trireme")
    procs = Procs()
    data = os.path.join(base, "trireme")
    saved = {k: os.environ.get(k) for k in env}
    try:
        os.environ.update(env)
        try:
            _, info = dev_up(procs, data, base_port, 3, volume_size)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        attach(info["nodes"][0]["admin"], 1)
        figures = {}
        for wid, desc, args, kind in workloads:
            os.sync()
            job = run_fio(info["nbd_uri"], args, runtime, "256m", f"{wid} on {bin_dir}")
            m = summarize(job, kind)
            figures[wid] = {"iops": m["iops"], "mib_s": m["mib_s"]}
            log(f"   {wid} {desc}: {m['iops']:,.0f} IOPS, {m['mib_s']:,.1f} MiB/s")
        return figures
    except (SystemExit, Exception):
        show_logs(base)
        raise
    finally:
        procs.stop_all()
        shutil.rmtree(data, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", action="append", default=[], metavar="NAME=DIR", help="a build to compare")
    ap.add_argument("--rounds", type=int, default=3, help="clusters per build (default 3)")
    ap.add_argument("--runtime-s", type=int, default=6, help="seconds per fio job (default 6)")
    ap.add_argument("--workloads", default="W1,W2,W4", help="which of W1..W5, run in this order (default W1,W2,W4)")
    ap.add_argument("--volume-size", default="1GiB", help="vol0's size (default 1GiB)")
    ap.add_argument("--base-port", type=int, default=27000, help="dev up's port base (default 27000)")
    ap.add_argument("--json", default=os.path.join(ROOT, "bench-results", "ab.json"), help="results file")
    a = ap.parse_args()
    bins = parse_bins(a.bin)
    if a.rounds < 1 or a.runtime_s < 1:
        raise SystemExit("--rounds and --runtime-s must be at least 1")
    by_id = {w[0]: w for w in WORKLOADS}
    wanted = [w.strip() for w in a.workloads.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in by_id]
    if unknown or not wanted:
        raise SystemExit(f"--workloads: unknown {unknown}; choose from {', '.join(by_id)}")
    workloads = [by_id[w] for w in wanted]
    sigterm_to_interrupt()
    base = tempfile.mkdtemp(prefix="ab-", dir=os.path.join(ROOT, "target"))
    results = {name: [] for name, _, _ in bins}
    started = time.monotonic()
    try:
        for r in range(a.rounds):
            order = bins if r % 2 == 0 else list(reversed(bins))
            for name, path, env in order:
                log(f"== round {r + 1}/{a.rounds}: {name}")
                results[name].append(one_cluster(path, env, base, a.base_port, a.volume_size, workloads,
                                                 a.runtime_s))
    finally:
        ignore_interrupts()
        shutil.rmtree(base, ignore_errors=True)

    first = bins[0][0]
    print(f"\n{a.rounds} rounds, {a.runtime_s} s per job, fresh 3-node cluster per build and round\n")
    print("| workload | build | rounds | median | vs " + first + " | paired |")
    print("|---|---|---|---:|---:|---:|")
    medians = {}
    for wid in wanted:
        key = "mib_s" if wid == "W4" else "iops"
        unit = "MiB/s" if key == "mib_s" else "IOPS"
        for name, _, _ in bins:
            values = [round(f[wid][key]) for f in results[name]]
            medians[(wid, name)] = statistics.median(values)
        for name, _, _ in bins:
            values = [f"{round(f[wid][key]):,}" for f in results[name]]
            ratio = medians[(wid, name)] / max(medians[(wid, first)], 1e-9)
            paired = statistics.median(f[wid][key] / max(b[wid][key], 1e-9)
                                       for f, b in zip(results[name], results[first]))
            print(f"| {wid} ({unit}) | {name} | {' / '.join(values)} | {medians[(wid, name)]:,.0f} | {ratio:.2f}x "
                  f"| {paired:.2f}x |")
    doc = {
        "script": "benches/ab.py",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_info(), "host": host_info(), "rounds": a.rounds, "runtime_s": a.runtime_s,
        "workloads": wanted, "volume_size": a.volume_size, "bins": {name: {"dir": path, "env": env} for name, path, env in bins}, "results": results,
        "elapsed_s": time.monotonic() - started,
    }
    write_json(a.json, doc)
    print(f"\nresults written to {a.json} ({doc['elapsed_s']:.0f} s in all)")


if __name__ == "__main__":
    run_main(main)
