"""The MM-DiT of Stable Diffusion 3 (Esser et al. 2024, section 4), sized by depth d.

Hidden width D = head_dim * d, d heads, d joint blocks. Each joint block has two streams with their own
weights (image tokens x and text tokens c) that meet in one softmax attention over the concatenated
sequence. The last block's context stream is "pre-only": it contributes keys and values and is then
discarded. All attention goes through ``kernels.attention`` so that its forward-mode JVP (sCD) has one
place to live.

For sCD's fused JVP pass, ``forward(..., tangents=(dx, dt))`` also propagates a tangent. Each primal is
written once; the modules compute the tangent beside it, in their ``tangent`` / ``*_tangent`` methods, from
the intermediates the primal returns (the per-layer rules are in ``trainer.models.tangent``).

Built on any device, including ``meta``; weights are set by ``init_weights`` (so FSDP2 can shard a
meta-built model first and initialise only its shards).
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from infra.config import ModelConfig
from trainer.models import tangent


# --------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim) as [sin(pos * w_i), cos(pos * w_i)], w_i = 10000^(-i / (dim/2))."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(N,) row and column indices -> (N, dim): half the channels encode the column, half the row."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a width divisible by 4, got {dim}")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


def sincos_2d_table(dim: int, grid: int) -> torch.Tensor:
    """The full (grid * grid, dim) table, row-major (SD3 builds this for grid = 192)."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return sincos_2d(dim, rows.flatten(), cols.flatten())


def cropped_pos_embed(dim: int, max_size: int, h: int, w: int) -> torch.Tensor:
    """The centre (h, w) crop of the (max_size x max_size) sin-cos table, as (h * w, dim), float64.

    Computed for the crop's positions only: the full 192^2 table of the 8B model would be 358 MB per
    replica for values that are a closed-form function of the position.
    """
    if h > max_size or w > max_size:
        raise ValueError(
            f"a {h}x{w} patch grid is larger than the {max_size}x{max_size} positional table "
            f"(model.pos_embed_max_size); use a smaller resolution or a larger table"
        )
    top, left = (max_size - h) // 2, (max_size - w) // 2
    rows, cols = torch.meshgrid(torch.arange(top, top + h), torch.arange(left, left + w), indexing="ij")
    return sincos_2d(dim, rows.flatten(), cols.flatten())


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) scaled times -> (B, dim) sinusoidal features [cos, sin] (positional, not Fourier features:
    large-bandwidth Fourier features destabilise the sCD JVP, SCD.md section 4)."""
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32)  # at least fp32 (bf16 t is upcast, fp64 kept)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class PatchEmbed(nn.Conv2d):
    """(B, C, H, W) -> (B, D, H/p, W/p): a p x p convolution with stride p; with ``dx``, (y, dy)."""

    def forward(self, x: torch.Tensor, dx: torch.Tensor | None = None):
        y = super().forward(x)
        if dx is None:
            return y
        with tangent.tangent_mode(x.device.type):
            return y, self.tangent(dx)

    def tangent(self, dx: torch.Tensor) -> torch.Tensor:
        """The convolution is linear: its tangent at frozen weights is dx convolved, without the bias."""
        dtype = tangent.matmul_dtype(dx.dtype)
        return F.conv2d(dx.to(dtype), self.weight.to(dtype), None, self.stride).to(dx.dtype)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear, the timestep and pooled-text embedders; with ``dx``, (y, dy)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, dx: torch.Tensor | None = None):
        h = self.fc1(x)  # (B, in_dim) -> (B, D)
        y = self.fc2(F.silu(h))
        if dx is None:
            return y
        with tangent.tangent_mode(x.device.type):
            return y, self.tangent(h, dx)

    def tangent(self, h: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        """The tangent along dx, given the primal's ``h = fc1(x)`` (SiLU's slope is read there)."""
        return tangent.linear(self.fc2.weight, tangent.silu(h, tangent.linear(self.fc1.weight, dx)))


class RMSNorm(nn.Module):
    """Per-head RMSNorm over the head dimension with a learnable scale (QK-norm, SD3 8B).

    Written out (not ``F.rms_norm``) so forward-mode AD has a formula on every backend.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # at least fp32: bf16 is upcast, fp64 kept
        xf = x.to(dtype)
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(dtype)).to(x.dtype)


