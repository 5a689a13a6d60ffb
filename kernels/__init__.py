"""Attention for flowscale: the single entry point every model layer calls."""

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention, shapes (B, heads, S, head_dim), scale 1/sqrt(head_dim), no mask."""
    return F.scaled_dot_product_attention(q, k, v)


__all__ = ["attention"]
