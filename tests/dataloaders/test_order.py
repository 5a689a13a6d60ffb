"""The global order: a permutation per epoch, independent of ranks, fixed partitions, and measurably well mixed."""

from __future__ import annotations

import numpy as np
import pytest

from dataloaders.sampler.order import GlobalOrder, shards_per_batch, shuffle_quality

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


# Record batches: 16 shards of 64 rows in batches of 8, the last shard short (1,000 samples, as in issue 14).
BATCH_ROWS = [8] * (15 * 8) + [8] * 5
BATCH_SHARDS = np.repeat(np.arange(16), [8] * 15 + [5])


def partitioned(partitions: int, seed: int = 0, block: int = 256, batch: int = 32) -> GlobalOrder:
    return GlobalOrder(BATCH_ROWS, seed, block_size=block, batch_shards=BATCH_SHARDS, partitions=partitions,
                       global_batch_size=batch)


def test_partitions_are_spans_of_nearly_equal_rows_fixed_by_the_seed():
    order = partitioned(4)
    assert sorted(np.concatenate(order.members).tolist()) == list(range(len(BATCH_ROWS)))
    assert order.partition_rows.max() - order.partition_rows.min() <= 8  # within one record batch
    for members in order.members:  # contiguous spans of shards: few shards are split between two partitions
        assert len(np.unique(BATCH_SHARDS[members])) <= 16 // 4 + 2
    assert all(np.array_equal(a, b) for a, b in zip(order.members, partitioned(4).members))
    assert not all(np.array_equal(a, b) for a, b in zip(order.members, partitioned(4, seed=1).members))


@pytest.mark.parametrize("partitions", [1, 2, 4, 8])
def test_every_pass_of_a_partition_is_a_permutation_of_its_samples(partitions):
    order = partitioned(partitions)
    for p, members in enumerate(order.members):
        positions = np.flatnonzero(order.pass_position(np.arange(2 * order.num_samples))[0] == p)
        _, batches, rows = order.locate(0, 2 * order.num_samples)
        for epoch in range(2):
            mine = positions[epoch * order.span:(epoch + 1) * order.span]
            got = set(zip(batches[mine].tolist(), rows[mine].tolist()))
            assert got == {(b, r) for b in members.tolist() for r in range(8)}  # padded passes repeat a few


@pytest.mark.parametrize("partitions", [1, 2, 4, 8])
def test_global_batches_draw_from_more_shards_than_a_uniform_permutation(partitions):
    order = partitioned(partitions)
    shards, _ = order.epoch_sequence(0)
    uniform = np.random.default_rng(0).permutation(np.repeat(np.arange(16), [64] * 15 + [40]))
    assert shards_per_batch(shards, 32, 16) >= 0.9 > shards_per_batch(uniform, 32, 16)
