"""The MM-DiT of Stable Diffusion 3 (Esser et al. 2024, section 4), sized by depth d.

Hidden width D = head_dim * d, d heads, d joint blocks. Each joint block has two streams with their own
weights (image tokens x and text tokens c) that meet in one softmax attention over the concatenated
sequence. The last block's context stream is "pre-only": it contributes keys and values and is then
discarded. All attention goes through ``kernels.attention`` so that its forward-mode JVP (sCD) has one
place to live.

Built on any device, including ``meta``; weights are set by ``init_weights`` (so FSDP2 can shard a
meta-built model first and initialise only its shards).
"""

from __future__ import annotations

import math
import zlib
from typing import Callable

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
    """(B, C, H, W) -> (B, D, H/p, W/p): a p x p convolution with stride p; with ``dx``, also its tangent."""

    def forward(self, x: torch.Tensor, dx: torch.Tensor | None = None):
        y = super().forward(x)
        if dx is None:
            return y
        with tangent.tangent_mode(x.device.type):
            dy = F.conv2d(dx, self.weight.to(dx.dtype), None, self.stride)
        return y, dy


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear, the timestep and pooled-text embedders; with ``dx``, also the tangent."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, dx: torch.Tensor | None = None):
        h = self.fc1(x)
        y = self.fc2(F.silu(h))
        if dx is None:
            return y
        with tangent.tangent_mode(x.device.type):
            dy = tangent.linear(self.fc2.weight, tangent.silu(h, tangent.linear(self.fc1.weight, dx)))
        return y, dy


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


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with (B, D) modulations broadcast over the sequence."""
    return x * (1 + scale[:, None]) + shift[:, None]


# --------------------------------------------------------------------------------------------------
# Joint block
# --------------------------------------------------------------------------------------------------


class StreamBlock(nn.Module):
    """One stream (image or text) of a joint block: adaLN-Zero, qkv with QK-norm, out-proj, MLP.

    ``pre_only`` (the text stream of the last block) keeps only the modulation of the attention input
    and the qkv projection: its k, v feed the image stream and its output is discarded.

    Both halves optionally carry a tangent (``ds`` of the stream, ``dc`` of the conditioning vector) next to
    the primal, for sCD's JVP pass (``trainer.models.tangent``).
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

    def pre_attention(self, s: torch.Tensor, c: torch.Tensor, ds: torch.Tensor | None = None,
                      dc: torch.Tensor | None = None):
        """-> q, k, v as (B, heads, N, head_dim) and the modulations the post-attention half needs; with
        tangents, also (dq, dk, dv) and the modulations' tangents."""
        n_mods = 2 if self.pre_only else 6
        mods = self.adaLN_modulation(F.silu(c)).chunk(n_mods, dim=-1)
        normed = self.norm1(s)
        h = modulate(normed, mods[0], mods[1])
        B, N, _ = h.shape
        q, k, v = self.qkv(h).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)  # (B, N, H, Dh) each
        qkv = (self.ln_q(q).transpose(1, 2), self.ln_k(k).transpose(1, 2), v.transpose(1, 2))
        if ds is None:
            return qkv, mods[2:]
        with tangent.tangent_mode(s.device.type):
            dmods = tangent.linear(self.adaLN_modulation.weight, tangent.silu(c, dc)).chunk(n_mods, dim=-1)
            dh = tangent.modulate(normed, tangent.layer_norm(s, ds, self.norm1.eps), mods[1], dmods[0], dmods[1])
            dq, dk, dv = tangent.linear(self.qkv.weight, dh).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)
            dqkv = (self._qk_norm_tangent(self.ln_q, q, dq).transpose(1, 2),
                    self._qk_norm_tangent(self.ln_k, k, dk).transpose(1, 2), dv.transpose(1, 2))
        return qkv, mods[2:], dqkv, dmods[2:]

    @staticmethod
    def _qk_norm_tangent(norm: nn.Module, x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        return tangent.rms_norm(x, dx, norm.weight, norm.eps) if isinstance(norm, RMSNorm) else dx

    def post_attention(self, s: torch.Tensor, attn: torch.Tensor, mods, ds: torch.Tensor | None = None,
                       dattn: torch.Tensor | None = None, dmods=None):
        """-> the stream after the gated attention and MLP branches; with tangents, (stream, its tangent)."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        projected = self.proj(attn)
        s = s + gate_msa[:, None] * projected
        normed = self.norm2(s)
        fc1, act, fc2 = self.mlp
        hidden = fc1(modulate(normed, shift_mlp, scale_mlp))
        mlp_out = fc2(act(hidden))
        out = s + gate_mlp[:, None] * mlp_out
        if ds is None:
            return out
        dgate_msa, dshift_mlp, dscale_mlp, dgate_mlp = dmods
        with tangent.tangent_mode(s.device.type):
            ds = tangent.gated_residual(ds, gate_msa, dgate_msa, projected, tangent.linear(self.proj.weight, dattn))
            dh = tangent.modulate(normed, tangent.layer_norm(s, ds, self.norm2.eps), scale_mlp, dshift_mlp, dscale_mlp)
            dmlp = tangent.linear(fc2.weight, tangent.gelu_tanh(hidden, tangent.linear(fc1.weight, dh)))
            dout = tangent.gated_residual(ds, gate_mlp, dgate_mlp, mlp_out, dmlp)
        return out, dout


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
        if dx is None:
            (cq, ck, cv), c_mods = self.context_block.pre_attention(context, c)
            (xq, xk, xv), x_mods = self.x_block.pre_attention(x, c)
        else:
            (cq, ck, cv), c_mods, (dcq, dck, dcv), dc_mods = self.context_block.pre_attention(context, c, dcontext, dc)
            (xq, xk, xv), x_mods, (dxq, dxk, dxv), dx_mods = self.x_block.pre_attention(x, c, dx, dc)
        n_ctx = context.shape[1]
        q, k, v = torch.cat([cq, xq], 2), torch.cat([ck, xk], 2), torch.cat([cv, xv], 2)
        if dx is None:
            out = kernels.attention(q, k, v)
        else:
            with tangent.tangent_mode(x.device.type):
                dq, dk, dv = torch.cat([dcq, dxq], 2), torch.cat([dck, dxk], 2), torch.cat([dcv, dxv], 2)
            out, dout = kernels.attention_with_tangent(q, k, v, dq, dk, dv)
            dout = dout.transpose(1, 2).flatten(2)
        out = out.transpose(1, 2).flatten(2)  # (B, H, S, Dh) -> (B, S, D)
        context_attn, x_attn = out[:, :n_ctx], out[:, n_ctx:]
        if dx is None:
            x = self.x_block.post_attention(x, x_attn, x_mods)
            if self.context_block.pre_only:
                return None, x
            return self.context_block.post_attention(context, context_attn, c_mods), x
        x, dx = self.x_block.post_attention(x, x_attn, x_mods, dx, dout[:, n_ctx:], dx_mods)
        if self.context_block.pre_only:
            return None, x, None, dx
        context, dcontext = self.context_block.post_attention(context, context_attn, c_mods, dcontext,
                                                              dout[:, :n_ctx], dc_mods)
        return context, x, dcontext, dx


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to patch_size^2 * out_channels per token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Linear(D, 2 * D)
        self.linear = nn.Linear(D, cfg.patch_size**2 * cfg.out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor, dx: torch.Tensor | None = None, dc: torch.Tensor | None = None):
        shift, scale = self.adaLN_modulation(F.silu(c)).chunk(2, dim=-1)
        normed = self.norm_final(x)
        y = self.linear(modulate(normed, shift, scale))
        if dx is None:
            return y
        with tangent.tangent_mode(x.device.type):
            dshift, dscale = tangent.linear(self.adaLN_modulation.weight, tangent.silu(c, dc)).chunk(2, dim=-1)
            dh = tangent.modulate(normed, tangent.layer_norm(x, dx, self.norm_final.eps), scale, dshift, dscale)
            dy = tangent.linear(self.linear.weight, dh)
        return y, dy


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

    def check_inputs(self, x, t, context, pooled) -> None:
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

    def conditioning(self, t: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None = None,
                     dt: torch.Tensor | None = None):
        """c = TimestepMLP(sinusoidal(time_scale * t)) + PooledMLP(pooled) [+ GuidanceMLP(sinusoidal(w))], (B, D);
        with the time tangent ``dt``, (c, dc) (only the time carries a tangent)."""
        scale = self.cfg.time_scale
        t_freq = timestep_embedding(scale * t, self.cfg.time_freq_dim).to(pooled.dtype)
        if dt is None:
            c = self.t_embedder(t_freq)
        else:
            with tangent.tangent_mode(t.device.type):
                dt_freq = tangent.timestep_embedding(scale * t, scale * dt, self.cfg.time_freq_dim)
            c, dc = self.t_embedder(t_freq, dt_freq)
        c = c + self.y_embedder(pooled)
        if self.cfg.guidance_embed:
            if guidance is None or guidance.shape != t.shape:
                raise ValueError(
                    f"this model has a guidance embedding (model.guidance_embed): pass guidance, one CFG scale per "
                    f"sample of shape {tuple(t.shape)}, got {None if guidance is None else tuple(guidance.shape)}"
                )
            g_freq = timestep_embedding(GUIDANCE_FEATURE_SCALE * guidance, self.cfg.time_freq_dim)
            c = c + self.g_embedder(g_freq.to(pooled.dtype))
        elif guidance is not None:
            raise ValueError("guidance was given to a model without a guidance embedding (model.guidance_embed)")
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
        (with its autograd graph when grad is enabled); the tangent is stop-gradient and in dx's dtype.
        """
        self.check_inputs(x, t, context, pooled)
        B, _, H, W = x.shape
        p = self.cfg.patch_size
        h, w = H // p, W // p
        if tangents is None:
            tokens = self.to_tokens(self.x_embedder(x))
            tokens = tokens + self.pos_embed(h, w, tokens.device, tokens.dtype)
            c = self.conditioning(t, pooled, guidance)
            ctx = self.context_embedder(context)
            for block in self.joint_blocks:
                ctx, tokens = block(ctx, tokens, c)
            out = self.unpatchify(self.final_layer(tokens, c), h, w)  # (B, h*w, p*p*C_out) -> (B, C_out, H, W)
            return (out, c) if return_conditioning else out

        dx, dt = tangents
        tokens, dtokens = self.x_embedder(x, dx)
        tokens = self.to_tokens(tokens) + self.pos_embed(h, w, tokens.device, tokens.dtype)
        dtokens = self.to_tokens(dtokens)  # the positional table is constant
        c, dc = self.conditioning(t, pooled, guidance, dt)
        ctx = self.context_embedder(context)
        dctx = torch.zeros(ctx.shape, dtype=dx.dtype, device=ctx.device)  # text tokens carry no input tangent
        for block in self.joint_blocks:
            ctx, tokens, dctx, dtokens = block(ctx, tokens, c, dctx, dtokens, dc)
        out, dout = self.final_layer(tokens, c, dtokens, dc)
        out, dout = self.unpatchify(out, h, w), self.unpatchify(dout, h, w)
        return (out, c, dout) if return_conditioning else (out, dout)

    @staticmethod
    def to_tokens(patches: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, h*w, D), contiguous: a per-block-compiled block returned wrong gradients for the
        transposed layout (torch 2.13, CPU inductor; tests/trainer/test_mmdit.py)."""
        return patches.flatten(2).transpose(1, 2).contiguous()

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
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
