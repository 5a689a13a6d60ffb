"""What the loader benchmark's S3 endpoint serves to a bare client, by GET size: the store's side of
``benchmarks/loader.py``.

    python benchmarks/s3_ranges.py      # after benchmarks/loader.py has written its data (--work)

Every shard of our format is read once with 8 threads, cut into 8, 4, 2 or 1 ranged GETs per shard (no
decoding), by s3fs and by pyarrow's C++ S3 client. Printed per row: MiB/s, and the CPU seconds the server
process and this client spent. moto reads the whole object for every ranged GET, so its cost grows with
the number of GETs, not with the bytes asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loader import S3_ENV, start_s3  # noqa: E402

MIB = 1 << 20


def ranges(shards: list[tuple[str, int]], parts: int) -> list[tuple[str, int, int]]:
    out = []
    for path, size in shards:
        step = -(-size // parts)
        out += [(path, start, min(size, start + step)) for start in range(0, size, step)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/loader-bench/1000x64-256-116", help="benchmarks/loader.py's data")
    p.add_argument("--threads", type=int, default=8)
    args = p.parse_args()
    os.environ.update(S3_ENV)
    work = Path(args.work)
    shards = [(s["path"], s["bytes"]) for s in json.loads((work / "ours" / "manifest.json").read_text())["shards"]]
    server, endpoint = start_s3(work, ["ours"])
    try:
        import pyarrow.fs as pafs
        import s3fs

        served, me = psutil.Process(server.pid), psutil.Process()
        print(f"{len(shards)} shards, {sum(s for _, s in shards) / MIB:.0f} MiB, {args.threads} threads\n")
        print("| client | GETs | MiB per GET | MiB/s | server CPU s | client CPU s |")
        print("|---|---|---|---|---|---|")
        for client in ("s3fs", "pyarrow"):
            for parts in (8, 4, 2, 1):
                todo = ranges(shards, parts)
                if client == "s3fs":
                    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)

                    def get(r, fs=fs):
                        return len(fs.cat_file(f"bench/ours/{r[0]}", start=r[1], end=r[2]))
                else:
                    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1")

                    def get(r, fs=fs):
                        with fs.open_input_file(f"bench/ours/{r[0]}") as f:
                            return len(f.read_at(r[2] - r[1], r[1]))
                s0, c0, t0 = served.cpu_times(), me.cpu_times(), time.perf_counter()
                with ThreadPoolExecutor(args.threads) as pool:
                    total = sum(pool.map(get, todo))
                wall = time.perf_counter() - t0
                s1, c1 = served.cpu_times(), me.cpu_times()
                print(f"| {client} | {len(todo)} | {total / len(todo) / MIB:.1f} | {total / wall / MIB:.0f} | "
                      f"{s1.user - s0.user + s1.system - s0.system:.2f} | "
                      f"{c1.user - c0.user + c1.system - c0.system:.2f} |", flush=True)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