def qk_norm_tangent(norm: nn.Module, x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """The tangent of a QK-norm at its primal input x: RMSNorm's, or dx itself for the identity (no QK-norm)."""
    return tangent.rms_norm(x, dx, norm.weight, norm.eps) if isinstance(norm, RMSNorm) else dx


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with (B, D) modulations broadcast over the sequence."""
    return x * (1 + scale[:, None]) + shift[:, None]


# --------------------------------------------------------------------------------------------------
# Joint block
# --------------------------------------------------------------------------------------------------


class PreAttention(NamedTuple):
    """What a stream's ``pre_attention`` keeps for its ``post_attention`` and for its tangent."""

    s: torch.Tensor  # (B, N, D) the stream in
    c: torch.Tensor  # (B, D) the conditioning vector
    mods: tuple[torch.Tensor, ...]  # (B, D) each: shift, scale, gate of attention, then of the MLP (pre-only: 2)
    normed: torch.Tensor  # (B, N, D) norm1(s)
    q: torch.Tensor  # (B, N, H, Dh) before the QK-norm
    k: torch.Tensor


class PostAttention(NamedTuple):
    """What a stream's ``post_attention`` keeps for its tangent."""

    mods: tuple[torch.Tensor, ...]  # as in PreAttention
    s: torch.Tensor  # (B, N, D) the stream after the attention branch
    normed: torch.Tensor  # (B, N, D) norm2(s)
    projected: torch.Tensor  # (B, N, D) proj(attention)
    hidden: torch.Tensor  # (B, N, mlp_ratio * D) the MLP's first linear, before the GELU
    mlp_out: torch.Tensor  # (B, N, D)


class StreamBlock(nn.Module):
    """One stream (image or text) of a joint block: adaLN-Zero, qkv with QK-norm, out-proj, MLP.

    ``pre_only`` (the text stream of the last block) keeps only the modulation of the attention input
    and the qkv projection: its k, v feed the image stream and its output is discarded.

    The two halves around the joint attention (SD3's ``pre_attention`` / ``post_attention``) also return
    the intermediates their tangents (``*_tangent``, sCD's JVP pass, ``trainer.models.tangent``) read, so
    the tangent recomputes no per-token tensor; with grad enabled autograd keeps them anyway. The tangent
    methods run under ``tangent.tangent_mode``, entered by ``JointBlock.forward``.
    """

    def __init__(self, cfg: ModelConfig, pre_only: bool = False):
        super().__init__()
        D, Dh = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.head_dim, self.pre_only = cfg.num_heads, Dh, pre_only
        self.adaLN_modulation = nn.Linear(D, (2 if pre_only else 6) * D)
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(D, 3 * D, bias=cfg.qkv_bias)
        self.ln_q = RMSNorm(Dh) if cfg.qk_norm else nn.Identity()
        self.ln_k = RMSNorm(Dh) if cfg.qk_norm else nn.Identity()
        if not pre_only:
            self.proj = nn.Linear(D, D)
            self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
            hidden = int(D * cfg.mlp_ratio)
            self.mlp = nn.Sequential(nn.Linear(D, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, D))

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, N, 3D) -> q, k, v as (B, N, H, Dh)."""
        return qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(2)

    def pre_attention(self, s: torch.Tensor, c: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], PreAttention]:
        """The stream s (B, N, D) under c (B, D) -> q, k, v as (B, H, N, Dh), and what the rest reads."""
        mods = self.adaLN_modulation(F.silu(c)).chunk(2 if self.pre_only else 6, dim=-1)
        shift_msa, scale_msa = mods[:2]
        normed = self.norm1(s)
        q, k, v = self.split_heads(self.qkv(modulate(normed, shift_msa, scale_msa)))  # (B, N, D) -> (B, N, H, Dh)
        qkv = (self.ln_q(q).transpose(1, 2), self.ln_k(k).transpose(1, 2), v.transpose(1, 2))  # -> (B, H, N, Dh)
        return qkv, PreAttention(s, c, mods, normed, q, k)

    def pre_attention_tangent(self, saved: PreAttention, ds: torch.Tensor, dc: torch.Tensor):
        """The tangent of ``pre_attention`` along (ds, dc): (dq, dk, dv) as (B, H, N, Dh), and the
        modulations' tangents."""
        dmods = tangent.modulations(self.adaLN_modulation.weight, saved.c, dc, len(saved.mods))
        dshift_msa, dscale_msa = dmods[:2]
        dh = tangent.modulated_layer_norm(saved.s, ds, saved.normed, saved.mods[1], dshift_msa, dscale_msa,
                                          self.norm1.eps)
        dq, dk, dv = self.split_heads(tangent.linear(self.qkv.weight, dh))
        dq, dk = qk_norm_tangent(self.ln_q, saved.q, dq), qk_norm_tangent(self.ln_k, saved.k, dk)
        return (dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)), dmods

    def post_attention(self, attn: torch.Tensor, saved: PreAttention) -> tuple[torch.Tensor, PostAttention]:
        """The stream's attention output (B, N, D) -> the stream after the gated attention and MLP branches,
        and what its tangent reads."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = saved.mods
        projected = self.proj(attn)
        s = saved.s + gate_msa[:, None] * projected
        normed = self.norm2(s)
        fc1, act, fc2 = self.mlp
        hidden = fc1(modulate(normed, shift_mlp, scale_mlp))  # (B, N, D) -> (B, N, mlp_ratio * D)
        mlp_out = fc2(act(hidden))
        return s + gate_mlp[:, None] * mlp_out, PostAttention(saved.mods, s, normed, projected, hidden, mlp_out)

    def post_attention_tangent(self, saved: PostAttention, ds: torch.Tensor, dattn: torch.Tensor, dmods):
        """The tangent of ``post_attention`` along the stream's tangent ds (its input to ``pre_attention``),
        the attention output's dattn and the modulations' dmods."""
        _, _, gate_msa, _, scale_mlp, gate_mlp = saved.mods
        _, _, dgate_msa, dshift_mlp, dscale_mlp, dgate_mlp = dmods
        fc1, _, fc2 = self.mlp
        ds = tangent.gated_residual(ds, gate_msa, dgate_msa, saved.projected, tangent.linear(self.proj.weight, dattn))
        dh = tangent.modulated_layer_norm(saved.s, ds, saved.normed, scale_mlp, dshift_mlp, dscale_mlp, self.norm2.eps)
        dmlp = tangent.linear(fc2.weight, tangent.gelu_tanh(saved.hidden, tangent.linear(fc1.weight, dh)))
        return tangent.gated_residual(ds, gate_mlp, dgate_mlp, saved.mlp_out, dmlp)


def joint_sequence(context_qkv, x_qkv) -> tuple[torch.Tensor, ...]:
    """The streams' (q, k, v), (B, H, L, Dh) and (B, H, N, Dh), as one [text, image] sequence (B, H, L + N, Dh)."""
    return tuple(torch.cat([a, b], 2) for a, b in zip(context_qkv, x_qkv))


