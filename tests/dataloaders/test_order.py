"""The global order: a permutation per epoch, independent of ranks, measurably well mixed, and exactly what
the loader delivers."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from dataloaders import open_dataset
from dataloaders.sampler.order import GlobalOrder, shuffle_quality
from tests.dataloaders.conftest import assert_rows_match_ids, write_small

SHARDS = [64] * 40 + [17]  # 2,577 samples


def flat(order: GlobalOrder, epoch: int) -> np.ndarray:
    shards, rows = order.epoch_sequence(epoch)
    starts = np.concatenate([[0], np.cumsum(SHARDS)[:-1]])
    return starts[shards] + rows


def test_each_epoch_is_a_permutation():
    order = GlobalOrder(SHARDS, seed=5, block_size=512)
    for epoch in range(3):
        assert sorted(flat(order, epoch)) == list(range(sum(SHARDS)))


def test_locate_in_pieces_equals_locate_at_once():
    order = GlobalOrder(SHARDS, seed=5, block_size=512)
    whole = order.locate(1000, 4000)
    pieces = [order.locate(start, 250) for start in range(1000, 5000, 250)]
    for i in range(3):
        assert np.array_equal(whole[i], np.concatenate([p[i] for p in pieces]))


def test_order_depends_on_seed_and_epoch_only():
    a, b = GlobalOrder(SHARDS, seed=1, block_size=512), GlobalOrder(SHARDS, seed=1, block_size=512)
    assert np.array_equal(flat(a, 2), flat(b, 2))
    assert not np.array_equal(flat(a, 0), flat(a, 1))
    assert not np.array_equal(flat(a, 0), flat(GlobalOrder(SHARDS, seed=2, block_size=512), 0))


def test_block_shuffle_mixes_shards_within_a_batch():
    # Blocks of 10 shards' worth of samples (the rule of thumb): a 64-sample window then draws from
    # most of the shards a uniform permutation would, and samples travel as far as under one.
    order = GlobalOrder(SHARDS, seed=0, block_size=640)
    q = shuffle_quality(*order.epoch_sequence(0), SHARDS, window=64)
    assert q["shards_per_window"] > 0.25 and q["displacement"] > 0.8
    unshuffled = GlobalOrder(SHARDS, seed=0, shuffle=False)
    q0 = shuffle_quality(*unshuffled.epoch_sequence(0), SHARDS, window=64)
    assert q0["displacement"] == 0 and q0["shards_per_window"] < q["shards_per_window"] / 5


def test_larger_blocks_mix_better():
    quality = [shuffle_quality(*GlobalOrder(SHARDS, seed=0, block_size=b).epoch_sequence(0), SHARDS, window=64)
               ["shards_per_window"] for b in (64, 256, 1024, 4096)]
    assert quality == sorted(quality) and quality[-1] > 0.9


def test_loader_delivers_the_global_order_row_by_row(tmp_path):
    """The small dataset's sample_id is its stored position, so the loader's ids must be the order's
    sequence itself (across an epoch boundary), with every column of each row belonging to its id."""
    url = write_small(str(tmp_path / "ds"), n=150, shard_rows=32)
    ds = open_dataset(url)
    order = GlobalOrder([shard.rows for shard in ds.manifest.shards], seed=11, block_size=48)
    starts = np.concatenate([[0], np.cumsum(order.shard_rows)[:-1]])
    expected = np.concatenate([starts[shards] + rows for shards, rows in map(order.epoch_sequence, (0, 1))])
    loader = ds.loader(rank=0, world_size=1, global_batch_size=40, seed=11, shuffle_block_size=48)
    batches = list(itertools.islice(loader, 6))  # 240 samples: the epoch, then 90 of the next
    for batch in batches:
        assert_rows_match_ids(batch)
    assert torch.cat([b["sample_id"] for b in batches]).tolist() == expected[:240].tolist()
