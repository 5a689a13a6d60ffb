"""Forward-mode derivatives of the MM-DiT's layers, written out: the tangent half of sCD's JVP pass.

sCD needs, for the student at frozen weights, the primal F and its directional derivative along
(dx, dtau) (SCD.md section 3). ``torch.func.jvp`` gets it by running every op on dual tensors, which on
eager PyTorch roughly doubles the op count and cannot record a graph for backward through FSDP2
(pytorch#182641). Here each layer propagates its tangent next to its primal instead: the primal keeps
its ordinary autograd graph (so the same pass is also sCD's with-grad pass, rCM's fused step), and the
tangent is computed from the primal's values under ``no_grad``: the tangent is stop-gradient.

Weights are frozen for the tangent (theta^- = stop-grad theta), so a linear layer's tangent is
``dx @ W^T`` with no bias. Tangents are computed in their own dtype (the caller's fp32 when the primal
runs under bf16 autocast), with primal values cast to it; only the matmuls' operands may be narrower, for
the duration of a ``matmul_precision`` scope (sCD's ``distill.tangent_precision``).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


# The dtype of the tangent matmuls' operands while a ``matmul_precision("bf16")`` scope is open; None: the
# tangent's own dtype. A module global like autocast's own state: the layers read it where FSDP2 has gathered
# their weights, deep inside the model, where no argument reaches.
_matmul_dtype: torch.dtype | None = None


@contextlib.contextmanager
def matmul_precision(precision: str):
    """The precision of the tangent's matmuls (linear layers, the patch convolution, attention) inside the scope:
    "fp32" leaves them in the tangent's dtype under PyTorch's settings as they are (by default IEEE matmuls, and
    TF32 cuDNN convolutions: only the patch embedding's); "tf32" allows TF32 for fp32 matmuls and convolutions
    (CUDA; nothing changes elsewhere); "bf16" feeds them bf16 operands (fp32 accumulation) and returns the
    result in the tangent's dtype, so that the elementwise rules and the tangent between layers stay fp32."""
    global _matmul_dtype
    if precision not in ("fp32", "tf32", "bf16"):
        raise ValueError(f"unknown tangent precision {precision!r}; use fp32, tf32 or bf16 (distill.tangent_precision)")
    saved = _matmul_dtype, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if precision == "bf16":
        _matmul_dtype = torch.bfloat16
    if precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        _matmul_dtype, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The operand dtype of a tangent matmul whose tangent has ``dtype`` (see ``matmul_precision``)."""
    return _matmul_dtype or dtype


@contextlib.contextmanager
def tangent_mode(device_type: str):
    """No graph and no autocast: tangents are stop-gradient and keep the dtype they were given."""
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        yield


def in_backward() -> bool:
    """True while the autograd engine runs, e.g. activation checkpointing's recompute of a block's forward,
    whose tangents nobody reads."""
    return torch._C._current_graph_task_id() != -1


def linear(weight: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Tangent of ``F.linear(x, weight, bias)`` at frozen weights: ``dx @ weight^T``."""
    dtype = matmul_dtype(dx.dtype)
    return F.linear(dx.to(dtype), weight.to(dtype)).to(dx.dtype)


def silu(x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Tangent of SiLU: ``dx * silu'(x)`` (an elementwise Jacobian is its own transpose, so SiLU's backward
    kernel is also its JVP)."""
    return torch.ops.aten.silu_backward(dx, x.to(dx.dtype))


def gelu_tanh(x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Tangent of the tanh-approximated GELU: ``dx * gelu'(x)``."""
    return torch.ops.aten.gelu_backward(dx, x.to(dx.dtype), approximate="tanh")


def layer_norm(x: torch.Tensor, dx: torch.Tensor, eps: float) -> torch.Tensor:
    """Tangent of a LayerNorm without affine over the last dim: ``rstd (dx - mean(dx) - y mean(y dx))``.

    That Jacobian, ``rstd (I - 11^T/n - y y^T/n)``, is symmetric, so LayerNorm's backward kernel computes
    it in one op given the forward's mean and rstd.
    """
    x = x.to(dx.dtype)
    var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
    rstd = torch.rsqrt(var + eps)
    shape = (x.shape[-1],)
    return torch.ops.aten.native_layer_norm_backward(dx, x, shape, mean, rstd, None, None, [True, False, False])[0]


def rms_norm(x: torch.Tensor, dx: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Tangent of ``x rsqrt(mean(x^2) + eps) * weight`` over the last dim:
    ``weight * r (dx - x r^2 mean(x dx))``, r = rsqrt(mean(x^2) + eps)."""
    x = x.to(dx.dtype)
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(dx.dtype) * r * (dx - x * (r * r) * (x * dx).mean(-1, keepdim=True))


def modulate(h: torch.Tensor, dh: torch.Tensor, scale: torch.Tensor, dshift: torch.Tensor,
             dscale: torch.Tensor) -> torch.Tensor:
    """Tangent of adaLN's ``h (1 + scale) + shift`` with (B, D) modulations broadcast over the sequence."""
    dtype = dh.dtype
    return torch.addcmul(dshift[:, None], h.to(dtype), dscale[:, None]).addcmul_(dh, 1 + scale.to(dtype)[:, None])


def modulations(weight: torch.Tensor, c: torch.Tensor, dc: torch.Tensor, chunks: int) -> tuple[torch.Tensor, ...]:
    """Tangent of adaLN's modulations ``Linear(SiLU(c)).chunk(chunks)``, (B, D) each."""
    return linear(weight, silu(c, dc)).chunk(chunks, dim=-1)


def modulated_layer_norm(x: torch.Tensor, dx: torch.Tensor, normed: torch.Tensor, scale: torch.Tensor,
                         dshift: torch.Tensor, dscale: torch.Tensor, eps: float) -> torch.Tensor:
    """Tangent of adaLN's ``modulate(layer_norm(x), shift, scale)``, given the primal's ``normed = layer_norm(x)``."""
    return modulate(normed, layer_norm(x, dx, eps), scale, dshift, dscale)


def gated_residual(ds: torch.Tensor, gate: torch.Tensor, dgate: torch.Tensor, y: torch.Tensor,
                   dy: torch.Tensor) -> torch.Tensor:
    """Tangent of the gated residual update ``s + gate[:, None] * y``, given the tangent ds of s."""
    dtype = dy.dtype
    return torch.addcmul(ds, dgate[:, None], y.to(dtype)).addcmul_(gate.to(dtype)[:, None], dy)


def timestep_embedding(t: torch.Tensor, dt: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Tangent of ``[cos(t w_i), sin(t w_i)]`` (``mmdit.timestep_embedding``): ``[-sin, cos](t w_i) w_i dt``."""
    half = dim // 2
    dtype = dt.dtype
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    rate = dt[:, None] * freqs[None]
    return torch.cat([-torch.sin(args) * rate, torch.cos(args) * rate], dim=-1)
