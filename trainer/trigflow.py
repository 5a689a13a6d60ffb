"""TrigFlow and the continuous-time consistency objective (sCM; Lu & Song 2024), as in SCD.md.

Convention: ``x_tau = cos(tau) x0 + sin(tau) z`` with ``z ~ N(0, sigma_d^2 I)`` and ``tau in [0, pi/2]``
(0 = data); ``x_in = x_tau / sigma_d`` is the unit-variance state a network sees, and ``F(x_in, tau)`` is
the sigma_d-normalised velocity, ``dx_tau/dtau = sigma_d F``. Our networks are rectified-flow MM-DiTs
(``v(x_rf, t_rf)`` with the time scale inside the model); ``rf_inputs`` and ``trigflow_from_rf`` turn one
into a TrigFlow F at the equal-SNR point (section 2). Shapes: x is (B, C, H, W), tau and w are (B,).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn

# F(x_in, tau) -> F, both (B, C, H, W), tau (B,)
TrigFlowVelocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def expand_like(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1), in ``like``'s dtype, to scale (B, C, H, W) tensors sample by sample."""
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def max_time(sigma_d: float, sigma_max: float = 80.0) -> float:
    """T = arctan(sigma_max / sigma_d): the largest tau of training and the start of sampling (section 5)."""
    return math.atan(sigma_max / sigma_d)


# --------------------------------------------------------------------------------------------------
# A rectified-flow network as a TrigFlow F (section 2)
# --------------------------------------------------------------------------------------------------