def split_sequence(attn: torch.Tensor, n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, L + N, Dh) -> the text (B, L, D) and image (B, N, D) parts, heads merged."""
    attn = attn.transpose(1, 2).flatten(2)
    return attn[:, :n_ctx], attn[:, n_ctx:]


class JointBlock(nn.Module):
    """Two streams, one attention over the concatenated [text, image] sequence (SD3 order).

    ``block(context, x, c) -> (context, x)``; with the tangents ``dcontext, dx, dc`` it returns
    ``(context, x, dcontext, dx)``, the primal still recording its autograd graph when grad is enabled.
    """

    def __init__(self, cfg: ModelConfig, context_pre_only: bool = False):
        super().__init__()
        self.context_block = StreamBlock(cfg, pre_only=context_pre_only)
        self.x_block = StreamBlock(cfg)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor,
                dcontext: torch.Tensor | None = None, dx: torch.Tensor | None = None, dc: torch.Tensor | None = None):
        if dx is not None and tangent.in_backward():
            # Activation checkpointing's recompute needs only the primal's saved tensors: skip the tangent.
            return (*self.forward(context, x, c), None, None)
        (q, k, v), saved = self.pre_attention(context, x, c)
        if dx is None:
            context, x, _ = self.post_attention(kernels.attention(q, k, v), saved)
            return context, x
        with tangent.tangent_mode(x.device.type):
            (dq, dk, dv), dmods = self.pre_attention_tangent(saved, dcontext, dx, dc)
        dtype = tangent.matmul_dtype(dx.dtype)
        attn, dattn = kernels.attention_with_tangent(q, k, v, dq.to(dtype), dk.to(dtype), dv.to(dtype))
        dattn = dattn.to(dx.dtype)
        context, x, saved = self.post_attention(attn, saved)
        with tangent.tangent_mode(x.device.type):
            dcontext, dx = self.post_attention_tangent(saved, dcontext, dx, dattn, dmods)
        return context, x, dcontext, dx

    def pre_attention(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor):
        """-> q, k, v over the joint sequence, (B, H, L + N, Dh) each, and the streams' saved intermediates."""
        context_qkv, context_saved = self.context_block.pre_attention(context, c)
        x_qkv, x_saved = self.x_block.pre_attention(x, c)
        return joint_sequence(context_qkv, x_qkv), (context_saved, x_saved)

    def pre_attention_tangent(self, saved, dcontext: torch.Tensor, dx: torch.Tensor, dc: torch.Tensor):
        """-> (dq, dk, dv) over the joint sequence and the streams' modulation tangents."""
        context_dqkv, context_dmods = self.context_block.pre_attention_tangent(saved[0], dcontext, dc)
        x_dqkv, x_dmods = self.x_block.pre_attention_tangent(saved[1], dx, dc)
        return joint_sequence(context_dqkv, x_dqkv), (context_dmods, x_dmods)

    def post_attention(self, attn: torch.Tensor, saved):
        """The joint attention (B, H, L + N, Dh) -> context (None from a pre-only text stream), x, and the
        streams' saved intermediates. The image stream goes first: the order ops are recorded in fixes the
        order autograd sums the gradients of c in."""
        context_saved, x_saved = saved
        context_attn, x_attn = split_sequence(attn, context_saved.s.shape[1])
        x, x_saved = self.x_block.post_attention(x_attn, x_saved)
        if self.context_block.pre_only:
            return None, x, (None, x_saved)
        context, context_saved = self.context_block.post_attention(context_attn, context_saved)
        return context, x, (context_saved, x_saved)

    def post_attention_tangent(self, saved, dcontext: torch.Tensor, dx: torch.Tensor, dattn: torch.Tensor, dmods):
        """-> (dcontext, dx) after the block, from the joint attention's tangent dattn."""
        context_saved, x_saved = saved
        dcontext_attn, dx_attn = split_sequence(dattn, dcontext.shape[1])
        dx = self.x_block.post_attention_tangent(x_saved, dx, dx_attn, dmods[1])
        if self.context_block.pre_only:
            return None, dx
        return self.context_block.post_attention_tangent(context_saved, dcontext, dcontext_attn, dmods[0]), dx


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to patch_size^2 * out_channels per token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Linear(D, 2 * D)
        self.linear = nn.Linear(D, cfg.patch_size**2 * cfg.out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor, dx: torch.Tensor | None = None, dc: torch.Tensor | None = None):
        """Tokens (B, N, D) under c (B, D) -> (B, N, p*p*C_out); with the tangents (dx, dc), (y, dy)."""
        shift, scale = self.adaLN_modulation(F.silu(c)).chunk(2, dim=-1)
        normed = self.norm_final(x)
        y = self.linear(modulate(normed, shift, scale))
        if dx is None:
            return y
        with tangent.tangent_mode(x.device.type):
            return y, self.tangent(x, c, normed, scale, dx, dc)

    def tangent(self, x: torch.Tensor, c: torch.Tensor, normed: torch.Tensor, scale: torch.Tensor,
                dx: torch.Tensor, dc: torch.Tensor) -> torch.Tensor:
        """The tangent along (dx, dc), given the primal's inputs, ``norm_final(x)`` and the scale."""
        dshift, dscale = tangent.modulations(self.adaLN_modulation.weight, c, dc, 2)
        dh = tangent.modulated_layer_norm(x, dx, normed, scale, dshift, dscale, self.norm_final.eps)
        return tangent.linear(self.linear.weight, dh)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


