"""Node-aware order: each node reads only its partitions' record batches, the same ones every epoch, and the
global sequence survives a restart on another node and rank count that divides the partition count."""

from __future__ import annotations

import numpy as np
import pytest

from dataloaders import open_dataset
from dataloaders.dataset import ReadOptions
from tests.dataloaders.conftest import run_ranks, write_small

N, SHARD_ROWS, BATCH_ROWS, G = 320, 32, 8, 32  # 10 shards of 4 record batches; 10 global batches per epoch


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> str:
    return write_small(str(tmp_path_factory.mktemp("nodes") / "ds"), n=N, shard_rows=SHARD_ROWS, batch_rows=BATCH_ROWS)


def run(url: str, nodes: int, ranks_per_node: int, batches: int, cache_root=None, state=None, partitions=None):
    """Every rank of a job for `batches` global batches: the global sample sequence, the final state, and per
    node the record batches its cache holds and the bytes its ranks fetched."""
    ds = open_dataset(url)
    world = nodes * ranks_per_node
    loaders = []
    for r in range(world):
        read = ReadOptions(cache_dir=str(cache_root / f"node{r // ranks_per_node}") if cache_root else "")
        loaders.append(ds.loader(rank=r, world_size=world, global_batch_size=G, seed=11, shuffle_block_size=64,
                                 read=read, ranks_per_node=ranks_per_node, partitions=partitions))
    ids, state = run_ranks(loaders, batches, state)
    fetched = [sum(loader.io["bytes_fetched"] for loader in loaders[n * ranks_per_node:(n + 1) * ranks_per_node])
               for n in range(nodes)]
    cached = [set() for _ in range(nodes)]
    if cache_root:
        for n in range(nodes):
            cached[n] = {int(p.name.split(".")[0]) for p in (cache_root / f"node{n}").glob("*/*.arrow-batch")}
    return ids, state, cached, fetched


def test_two_nodes_of_two_ranks_read_disjoint_shares_whose_union_is_the_epoch(url, tmp_path):
    ids, state, cached, fetched = run(url, nodes=2, ranks_per_node=2, batches=N // G, cache_root=tmp_path)
    assert sorted(ids) == list(range(N)) and state["partitions"] == 2  # the epoch, each sample once
    index = open_dataset(url).record_batches()
    assert cached[0].isdisjoint(cached[1]) and cached[0] | cached[1] == set(range(len(index)))
    samples = [{i for b in range(0, N, G) for i in ids[b + n * G // 2:b + (n + 1) * G // 2]} for n in range(2)]
    for n in range(2):  # a node's samples are those of the record batches it holds, and it fetched each once
        batches_of_samples = {int(np.flatnonzero(index.shard == i // SHARD_ROWS)[0]) + i % SHARD_ROWS // BATCH_ROWS
                              for i in samples[n]}
        assert batches_of_samples == cached[n]
        sizes = open_dataset(url).manifest.shards
        tails = sum(sizes[int(index.shard[b])].bytes - int(index.offset[b] + index.length[b])
                    for b in cached[n] if index.last[b])
        assert fetched[n] == int(index.length[sorted(cached[n])].sum()) + tails


def test_a_node_reads_the_same_share_every_epoch(url, tmp_path):
    _, _, first, _ = run(url, nodes=2, ranks_per_node=1, batches=N // G, cache_root=tmp_path / "one")
    _, _, both, _ = run(url, nodes=2, ranks_per_node=1, batches=2 * N // G, cache_root=tmp_path / "two")
    assert first == both


@pytest.mark.parametrize("nodes, ranks_per_node", [(1, 4), (4, 1)])
def test_the_order_is_identical_after_resuming_on_other_node_and_rank_counts(url, nodes, ranks_per_node):
    uninterrupted, _, _, _ = run(url, nodes=2, ranks_per_node=2, batches=14, partitions=4)
    head, state, _, _ = run(url, nodes=2, ranks_per_node=2, batches=5, partitions=4)
    tail, after, _, _ = run(url, nodes=nodes, ranks_per_node=ranks_per_node, batches=9, state=state)
    assert head + tail == uninterrupted and after["partitions"] == 4
    assert sorted(uninterrupted[:N]) == list(range(N))


def test_an_explicit_partition_count_that_differs_from_the_checkpoint_is_refused(url):
    _, state, _, _ = run(url, nodes=2, ranks_per_node=1, batches=1)
    loader = open_dataset(url).loader(rank=0, world_size=1, global_batch_size=G, seed=11, shuffle_block_size=64,
                                      partitions=4)
    with pytest.raises(ValueError, match="data.partitions"):
        loader.load_state_dict(state)


def test_resuming_with_another_global_batch_repeats_and_skips_nothing(url):
    head, state, _, _ = run(url, nodes=2, ranks_per_node=1, batches=2)  # each partition is 32 of 160 in
    loader = open_dataset(url).loader(rank=0, world_size=1, global_batch_size=2 * G, seed=11, shuffle_block_size=64)
    loader.load_state_dict(state)  # the partitions go on in chunks of 32 instead of 16
    stream = iter(loader)
    tail = [i for _ in range(4) for i in next(stream)["sample_id"].tolist()]
    loader.close()
    assert sorted(head + tail) == list(range(N))  # the epoch completes, each sample once
