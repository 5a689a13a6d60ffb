"""Sample grids: model outputs to viewable images."""

from __future__ import annotations

import numpy as np
import torch


def latents_to_images(latents: torch.Tensor) -> torch.Tensor:
    """Model outputs (B, C, H, W) to images in [0, 1].

    Pixel-space data (1 or 3 channels in [-1, 1], e.g. the digits demo) maps directly; latents of other
    widths have no decoder here, so their first three channels are shown, each normalised.
    """
    x = latents.detach().float().cpu()
    if x.shape[1] in (1, 3):
        return ((x + 1) / 2).clamp(0, 1)
    x = x[:, :3]
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-6)


def image_decoder(url: str, storage_options: dict | None = None, device: str | torch.device = "cpu"):
    """Latents of the dataset at ``url`` -> images in [0, 1]: through the dataset's VAE when its manifest
    records one (the ``encode`` path; loaded on first use, on ``device``, in the recorded precision),
    otherwise ``latents_to_images`` (pixel-space data such as the digits demo, or latents without a VAE)."""
    from dataloaders.dataset import open_dataset

    record = open_dataset(url, storage_options).manifest.extra.get("vae")
    if not record:
        return latents_to_images
    from dataloaders.encoders import LatentDecoder

    return LatentDecoder(record, device)


def make_grid(images: torch.Tensor, nrow: int, scale: int = 1, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> one uint8 (rows*H, nrow*W, 3) grid, each tile upscaled ``scale`` times."""
    x = images.float().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    n, c, h, w = x.shape
    rows = -(-n // nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = x[i]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def save_png(grid: np.ndarray, path) -> None:
    from PIL import Image

    Image.fromarray(grid).save(path)
