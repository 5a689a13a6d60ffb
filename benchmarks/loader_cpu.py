"""Where one epoch of our loader spends CPU, per process: the rank, its forkserver, its loader workers,
and the S3 endpoint. The processes of ``benchmarks/loader.py``'s side-by-side run, measured with psutil.

    python benchmarks/loader_cpu.py                 # 0 and 2 workers, after benchmarks/loader.py wrote its data
    python benchmarks/loader_cpu.py --workers 2,2   # a run per entry

Each run is a fresh ``benchmarks/loader.py --one`` process (the clock starts after its imports). The
process tree is sampled every 50 ms; a process's CPU is its last sample, so the figures are lower bounds
by up to 50 ms each. "start" is when a process first appeared, from the rank process's start.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import loader as bench  # noqa: E402


def one_run(endpoint: str, workers: int) -> tuple[dict, list[tuple]]:
    """One epoch in a fresh process: its result, and (role, start s, user s, system s) per process."""
    spec = json.dumps({"loader": "ours", "url": "s3://bench/ours", "endpoint": endpoint, "batch": 32,
                       "workers": workers})
    child = subprocess.Popen([sys.executable, bench.__file__, "--one", spec], stdout=subprocess.PIPE, text=True)
    rank = psutil.Process(child.pid)
    seen: dict[int, list] = {}  # pid -> [command line, parent pid, first seen, last CPU times]
    while child.poll() is None:
        try:
            procs = [rank] + rank.children(recursive=True)
        except psutil.Error:
            break
        for proc in procs:
            try:
                entry = seen.setdefault(proc.pid, [" ".join(proc.cmdline()), proc.ppid(), time.time(), None])
                entry[3] = proc.cpu_times()
            except psutil.Error:
                pass
        time.sleep(0.05)
    result = json.loads([ln for ln in child.stdout.read().splitlines() if ln.startswith("{")][-1])
    servers = {pid for pid, e in seen.items() if e[1] == child.pid and "forkserver import main" in e[0]}
    rows = []
    for pid, (cmdline, parent, first_seen, cpu) in seen.items():
        if cpu is None or "resource_tracker" in cmdline:
            continue
        name = ("rank" if pid == child.pid else "forkserver" if pid in servers else
                "worker" if parent in servers else "other")
        rows.append((name, first_seen - seen[child.pid][2], cpu.user, cpu.system))
    return result, sorted(rows, key=lambda r: r[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/loader-bench/1000x64-256-116", help="benchmarks/loader.py's data")
    p.add_argument("--workers", default="0,2", help="one run per entry")
    args = p.parse_args()
    os.environ.update(bench.S3_ENV)
    server, endpoint = bench.start_s3(Path(args.work), ["ours"])
    try:
        served = psutil.Process(server.pid)
        print("| workers | first batch s | epoch s | process | start s | user s | system s |")
        print("|---|---|---|---|---|---|---|")
        for workers in (int(w) for w in args.workers.split(",")):
            before = served.cpu_times()
            result, rows = one_run(endpoint, workers)
            after = served.cpu_times()
            head = f"| {workers} | {result['first_batch_s']:.2f} | {result['epoch_s']:.2f} |"
            for name, start, user, system in rows:
                print(f"{head} {name} | {start:.2f} | {user:.2f} | {system:.2f} |")
                head = "| | | |"
            print(f"{head} S3 server | - | {after.user - before.user:.2f} | {after.system - before.system:.2f} |",
                  flush=True)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
