"""Rectified flow, the SD3 recipe (MMDIT_RF.md sections 1-3).

Convention: t = 0 is data, t = 1 is noise; ``x_t = (1 - t) x0 + t eps``; the network predicts the
velocity ``eps - x0``. The four training densities of SD3's ablation, the resolution shift, the loss,
text dropout for classifier-free guidance, an x0 estimate and the Euler sampler with CFG.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from infra.config import FlowConfig

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Timestep densities (SD3 section 3.1) and the resolution shift
# --------------------------------------------------------------------------------------------------


def logit_normal_timesteps(n: int, m: float, s: float, generator: torch.Generator, device=None) -> torch.Tensor:
    """t = sigmoid(u), u ~ N(m, s^2)."""
    u = torch.randn(n, generator=generator, device=device) * s + m
    return torch.sigmoid(u)


def mode_timesteps(n: int, scale: float, generator: torch.Generator, device=None) -> torch.Tensor:
    """Mode sampling with heavy tails: t = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1)."""
    u = torch.rand(n, generator=generator, device=device)
    return 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


def cosmap_timesteps(n: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """CosMap: t = 1 - 1 / (tan(pi u / 2) + 1), u ~ U(0, 1)."""
    u = torch.rand(n, generator=generator, device=device)
    return 1 - 1 / (torch.tan(math.pi * u / 2) + 1)


def uniform_timesteps(n: int, generator: torch.Generator, device=None) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device)


def logit_normal_density(t: torch.Tensor, m: float, s: float) -> torch.Tensor:
    logit = torch.log(t) - torch.log1p(-t)
    return torch.exp(-((logit - m) ** 2) / (2 * s**2)) / (s * math.sqrt(2 * math.pi) * t * (1 - t))


def cosmap_density(t: torch.Tensor) -> torch.Tensor:
    return 2 / (math.pi - 2 * math.pi * t + 2 * math.pi * t**2)


def mode_density(t: torch.Tensor, scale: float, iters: int = 60) -> torch.Tensor:
    """Density of mode sampling: 1 / |dt/du| at u = map^-1(t) (the map is monotone decreasing in u
    for scale in [-1, 2/(pi-2)], so bisection finds the unique preimage)."""
    lo, hi = torch.zeros_like(t), torch.ones_like(t)
    for _ in range(iters):
        mid = (lo + hi) / 2
        t_mid = 1 - mid - scale * (torch.cos(math.pi * mid / 2) ** 2 - 1 + mid)
        go_right = t_mid > t  # decreasing map: the preimage lies to the right
        lo, hi = torch.where(go_right, mid, lo), torch.where(go_right, hi, mid)
    u = (lo + hi) / 2
    dt_du = -1 - scale * (1 - math.pi / 2 * torch.sin(math.pi * u))
    return 1 / dt_du.abs()


def timestep_density(cfg: FlowConfig, t: torch.Tensor) -> torch.Tensor:
    """The density of ``sample_timesteps`` before the shift."""
    if cfg.timestep_sampler == "logit_normal":
        return logit_normal_density(t, cfg.logit_mean, cfg.logit_std)
    if cfg.timestep_sampler == "mode":
        return mode_density(t, cfg.mode_scale)
    if cfg.timestep_sampler == "cosmap":
        return cosmap_density(t)
    return torch.ones_like(t)


def shift_time(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """Resolution shift t' = alpha t / (1 + (alpha - 1) t): more noise at higher resolution."""
    if alpha == 1.0:
        return t
    return alpha * t / (1 + (alpha - 1) * t)


def resolution_shift(target_tokens: int, base_tokens: int) -> float:
    """alpha = sqrt(m / n) for m target and n base pixel (or token) counts."""
    return math.sqrt(target_tokens / base_tokens)


def sample_timesteps(cfg: FlowConfig, n: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """n training times from the configured density, then shifted by ``cfg.shift``."""
    if cfg.timestep_sampler == "logit_normal":
        t = logit_normal_timesteps(n, cfg.logit_mean, cfg.logit_std, generator, device)
    elif cfg.timestep_sampler == "mode":
        t = mode_timesteps(n, cfg.mode_scale, generator, device)
    elif cfg.timestep_sampler == "cosmap":
        t = cosmap_timesteps(n, generator, device)
    else:
        t = uniform_timesteps(n, generator, device)
    return shift_time(t, cfg.shift)


# --------------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------------


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, t broadcast per sample."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


def per_sample_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Mean over elements of (v - (eps - x0))^2, one value per sample, in fp32."""
    err = v_pred.float() - velocity_target(x0.float(), eps.float())
    return err.pow(2).flatten(1).mean(1)


def x0_estimate(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x0_hat = x_t - t v."""
    return x_t - t.view(-1, *([1] * (x_t.dim() - 1))).to(x_t.dtype) * v


def drop_text(
    context: torch.Tensor,
    pooled: torch.Tensor,
    empty_context: torch.Tensor,
    empty_pooled: torch.Tensor,
    p: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace each sample's text condition by the empty-caption encoding with probability p.

    The replacement is exactly the encoding inference uses as "unconditional", so CFG at sampling time
    queries the same input the model was trained on. Returns (context, pooled, dropped mask).
    """
    B = context.shape[0]
    dropped = torch.rand(B, generator=generator, device=generator.device) < p
    dropped = dropped.to(context.device)
    if empty_context.shape != context.shape[1:]:
        raise ValueError(
            f"empty-caption context {tuple(empty_context.shape)} does not match the batch's "
            f"text tokens {tuple(context.shape[1:])}"
        )
    context = torch.where(dropped[:, None, None], empty_context.to(context), context)
    pooled = torch.where(dropped[:, None], empty_pooled.to(pooled), pooled)
    return context, pooled, dropped


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def sigma_schedule(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """steps + 1 times from 1 to 0: linear in t, mapped through the shift, ending at exactly 0."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift_time(t, shift).to(device=device, dtype=torch.float32)


def guided_velocity(
    model: Velocity,
    x: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    pooled: torch.Tensor,
    empty_context: torch.Tensor | None,
    empty_pooled: torch.Tensor | None,
    cfg_scale: float,
) -> torch.Tensor:
    """v_u + w (v_c - v_u), with conditional and unconditional halves in one batched call."""
    if cfg_scale == 1.0 or empty_context is None:
        return model(x, t, context, pooled)
    B = x.shape[0]
    ctx_u = empty_context.to(context).expand(B, *empty_context.shape)
    pool_u = empty_pooled.to(pooled).expand(B, *empty_pooled.shape)
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, ctx_u]), torch.cat([pooled, pool_u]))
    v_c, v_u = v.chunk(2)
    return v_u + cfg_scale * (v_c - v_u)


@torch.no_grad()
def euler_sample(
    model: Velocity,
    noise: torch.Tensor,
    context: torch.Tensor,
    pooled: torch.Tensor,
    steps: int,
    cfg_scale: float = 1.0,
    shift: float = 1.0,
    empty_context: torch.Tensor | None = None,
    empty_pooled: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0: x <- x + (sigma_{i+1} - sigma_i) v_cfg(x, sigma_i)."""
    sigmas = sigma_schedule(steps, shift, device=noise.device)
    x = noise
    for i in range(steps):
        t = sigmas[i].expand(x.shape[0])
        v = guided_velocity(model, x, t, context, pooled, empty_context, empty_pooled, cfg_scale)
        x = x + (sigmas[i + 1] - sigmas[i]) * v.to(x.dtype)
    return x
