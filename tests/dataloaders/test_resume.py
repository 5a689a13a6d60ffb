"""Exact and elastic resume: the concatenated sample ids equal an uninterrupted run, and every delivered row
is the one written for its sample_id."""

from __future__ import annotations

import itertools

import pytest

from dataloaders import open_dataset
from tests.dataloaders.conftest import assert_rows_match_ids, run_ranks, write_small

N = 300  # samples per epoch in the small dataset (shards of 32 rows: the last one is short)


def global_ids(url: str, world: int, batches: int, global_batch: int, state=None, workers: int = 0,
               seed: int = 7, block: int = 64):
    """Run every rank of a `world`-rank job for `batches` steps; the global sample order, the final state."""
    ds = open_dataset(url)
    loaders = [ds.loader(rank=r, world_size=world, global_batch_size=global_batch, seed=seed, shuffle_block_size=block,
                         num_workers=workers, prefetch=2) for r in range(world)]
    return run_ranks(loaders, batches, state)  # every delivered row checked against its sample_id


@pytest.fixture(scope="module")
def small_url(tmp_path_factory):
    return write_small(str(tmp_path_factory.mktemp("small") / "ds"), n=N)


@pytest.mark.parametrize("k", [1, 3, 7, 11])  # 11 x 30 = 330: past the epoch boundary; 7 x 30 ends mid-shard
def test_resume_after_k_batches_continues_exactly(small_url, k):
    uninterrupted, _ = global_ids(small_url, world=1, batches=14, global_batch=30)
    head, state = global_ids(small_url, world=1, batches=k, global_batch=30)
    tail, _ = global_ids(small_url, world=1, batches=14 - k, global_batch=30, state=state)
    assert head + tail == uninterrupted


def test_every_epoch_is_a_permutation_and_epochs_differ(small_url):
    ids, state = global_ids(small_url, world=1, batches=20, global_batch=30)
    assert sorted(ids[:N]) == list(range(N)) and sorted(ids[N:2 * N]) == list(range(N))
    assert ids[:N] != ids[N:2 * N] and state["epoch"] == 2


def test_seed_changes_the_order(small_url):
    a, _ = global_ids(small_url, world=1, batches=2, global_batch=30, seed=1)
    b, _ = global_ids(small_url, world=1, batches=2, global_batch=30, seed=2)
    assert a != b


@pytest.mark.parametrize("resume_world", [3, 1])
def test_elastic_resume_keeps_the_global_order(small_url, resume_world):
    uninterrupted, _ = global_ids(small_url, world=1, batches=10, global_batch=30)
    head, state = global_ids(small_url, world=2, batches=4, global_batch=30)
    tail, _ = global_ids(small_url, world=resume_world, batches=6, global_batch=30, state=state)
    assert head + tail == uninterrupted
    assert sorted(uninterrupted) == list(range(N))  # the epoch: every sample exactly once


def test_resume_with_worker_processes_matches_in_process_run(small_url):
    uninterrupted, _ = global_ids(small_url, world=1, batches=13, global_batch=30)
    head, state = global_ids(small_url, world=1, batches=5, global_batch=30, workers=2)
    tail, _ = global_ids(small_url, world=2, batches=8, global_batch=30, state=state, workers=2)
    assert head + tail == uninterrupted


def test_state_from_another_seed_is_refused(small_url):
    _, state = global_ids(small_url, world=1, batches=1, global_batch=30, seed=1)
    loader = open_dataset(small_url).loader(rank=0, world_size=1, global_batch_size=30, seed=2)
    with pytest.raises(ValueError, match="train.seed"):
        loader.load_state_dict(state)


def test_load_state_after_iter_restarts_from_the_loaded_position(small_url):
    _, state = global_ids(small_url, world=1, batches=3, global_batch=30)
    loader = open_dataset(small_url).loader(rank=0, world_size=1, global_batch_size=30, seed=7, shuffle_block_size=64)
    stale = iter(loader)
    next(stale)
    loader.load_state_dict(state)
    batch = next(iter(loader))
    assert_rows_match_ids(batch)
    resumed = batch["sample_id"].tolist()
    expected, _ = global_ids(small_url, world=1, batches=4, global_batch=30)
    assert resumed == expected[90:120]
    with pytest.raises(StopIteration):
        next(stale)  # the stale stream was closed, so it cannot silently feed old positions


def test_unshuffled_order_is_the_stored_order(small_url):
    loader = open_dataset(small_url).loader(rank=0, world_size=1, global_batch_size=30, seed=0, shuffle=False)
    batches = list(itertools.islice(loader, 10))
    for batch in batches:
        assert_rows_match_ids(batch)
    ids = list(itertools.chain.from_iterable(batch["sample_id"].tolist() for batch in batches))
    assert ids == list(range(N))
