"""The prepare CLI: synthetic SD3-shaped samples in bf16, and the digits demo's layout."""

from __future__ import annotations

import json

import torch

from dataloaders import open_dataset
from dataloaders.prepare import main


def test_synthetic_has_sd3_shapes_in_bf16(tmp_path):
    main(["synthetic", "--out", str(tmp_path / "syn"), "--samples", "6", "--resolution", "32",
          "--text-tokens", "3", "--shard-rows", "4"])
    ds = open_dataset(str(tmp_path / "syn"))
    assert len(ds) == 6 and len(ds.manifest.shards) == 2
    batch = next(iter(ds.loader(rank=0, world_size=1, global_batch_size=6, seed=0, shuffle=False)))
    assert batch["latent"].shape == (6, 16, 4, 4) and batch["latent"].dtype == torch.bfloat16
    assert batch["text_tokens"].shape == (6, 3, 4096) and batch["text_pooled"].shape == (6, 2048)
    assert batch["sample_id"].tolist() == list(range(6))


def test_digits_manifest_records_encoder_and_sizes(tmp_path):
    main(["digits", "--out", f"file://{tmp_path}/digits"])
    manifest = json.loads((tmp_path / "digits" / "manifest.json").read_text())
    assert manifest["num_samples"] == 1797
    assert manifest["text_encoder"]["name"] == "demo"
    shapes = {c["name"]: c["shape"] for c in manifest["columns"]}
    assert shapes["latent"] == [1, 8, 8] and shapes["text_tokens"] == [16, 64] and shapes["text_pooled"] == [64]
