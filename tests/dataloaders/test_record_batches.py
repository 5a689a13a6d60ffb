"""The record-batch index describes the shards: each batch's range decodes alone to its rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from dataloaders import open_dataset
from dataloaders.columns import infer_spec
from dataloaders.shards.index import RecordBatchIndex
from dataloaders.writer import BATCH_BYTES, encode_shard
from tests.dataloaders.conftest import write_small

N, SHARD_ROWS, BATCH_ROWS = 96, 32, 8  # 3 shards of 4 record batches


@pytest.fixture
def batched_local(tmp_path) -> str:
    return write_small(str(tmp_path / "ds"), n=N, shard_rows=SHARD_ROWS, batch_rows=BATCH_ROWS)


def whole_shard_table(root: Path, relative: str) -> pa.Table:
    """The reference: pyarrow's own reading of the whole file."""
    return pa.ipc.open_file(pa.memory_map(str(root / relative))).read_all()


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