def rf_inputs(x_in: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_rf, t_rf): the rectified-flow state and time with the same signal-to-noise ratio as (x_in, tau).

    t_rf = s / (s + c), x_rf = x_in / (s + c). Both are smooth in tau, so forward-mode AD through them
    gives the time tangent the network's time embedding needs.
    """
    c, s = torch.cos(tau), torch.sin(tau)
    return x_in / expand_like(s + c, x_in), s / (s + c)


def trigflow_from_rf(v: torch.Tensor, x_in: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """F = ((c - s) x_in + v) / (c + s), from the RF velocity v at ``rf_inputs(x_in, tau)``.

    Closed form without 1/sin(tau) (rCM's EDM-style form divides by sin tau); computed in x_in's dtype, so
    a bf16 network output is combined in fp32 when x_in is fp32.
    """
    c, s = expand_like(torch.cos(tau), x_in), expand_like(torch.sin(tau), x_in)
    return ((c - s) * x_in + v.to(x_in.dtype)) / (c + s)


def rf_inputs_tangent(x_in: torch.Tensor, tau: torch.Tensor, dx_in: torch.Tensor,
                      dtau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tangents of ``rf_inputs`` along (dx_in, dtau): dx_rf = (dx_in - x_rf (c - s) dtau) / (s + c) and
    dt_rf = dtau / (s + c)^2."""
    c, s = torch.cos(tau), torch.sin(tau)
    with torch.no_grad():
        d = expand_like(s + c, dx_in)
        dx_rf = (dx_in - x_in / d * expand_like((c - s) * dtau, dx_in)) / d
        return dx_rf, dtau / (s + c) ** 2


def trigflow_from_rf_tangent(F: torch.Tensor, dv: torch.Tensor, x_in: torch.Tensor, tau: torch.Tensor,
                             dx_in: torch.Tensor, dtau: torch.Tensor) -> torch.Tensor:
    """Tangent of ``trigflow_from_rf`` (whose value is F) along (dv, dx_in, dtau):
    dF = ((c - s)(dx_in - F dtau) + dv) / (c + s) - x_in dtau."""
    with torch.no_grad():
        dtype = torch.promote_types(dx_in.dtype, x_in.dtype)
        c, s, dt = (expand_like(v, dx_in) for v in (torch.cos(tau), torch.sin(tau), dtau))
        return ((c - s) * (dx_in - F.to(dtype) * dt) + dv.to(dtype)) / (c + s) - x_in.to(dtype) * dt


def trigflow_velocity(net: nn.Module, x_in: torch.Tensor, tau: torch.Tensor, context: torch.Tensor,
                      pooled: torch.Tensor, **kwargs) -> torch.Tensor:
    """F(x_in, tau) of a rectified-flow network ``net(x_rf, t_rf, context, pooled, **kwargs) -> v``."""
    x_rf, t_rf = rf_inputs(x_in, tau)
    return trigflow_from_rf(net(x_rf, t_rf, context, pooled, **kwargs), x_in, tau)


def guided_trigflow_velocity(
    net: nn.Module, x_in: torch.Tensor, tau: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
    empty_context: torch.Tensor, empty_pooled: torch.Tensor, w: torch.Tensor,
) -> torch.Tensor:
    """F_u + w (F_c - F_u) with per-sample w (B,): the teacher's guided velocity (section 2).

    F is affine in v at fixed (x_in, tau), so guiding F equals guiding v. Conditional and unconditional
    halves go through the network in one batched call.
    """
    B = x_in.shape[0]
    ctx_u = empty_context.to(context).expand(B, *empty_context.shape)
    pool_u = empty_pooled.to(pooled).expand(B, *empty_pooled.shape)
    F = trigflow_velocity(net, torch.cat([x_in, x_in]), torch.cat([tau, tau]), torch.cat([context, ctx_u]),
                          torch.cat([pooled, pool_u]))
    F_c, F_u = F.chunk(2)
    return F_u + expand_like(w, F_u) * (F_c - F_u)


# --------------------------------------------------------------------------------------------------
# Times, the consistency function and the samplers (sections 1 and 5)
# --------------------------------------------------------------------------------------------------


def sample_tau(n: int, p_mean: float, p_std: float, sigma_d: float, generator: torch.Generator,
               device=None, t_max: float | None = None) -> torch.Tensor:
    """tau = arctan(exp(p_mean + p_std * n) / sigma_d), n ~ N(0, 1): log-normal sigma = sigma_d tan(tau).

    Clamped to ``t_max`` (default T = arctan(80 / sigma_d)) so training never sees a time sampling
    does not start from.
    """
    sigma = torch.exp(torch.randn(n, generator=generator, device=device) * p_std + p_mean)
    return torch.atan(sigma / sigma_d).clamp(max=max_time(sigma_d) if t_max is None else t_max)


def consistency_fn(F: torch.Tensor, x_tau: torch.Tensor, tau: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """f(x_tau, tau) = cos(tau) x_tau - sin(tau) sigma_d F(x_tau / sigma_d, tau): the x0 prediction.

    f(x, 0) = x by construction (the boundary condition of a consistency model).
    """
    c, s = expand_like(torch.cos(tau), x_tau), expand_like(torch.sin(tau), x_tau)
    return c * x_tau - s * sigma_d * F.to(x_tau.dtype)


def sampling_times(steps: int, t_max: float, mid_times: Sequence[float] = (1.1,)) -> list[float]:
    """[T] for one step, [T, mid_times[0], ...] for more; 2 steps use t_mid = 1.1 (the sCM recipe)."""
    if steps < 1:
        raise ValueError(f"a consistency sampler needs steps >= 1, got {steps}")
    if steps - 1 > len(mid_times):
        raise ValueError(
            f"{steps} sampling steps need {steps - 1} intermediate times, only {len(mid_times)} given "
            f"({list(mid_times)}); set distill.sample_mid_times"
        )
    return [t_max, *mid_times[: steps - 1]]


@torch.no_grad()
def consistency_sample(F_fn: TrigFlowVelocity, noise: torch.Tensor, sigma_d: float, times: Sequence[float],
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Multi-step consistency sampling: x_T = sigma_d n, x0 = f(x_T, T); at each later time t re-noise
    x = cos(t) x0 + sin(t) sigma_d n' and apply f again. Returns x0 in TrigFlow units (sigma_d * latents).
    """
    x0 = None
    for i, t in enumerate(times):
        tau = torch.full((noise.shape[0],), float(t), device=noise.device, dtype=noise.dtype)
        if i == 0:
            x = sigma_d * noise
        else:
            fresh = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
            x = math.cos(t) * x0 + math.sin(t) * sigma_d * fresh
        x0 = consistency_fn(F_fn(x / sigma_d, tau), x, tau, sigma_d)
    return x0


# --------------------------------------------------------------------------------------------------
# The sCD / sCT objective (section 3)
# --------------------------------------------------------------------------------------------------


def tangent_warmup(step: int, warmup_steps: int, shape: str = "linear") -> float:
    """r in [0, 1], the weight of the second tangent term: linear min(1, step/N), cosine (1 - cos(pi
    min(1, step/N))) / 2, or none (r = 1)."""
    if shape == "none" or warmup_steps <= 0:
        return 1.0
    progress = min(1.0, step / warmup_steps)
    if shape == "linear":
        return progress
    if shape == "cosine":
        return (1 - math.cos(math.pi * progress)) / 2
    raise ValueError(f"unknown tangent warmup shape {shape!r}; use linear, cosine or none (distill.tangent_warmup)")


def sct_velocity(x0: torch.Tensor, z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """dx_tau/dtau = cos(tau) z - sin(tau) x0: the conditional ODE of one (x0, z) pair (sCT, no teacher)."""
    return expand_like(torch.cos(tau), z) * z - expand_like(torch.sin(tau), x0) * x0


def rearranged_tangents(tau: torch.Tensor, dxdt: torch.Tensor, sigma_d: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos sin dxdt / sigma_d, cos sin): the tangents of the JVP pass along the teacher ODE, scaled by
    cos(tau) sin(tau) <= 1/2 so tangent activations stay bounded as tau -> pi/2 (section 3)."""
    cs = torch.cos(tau) * torch.sin(tau)
    return expand_like(cs, dxdt) * dxdt / sigma_d, cs


def check_tangent(F: torch.Tensor, J: torch.Tensor | None) -> torch.Tensor:
    """J itself, after checking that the JVP pass returned a tangent shaped like F."""
    if J is None or J.shape != F.shape:  # torch.compile has dropped forward-AD tangents (pytorch#187284)
        raise RuntimeError(f"the JVP pass returned no tangent of shape {tuple(F.shape)}; run it eagerly")
    return J


def rearranged_jvp(F_fn: TrigFlowVelocity, x_in: torch.Tensor, tau: torch.Tensor, dxdt: torch.Tensor,
                   sigma_d: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, J) with J = cos(tau) sin(tau) dF/dtau along dx/dtau, as one forward-mode pass (section 3.5).

    Tangents (cos sin dxdt / sigma_d, cos sin) rather than (dxdt / sigma_d, 1): the same JVP scaled by
    cos sin <= 1/2 before the pass, which keeps tangent activations bounded as tau -> pi/2. Runs under
    no_grad: J is stop-gradient, and FSDP2's backward hooks must stay out of the transform (pytorch#182641).
    """
    with torch.no_grad():
        F, J = torch.func.jvp(F_fn, (x_in, tau), rearranged_tangents(tau, dxdt, sigma_d))
    return F, check_tangent(F, J)


def scd_tangent(F_minus: torch.Tensor, J: torch.Tensor, dxdt: torch.Tensor, x_tau: torch.Tensor, tau: torch.Tensor,
                sigma_d: float, r: float) -> torch.Tensor:
    """g = -cos^2 (sigma_d F^- - dx/dtau) - r (cos sin x_tau + sigma_d J); for r = 1, g = cos(tau) df^-/dtau.

    Computed in float64 (rCM): the two terms nearly cancel for a converged student.
    """
    F_minus, J, dxdt, x_tau = (t.double() for t in (F_minus, J, dxdt, x_tau))
    c, s = expand_like(torch.cos(tau), x_tau), expand_like(torch.sin(tau), x_tau)
    return -(c**2) * (sigma_d * F_minus - dxdt) - r * (c * s * x_tau + sigma_d * J)


def normalize_tangent(g: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(g / (||g||_2 + eps), ||g||_2) with the plain L2 norm per sample (paper, rCM; not the RMS variant)."""
    norm = g.flatten(1).norm(dim=1)
    return g / expand_like(norm + eps, g), norm


def prior_weight(tau: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """lambda(tau) = 1 / (sigma_d tan(tau)), (B,)."""
    return 1.0 / (sigma_d * torch.tan(tau))
