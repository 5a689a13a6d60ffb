"""Tiny randomly initialised SD3 encoders (VAE, two CLIPs, T5) saved to local folders, and an image folder
with captions: real models of the real classes, small enough for a unit test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

WORDS = ["<pad>", "<eos>", "<unk>", "a", "red", "blue", "square", "circle", "on", "white"]
CAPTIONS = ["a red square", "a blue circle on white", "a red circle"]


def save_word_tokenizer(folder) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(folder)


def write_models(root: Path) -> Path:
    """clip_l, clip_g, t5 and vae folders under ``root`` (a 4-channel VAE with one 2x downsampling)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

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


def write_image_folder(folder: Path) -> list[str]:
    """Three random images with their captions (``NAME.txt``); returns the captions in file order."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    return list(CAPTIONS)


def encode_dataset(models: Path, images: Path, out: Path, resolution: int = 16, t5_tokens: int = 4) -> str:
    """``python -m dataloaders.prepare encode`` on the image folder; returns the dataset's root."""
    from dataloaders.prepare import main

    main(["encode", "--out", str(out), "--images", str(images), "--vae", str(models / "vae"),
          "--clip", str(models / "clip_l"), "--t5", str(models / "t5"), "--resolution", str(resolution),
          "--t5-tokens", str(t5_tokens)])
    return str(out)
