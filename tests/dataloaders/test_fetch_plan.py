"""How the loader fetches: adjacent record batches of a shard share a GET, and with worker processes the
rank's own process builds the first batches while the workers start, without changing a sample."""

from __future__ import annotations

import itertools
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dataloaders import open_dataset
from dataloaders.dataset import ReadOptions, WorkerStream, fetch_units
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
    # the first batches' record batches come one per GET (2 * prefetch batches), the rest share GETs: about
    # 22 GETs here
    assert io["get_requests"] < 0.6 * record_batches, dict(io)
    for a, b in zip(coalesced, single):
        assert torch.equal(a["sample_id"], b["sample_id"])
        assert_rows_match_ids(a)
    assert sorted(torch.cat([b["sample_id"] for b in coalesced]).tolist()) == list(range(n))


def test_the_rank_process_builds_the_first_batches_while_workers_start(tmp_path):
    url = write_small(str(tmp_path / "ds"), n=160, shard_rows=16, batch_rows=4)
    ds = open_dataset(url)

    def loader(workers: int):
        return ds.loader(rank=0, world_size=1, global_batch_size=8, seed=1, shuffle_block_size=64,
                         num_workers=workers, prefetch=2,
                         read=ReadOptions(cache_dir=str(tmp_path / "cache") if workers else ""))

    alone = list(itertools.islice(loader(0), 30))  # past the epoch boundary (20 batches)
    with_workers = loader(2)
    stream = iter(with_workers)
    batches = [next(stream)]  # built here: the workers are still starting
    source = with_workers.stream
    assert isinstance(source, WorkerStream)
    deadline = time.monotonic() + 120
    while source._handoff[1] < 0:  # wait until a worker has started and fixed where the workers begin
        assert time.monotonic() < deadline, "no loader worker started in 120 s"
        time.sleep(0.02)
    batches += list(itertools.islice(stream, 29))
    with_workers.close()
    # 1 batch claimed when the first worker started, then the 2 x 2 batches the workers keep in flight
    assert source._handoff[1] == 5 and source.built == 5
    assert [b["sample_id"].tolist() for b in batches] == [b["sample_id"].tolist() for b in alone]
    for batch in batches:
        assert_rows_match_ids(batch)
