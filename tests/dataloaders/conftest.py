"""Small datasets shared by the loader tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataloaders.writer import DatasetWriter


def write_small(url: str, n: int = 300, shard_rows: int = 32, storage_options: dict | None = None,
                batch_rows: int | None = None) -> str:
    """A tiny dataset whose every column is a function of sample_id (so any mix-up is visible). Its rows are
    small, so by default each shard is one record batch; ``batch_rows`` makes several."""
    ids = np.arange(n, dtype=np.int64)
    with DatasetWriter(url, shard_rows=shard_rows, batch_rows=batch_rows, storage_options=storage_options,
                       text_encoder={"name": "demo", "settings": {"tokens": 3, "width": 4}}) as w:
        w.set_empty_condition(torch.zeros(3, 4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16))
        w.write({
            "sample_id": ids,
            "latent": torch.arange(n * 2 * 2 * 2, dtype=torch.float32).reshape(n, 2, 2, 2).to(torch.bfloat16),
            "text_tokens": torch.from_numpy(np.repeat(ids[:, None, None], 12, 1).reshape(n, 3, 4).astype(np.float32)),
            "text_pooled": torch.from_numpy(np.repeat(ids[:, None], 4, 1).astype(np.float16)),
            "caption": [f"caption {i}" for i in ids],
        })
    return w.url


def run_ranks(loaders: list, batches: int, state: dict | None = None) -> tuple[list[int], dict]:
    """Step every rank's loader (one per rank, in rank order) `batches` times, after loading `state` if given;
    the global sample sequence (rank slices side by side) and the final state, which all ranks must share."""
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    streams = [iter(loader) for loader in loaders]
    ids = []
    for _ in range(batches):
        ids.extend(torch.cat([next(s)["sample_id"] for s in streams]).tolist())
    states = [loader.state_dict() for loader in loaders]
    for loader in loaders:
        loader.close()
    assert all(s == states[0] for s in states), "ranks disagree on the loader state"
    return ids, states[0]


@pytest.fixture
def small_local(tmp_path) -> str:
    return write_small(str(tmp_path / "small"))
