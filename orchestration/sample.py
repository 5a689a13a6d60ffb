"""Images from any saved checkpoint (EMA weights by default).

    python orchestration/sample.py --checkpoint URI --prompt "a handwritten digit 3" [--prompt ...] \\
        --num-per-prompt 8 --steps 25 --cfg 2.0 --seed 0 --out grid.png [--out-npz samples.npz]

URI is a checkpoint directory on local disk or any fsspec URL (``s3://...``). The checkpoint carries its
resolved config, which names the dataset whose text encoder and empty-caption encoding are used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from infra.config import JobConfig, build_config
from orchestration import paths
from trainer import checkpoint


def checkpoint_config(directory: Path) -> JobConfig:
    """The resolved config a local checkpoint was saved with."""
    saved = checkpoint.read_config(str(directory))
    if not saved:
        raise checkpoint.CheckpointError(
            f"checkpoint {directory} has no {checkpoint.CONFIG} (not a flowscale checkpoint?)")
    return build_config(saved, source=str(directory / checkpoint.CONFIG))


def sample_checkpoint(
    uri: str, prompts: list[str], num_per_prompt: int, seed: int, steps: int | None = None,
    cfg_scale: float | None = None, ema: bool = True, device: str | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """(images (N, C, H, W) float32 in [0, 1], prompt of each image), prompt-major. ``steps`` and
    ``cfg_scale`` default to the recipe's settings in the checkpoint's config. A remote checkpoint is
    fetched once into FLOWSCALE_HOME/cache."""
    from dataloaders.dataset import open_dataset
    from dataloaders.text_encoders import load_text_encoder
    from orchestration.images import image_decoder
    from trainer.recipes import build_recipe

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    directory = checkpoint.fetch(uri, paths.cache_dir())
    cfg = checkpoint_config(directory)
    opts = dict(cfg.data.storage_options)
    empty = open_dataset(cfg.data.url, opts).empty_condition()
    recipe = build_recipe(checkpoint.recipe_of(directory), cfg, empty)
    model = recipe.build_model().to_empty(device="cpu")
    checkpoint.load_weights(model, directory, ema=ema)
    model.to(dev).eval()
    encoder = load_text_encoder(cfg.data.url, opts)
    expanded = [p for p in prompts for _ in range(num_per_prompt)]
    tokens, pooled = encoder.encode(expanded)
    gen = torch.Generator(device=dev).manual_seed(seed)
    latents = recipe.sample(
        model, torch.as_tensor(tokens).float().to(dev), torch.as_tensor(pooled).float().to(dev), gen,
        steps=steps, cfg_scale=cfg_scale,
    )
    return image_decoder(cfg.data.url, opts, dev)(latents), expanded


def main(argv: list[str] | None = None) -> int:
    from orchestration.images import make_grid, save_png

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or URL")
    parser.add_argument("--prompt", action="append", required=True, help="a caption; repeat for more")
    parser.add_argument("--num-per-prompt", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25,
                        help="Euler steps of a pretraining checkpoint; 1 or 2 for a distilled student")
    parser.add_argument("--cfg", type=float, default=2.0,
                        help="guidance weight (a student trained with sampled guidance takes it as input)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", required=True, help="grid PNG path")
    parser.add_argument("--out-npz", default=None, help="also save images (N, C, H, W) float32 and prompts")
    args = parser.parse_args(argv)
    try:
        images, prompts = sample_checkpoint(
            args.checkpoint, args.prompt, args.num_per_prompt, args.seed, steps=args.steps, cfg_scale=args.cfg,
            ema=not args.raw, device=args.device,
        )
    except (checkpoint.CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scale = max(1, 64 // images.shape[-1])
    save_png(make_grid(images, nrow=args.num_per_prompt, scale=scale), args.out)
    if args.out_npz:
        np.savez(args.out_npz, images=images.numpy().astype(np.float32), prompts=np.array(prompts))
    print(f"wrote {len(prompts)} samples to {args.out}" + (f" and {args.out_npz}" if args.out_npz else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
