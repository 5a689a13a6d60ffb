"""The loader at cluster scale, simulated on one machine: what each node reads from S3, and the order it gets.

    python benchmarks/loader_scale.py                     # defaults: ~1-2 minutes on 2 cores
    python benchmarks/loader_scale.py --samples 1000 --shard-rows 64 --configs 1x1x0   # issue 14's setting

A synthetic SD3 256² dataset (0.94 MiB per sample) is written once locally and copied to an S3 endpoint
(moto's ThreadedMotoServer in this process, on loopback, as tests/conftest.py does). Each configuration
``NODESxRANKSxWORKERS`` then runs as process groups: every rank is a process with its own loader (and
WORKERS loader worker processes), the ranks of one simulated node share that node's cache directory, and
each node has its own. All ranks start together and run ``--epochs`` epochs. Per node it prints:

- bytes fetched from S3 per epoch over the node's share (dataset bytes / nodes): epoch 1 (cold cache) and
  epoch 2 (warm: the cache holds the node's share);
- GET requests in epoch 1, and how many record batches the node's cache ended up with;
- time to its first batch, and the record batches that batch needs (its G/N samples of the first global
  batch); its samples/s over epoch 1 (G/N samples per global batch), and the sum over nodes;
- whether the global sequence (the ranks' slices laid side by side) equals a single process's order
  (world size 1, same partitions, read from the local copy).

Per configuration, shuffle quality: distinct shards per global batch over min(batch, shards).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"  # loader workers, forkserver

S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}
MIB = 1 << 20


def rank_main(args: dict, start, results) -> None:
    """One rank of a simulated node: its loader from S3 for `epochs` epochs; reports ids and I/O per epoch."""
    import dataloaders
    from dataloaders.dataset import ReadOptions, open_dataset

    options = {"endpoint_url": args["endpoint"]}
    ds = open_dataset(args["url"], storage_options=options)
    read = ReadOptions(storage_options=options, cache_dir=args["cache_dir"], fetch_threads=args["fetch_threads"])
    loader = ds.loader(rank=args["rank"], world_size=args["world"], global_batch_size=args["batch"], seed=0,
                       shuffle_block_size=args["block"], num_workers=args["workers"], prefetch=2, read=read,
                       ranks_per_node=args["ranks_per_node"])
    per_epoch = loader.num_samples // args["batch"]
    start.wait()
    t0 = time.perf_counter()
    stream = iter(loader)
    ids, io, marks = [], [], []
    for step in range(args["epochs"] * per_epoch):
        ids.append(next(stream)["sample_id"].tolist())
        if step == 0:
            marks.append(time.perf_counter() - t0)
        if (step + 1) % per_epoch == 0:
            marks.append(time.perf_counter() - t0)
            io.append(dict(loader.io))
    loader.close()
    results.put({"rank": args["rank"], "ids": ids, "io": io, "first_batch_s": marks[0], "epoch_end_s": marks[1:],
                 "module": dataloaders.__file__})


def single_process_order(local_url: str, batch: int, block: int, partitions: int, steps: int) -> list[int]:
    from dataloaders.dataset import open_dataset

    loader = open_dataset(local_url).loader(rank=0, world_size=1, global_batch_size=batch, seed=0,
                                            shuffle_block_size=block, partitions=partitions)
    stream = iter(loader)
    out = [i for _ in range(steps) for i in next(stream)["sample_id"].tolist()]
    loader.close()
    return out


def run_config(nodes: int, ranks: int, workers: int, a: argparse.Namespace, url: str, endpoint: str,
               work: Path) -> list[dict]:
    ctx = multiprocessing.get_context("forkserver")  # rank processes: torch and the loader imported once
    ctx.set_forkserver_preload(["torch", "dataloaders.dataset"])
    start, results = ctx.Event(), ctx.Queue()
    world = nodes * ranks
    shutil.rmtree(work / f"cache-{nodes}x{ranks}x{workers}", ignore_errors=True)  # every run starts cold
    procs = []
    for r in range(world):
        args = {"rank": r, "world": world, "ranks_per_node": ranks, "workers": workers, "url": url,
                "endpoint": endpoint, "batch": a.batch, "block": a.block, "epochs": a.epochs,
                "fetch_threads": a.fetch_threads, "cache_dir": str(work / f"cache-{nodes}x{ranks}x{workers}" /
                                                                    f"node{r // ranks}")}
        procs.append(ctx.Process(target=rank_main, args=(args, start, results)))
        procs[-1].start()
    time.sleep(1.0)  # let every rank open the dataset before the clock starts
    start.set()
    out = sorted((results.get(timeout=600) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join(timeout=60)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--shard-rows", type=int, default=32)
    p.add_argument("--batch-rows", type=int, default=4, help="rows per record batch (0: the writer's 8 MiB default)")
    p.add_argument("--batch", type=int, default=32, help="global batch size")
    p.add_argument("--block", type=int, default=256, help="shuffle block size (samples, per partition)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--fetch-threads", type=int, default=4)
    p.add_argument("--configs", default="2x2x0,4x2x0,8x2x0,2x2x2", help="NODESxRANKSxWORKERS,...")
    p.add_argument("--work", default="/tmp/loader-scale")
    a = p.parse_args()
    os.environ.update(S3_ENV)
    from dataloaders.dataset import open_dataset
    from dataloaders.prepare import write_synthetic
    from dataloaders.sampler.order import shards_per_batch

    work = Path(a.work)
    tag = f"{a.samples}-{a.shard_rows}-{a.batch_rows}"
    local = work / f"ds-{tag}"
    if not (local / "manifest.json").exists():
        write_synthetic(str(local), samples=a.samples, resolution=256, text_tokens=116, shard_rows=a.shard_rows,
                        batch_rows=a.batch_rows or None, progress=True)
    local_url = str(local / "manifest.json")
    manifest = open_dataset(local_url).manifest
    dataset_bytes = sum(s.bytes for s in manifest.shards)
    index = open_dataset(local_url).record_batches()
    batches = len(index)
    batch_starts = np.cumsum(index.rows) - index.rows  # synthetic sample ids are rows in write order

    import logging
    import socket

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request log

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir("bench")
    fs.put(str(local), "bench/ds", recursive=True)
    url = "s3://bench/ds/manifest.json"

    print(f"\n{a.samples} samples of ~0.94 MiB in {len(manifest.shards)} shards of {a.shard_rows} rows "
          f"({batches} record batches), {dataset_bytes / MIB:.0f} MiB; global batch {a.batch}, shuffle block "
          f"{a.block}, {a.epochs} epochs, {os.cpu_count()} cores\n", flush=True)
    rows = ["| nodes x ranks x workers | node | epoch 1 bytes / share | epoch 2 bytes / share | GETs epoch 1 | "
            "record batches cached / total | first batch s (record batches it needs) | samples/s epoch 1 "
            "(all nodes) | order = single process | shards per batch / min(G, shards) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    try:
        for config in a.configs.split(","):
            nodes, ranks, workers = map(int, config.split("x"))
            t0 = time.perf_counter()
            got = run_config(nodes, ranks, workers, a, url, endpoint, work)
            wall = time.perf_counter() - t0
            assert all(r["module"].startswith(str(REPO)) for r in got), got[0]["module"]
            sequence = [i for step in zip(*(r["ids"] for r in got)) for part in step for i in part]
            reference = single_process_order(local_url, a.batch, a.block, nodes, len(got[0]["ids"]))
            same = sequence == reference
            quality = shards_per_batch(np.asarray(sequence[:len(sequence) // a.epochs]) // a.shard_rows, a.batch,
                                       len(manifest.shards))
            share = dataset_bytes / nodes
            rates = [(a.batch // nodes) * len(got[n * ranks]["ids"]) / a.epochs /
                     max(r["epoch_end_s"][0] for r in got[n * ranks:(n + 1) * ranks]) for n in range(nodes)]
            for n in range(nodes):
                mine = got[n * ranks:(n + 1) * ranks]
                epoch_bytes = [sum(r["io"][e].get("bytes_fetched", 0) for r in mine) for e in range(a.epochs)]
                epoch_bytes = [epoch_bytes[0]] + [b - prev for prev, b in zip(epoch_bytes, epoch_bytes[1:])]
                gets = sum(r["io"][0].get("get_requests", 0) for r in mine)
                cached = len(list((work / f"cache-{config}" / f"node{n}").glob("*/*.arrow-batch")))
                first = max(r["first_batch_s"] for r in mine)
                first_ids = [i for r in mine for i in r["ids"][0]]
                needs = len(np.unique(np.searchsorted(batch_starts, first_ids, side="right")))
                rows.append(f"| {config} | {n} | {epoch_bytes[0] / share:.3f} | "
                            f"{(epoch_bytes[1] / share if a.epochs > 1 else float('nan')):.3f} | {gets} | "
                            f"{cached} / {batches} | {first:.2f} ({needs}) | {rates[n]:.0f} ({sum(rates):.0f}) | "
                            f"{'yes' if same else 'NO'} | {quality:.3f} |")
            print("\n".join(rows[-nodes:]), f"\n({config}: {wall:.0f} s)", flush=True)
    finally:
        server.stop()
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
