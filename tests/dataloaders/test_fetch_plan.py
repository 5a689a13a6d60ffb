"""How the loader fetches: adjacent record batches of a shard share a GET, and worker processes fetch
ahead into the node cache while the rank's own process builds every batch, so no sample changes."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dataloaders import open_dataset
from dataloaders.dataset import PrefetchStream, ReadOptions, fetch_units, opening_units
from dataloaders.shards import reader as reader_module
from tests.dataloaders.conftest import assert_rows_match_ids, write_small


@pytest.mark.parametrize("seed", range(5))
def test_fetch_units_are_runs_of_one_shard_within_the_limit_in_first_use_order(seed):
    rng = np.random.default_rng(seed)
    per_shard = rng.integers(1, 9, size=rng.integers(1, 7))
    index = SimpleNamespace(shard=np.repeat(np.arange(len(per_shard)), per_shard),
                            length=rng.integers(1, 100, size=int(per_shard.sum())))
    wanted = rng.permutation(len(index.shard))[:rng.integers(1, len(index.shard) + 1)].tolist()  # first-use order
    limit = int(rng.integers(1, 300))
    units = fetch_units(index, wanted, limit)

    members = [b for unit in units for b in unit]
    assert sorted(members) == sorted(wanted)  # each wanted batch in exactly one unit, nothing else
    first_use = {b: k for k, b in enumerate(wanted)}
    for unit in units:
        assert unit == list(range(unit[0], unit[-1] + 1))  # a run of adjacent batches...
        assert len(set(index.shard[unit].tolist())) == 1  # ...of one shard...
        assert len(unit) == 1 or index.length[unit].sum() <= limit  # ...within the limit (one GET)
    seeds = [min(first_use[b] for b in unit) for unit in units]
    assert seeds == sorted(seeds)  # submitted in the order of each unit's first need
    # greedy growth: a unit stops only at a batch that is not wanted, is taken, is in another shard, or is
    # too large to add
    taken = {}
    for k, unit in enumerate(units):
        for b in unit:
            taken[b] = k
    for k, unit in enumerate(units):
        size = int(index.length[unit].sum())
        for nxt in (unit[-1] + 1, unit[0] - 1):
            if 0 <= nxt < len(index.shard) and nxt in taken and taken[nxt] > k \
                    and index.shard[nxt] == index.shard[unit[0]]:
                assert size + index.length[nxt] > limit, (unit, nxt)


@pytest.mark.parametrize("seed", range(5))
def test_the_first_batch_gets_leave_the_rest_of_each_shard_in_one_run(seed):
    rng = np.random.default_rng(seed)
    per_shard = rng.integers(1, 9, size=rng.integers(2, 9))
    shard = np.repeat(np.arange(len(per_shard)), per_shard)
    starts = np.r_[0, np.cumsum(per_shard)[:-1]]
    last = np.zeros(len(shard), bool)
    last[np.cumsum(per_shard) - 1] = True
    index = SimpleNamespace(shard=shard, batch=np.arange(len(shard)) - starts[shard], last=last,
                            length=rng.integers(1, 100, size=len(shard)))
    opening = [int(starts[s] + rng.integers(per_shard[s])) for s in rng.permutation(len(per_shard))[:4]]
    later = set(rng.permutation([b for b in range(len(shard)) if b not in opening])[:len(shard) * 3 // 4].tolist())
    limit = int(rng.integers(50, 400))
    units = opening_units(index, opening, later, limit)

    assert len(units) == len(opening) and all(b in u for b, u in zip(opening, units))  # one each, in order
    for b, unit in zip(opening, units):
        assert unit == list(range(unit[0], unit[-1] + 1)) and len(set(shard[unit].tolist())) == 1
        lo, hi = starts[shard[b]], starts[shard[b]] + per_shard[shard[b]] - 1
        side = [i for i in unit if i != b]
        near = list(range(lo, b)) if b - lo <= hi - b else list(range(b + 1, hi + 1))
        if side:  # grown: exactly the nearer side, all needed later, within half a GET
            assert side == near and set(side) <= later and index.length[side].sum() <= limit // 2
        else:  # not grown: nothing on the nearer side, or it could not be
            assert not near or not set(near) <= later or index.length[near].sum() > limit // 2
        rest = [i for i in range(lo, hi + 1) if i not in unit]
        if side and rest:
            assert rest == list(range(rest[0], rest[-1] + 1))  # what is left of the shard: one run, one GET
    members = [b for unit in units for b in unit]
    assert len(members) == len(set(members))


def test_an_epoch_from_s3_shares_gets_between_adjacent_record_batches(s3_bucket, monkeypatch):
    n, shard_rows, batch_rows = 192, 64, 4  # 3 shards of 16 record batches
    url = write_small(f"{s3_bucket}/ds", n=n, shard_rows=shard_rows, batch_rows=batch_rows)
    ds = open_dataset(url)
    record_batches = len(ds.record_batches())

    def epoch(max_get_bytes: int):
        monkeypatch.setattr(reader_module, "MAX_GET_BYTES", max_get_bytes)
        loader = ds.loader(rank=0, world_size=1, global_batch_size=16, seed=3, shuffle_block_size=n, prefetch=1)
        batches = list(itertools.islice(loader, n // 16))
        loader.close()
        return batches, loader.io

    coalesced, io = epoch(32 << 20)
    single, io_single = epoch(1)
    # (the lookahead may also have begun fetching the next epoch's first record batches)
    assert io_single["get_requests"] >= record_batches  # one GET per record batch without coalescing
    # the first batch's record batches come about one per GET, the rest share GETs
    assert io["get_requests"] < 0.6 * record_batches, dict(io)
    for a, b in zip(coalesced, single):
        assert torch.equal(a["sample_id"], b["sample_id"])
        assert_rows_match_ids(a)
    assert sorted(torch.cat([b["sample_id"] for b in coalesced]).tolist()) == list(range(n))


@pytest.mark.parametrize("cache", ["node", "temporary"])
def test_workers_fetch_ahead_into_the_cache_and_the_rank_process_reads_it(s3_bucket, tmp_path, cache):
    url = write_small(f"{s3_bucket}/ds", n=160, shard_rows=16, batch_rows=4)
    ds = open_dataset(url)
    index = ds.record_batches()

    def loader(workers: int):
        return ds.loader(rank=0, world_size=1, global_batch_size=8, seed=1, shuffle_block_size=64,
                         num_workers=workers, prefetch=1,
                         read=ReadOptions(cache_dir=str(tmp_path / "node") if cache == "node" and workers else ""))

    alone = list(itertools.islice(loader(0), 20))  # one epoch
    with_workers = loader(2)
    stream = iter(with_workers)
    batches = [next(stream)]  # the rank's process fetches the first batch's record batches itself
    source = with_workers.stream
    assert isinstance(source, PrefetchStream)
    temporary = source._temp
    assert (temporary is None) == (cache == "node")
    first_window = with_workers._lookahead()  # the workers start once the rank plans past it
    while not source.workers_started:
        assert len(batches) <= first_window, "the workers did not start after the rank's first window"
        batches.append(next(stream))
    deadline = time.monotonic() + 120
    while not source.workers_running:  # a worker process has started
        assert time.monotonic() < deadline, "no prefetch worker started in 120 s"
        time.sleep(0.02)
    batches += list(itertools.islice(stream, 20 - len(batches)))
    with_workers.close()
    assert [b["sample_id"].tolist() for b in batches] == [b["sample_id"].tolist() for b in alone]
    for batch in batches:
        assert_rows_match_ids(batch)
    io = with_workers.io
    assert sum(source._counters[1::2]) > 0  # the workers fetched...
    assert io["cache_hits"] + io.get("cache_waits", 0) > 0, dict(io)  # ...and the rank read it from the cache
    # every record batch once between the rank's process and its workers (the GETs counted include theirs)
    tails = sum(ds.manifest.shards[int(index.shard[b])].bytes - int(index.offset[b] + index.length[b])
                for b in range(len(index)) if index.last[b])
    assert io["bytes_fetched"] == int(index.length.sum()) + tails, dict(io)
    if temporary is not None:
        assert not Path(temporary).exists()  # the stream's own cache is removed with it
