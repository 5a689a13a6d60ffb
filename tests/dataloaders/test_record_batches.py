"""Record-batch reads: the index describes the shards, ranged reads give exactly the rows of whole-shard
reads, only the needed bytes are fetched, a corrupt batch is named and its neighbours still read, and
datasets written before the index still load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from dataloaders import CorruptShardError, open_dataset
from dataloaders.columns import infer_spec
from dataloaders.dataset import ReadOptions
from dataloaders.shards.index import RecordBatchIndex
from dataloaders.shards.reader import ShardReader
from dataloaders.writer import BATCH_BYTES, encode_shard
from tests.dataloaders.conftest import write_small

N, SHARD_ROWS, BATCH_ROWS = 96, 32, 8  # 3 shards of 4 record batches


@pytest.fixture
def batched_local(tmp_path) -> str:
    return write_small(str(tmp_path / "ds"), n=N, shard_rows=SHARD_ROWS, batch_rows=BATCH_ROWS)


def whole_shard_table(root: Path, relative: str) -> pa.Table:
    """The reference: pyarrow's own reading of the whole file."""
    return pa.ipc.open_file(pa.memory_map(str(root / relative))).read_all()


def read_all_batches(url: str, **reader_kw) -> tuple[ShardReader, dict]:
    ds = open_dataset(url, storage_options=reader_kw.get("storage_options"))
    reader = ShardReader(ds.manifest, ds.record_batches(), **reader_kw)
    return reader, reader.read_batches(list(range(len(ds.record_batches()))))


