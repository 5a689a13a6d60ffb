"""What writing a node cache costs: 1 GB of record batches (8 MiB each, arriving as 64 MiB GETs in 256 KiB
pieces, as from S3) written to files in different ways, in this one process, system and user CPU apiece.

    python benchmarks/cache_writes.py               # each way 3 times, interleaved; under a minute
    python benchmarks/cache_writes.py --dir /dev/shm

- ``joined, one write``: each GET joined into one ``bytes`` (what s3fs's ``cat_file`` returns), each batch
  written with one ``write()`` of 8 MiB: the node cache before c736fed;
- ``joined, 256 KiB writes``: the same buffer, each batch in 256 KiB writes (``cache.write_in_pieces``);
- ``streamed``: each piece written to its batch's file as it arrives, CRC32 on the way, the file then
  memory-mapped (``cache.StagingSink``): no buffer of the GET;
- ``joined, no file``: the buffer alone, no cache (the loader without ``data.cache_dir``).

Every way then reads each batch once (as the loader copies its rows out), and the files are deleted after
each run. Page faults are printed too: each fresh 4 KiB page of a ``bytes`` is one.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataloaders.cache import BatchCache, write_in_pieces  # noqa: E402

MIB = 1 << 20
GET, BATCH, PIECE = 64 * MIB, 8 * MIB, 256 << 10


def pieces(piece: bytes):
    for _ in range(GET // PIECE):
        yield piece


def read_once(buffer, scratch: np.ndarray) -> None:
    scratch[:len(buffer)] = np.frombuffer(buffer, np.uint8)


def joined(directory: Path, gets: int, piece: bytes, scratch: np.ndarray, how: str) -> None:
    for g in range(gets):
        blob = b"".join(pieces(piece))
        for b in range(GET // BATCH):
            view = memoryview(blob)[b * BATCH:(b + 1) * BATCH]
            if how == "one write":
                with open(directory / f"{g}-{b}", "wb") as f:
                    f.write(view)
            elif how == "pieces":
                write_in_pieces(directory / f"{g}-{b}", view)
            read_once(view, scratch)


def streamed(directory: Path, gets: int, piece: bytes, scratch: np.ndarray) -> None:
    cache = BatchCache(str(directory), "f" * 16)
    for g in range(gets):
        sink = cache.stager([(g * 100 + b, b * BATCH, BATCH) for b in range(GET // BATCH)])
        sink.begin()
        for p in pieces(piece):
            sink.write(p)
        for staged in sink.finish().values():
            assert staged.crc32 == zlib.crc32(staged.buffer)
            read_once(staged.buffer, scratch)


WAYS = {
    "joined, one write": lambda d, n, p, s: joined(d, n, p, s, "one write"),
    "joined, 256 KiB writes": lambda d, n, p, s: joined(d, n, p, s, "pieces"),
    "streamed": streamed,
    "joined, no file": lambda d, n, p, s: joined(d, n, p, s, "none"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=1.0, help="data written per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the files go")
    args = p.parse_args()
    gets = max(1, round(args.gib * 1024 * MIB / GET))
    piece = os.urandom(PIECE)
    scratch = np.empty(BATCH, np.uint8)
    runs: dict[str, list[tuple[float, float, float, int]]] = {name: [] for name in WAYS}
    for _ in range(args.repeats):
        for name, way in WAYS.items():
            directory = Path(tempfile.mkdtemp(prefix="cache-writes-", dir=args.dir))
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            way(directory, gets, piece, scratch)
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            shutil.rmtree(directory)
            runs[name].append((t1 - t0, r1.ru_stime - r0.ru_stime, r1.ru_utime - r0.ru_utime,
                               r1.ru_minflt - r0.ru_minflt))
    print(f"{gets * GET / MIB:.0f} MiB in {gets} GETs of {GET // MIB} MiB, batches of {BATCH // MIB} MiB, "
          f"files under {args.dir}; medians of {args.repeats} (each run in brackets)\n")
    print("| way | wall s | system s | user s | page faults |")
    print("|---|---|---|---|---|")
    for name, rs in runs.items():
        cols = [f"{statistics.median(r[k] for r in rs):.2f} ({', '.join(f'{r[k]:.2f}' for r in rs)})"
                for k in range(3)]
        print(f"| {name} | {' | '.join(cols)} | {statistics.median(r[3] for r in rs):,.0f} |")


if __name__ == "__main__":
    main()