# w in [1, 10] spans phases 100..1000 of the sinusoids, the range time_scale * t covers with SD3's scale.
GUIDANCE_FEATURE_SCALE = 100.0


class MMDiT(nn.Module):
    """``model(x, t, context, pooled) -> velocity``.

    x: (B, C_in, H, W) latents; t: (B,) rectified-flow time in [0, 1] (the network sees
    ``time_scale * t``); context: (B, L, C_ctx) text tokens; pooled: (B, C_pool) pooled text embedding.
    Returns (B, C_out, H, W). With ``model.guidance_embed`` the model also takes ``guidance``: (B,) CFG
    scales w, embedded like the time and added to the conditioning vector (the sCD student; Sana-Sprint).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = PatchEmbed(cfg.in_channels, D, kernel_size=p, stride=p)
        self.t_embedder = MLPEmbedder(cfg.time_freq_dim, D)
        self.y_embedder = MLPEmbedder(cfg.pooled_dim, D)
        self.context_embedder = nn.Linear(cfg.context_dim, D)
        if cfg.guidance_embed:
            self.g_embedder = MLPEmbedder(cfg.time_freq_dim, D)  # output layer zero-init: starts as the teacher
        self.joint_blocks = nn.ModuleList(
            JointBlock(cfg, context_pre_only=(i == cfg.depth - 1)) for i in range(cfg.depth)
        )
        self.final_layer = FinalLayer(cfg)
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    # ---- inputs ------------------------------------------------------------------------------------

    def check_inputs(self, x, t, context, pooled, guidance) -> None:
        cfg = self.cfg
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, H, W) latents, got shape {tuple(x.shape)}")
        B, _, H, W = x.shape
        if H % cfg.patch_size or W % cfg.patch_size:
            raise ValueError(
                f"x is {H}x{W}, not divisible by model.patch_size={cfg.patch_size}; crop or pad the latents"
            )
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},) (one time per sample), got {tuple(t.shape)}")
        if context.dim() != 3 or context.shape[0] != B or context.shape[2] != cfg.context_dim:
            raise ValueError(
                f"context must be (B={B}, L, model.context_dim={cfg.context_dim}), got {tuple(context.shape)}"
            )
        if pooled.shape != (B, cfg.pooled_dim):
            raise ValueError(
                f"pooled must be (B={B}, model.pooled_dim={cfg.pooled_dim}), got {tuple(pooled.shape)}"
            )
        if cfg.guidance_embed and (guidance is None or guidance.shape != t.shape):
            raise ValueError(
                f"this model has a guidance embedding (model.guidance_embed): pass guidance, one CFG scale per "
                f"sample of shape {tuple(t.shape)}, got {None if guidance is None else tuple(guidance.shape)}"
            )
        if not cfg.guidance_embed and guidance is not None:
            raise ValueError("guidance was given to a model without a guidance embedding (model.guidance_embed)")

    def pos_embed(self, h: int, w: int, device, dtype) -> torch.Tensor:
        key = (h, w, str(device), dtype)
        if key not in self._pos_cache:
            table = cropped_pos_embed(self.cfg.hidden_size, self.cfg.pos_embed_max_size, h, w)
            table = table.to(device=device, dtype=dtype)
            if torch._C._functorch.is_functorch_wrapped_tensor(table):
                # Built inside a torch.func transform (sCD's JVP pass): caching it would leak the transform's
                # wrapper tensor out of it (deepcopy and later transforms fail on it).
                return table
            self._pos_cache[key] = table
        return self._pos_cache[key]

    def image_tokens(self, patches: torch.Tensor) -> torch.Tensor:
        """The patch embedding (B, D, h, w) -> tokens (B, h*w, D) with their positions."""
        tokens = self.to_tokens(patches)
        return tokens + self.pos_embed(*patches.shape[2:], tokens.device, tokens.dtype)

    def conditioning(self, t: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None = None,
                     dt: torch.Tensor | None = None):
        """c = TimestepMLP(sinusoidal(time_scale * t)) + PooledMLP(pooled) [+ GuidanceMLP(sinusoidal(w))], (B, D);
        with the time tangent ``dt``, (c, dc): only the time carries a tangent."""
        scale = self.cfg.time_scale
        t_freq = timestep_embedding(scale * t, self.cfg.time_freq_dim).to(pooled.dtype)  # (B,) -> (B, time_freq_dim)
        if dt is None:
            c = self.t_embedder(t_freq)
        else:
            with tangent.tangent_mode(t.device.type):
                dt_freq = tangent.timestep_embedding(scale * t, scale * dt, self.cfg.time_freq_dim)
            c, dc = self.t_embedder(t_freq, dt_freq)
        c = c + self.y_embedder(pooled)
        if self.cfg.guidance_embed:
            g_freq = timestep_embedding(GUIDANCE_FEATURE_SCALE * guidance, self.cfg.time_freq_dim)
            c = c + self.g_embedder(g_freq.to(pooled.dtype))
        return c if dt is None else (c, dc)

    # ---- forward -----------------------------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
        guidance: torch.Tensor | None = None, return_conditioning: bool = False,
        tangents: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """-> velocity (B, C_out, H, W), or (velocity, c) with ``return_conditioning`` for heads that read the
        conditioning vector c (B, D) (sCD's log-variance head).

        ``tangents=(dx, dt)`` also returns the velocity's directional derivative along them at frozen weights,
        last in the tuple: ``(velocity, [c,] dvelocity)``. The primal is computed exactly as without tangents
        (with its autograd graph when grad is enabled); the tangent is stop-gradient and in dx's dtype. Each
        module computes it inside its own forward, where FSDP2 has gathered its weights.
        """
        self.check_inputs(x, t, context, pooled, guidance)
        h, w = x.shape[2] // self.cfg.patch_size, x.shape[3] // self.cfg.patch_size
        if tangents is None:
            tokens = self.image_tokens(self.x_embedder(x))
            c = self.conditioning(t, pooled, guidance)
            ctx = self.context_embedder(context)  # (B, L, C_ctx) -> (B, L, D)
            for block in self.joint_blocks:
                ctx, tokens = block(ctx, tokens, c)
            out = self.unpatchify(self.final_layer(tokens, c), h, w)
            return (out, c) if return_conditioning else out

        dx, dt = tangents
        patches, dpatches = self.x_embedder(x, dx)
        tokens, dtokens = self.image_tokens(patches), self.to_tokens(dpatches)  # the positions are constant
        c, dc = self.conditioning(t, pooled, guidance, dt)
        ctx = self.context_embedder(context)
        dctx = torch.zeros(ctx.shape, dtype=dx.dtype, device=ctx.device)  # text tokens carry no input tangent
        for block in self.joint_blocks:
            ctx, tokens, dctx, dtokens = block(ctx, tokens, c, dctx, dtokens, dc)
        out, dout = (self.unpatchify(y, h, w) for y in self.final_layer(tokens, c, dtokens, dc))
        return (out, c, dout) if return_conditioning else (out, dout)

    @staticmethod
    def to_tokens(patches: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, h*w, D), contiguous: a per-block-compiled block returned wrong gradients for the
        transposed layout (torch 2.13, CPU inductor; tests/trainer/test_mmdit.py)."""
        return patches.flatten(2).transpose(1, 2).contiguous()

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h*w, p*p*C_out) -> (B, C_out, h*p, w*p)."""
        B, p, C = tokens.shape[0], self.cfg.patch_size, self.cfg.out_channels
        x = tokens.reshape(B, h, w, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, h * p, w * p)

    # ---- initialisation ----------------------------------------------------------------------------

    def init_weights(self, seed: int = 0, assign: Callable[[nn.Parameter, torch.Tensor], None] | None = None) -> None:
        """Set every parameter from its own seeded generator (world-size independent).

        Each tensor is drawn whole on the CPU from a generator seeded by (seed, parameter name), so a
        sharded model (FSDP2 passes ``assign`` to copy just the local shard) gets bit-for-bit the
        weights of an unsharded one. Scheme (DiT/SD3): xavier-uniform linears with zero bias,
        N(0, 0.02) timestep MLP, zero adaLN modulations and final projection (adaLN-Zero: every
        block starts as the identity), unit QK-norm scales, zero output layer of the guidance MLP (a
        student starts exactly as its teacher whatever w it is given).
        """
        assign = assign or (lambda param, value: param.data.copy_(value))
        with torch.no_grad():
            for raw_name, param in self.named_parameters():
                name = canonical_name(raw_name)
                gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
                assign(param, self._initial_value(name, tuple(param.shape), gen).to(param.dtype))

    @staticmethod
    def _initial_value(name: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
        zero = name.endswith("bias") or "adaLN_modulation" in name
        if zero or name.startswith(("final_layer.linear", "g_embedder.fc2")):
            return torch.zeros(shape)
        if name.endswith(("ln_q.weight", "ln_k.weight")):
            return torch.ones(shape)
        if name.startswith("t_embedder"):
            return torch.randn(shape, generator=gen) * 0.02
        fan_out, fan_in = shape[0], math.prod(shape[1:])  # linear (out, in) and conv (out, in, p, p)
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def canonical_name(name: str) -> str:
    """A parameter's name without the wrapper prefixes that checkpointing and compile insert."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def build_mmdit(cfg: ModelConfig, device: torch.device | str = "cpu", seed: int = 0) -> MMDiT:
    """Build on the meta device, materialise on ``device``, then initialise (the FSDP2 path defers the
    last two steps until after sharding)."""
    with torch.device("meta"):
        model = MMDiT(cfg)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def count_params(model: nn.Module) -> dict[str, int]:
    """Total and per-stream parameter counts (``image``: x streams, ``text``: context streams)."""
    out = {"total": 0, "image_stream": 0, "text_stream": 0, "shared": 0}
    for name, p in model.named_parameters():
        n = p.numel()
        out["total"] += n
        if ".x_block." in name:
            out["image_stream"] += n
        elif ".context_block." in name or name.startswith("context_embedder"):
            out["text_stream"] += n
        else:
            out["shared"] += n
    return out


def expected_param_count(depth: int) -> int:
    """The spec's closed form at SD3's sizes (C 16, pooled 2048, context 4096, QK-norm, head_dim 64)."""
    d = depth
    return 147456 * d**3 - 34944 * d**2 + 417920 * d + 64
