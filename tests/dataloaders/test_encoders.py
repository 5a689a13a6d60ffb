"""Real-data encoding (VAE + CLIP + T5 from local folders), with tiny randomly initialised models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import require

require("transformers")
require("diffusers")

WORDS = ["<pad>", "<eos>", "<unk>", "a", "red", "blue", "square", "circle", "on", "white"]


def save_word_tokenizer(folder) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(folder)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    for name, width, proj in (("clip_l", 12, 6), ("clip_g", 20, 10)):
        cfg = CLIPTextConfig(vocab_size=len(WORDS), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=77, projection_dim=proj,
                             pad_token_id=0, eos_token_id=1, bos_token_id=1)
        CLIPTextModelWithProjection(cfg).save_pretrained(root / name)
        save_word_tokenizer(root / name)
    T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=40, d_ff=48, num_layers=1, num_heads=2, d_kv=8,
                            pad_token_id=0, eos_token_id=1)).save_pretrained(root / "t5")
    save_word_tokenizer(root / "t5")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=4, sample_size=16, scaling_factor=1.5, shift_factor=0.1).save_pretrained(root / "vae")
    return root


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    captions = ["a red square", "a blue circle on white", "a red circle"]
    for i, caption in enumerate(captions):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
        (tmp_path / f"img{i}.txt").write_text(caption)
    return tmp_path, captions


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
    from dataloaders.prepare import main

    images, captions = image_folder
    out = tmp_path / "encoded"
    main(["encode", "--out", str(out), "--images", str(images), "--vae", str(model_dirs / "vae"),
          "--clip", str(model_dirs / "clip_l"), "--t5", str(model_dirs / "t5"), "--resolution", "16",
          "--t5-tokens", "4"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["text_encoder"]["name"] == "sd3"
    ds = dataloaders.open_dataset(str(out))
    batch = next(iter(ds.loader(rank=0, world_size=1, global_batch_size=3, seed=0, shuffle=False)))
    assert batch["latent"].shape == (3, 4, 8, 8) and batch["latent"].dtype == torch.bfloat16
    assert batch["caption"] == captions
    tokens, pooled = dataloaders.load_text_encoder(str(out)).encode(captions)
    assert torch.equal(tokens.to(torch.bfloat16), batch["text_tokens"])
    assert torch.equal(pooled.to(torch.bfloat16), batch["text_pooled"])
