"""Streaming loaders side by side: one epoch from S3 for ours, litdata, mosaicml-streaming and plain pyarrow.

    /work/bench-venv/bin/python benchmarks/loader.py     # 1,000 samples of 0.94 MiB, 16 shards of ~64 MB
    python benchmarks/loader.py --smoke                  # seconds: tiny samples, ours and pyarrow only

The same synthetic SD3 256² samples (16x32x32 bf16 latent, 116x4096 bf16 text tokens, 2048 bf16 pooled:
0.94 MiB, the bytes of SD3's unpadded CLIP + T5-77 features) are written once as our Arrow shards, then
copied row for row, shard for shard (``--shard-rows`` samples each, ~64 MB), into litdata chunks
(``litdata.optimize``), MDS shards (mosaicml-streaming) and Parquet files (pyarrow). All four are uploaded
to one S3 endpoint: moto's server in its own process on 127.0.0.1, wrapped so that it counts the requests
and bytes it serves.

Every run is a fresh process that builds the dataset from its S3 URL and reads one epoch, shuffling on, in
batches of ``--batch``, the way a user comparing loaders would write it: each library's defaults apart from
the shuffle, the batch and the worker count (ours: ``DataConfig``'s defaults; with workers, a fresh node
cache directory, as litdata and mosaic get theirs). The clock starts after the imports, before the dataset is
opened (index and manifest reads count), and stops at the epoch's last batch. Each loader runs with 0 and 2
worker processes (``--workers``), pyarrow in one process as a floor. Runs are interleaved (repeat 1 of every
configuration, then repeat 2, ...) and the table gives medians over ``--repeats``.

Printed per configuration: samples/s over the epoch (first batch included), seconds to the first batch, GET
requests and MiB served by the S3 endpoint, and the shuffle mix: distinct shards per batch (full batches
only), each sample's shard taken from that format's own index. Then each target, met or not met.

litdata and mosaicml-streaming are not dependencies of this project; see docs/PERFORMANCE.md for the
install that keeps this environment's torch and numpy. Writes to --work (default /tmp/loader-bench).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"  # children, forkserver

MIB = 1 << 20
TENSORS = ("latent", "text_tokens", "text_pooled")
LOADERS = ("ours", "litdata", "mosaic", "pyarrow")
FORMAT = {"ours": "ours", "litdata": "litdata", "mosaic": "mds", "pyarrow": "parquet"}
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}
COUNTS_PATH = "/_served"  # the endpoint's request counter (not a bucket name: those cannot start with "_")


# --------------------------------------------------------------------------------------------------
# Data: one synthetic dataset, four formats, and each sample's shard in each
# --------------------------------------------------------------------------------------------------


def import_mosaic():
    # mosaicml-streaming's package __init__ imports its torchvision/transformers-based example datasets,
    # which are not used here (and torchvision is not installed): register empty modules in their place.
    for name in ("streaming.vision", "streaming.multimodal", "streaming.text"):
        sys.modules.setdefault(name, types.ModuleType(name))
    import streaming

    return streaming


def shard_tables(work: Path):
    """Our shards, in write order, as Arrow tables."""
    import pyarrow as pa

    from dataloaders.dataset import open_dataset

    manifest = open_dataset(str(work / "ours" / "manifest.json")).manifest
    for shard in manifest.shards:
        yield pa.ipc.open_file(pa.memory_map(str(work / "ours" / shard.path))).read_all()


def sample_arrays(table, r: int) -> dict:
    """Row ``r`` as the plain types the other formats store: bf16 tensors as their uint16 bits."""
    out = {"sample_id": int(table.column("sample_id")[r].as_py()), "caption": table.column("caption")[r].as_py()}
    for name in TENSORS:
        column = table.column(name)
        shape = json.loads(table.schema.field(name).metadata[b"flowscale"])["shape"]
        out[name] = column.chunk(0)[r].values.to_numpy().reshape(shape) if column.num_chunks == 1 else \
            column.combine_chunks()[r].values.to_numpy().reshape(shape)
    return out


@functools.lru_cache(maxsize=2)
def _shard_table(work: str, i: int):
    return list(itertools.islice(shard_tables(Path(work)), i, i + 1))[0]


def _litdata_item(work: str, where: tuple[int, int]) -> dict:
    """Row ``where = (shard, row)`` of our shards; litdata's optimize runs it in its own worker process."""
    return sample_arrays(_shard_table(work, where[0]), where[1])


