"""Small datasets shared by the loader tests, and the check that a delivered row is the one written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataloaders.writer import DatasetWriter


def small_columns(ids) -> dict:
    """Every column of the small dataset as a function of sample_id, so any mix-up is visible.

    The latent holds the id's eight base-16 digits, each offset by 16 x its position: small integers,
    exact in bf16, distinct for every id and every element position.
    """
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    position = np.arange(8)
    digits = ids[:, None] // 16**position % 16 + 16 * position
    return {
        "sample_id": ids,
        "latent": torch.from_numpy(digits.astype(np.float32)).reshape(n, 2, 2, 2).to(torch.bfloat16),
        "text_tokens": torch.from_numpy(np.repeat(ids[:, None, None], 12, 1).reshape(n, 3, 4).astype(np.float32)),
        "text_pooled": torch.from_numpy(np.repeat(ids[:, None], 4, 1).astype(np.float16)),
        "caption": [f"caption {i}" for i in ids],
    }


def write_small(url: str, n: int = 300, shard_rows: int = 32, storage_options: dict | None = None,
                batch_rows: int | None = None) -> str:
    """A tiny dataset of ``small_columns(range(n))``. Its rows are small, so by default each shard is one
    record batch; ``batch_rows`` makes several."""
    with DatasetWriter(url, shard_rows=shard_rows, batch_rows=batch_rows, storage_options=storage_options,
                       text_encoder={"name": "demo", "settings": {"tokens": 3, "width": 4}}) as w:
        w.set_empty_condition(torch.zeros(3, 4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16))
        w.write(small_columns(np.arange(n)))
    return w.url


def assert_rows_match_ids(batch: dict) -> None:
    """Every column of every row of a batch of the small dataset is what was written for its sample_id,
    with the stored dtype."""
    ids = batch["sample_id"]
    assert ids.dtype == torch.int64, ids.dtype
    expected = small_columns(ids.numpy())
    assert sorted(batch) == sorted(expected), f"columns {sorted(batch)}, written {sorted(expected)}"
    for name, want in expected.items():
        got = batch[name]
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype, f"column {name}: dtype {got.dtype}, written {want.dtype}"
            wrong = (got != want).flatten(1).any(1).nonzero().flatten().tolist()
        else:
            wrong = [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
        assert not wrong, f"column {name} does not belong to sample_id {ids[wrong].tolist()[:10]} (rows {wrong[:10]})"


def run_ranks(loaders: list, batches: int, state: dict | None = None) -> tuple[list[int], dict]:
    """Step every rank's loader (one per rank, in rank order) `batches` times, after loading `state` if given;
    the global sample sequence (rank slices side by side) and the final state, which all ranks must share."""
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    streams = [iter(loader) for loader in loaders]
    ids = []
    for _ in range(batches):
        for batch in (next(s) for s in streams):
            assert_rows_match_ids(batch)
            ids.extend(batch["sample_id"].tolist())
    states = [loader.state_dict() for loader in loaders]
    for loader in loaders:
        loader.close()
    assert all(s == states[0] for s in states), "ranks disagree on the loader state"
    return ids, states[0]


@pytest.fixture
def small_local(tmp_path) -> str:
    return write_small(str(tmp_path / "small"))
