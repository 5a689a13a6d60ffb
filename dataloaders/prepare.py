"""Build datasets: ``python -m dataloaders.prepare {digits,synthetic,encode} --out URL``.

- ``digits``: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, no download) as the demo
  dataset of the embedded default job: ``latent`` is the image as (1, 8, 8) float32 in [-1, 1], captions
  come from several templates (the canonical one is ``a handwritten digit {k}``), text is encoded by the
  built-in ``DemoTextEncoder`` (16 tokens of width 64, pooled width 64).
- ``synthetic``: random samples with SD3's shapes (16-channel latents at R/8, 4096-wide text tokens,
  2048-wide pooled, all bf16) for benchmarks and scale tests.
- ``encode``: real images + captions through a VAE and CLIP/T5 from local model folders
  (see ``dataloaders.encoders``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from dataloaders.text_encoders import DemoTextEncoder
from dataloaders.writer import DatasetWriter

DIGIT_TEMPLATES = (
    "a handwritten digit {k}",  # canonical: the sampling prompts use it
    "the number {k}, written by hand",
    "a scan of a handwritten {k}",
    "digit {k}",
    "a small grayscale image of the digit {k}",
)


def write_digits(out: str, *, shard_rows: int = 64, storage_options: dict | None = None,
                 progress: bool = False) -> str:
    """Write the digits demo dataset to ``out``; returns its manifest URL."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 8.0 - 1.0  # sklearn's 0..16 -> [-1, 1]
    labels = digits.target.astype(np.int64)
    n = len(labels)
    # Half the captions are canonical, the rest spread over the other templates (deterministically).
    template = np.where(np.arange(n) % 2 == 0, 0, 1 + (np.arange(n) // 2) % (len(DIGIT_TEMPLATES) - 1))
    captions = [DIGIT_TEMPLATES[t].format(k=int(k)) for t, k in zip(template, labels)]
    encoder = DemoTextEncoder(tokens=16, width=64)
    tokens, pooled = encoder.encode(captions)
    empty_tokens, empty_pooled = encoder.encode([""])
    with DatasetWriter(out, shard_rows=shard_rows, storage_options=storage_options,
                       text_encoder=encoder.describe(), progress=n if progress else False,
                       extra={"source": "sklearn.datasets.load_digits", "templates": list(DIGIT_TEMPLATES)}) as w:
        w.set_empty_condition(empty_tokens[0], empty_pooled[0])
        w.write({
            "sample_id": np.arange(n, dtype=np.int64),
            "latent": images[:, None],
            "text_tokens": tokens,
            "text_pooled": pooled,
            "caption": captions,
            "label": labels,
        })
    return w.url


def ensure_digits(directory: str | Path) -> str:
    """The digits dataset's URL under ``directory``, writing it first if it is not there yet.

    Safe when several ranks race here: each writes its own shard names and the manifest lands by rename.
    """
    manifest = Path(directory) / "manifest.json"
    if not manifest.exists():
        write_digits(str(directory))
    return str(manifest)


def write_synthetic(out: str, *, samples: int, resolution: int = 256, text_tokens: int = 154,
                    context_dim: int = 4096, pooled_dim: int = 2048, latent_channels: int = 16,
                    shard_rows: int = 64, batch_rows: int | None = None, seed: int = 0,
                    storage_options: dict | None = None, progress: bool = False) -> str:
    """Random bf16 samples with SD3's shapes (about 0.94 MiB each at 256² with 77 text tokens)."""
    if resolution % 8:
        raise ValueError(f"--resolution must be a multiple of 8 (the VAE's downsampling), got {resolution}")
    g = torch.Generator().manual_seed(seed)
    side = resolution // 8
    chunk = max(1, min(shard_rows, samples))
    with DatasetWriter(out, shard_rows=shard_rows, batch_rows=batch_rows, storage_options=storage_options,
                       text_encoder={"name": "synthetic", "settings": {"seed": seed}},
                       progress=samples if progress else False,
                       extra={"source": "synthetic", "resolution": resolution}) as w:
        w.set_empty_condition(torch.zeros(text_tokens, context_dim, dtype=torch.bfloat16),
                              torch.zeros(pooled_dim, dtype=torch.bfloat16))
        for first in range(0, samples, chunk):
            n = min(chunk, samples - first)
            w.write({
                "sample_id": np.arange(first, first + n, dtype=np.int64),
                "latent": torch.randn(n, latent_channels, side, side, generator=g).to(torch.bfloat16),
                "text_tokens": torch.randn(n, text_tokens, context_dim, generator=g).to(torch.bfloat16),
                "text_pooled": torch.randn(n, pooled_dim, generator=g).to(torch.bfloat16),
                "caption": [f"synthetic sample {i}" for i in range(first, first + n)],
            })
    return w.url


def _storage_options(args: argparse.Namespace) -> dict:
    return {"endpoint_url": args.endpoint_url} if args.endpoint_url else {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dataloaders.prepare", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="dataset root URL: a path, file://..., or s3://bucket/prefix")
        p.add_argument("--shard-rows", type=int, default=None, help="samples per shard")
        p.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL", ""),
                       help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)")

    common(sub.add_parser("digits", help="the bundled handwritten digits with demo text encodings"))
    syn = sub.add_parser("synthetic", help="random samples with SD3's shapes (bf16)")
    common(syn)
    syn.add_argument("--samples", type=int, required=True)
    syn.add_argument("--resolution", type=int, default=256)
    syn.add_argument("--text-tokens", type=int, default=154)
    syn.add_argument("--seed", type=int, default=0)
    enc = sub.add_parser("encode", help="images + captions through a local VAE and CLIP/T5")
    common(enc)
    enc.add_argument("--images", required=True, help="folder of images, each with a same-named .txt caption")
    enc.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder")
    enc.add_argument("--clip", action="append", default=[], help="local CLIP text-model folder (repeatable)")
    enc.add_argument("--t5", default="", help="local T5 encoder folder")
    enc.add_argument("--resolution", type=int, default=256)
    enc.add_argument("--t5-tokens", type=int, default=77)
    args = parser.parse_args(argv)

    options = _storage_options(args)
    if args.command == "digits":
        url = write_digits(args.out, shard_rows=args.shard_rows or 64, storage_options=options, progress=True)
    elif args.command == "synthetic":
        url = write_synthetic(args.out, samples=args.samples, resolution=args.resolution,
                              text_tokens=args.text_tokens, seed=args.seed, shard_rows=args.shard_rows or 64,
                              storage_options=options, progress=True)
    else:
        from dataloaders.encoders import SD3Encoder, write_image_folder

        encoder = SD3Encoder.from_local(vae=args.vae, clip=args.clip, t5=args.t5, t5_tokens=args.t5_tokens)
        url = write_image_folder(args.images, args.out, encoder, resolution=args.resolution,
                                 shard_rows=args.shard_rows or 64, storage_options=options)
    print(url)


if __name__ == "__main__":
    main()
