"""Streaming-loader throughput: ours against mosaicml-streaming, Ray Data and plain pyarrow.

    python benchmarks/loader.py --samples 1024 --seconds 20

The same synthetic SD3 256² samples (16x32x32 bf16 latent, 116x4096 bf16 text tokens, 2048 bf16 pooled:
0.94 MiB, the bytes of SD3's unpadded CLIP + T5-77 features) are written once as our Arrow shards, then
copied row for row into MDS shards (mosaicml-streaming) and Parquet files (Ray Data, pyarrow). Each loader
reads them with shuffling on, from local disk and from an S3 endpoint (moto's server in its own process,
on loopback), in a fresh process, and yields torch batches as a trainer would take them. Reported:
samples/s and MiB/s over a --seconds window after the first batch (as many epochs as fit; mosaic from S3
gets its first epoch only, since it serves later ones from a local copy), MiB/s per CPU core the loader's
processes used, the time to the first batch, and samples/s with that startup included. Last, the bytes per
second one H100/H200 needs at 256² (SD3 FLOPs formula, 40 % MFU) for d=24 and d=38.

Needs ``pip install mosaicml-streaming`` (bench extra). Writes to --work (default /tmp/loader-bench).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEXT_TOKENS, CONTEXT, POOLED, LATENT = 116, 4096, 2048, (16, 32, 32)
SAMPLE_BYTES = 2 * (int(np.prod(LATENT)) + TEXT_TOKENS * CONTEXT + POOLED)
MIB = 1 << 20
LOADERS = ("ours", "mosaic", "ray", "pyarrow")
READ_AHEAD_BYTES = 512 * MIB


# --------------------------------------------------------------------------------------------------
# Data: one synthetic dataset, three formats
# --------------------------------------------------------------------------------------------------


def prepare(work: Path, samples: int, shard_rows: int) -> None:
    from dataloaders.manifest import manifest_url
    from dataloaders.prepare import write_synthetic

    if (work / "ours" / "manifest.json").exists():
        return
    write_synthetic(str(work / "ours"), samples=samples, resolution=256, text_tokens=TEXT_TOKENS,
                    shard_rows=shard_rows, progress=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dataloaders.dataset import open_dataset

    manifest = open_dataset(manifest_url(str(work / "ours"))).manifest
    MDSWriter = import_mosaic().MDSWriter
    columns = {"sample_id": "int64", "caption": "str", "latent": f"ndarray:uint16:{','.join(map(str, LATENT))}",
               "text_tokens": f"ndarray:uint16:{TEXT_TOKENS},{CONTEXT}", "text_pooled": f"ndarray:uint16:{POOLED}"}
    (work / "parquet").mkdir(exist_ok=True)
    with MDSWriter(out=str(work / "mds"), columns=columns, size_limit=shard_rows * SAMPLE_BYTES + MIB) as mds:
        for i, shard in enumerate(manifest.shards):
            table = pa.ipc.open_file(pa.memory_map(str(work / "ours" / shard.path))).read_all()
            pq.write_table(table, work / "parquet" / f"part-{i:05d}.parquet", compression="none",
                           row_group_size=shard_rows)
            arrays = {c: table.column(c).combine_chunks() for c in ("latent", "text_tokens", "text_pooled")}
            for r in range(table.num_rows):
                mds.write({
                    "sample_id": int(table.column("sample_id")[r].as_py()),
                    "caption": table.column("caption")[r].as_py(),
                    "latent": arrays["latent"][r].values.to_numpy().reshape(LATENT),
                    "text_tokens": arrays["text_tokens"][r].values.to_numpy().reshape(TEXT_TOKENS, CONTEXT),
                    "text_pooled": arrays["text_pooled"][r].values.to_numpy(),
                })


def import_mosaic():
    # mosaicml-streaming's package __init__ imports its torchvision/transformers-based example datasets,
    # which we do not use (and torchvision is not installed): register empty modules in their place.
    for name in ("streaming.vision", "streaming.multimodal", "streaming.text"):
        sys.modules.setdefault(name, types.ModuleType(name))
    import streaming

    return streaming


# --------------------------------------------------------------------------------------------------
# One loader, one source, in this (fresh) process
# --------------------------------------------------------------------------------------------------


def batches_ours(root: str, batch: int, workers: int, endpoint: str):
    from dataloaders.dataset import ReadOptions, open_dataset

    options = {"endpoint_url": endpoint} if endpoint else {}
    ds = open_dataset(root, storage_options=options)
    loader = ds.loader(rank=0, world_size=1, global_batch_size=batch, seed=0, shuffle_block_size=8 * batch,
                       num_workers=workers, prefetch=4, read=ReadOptions(storage_options=options, fetch_threads=8))
    for b in loader:
        yield b["text_tokens"].shape[0]


def batches_mosaic(root: str, batch: int, workers: int, endpoint: str):
    import tempfile

    import torch
    from torch.utils.data import DataLoader

    streaming = import_mosaic()
    if endpoint:
        os.environ["S3_ENDPOINT_URL"] = endpoint
    local = tempfile.mkdtemp(prefix="mds-cache-")
    ds = streaming.StreamingDataset(remote=root if endpoint else None, local=local if endpoint else root,
                                    shuffle=True, shuffle_seed=0, shuffle_block_size=8 * batch, batch_size=batch)

    def collate(samples):
        return {k: torch.from_numpy(np.stack([s[k] for s in samples])).view(torch.bfloat16)
                for k in ("latent", "text_tokens", "text_pooled")}

    while True:
        for b in DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate):
            yield b["text_tokens"].shape[0]


def batches_ray(root: str, batch: int, workers: int, endpoint: str):
    import pyarrow.fs as pafs
    import ray
    import torch

    ray.init("local", num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
    # Ray Data reads ahead until its object-store budget is full (here: the whole 1 GB epoch before the
    # first batch), which no loader can do on a real dataset. Give it a bounded read-ahead like the others'
    # (ours: a shuffle block plus prefetch, ~0.3 GB; mosaic: predownload = 8 batches), so the figure is a
    # sustained rate.
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=READ_AHEAD_BYTES)
    fs = pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1") if endpoint else None
    path = root.removeprefix("s3://") if endpoint else root
    ds = ray.data.read_parquet(path, filesystem=fs).randomize_block_order(seed=0)
    while True:
        for b in ds.iter_batches(batch_size=batch, batch_format="pyarrow", local_shuffle_buffer_size=8 * batch):
            out = {k: torch.from_numpy(b.column(k).combine_chunks().values.to_numpy(zero_copy_only=False))
                   .view(torch.bfloat16) for k in ("latent", "text_tokens", "text_pooled")}
            yield out["text_pooled"].numel() // POOLED


def batches_pyarrow(root: str, batch: int, workers: int, endpoint: str):
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    import torch

    fs = pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1") if endpoint else pafs.LocalFileSystem()
    path = root.removeprefix("s3://")
    files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(path)) if f.path.endswith(".parquet"))
    rng = np.random.default_rng(0)
    while True:
        for i in rng.permutation(len(files)):  # shuffled files, shuffled rows inside each
            table = pq.read_table(files[i], filesystem=fs)
            table = table.take(rng.permutation(table.num_rows))
            for start in range(0, table.num_rows, batch):
                part = table.slice(start, batch)
                out = {k: torch.from_numpy(part.column(k).combine_chunks().values.to_numpy(zero_copy_only=False))
                       .view(torch.bfloat16) for k in ("latent", "text_tokens", "text_pooled")}
                yield out["text_pooled"].numel() // POOLED


def cpu_seconds() -> float:
    import psutil

    me = psutil.Process()
    finished = os.times()  # children already reaped (e.g. the workers of a finished epoch)
    total = sum(me.cpu_times()[:2]) + finished.children_user + finished.children_system
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def measure(loader: str, root: str, batch: int, workers: int, endpoint: str, seconds: float,
            max_samples: int) -> dict:
    stream = globals()[f"batches_{loader}"](root, batch, workers, endpoint)
    t0 = time.perf_counter()
    next(stream)
    startup = time.perf_counter() - t0
    t1, cpu1, n = time.perf_counter(), cpu_seconds(), 0
    while time.perf_counter() - t1 < seconds and n < max_samples:
        n += next(stream)
    wall, cpu = time.perf_counter() - t1, cpu_seconds() - cpu1
    return {"samples_per_s": n / wall, "mib_per_s": n * SAMPLE_BYTES / MIB / wall,
            "mib_per_s_per_core": n * SAMPLE_BYTES / MIB / max(cpu, 1e-9), "startup_s": startup, "samples": n,
            "with_startup_per_s": (n + batch) / (wall + startup)}


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------


def start_s3(work: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            import urllib.request

            urllib.request.urlopen(endpoint, timeout=1)
            break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir("bench")
    for name in ("ours", "mds", "parquet"):
        fs.put(str(work / name), f"bench/{name}", recursive=True)
    return server, endpoint


def s3_environment() -> None:
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                       "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"})


def gpu_needs() -> dict[str, float]:
    """MiB/s one GPU consumes at 256² (SD3 MM-DiT: 72 D d² S + 12 D d S² train FLOPs per sample,
    d = 64 D, S = 256 image + 154 text tokens) at 40 % MFU of 989 TFLOP/s."""
    out = {}
    for depth in (24, 38):
        d, s = 64 * depth, 256 + 154
        flops = 72 * depth * d * d * s + 12 * depth * d * s * s
        out[f"d={depth}"] = 0.4 * 989e12 / flops * SAMPLE_BYTES / MIB
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--shard-rows", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=1, help="loader worker processes (Ray: CPUs)")
    p.add_argument("--seconds", type=float, default=20.0, help="measurement window per loader and source")
    p.add_argument("--loaders", default=",".join(LOADERS))
    p.add_argument("--sources", default="local,s3")
    p.add_argument("--work", default="/tmp/loader-bench")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # "loader|root|endpoint": measure one, in a child
    args = p.parse_args()
    s3_environment()

    if args.one:
        loader, root, endpoint = args.one.split("|")
        # A --seconds window over as many epochs as fit, so that what a loader buffered before its first
        # batch is a small part of what is measured; but mosaic from S3 gets its first epoch only, as it
        # serves later ones from its local copy, not from S3.
        limit = args.samples - args.batch if loader == "mosaic" and endpoint else 10**9
        print(json.dumps(measure(loader, root, args.batch, args.workers, endpoint, args.seconds, limit)))
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.samples, args.shard_rows)
    roots = {"ours": "ours/manifest.json", "mosaic": "mds", "ray": "parquet", "pyarrow": "parquet"}
    server, endpoint = start_s3(work) if "s3" in args.sources else (None, "")
    results: dict[tuple[str, str], dict] = {}
    try:
        for source in args.sources.split(","):
            for loader in args.loaders.split(","):
                root = str(work / roots[loader]) if source == "local" else f"s3://bench/{roots[loader]}"
                child = subprocess.run(
                    [sys.executable, __file__, "--one", f"{loader}|{root}|{endpoint if source == 's3' else ''}",
                     "--batch", str(args.batch), "--workers", str(args.workers), "--seconds", str(args.seconds),
                     "--samples", str(args.samples)],
                    capture_output=True, text=True, timeout=600)
                lines = [ln for ln in child.stdout.splitlines() if ln.startswith("{")]
                if child.returncode or not lines:
                    print(f"{loader} from {source} failed:\n{child.stderr[-2000:]}", file=sys.stderr)
                    continue
                results[(loader, source)] = json.loads(lines[-1])
                print(loader, source, results[(loader, source)], file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.terminate()

    print(f"\n{args.samples} samples of {SAMPLE_BYTES / MIB:.3f} MiB, batch {args.batch}, shuffling on, "
          f"{args.workers} worker(s), {os.cpu_count()} cores\n")
    print("| loader | source | samples/s | MiB/s | MiB/s per core | startup s | samples/s incl. startup |")
    print("|---|---|---|---|---|---|---|")
    for (loader, source), r in results.items():
        print(f"| {loader} | {source} | {r['samples_per_s']:.0f} | {r['mib_per_s']:.0f} | "
              f"{r['mib_per_s_per_core']:.0f} | {r['startup_s']:.1f} | {r['with_startup_per_s']:.0f} |")
    print("\nOne GPU's need at 256² (40 % MFU, H100/H200): " +
          ", ".join(f"{k}: {v:.0f} MiB/s" for k, v in gpu_needs().items()))


if __name__ == "__main__":
    main()
