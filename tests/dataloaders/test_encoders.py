"""Real-data encoding (VAE + CLIP + T5 from local folders), with tiny randomly initialised models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import require

require("transformers")
require("diffusers")

from tests.dataloaders.tiny_encoders import encode_dataset, write_image_folder, write_models  # noqa: E402

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def image_folder(tmp_path):
    return tmp_path, write_image_folder(tmp_path)


def test_text_layout_follows_sd3(model_dirs):
    from dataloaders.encoders import SD3Encoder

    enc = SD3Encoder.from_local(clip=[str(model_dirs / "clip_l"), str(model_dirs / "clip_g")],
                                t5=str(model_dirs / "t5"), t5_tokens=5, clip_tokens=7)
    tokens, pooled = enc.encode(["a red square", "a blue circle"])
    assert tokens.shape == (2, 7 + 5, 40)  # CLIP tokens then T5 tokens, at T5's width
    assert pooled.shape == (2, 6 + 10)  # both CLIP projections
    assert torch.all(tokens[:, :7, 12 + 20:] == 0)  # CLIP channels zero-padded up to T5's width
    assert not torch.allclose(tokens[0], tokens[1])


def test_prepare_encode_writes_a_dataset_whose_encoder_can_be_rebuilt(model_dirs, image_folder, tmp_path):
    import dataloaders
    images, captions = image_folder
    out = Path(encode_dataset(model_dirs, images, tmp_path / "encoded"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["text_encoder"]["name"] == "sd3"
    ds = dataloaders.open_dataset(str(out))
    batch = next(iter(ds.loader(rank=0, world_size=1, global_batch_size=3, seed=0, shuffle=False)))
    assert batch["latent"].shape == (3, 4, 8, 8) and batch["latent"].dtype == torch.bfloat16
    assert batch["caption"] == captions
    tokens, pooled = dataloaders.load_text_encoder(str(out)).encode(captions)
    assert torch.equal(tokens.to(torch.bfloat16), batch["text_tokens"])
    assert torch.equal(pooled.to(torch.bfloat16), batch["text_pooled"])


def test_the_recorded_vae_decodes_latents_to_rgb_images_of_the_dataset_resolution(model_dirs, image_folder, tmp_path):
    import dataloaders
    from dataloaders.encoders import LatentDecoder
    from orchestration.images import image_decoder, make_grid

    out = encode_dataset(model_dirs, image_folder[0], tmp_path / "encoded")
    record = dataloaders.open_dataset(out).manifest.extra["vae"]
    assert record == {"path": str(model_dirs / "vae"), "scaling_factor": 1.5, "shift_factor": 0.1, "dtype": "float32"}
    decode = image_decoder(out)
    assert isinstance(decode, LatentDecoder)
    batch = next(iter(dataloaders.open_dataset(out).loader(rank=0, world_size=1, global_batch_size=3, seed=0)))
    images = decode(batch["latent"])
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1 and float(images.std()) > 0
    assert make_grid(images, nrow=3).shape == (1 + 17, 1 + 3 * 17, 3)  # one row of RGB tiles, 1 px apart


def test_datasets_without_a_vae_keep_the_direct_rendering(tmp_path):
    from dataloaders.prepare import write_digits
    from orchestration.images import image_decoder, latents_to_images

    assert image_decoder(write_digits(str(tmp_path / "digits"))) is latents_to_images
