"""The trainer's contract: build_loader, batch layout, empty condition, demo dataset and encoder."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import dataloaders
from dataloaders.prepare import write_digits
from infra.config import DataConfig
from tests.dataloaders.conftest import assert_rows_match_ids, write_small


@pytest.fixture(scope="module")
def digits_url(tmp_path_factory) -> str:
    return write_digits(str(tmp_path_factory.mktemp("digits")))


def digits_cfg(url: str, **kw) -> DataConfig:
    return DataConfig(url=url, latent_size=8, text_tokens=16, shuffle_block_size=256, num_workers=0, **kw)


def test_batches_have_the_contract_layout(digits_url):
    loader = dataloaders.build_loader(digits_cfg(digits_url), rank=1, world_size=2, global_batch_size=64, seed=0)
    batch = next(iter(loader))
    assert batch["latent"].shape == (32, 1, 8, 8) and batch["latent"].dtype == torch.float32
    assert batch["text_tokens"].shape == (32, 16, 64) and batch["text_pooled"].shape == (32, 64)
    assert batch["sample_id"].dtype == torch.int64 and batch["sample_id"].shape == (32,)
    assert isinstance(batch["caption"], list) and all(isinstance(c, str) for c in batch["caption"])
    assert -1.0 <= batch["latent"].min() < batch["latent"].max() <= 1.0


def test_worker_processes_deliver_every_row_with_its_own_columns(tmp_path):
    url = write_small(str(tmp_path / "ds"), n=96, shard_rows=16)
    cfg = DataConfig(url=url, latent_size=2, text_tokens=3, shuffle_block_size=32, num_workers=2, prefetch=2)
    loader = dataloaders.build_loader(cfg, rank=1, world_size=2, global_batch_size=24, seed=5)
    batches = list(itertools.islice(loader, 5))  # past the epoch boundary
    loader.close()
    for batch in batches:
        assert_rows_match_ids(batch)


def test_indivisible_global_batch_is_an_error(digits_url):
    with pytest.raises(ValueError, match="not divisible by the 3"):
        dataloaders.build_loader(digits_cfg(digits_url), rank=0, world_size=3, global_batch_size=64, seed=0)


def test_shape_mismatch_with_config_is_an_error(digits_url):
    with pytest.raises(ValueError, match="data.latent_size=32"):
        dataloaders.build_loader(DataConfig(url=digits_url), rank=0, world_size=1, global_batch_size=8, seed=0)


def test_loader_is_infinite_and_counts_epochs(digits_url):
    loader = dataloaders.build_loader(digits_cfg(digits_url), rank=0, world_size=1, global_batch_size=600, seed=0)
    it = iter(loader)
    first = [next(it)["sample_id"] for _ in range(3)]  # exactly 1800 samples: the epoch plus 3
    assert loader.epoch == 1 and loader.samples_seen_in_epoch == 3
    assert sorted(torch.cat(first)[:1797].tolist()) == list(range(1797))
    next(it)
    assert loader.epoch == 1


def test_state_dict_is_plain_json(digits_url):
    loader = dataloaders.build_loader(digits_cfg(digits_url), rank=0, world_size=1, global_batch_size=64, seed=0)
    next(iter(loader))
    state = loader.state_dict()
    assert json.loads(json.dumps(state)) == state and state["samples_seen"] == 64


def test_empty_condition_matches_the_encoder_on_an_empty_caption(digits_url):
    empty = dataloaders.empty_condition(digits_url)
    tokens, pooled = dataloaders.load_text_encoder(digits_url).encode([""])
    assert empty["text_tokens"].shape == (16, 64) and empty["text_pooled"].shape == (64,)
    assert torch.equal(empty["text_tokens"], tokens[0]) and torch.equal(empty["text_pooled"], pooled[0])


def test_stored_text_is_what_the_recorded_encoder_gives(digits_url):
    batch = next(iter(dataloaders.build_loader(digits_cfg(digits_url), rank=0, world_size=1,
                                               global_batch_size=16, seed=3)))
    tokens, pooled = dataloaders.load_text_encoder(digits_url).encode(batch["caption"])
    assert torch.equal(tokens, batch["text_tokens"]) and torch.equal(pooled, batch["text_pooled"])


def test_digit_captions_match_their_images_label(digits_url):
    batch = next(iter(dataloaders.build_loader(digits_cfg(digits_url), rank=0, world_size=1,
                                               global_batch_size=128, seed=0)))
    for caption, label in zip(batch["caption"], batch["label"].tolist()):
        assert caption.split()[-1].strip(",") == str(label) or f" {label}," in caption
    assert any(c.startswith("a handwritten digit ") for c in batch["caption"])


def test_empty_url_is_an_error_that_names_the_key():
    with pytest.raises(ValueError, match="data.url is empty"):
        dataloaders.build_loader(digits_cfg(""), rank=0, world_size=1, global_batch_size=8, seed=0)
