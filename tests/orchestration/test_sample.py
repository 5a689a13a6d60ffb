"""Sampling from a checkpoint (orchestration/sample.py): latents of a dataset encoded through a VAE come
back as RGB images decoded by that VAE."""

from __future__ import annotations

import pytest
import torch

from infra.config import dump_config, load_config
from trainer import checkpoint
from trainer.loop import Trainer
from trainer.recipes import build_recipe

pytest.importorskip("diffusers")
from tests.dataloaders.tiny_encoders import encode_dataset, write_image_folder, write_models  # noqa: E402


def test_a_checkpoint_on_an_encoded_dataset_samples_rgb_images_through_its_vae(tmp_path):
    import dataloaders
    from orchestration.sample import sample_checkpoint

    (tmp_path / "images").mkdir()
    write_image_folder(tmp_path / "images")
    url = encode_dataset(write_models(tmp_path / "models"), tmp_path / "images", tmp_path / "encoded")
    ds = dataloaders.open_dataset(url)
    tokens, pooled = (ds.manifest.column(c).shape for c in ("text_tokens", "text_pooled"))
    cfg = load_config("demo", [
        "model.depth=1", "model.head_dim=16", "model.in_channels=4", "model.out_channels=4",
        f"model.context_dim={tokens[1]}", f"model.pooled_dim={pooled[0]}", "data.latent_size=8",
        f"data.text_tokens={tokens[0]}", f"data.url={url}", "sample.steps=2",
    ])
    trainer = Trainer(cfg, build_recipe("rectified_flow", cfg, ds.empty_condition()))
    directory = checkpoint.save(trainer, tmp_path / "checkpoint_00000000", config_yaml=dump_config(cfg))

    images, prompts = sample_checkpoint(str(directory), ["a red square", "a blue circle"], 2, seed=0, steps=2)
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32  # decoded: 8x8x4 latents -> 16x16 RGB
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert prompts == ["a red square"] * 2 + ["a blue circle"] * 2