def prepare(work: Path, samples: int, shard_rows: int, resolution: int, text_tokens: int, loaders: list[str]) -> None:
    """Write every format the chosen loaders read (each once: a later run reuses them)."""
    import pyarrow.parquet as pq

    from dataloaders.prepare import write_synthetic

    if not (work / "ours" / "manifest.json").exists():
        write_synthetic(str(work / "ours"), samples=samples, resolution=resolution, text_tokens=text_tokens,
                        shard_rows=shard_rows, progress=True)
    if "pyarrow" in loaders and not (work / "parquet" / "_done").exists():
        (work / "parquet").mkdir(exist_ok=True)
        for i, table in enumerate(shard_tables(work)):
            pq.write_table(table, work / "parquet" / f"part-{i:05d}.parquet", compression="none",
                           row_group_size=shard_rows)
        (work / "parquet" / "_done").touch()
    if "mosaic" in loaders and not (work / "mds" / "index.json").exists():
        first = next(iter(shard_tables(work)))
        row = sample_arrays(first, 0)
        columns = {"sample_id": "int64", "caption": "str",
                   **{k: f"ndarray:uint16:{','.join(map(str, row[k].shape))}" for k in TENSORS}}
        sample_bytes = sum(row[k].nbytes for k in TENSORS)
        # MDS closes a shard when the next sample would pass size_limit: half a sample of slack gives shard_rows
        with import_mosaic().MDSWriter(out=str(work / "mds"), columns=columns,
                                       size_limit=shard_rows * sample_bytes + sample_bytes // 2) as mds:
            for table in shard_tables(work):
                for r in range(table.num_rows):
                    mds.write(sample_arrays(table, r))
    if "litdata" in loaders and not (work / "litdata" / "index.json").exists():
        from litdata import optimize

        rows = [(i, r) for i, table in enumerate(shard_tables(work)) for r in range(table.num_rows)]
        optimize(functools.partial(_litdata_item, str(work)), rows, str(work / "litdata"), chunk_size=shard_rows,
                 num_workers=1, verbose=False)


def shard_of_sample(work: Path, fmt: str) -> list[int]:
    """Each sample id's shard in one format, from that format's own index (ids are write order in all four)."""
    if fmt in ("ours", "parquet"):
        rows = [s["rows"] for s in json.loads((work / "ours" / "manifest.json").read_text())["shards"]]
    elif fmt == "mds":
        rows = [s["samples"] for s in json.loads((work / "mds" / "index.json").read_text())["shards"]]
    else:
        rows = [c["chunk_size"] for c in json.loads((work / "litdata" / "index.json").read_text())["chunks"]]
    return np.repeat(np.arange(len(rows)), rows).tolist()


# --------------------------------------------------------------------------------------------------
# One loader, one epoch, in this (fresh) process: each yields the sample ids of every batch
# --------------------------------------------------------------------------------------------------


def as_bf16(batch: dict) -> dict:
    """The tensors a trainer takes: bf16, from however the loader hands over the stored 16 bits."""
    import torch

    return {k: torch.as_tensor(batch[k]).view(torch.bfloat16) for k in TENSORS}


def epoch_ours(url: str, endpoint: str, batch: int, workers: int, cache_dir: str):
    from dataloaders.dataset import ReadOptions, open_dataset
    from infra.config import DataConfig

    cfg = DataConfig()
    options = {"endpoint_url": endpoint} if endpoint else {}
    ds = open_dataset(f"{url}/manifest.json", storage_options=options)
    # a fresh node cache per run, as litdata and mosaic get: with workers, each record batch is fetched once
    read = ReadOptions(storage_options=options, fetch_threads=cfg.fetch_threads,
                       cache_dir=cache_dir if workers else "")
    loader = ds.loader(rank=0, world_size=1, global_batch_size=batch, seed=0, shuffle_block_size=cfg.shuffle_block_size,
                       num_workers=workers, prefetch=cfg.prefetch, read=read)
    seen = 0
    for b in loader:  # infinite: one epoch is its number of samples
        as_bf16(b)
        yield b["sample_id"].tolist()
        seen += len(b["sample_id"])
        if seen >= len(ds):
            break
    loader.close()


def epoch_litdata(url: str, endpoint: str, batch: int, workers: int, cache_dir: str):
    from litdata import StreamingDataLoader, StreamingDataset
    from litdata.streaming import downloader

    # litdata fetches chunks with obstore, which refuses a plain-http endpoint (this loopback one) unless its
    # client is told to allow it; litdata exposes no option for that, so extend its client options.
    downloader._OBSTORE_CLIENT_OPTIONS = {**downloader._OBSTORE_CLIENT_OPTIONS, "allow_http": True}
    options = {"endpoint_url": endpoint} if endpoint else {}
    ds = StreamingDataset(url, cache_dir=cache_dir, shuffle=True, storage_options=options)
    for b in StreamingDataLoader(ds, batch_size=batch, num_workers=workers):
        as_bf16(b)
        yield b["sample_id"].tolist()


def epoch_mosaic(url: str, endpoint: str, batch: int, workers: int, cache_dir: str):
    from torch.utils.data import DataLoader

    streaming = import_mosaic()
    streaming.base.util.clean_stale_shared_memory()
    if endpoint:
        os.environ["S3_ENDPOINT_URL"] = endpoint
    remote, local = (url, cache_dir) if endpoint else (None, url)
    ds = streaming.StreamingDataset(remote=remote, local=local, shuffle=True, batch_size=batch)
    for b in DataLoader(ds, batch_size=batch, num_workers=workers):
        as_bf16(b)
        yield b["sample_id"].tolist()


def epoch_pyarrow(url: str, endpoint: str, batch: int, workers: int, cache_dir: str):
    """The floor: whole Parquet files in shuffled order, rows shuffled inside each, one process."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs = pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1") if endpoint else pafs.LocalFileSystem()
    path = url.removeprefix("s3://")
    files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(path)) if f.path.endswith(".parquet"))
    rng = np.random.default_rng(0)
    for i in rng.permutation(len(files)):
        table = pq.read_table(files[i], filesystem=fs)
        table = table.take(rng.permutation(table.num_rows))
        for start in range(0, table.num_rows, batch):
            part = table.slice(start, batch)
            as_bf16({k: part.column(k).combine_chunks().values.to_numpy(zero_copy_only=False) for k in TENSORS})
            yield part.column("sample_id").to_pylist()


# What each loader imports, done before the clock starts: the clock times building and reading, not imports.
IMPORTS = {"ours": ("torch", "s3fs", "dataloaders.dataset", "infra.config"),
           "litdata": ("torch", "boto3", "obstore", "litdata", "litdata.streaming.downloader"),
           "mosaic": ("torch", "torch.utils.data", "boto3"),
           "pyarrow": ("torch", "pyarrow.fs", "pyarrow.parquet")}


def measure(loader: str, url: str, endpoint: str, batch: int, workers: int) -> dict:
    for module in IMPORTS[loader]:
        importlib.import_module(module)
    if loader == "mosaic":
        import_mosaic()
    cache_dir = tempfile.mkdtemp(prefix=f"loader-bench-{loader}-")
    try:
        t0 = time.perf_counter()
        ids, marks = [], []
        for b in globals()[f"epoch_{loader}"](url, endpoint, batch, workers, cache_dir):
            ids.append(b)
            marks.append(time.perf_counter() - t0)
        return {"first_batch_s": marks[0], "epoch_s": marks[-1], "ids": ids}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# The S3 endpoint: moto's server, counting what it serves
# --------------------------------------------------------------------------------------------------


class ServedCounter:
    """WSGI middleware: counts requests by method and the body bytes GETs sent; ``GET /_served`` reports the
    counts and ``DELETE /_served`` resets them."""

    def __init__(self, app):
        self.app = app
        self.counts: Counter = Counter()
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        if environ.get("PATH_INFO") == COUNTS_PATH:
            with self.lock:
                body = json.dumps(self.counts).encode()
                if method == "DELETE":
                    self.counts = Counter()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]

        with self.lock:
            self.counts[method] += 1
        body = self.app(environ, start_response)
        return self._counted(body) if method == "GET" else body

    def _counted(self, body):
        """The response body as sent, its bytes added to ``get_bytes``."""
        try:
            for chunk in body:
                with self.lock:
                    self.counts["get_bytes"] += len(chunk)
                yield chunk
        finally:
            if hasattr(body, "close"):
                body.close()


def serve_s3(port: int) -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    make_server("127.0.0.1", port, ServedCounter(DomainDispatcherApplication(create_backend_app)),
                threaded=True).serve_forever()


def served(endpoint: str, reset: bool = False) -> Counter:
    request = urllib.request.Request(endpoint + COUNTS_PATH, method="DELETE" if reset else "GET")
    with urllib.request.urlopen(request, timeout=30) as response:
        return Counter(json.loads(response.read()))


def start_s3(work: Path, formats: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--serve-s3", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                served(endpoint)
                break
            except OSError:
                time.sleep(0.1)
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir("bench")
        for name in formats:
            fs.put(str(work / name), f"bench/{name}", recursive=True)
    except BaseException:
        server.terminate()  # a failed upload must not leave the server running
        server.wait()
        raise
    return server, endpoint


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------


def mix(ids: list[list[int]], shard_of: list[int], batch: int) -> float:
    """Distinct shards per (full) batch."""
    full = [b for b in ids if len(b) == batch]
    return float(np.mean([len({shard_of[i] for i in b}) for b in full])) if full else float("nan")


def run_one(args: argparse.Namespace, loader: str, workers: int, endpoint: str, work: Path) -> dict:
    url = f"s3://bench/{FORMAT[loader]}" if endpoint else str(work / FORMAT[loader])
    spec = json.dumps({"loader": loader, "url": url, "endpoint": endpoint, "batch": args.batch, "workers": workers})
    if endpoint:
        served(endpoint, reset=True)
    child = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True, text=True, timeout=900)
    lines = [ln for ln in child.stdout.splitlines() if ln.startswith("{")]
    if child.returncode or not lines:
        raise RuntimeError(f"{loader} with {workers} workers failed:\n{child.stderr[-3000:]}")
    result = json.loads(lines[-1])
    if endpoint:
        counts = served(endpoint)
        result.update(gets=counts["GET"], mib_served=counts["get_bytes"] / MIB)
    return result


def summarize(runs: list[dict], shard_of: list[int], batch: int) -> dict:
    samples = [sum(len(b) for b in r["ids"]) for r in runs]
    med = statistics.median
    return {"samples": med(samples), "samples_per_s": med(n / r["epoch_s"] for n, r in zip(samples, runs)),
            "samples_per_s_all": [n / r["epoch_s"] for n, r in zip(samples, runs)],
            "first_batch_s": med(r["first_batch_s"] for r in runs),
            "first_batch_all": [r["first_batch_s"] for r in runs],
            "gets": med(r.get("gets", float("nan")) for r in runs),
            "mib_served": med(r.get("mib_served", float("nan")) for r in runs),
            "mix": med(mix(r["ids"], shard_of, batch) for r in runs)}


def verdicts(table: dict, worker_counts: list[int]) -> list[str]:
    """Each target of the loader issue, met or not met, from the medians (absent peers: not measured)."""
    out = []

    def line(ok: bool | None, text: str) -> str:
        return f"- {text}: {'met' if ok else 'NOT MET' if ok is not None else 'not measured'}"

    for w in worker_counts:
        ours, lit, mos = table.get(("ours", w)), table.get(("litdata", w)), table.get(("mosaic", w))
        if ours is None:
            continue
        if lit:
            out.append(line(ours["first_batch_s"] <= lit["first_batch_s"],
                            f"{w} workers, first batch at most litdata's ({ours['first_batch_s']:.2f} s vs "
                            f"{lit['first_batch_s']:.2f} s)"))
            out.append(line(ours["samples_per_s"] >= lit["samples_per_s"] and ours["mix"] >= 9 * lit["mix"],
                            f"{w} workers, epoch samples/s at least litdata's ({ours['samples_per_s']:.0f} vs "
                            f"{lit['samples_per_s']:.0f}, x{ours['samples_per_s'] / lit['samples_per_s']:.2f}) with a "
                            f"shuffle mix at least 9x litdata's ({ours['mix']:.2f} vs {lit['mix']:.2f} shards per "
                            f"batch, x{ours['mix'] / lit['mix']:.1f})"))
        else:
            out.append(line(None, f"{w} workers, first batch and epoch samples/s against litdata"))
        if mos:
            out.append(line(ours["samples_per_s"] >= 2 * mos["samples_per_s"],
                            f"{w} workers, epoch samples/s at least 2x mosaicml-streaming's "
                            f"({ours['samples_per_s']:.0f} vs {mos['samples_per_s']:.0f}, "
                            f"x{ours['samples_per_s'] / mos['samples_per_s']:.2f})"))
        else:
            out.append(line(None, f"{w} workers, epoch samples/s against mosaicml-streaming"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--shard-rows", type=int, default=64, help="samples per shard in every format (~64 MB)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--text-tokens", type=int, default=116)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", default="0,2", help="worker processes per loader (pyarrow: always 0)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loaders", default=",".join(LOADERS))
    p.add_argument("--source", choices=("s3", "local"), default="s3")
    p.add_argument("--work", default="/tmp/loader-bench")
    p.add_argument("--json", default="", help="also write the medians and every run's figures here")
    p.add_argument("--smoke", action="store_true",
                   help="a few seconds: 96 tiny samples, ours (0 workers) and pyarrow, one repeat")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # JSON spec: measure one run, in a child
    p.add_argument("--serve-s3", type=int, default=0, help=argparse.SUPPRESS)  # be the S3 endpoint, on this port
    args = p.parse_args()
    os.environ.update(S3_ENV)

    if args.serve_s3:
        serve_s3(args.serve_s3)
        return
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(measure(spec["loader"], spec["url"], spec["endpoint"], spec["batch"], spec["workers"])))
        return
    if args.smoke:
        args.samples, args.shard_rows, args.resolution, args.text_tokens = 96, 16, 64, 8
        args.batch, args.workers, args.repeats, args.loaders = 8, "0", 1, "ours,pyarrow"
        args.work = args.work if args.work != p.get_default("work") else "/tmp/loader-bench-smoke"

    loaders = args.loaders.split(",")
    worker_counts = [int(w) for w in args.workers.split(",")]
    work = Path(args.work) / f"{args.samples}x{args.shard_rows}-{args.resolution}-{args.text_tokens}"
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.samples, args.shard_rows, args.resolution, args.text_tokens, loaders)
    formats = sorted({FORMAT[name] for name in loaders})
    shard_of = {fmt: shard_of_sample(work, fmt) for fmt in formats}
    configs = [(name, w) for name in loaders for w in ([0] if name == "pyarrow" else worker_counts)]
    server, endpoint = start_s3(work, formats) if args.source == "s3" else (None, "")
    runs: dict[tuple[str, int], list[dict]] = {c: [] for c in configs}
    try:
        for repeat in range(args.repeats):
            for name, w in configs:
                r = run_one(args, name, w, endpoint, work)
                runs[(name, w)].append(r)
                print(f"repeat {repeat + 1}: {name} {w} workers: first batch {r['first_batch_s']:.2f} s, epoch "
                      f"{r['epoch_s']:.2f} s, GETs {r.get('gets', '-')}", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait()

    table = {c: summarize(rs, shard_of[FORMAT[c[0]]], args.batch) for c, rs in runs.items()}
    shards = {fmt: max(s) + 1 for fmt, s in shard_of.items()}
    mib = sum(s["bytes"] for s in json.loads((work / "ours" / "manifest.json").read_text())["shards"]) / MIB
    print(f"\n{args.samples} samples, {mib / args.samples:.2f} MiB each, in {shards[formats[0]]} shards of "
          f"{args.shard_rows} rows ({mib / shards[formats[0]]:.0f} MiB each); batch {args.batch}, shuffle on, one "
          f"epoch from {'S3 (moto on 127.0.0.1)' if endpoint else 'local disk'}, medians of {args.repeats} fresh "
          f"processes; {os.cpu_count()} cores\n")
    print("| loader | workers | samples/s (epoch, first batch included) | first batch s | GETs | MiB served | "
          "shards per batch | x litdata | x mosaic |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, w), t in table.items():
        ratios = [f"{t['samples_per_s'] / table[(peer, w)]['samples_per_s']:.2f}" if (peer, w) in table else "-"
                  for peer in ("litdata", "mosaic")]
        print(f"| {name} | {w} | {t['samples_per_s']:.0f} | {t['first_batch_s']:.2f} | {t['gets']:.0f} | "
              f"{t['mib_served']:.0f} | {t['mix']:.2f} | {ratios[0]} | {ratios[1]} |")
    print("\nTargets (ours against each peer with the same workers):")
    print("\n".join(verdicts(table, worker_counts)))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "settings": {k: v for k, v in vars(args).items() if k not in ("one", "serve_s3")},
            "medians": {f"{n}/{w}": t for (n, w), t in table.items()},
            "runs": {f"{n}/{w}": [{k: v for k, v in r.items() if k != "ids"} for r in rs]
                     for (n, w), rs in runs.items()},
        }, indent=1))


if __name__ == "__main__":
    main()