def test_the_index_locates_every_record_batch_of_every_shard(batched_local):
    ds = open_dataset(batched_local)
    root = Path(batched_local).parent
    index = RecordBatchIndex.decode((root / ds.manifest.record_batch_index.path).read_bytes(), ds.manifest, "index")
    assert not index.whole_shards and len(index) == N // BATCH_ROWS
    for s, info in enumerate(ds.manifest.shards):
        data = (root / info.path).read_bytes()
        mine = np.flatnonzero(index.shard == s)
        assert index.rows[mine].tolist() == [BATCH_ROWS] * (SHARD_ROWS // BATCH_ROWS)
        for k, i in enumerate(mine):
            message = data[index.offset[i]:index.offset[i] + index.length[i]]
            batch = pa.ipc.read_record_batch(pa.ipc.read_message(message), whole_shard_table(root, info.path).schema)
            assert batch.column("sample_id").to_pylist() == list(range(s * SHARD_ROWS + k * BATCH_ROWS,
                                                                       s * SHARD_ROWS + (k + 1) * BATCH_ROWS))


def test_default_record_batches_hold_about_8_mib():
    rows = np.zeros((40, 1 << 18), np.float32)  # 1 MiB per row
    _, ranges = encode_shard([infer_spec("x", rows)], {"x": rows})
    assert [r.rows for r in ranges] == [8] * 5 and BATCH_BYTES == 8 << 20


def test_ranged_reads_return_exactly_the_rows_of_a_whole_shard_read(batched_local):
    reader, batches = read_all_batches(batched_local)
    root = Path(batched_local).parent
    index = reader.index
    for s, info in enumerate(reader.manifest.shards):
        table = whole_shard_table(root, info.path)
        ids = np.flatnonzero(index.shard == s)
        for spec in reader.manifest.columns:
            ranged = [batches[i].columns[spec.name] for i in ids]
            if spec.kind == "string":
                assert sum(ranged, []) == table.column(spec.name).to_pylist()
            else:
                whole = table.column(spec.name).combine_chunks()
                flat = whole.values.to_numpy() if spec.kind == "tensor" else whole.to_numpy()
                assert np.array_equal(np.concatenate(ranged).reshape(-1), flat), spec.name


def test_ranged_reads_from_s3_equal_local_reads_and_fetch_only_what_is_asked(s3_bucket, tmp_path):
    local = write_small(str(tmp_path / "ds"), n=N, shard_rows=SHARD_ROWS, batch_rows=BATCH_ROWS)
    remote = write_small(f"{s3_bucket}/ds", n=N, shard_rows=SHARD_ROWS, batch_rows=BATCH_ROWS)
    _, want = read_all_batches(local)
    ds = open_dataset(remote)
    index = ds.record_batches()
    reader = ShardReader(ds.manifest, index)
    got = reader.read_batches([1])  # one batch from the middle of shard 0: one GET of exactly its bytes
    assert reader.take_counters() == {"bytes_fetched": index.length[1], "get_requests": 1}
    assert np.array_equal(got[1].columns["latent"], want[1].columns["latent"])
    reader.read_batches([5, 6])  # adjacent in shard 1: coalesced into one GET
    assert reader.take_counters() == {"bytes_fetched": index.length[5] + index.length[6], "get_requests": 1}
    reader.read_batches([8, 10])  # not adjacent: two GETs, and nothing in between
    assert reader.take_counters() == {"bytes_fetched": index.length[8] + index.length[10], "get_requests": 2}
    got = reader.read_batches(list(range(len(index))))
    for i in range(len(index)):
        assert got[i].columns["caption"] == want[i].columns["caption"]
        assert np.array_equal(got[i].columns["text_tokens"], want[i].columns["text_tokens"])


def flip_a_bit_in_record_batch(url: str, shard: int, batch: int) -> str:
    ds = open_dataset(url)
    index = ds.record_batches()
    i = int(np.flatnonzero((index.shard == shard) & (index.batch == batch))[0])
    path = Path(url).parent / ds.manifest.shards[shard].path
    data = bytearray(path.read_bytes())
    data[int(index.offset[i] + index.length[i]) - 16] ^= 0x01  # in the body's last buffer
    path.write_bytes(bytes(data))
    return ds.manifest.shards[shard].path


def test_a_corrupt_record_batch_is_named_and_its_neighbours_still_read(batched_local):
    path = flip_a_bit_in_record_batch(batched_local, shard=1, batch=2)
    _, batches = read_all_batches(batched_local)
    bad = 4 + 2
    assert isinstance(batches[bad], CorruptShardError)
    assert f"{path} is corrupt: checksum differs" in str(batches[bad]) and "record batch 2" in str(batches[bad])
    assert all(not isinstance(batches[i], Exception) for i in batches if i != bad)


def read_epoch(url: str, on_corrupt: str):
    ds = open_dataset(url)
    read = ReadOptions(on_corrupt=on_corrupt, retries=1)
    loader = ds.loader(rank=0, world_size=1, global_batch_size=N, seed=0, read=read, shuffle_block_size=32)
    return next(iter(loader)), loader


def test_a_corrupt_record_batch_fails_the_epoch_naming_shard_batch_and_url(batched_local):
    path = flip_a_bit_in_record_batch(batched_local, shard=0, batch=3)
    with pytest.raises(CorruptShardError, match=f"shard {Path(batched_local).parent}/{path} is corrupt: .*record batch 3"):
        read_epoch(batched_local, "fail")


def test_skip_policy_drops_and_counts_only_the_corrupt_record_batch(batched_local):
    path = flip_a_bit_in_record_batch(batched_local, shard=2, batch=1)
    batch, loader = read_epoch(batched_local, "skip")
    lost = set(range(2 * SHARD_ROWS + BATCH_ROWS, 2 * SHARD_ROWS + 2 * BATCH_ROWS))
    assert sorted(batch["sample_id"].tolist()) == sorted(set(range(N)) - lost)
    assert dict(loader.skipped) == {path: BATCH_ROWS}


def without_index(url: str) -> None:
    """Turn a dataset into what the writer produced before the index: the manifest lists no index."""
    manifest = json.loads(Path(url).read_text())
    del manifest["record_batch_index"]
    Path(url).write_text(json.dumps(manifest))


@pytest.mark.parametrize("batch_rows", [SHARD_ROWS, BATCH_ROWS])  # the old layout; several batches, no index
def test_datasets_without_an_index_load_whole_shards_with_the_same_samples(tmp_path, batch_rows):
    indexed = write_small(str(tmp_path / "new"), n=N, shard_rows=SHARD_ROWS, batch_rows=batch_rows)
    old = write_small(str(tmp_path / "old"), n=N, shard_rows=SHARD_ROWS, batch_rows=batch_rows)
    without_index(old)
    assert open_dataset(old).record_batches().whole_shards
    a, _ = read_epoch(indexed, "fail")
    b, loader = read_epoch(old, "fail")
    assert sorted(b["sample_id"].tolist()) == list(range(N))
    assert loader.io["get_requests"] == N // SHARD_ROWS  # one whole-shard GET each
    for key in ("sample_id", "latent", "text_pooled"):
        got = dict(zip(b["sample_id"].tolist(), b[key]))
        assert all(torch.equal(got[i], v) for i, v in zip(a["sample_id"].tolist(), a[key])), key
    if batch_rows == SHARD_ROWS:  # one batch per shard either way: the same order, sample for sample
        assert torch.equal(a["sample_id"], b["sample_id"])
