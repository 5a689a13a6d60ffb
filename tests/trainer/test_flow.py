"""Rectified flow (MMDIT_RF.md sections 1-3): timestep densities, the shift, the loss, text dropout and
the Euler sampler, each checked against float64 references on fresh random inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from infra.config import FlowConfig
from trainer import flow

# Goodness-of-fit tests reject a correct sampler with this probability; small enough that fresh seeds on
# every run almost never fail spuriously, large enough that a wrong (m, s) or a missing shift is caught.
ALPHA = 1e-4
N_SAMPLES = 20_000

SAMPLER_CASES = [
    FlowConfig(timestep_sampler="logit_normal", logit_mean=0.0, logit_std=1.0),
    FlowConfig(timestep_sampler="logit_normal", logit_mean=-0.5, logit_std=0.6),
    FlowConfig(timestep_sampler="logit_normal", logit_mean=1.0, logit_std=1.6),
    FlowConfig(timestep_sampler="mode", mode_scale=1.29),
    FlowConfig(timestep_sampler="mode", mode_scale=0.0),
    FlowConfig(timestep_sampler="mode", mode_scale=-0.8),
    FlowConfig(timestep_sampler="cosmap"),
    FlowConfig(timestep_sampler="uniform"),
]


def case_id(cfg: FlowConfig) -> str:
    if cfg.timestep_sampler == "logit_normal":
        return f"logit_normal(m={cfg.logit_mean},s={cfg.logit_std})"
    if cfg.timestep_sampler == "mode":
        return f"mode(s={cfg.mode_scale})"
    return cfg.timestep_sampler


def numerical_cdf(cfg: FlowConfig, points: int = 20_001):
    """The CDF of ``timestep_density`` by cumulative trapezoidal quadrature in float64 (unshifted); the
    quadrature error (~1e-9) is far below the KS statistic's resolution at N_SAMPLES (~1e-2)."""
    grid = np.linspace(0.0, 1.0, points)
    inner = torch.from_numpy(np.clip(grid, 1e-12, 1 - 1e-12))
    density = flow.timestep_density(cfg, inner).numpy()
    cdf = integrate.cumulative_trapezoid(density, grid, initial=0.0)
    return lambda t: np.interp(t, grid, cdf)


def inverse_shift(t, alpha: float):
    return t / (alpha - (alpha - 1) * t)


# --------------------------------------------------------------------------------------------------
# Timestep densities
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", SAMPLER_CASES, ids=case_id)
def test_sampler_histogram_matches_its_density(cfg, seed, gen):
    t = flow.sample_timesteps(cfg, N_SAMPLES, gen).double().numpy()
    assert t.shape == (N_SAMPLES,)
    assert ((t >= 0) & (t <= 1)).all(), f"seed={seed}: times outside [0, 1]"
    result = stats.kstest(t, numerical_cdf(cfg))
    assert result.pvalue > ALPHA, f"seed={seed}: {case_id(cfg)} KS D={result.statistic:.4f} p={result.pvalue:.2e}"


@pytest.mark.parametrize("cfg", SAMPLER_CASES, ids=case_id)
def test_density_integrates_to_one(cfg):
    def density(t: float) -> float:
        return float(flow.timestep_density(cfg, torch.tensor([t], dtype=torch.float64)))

    total, err = integrate.quad(density, 0.0, 1.0, points=[0.5], limit=200, epsabs=1e-11)
    assert abs(total - 1.0) < 1e-7, f"{case_id(cfg)} integrates to {total!r} (quadrature error {err:.1e})"


def test_goodness_of_fit_tells_nearby_logit_means_apart(seed, gen):
    """The KS check above has the power to catch a mean off by 0.1 (otherwise it would prove little)."""
    t = flow.sample_timesteps(FlowConfig(logit_mean=0.1), N_SAMPLES, gen).double().numpy()
    result = stats.kstest(t, numerical_cdf(FlowConfig(logit_mean=0.0)))
    assert result.pvalue < ALPHA, f"seed={seed}: m=0.1 samples passed as m=0 (p={result.pvalue:.2e})"


def test_logit_normal_density_is_the_normal_density_of_the_logit_over_t_times_one_minus_t(seed, gen):
    m, s = float(torch.randn(1, generator=gen)), 0.3 + float(torch.rand(1, generator=gen))
    t = torch.rand(1000, generator=gen, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    ref = stats.norm.pdf(np.log(t / (1 - t)), m, s) / (t * (1 - t))
    got = flow.logit_normal_density(t, m, s).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-10, err_msg=f"seed={seed}, m={m}, s={s}")


def test_cosmap_density_is_the_derivative_of_the_inverse_map(seed, gen):
    t = torch.rand(1000, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    inverse = lambda t: 2 / math.pi * torch.atan(t / (1 - t))  # u(t) of t = 1 - 1/(tan(pi u/2) + 1)
    h = 1e-6
    finite_diff = (inverse(t + h) - inverse(t - h)) / (2 * h)
    torch.testing.assert_close(flow.cosmap_density(t), finite_diff, rtol=1e-7, atol=0, msg=lambda m: f"seed={seed}\n{m}")


def test_mode_density_is_one_over_the_slope_of_the_map_at_the_preimage(seed, gen):
    scale = float(torch.rand(1, generator=gen)) * 2.5 - 1.0  # within [-1, 2/(pi-2)]
    u = torch.rand(500, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    mode_map = lambda u: 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    h = 1e-6
    slope = (mode_map(u + h) - mode_map(u - h)) / (2 * h)
    torch.testing.assert_close(
        flow.mode_density(mode_map(u), scale), 1 / slope.abs(), rtol=1e-6, atol=0, msg=lambda m: f"seed={seed}, s={scale}\n{m}"
    )


# --------------------------------------------------------------------------------------------------
# Resolution shift
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0, 7.3])
def test_shift_is_strictly_increasing_with_fixed_points_zero_and_one(alpha):
    t = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    shifted = flow.shift_time(t, alpha)
    assert shifted[0] == 0.0 and shifted[-1] == 1.0
    if alpha == 1.0:
        assert torch.equal(shifted, t)
    else:
        assert (shifted.diff() > 0).all()


@pytest.mark.parametrize("alpha", [0.5, 3.0, 7.3])
def test_shift_multiplies_the_odds_by_alpha(alpha, seed, gen):
    t = torch.rand(1000, generator=gen, dtype=torch.float64) * 0.99 + 0.005
    shifted = flow.shift_time(t, alpha)
    torch.testing.assert_close(shifted / (1 - shifted), alpha * t / (1 - t), rtol=1e-12, atol=0, msg=lambda m: f"seed={seed}\n{m}")
    torch.testing.assert_close(flow.shift_time(shifted, 1 / alpha), t, rtol=1e-12, atol=1e-15, msg=lambda m: f"seed={seed}\n{m}")


def test_shift_above_one_moves_every_interior_time_toward_noise(seed, gen):
    t = torch.rand(1000, generator=gen, dtype=torch.float64) * 0.99 + 0.005
    assert (flow.shift_time(t, 3.0) > t).all(), f"seed={seed}"


@pytest.mark.parametrize(
    "cfg", [FlowConfig(shift=3.0), FlowConfig(timestep_sampler="mode", mode_scale=1.29, shift=2.0),
            FlowConfig(timestep_sampler="uniform", shift=0.5)], ids=lambda c: f"{c.timestep_sampler},shift={c.shift}"
)
def test_shifted_samples_follow_the_pushed_forward_density(cfg, seed, gen):
    t = flow.sample_timesteps(cfg, N_SAMPLES, gen).double().numpy()
    unshifted_cdf = numerical_cdf(cfg)
    result = stats.kstest(t, lambda x: unshifted_cdf(inverse_shift(x, cfg.shift)))
    assert result.pvalue > ALPHA, f"seed={seed}: KS D={result.statistic:.4f} p={result.pvalue:.2e}"
    unshifted = stats.kstest(t, unshifted_cdf)
    assert unshifted.pvalue < ALPHA, f"seed={seed}: shifted samples are indistinguishable from unshifted ones"


def test_shifted_density_integrates_to_one():
    cfg, alpha = FlowConfig(logit_mean=0.3, logit_std=0.9), 3.0

    def shifted_density(s: float) -> float:
        t = inverse_shift(s, alpha)
        dt_ds = alpha / (alpha - (alpha - 1) * s) ** 2
        return float(flow.timestep_density(cfg, torch.tensor([t], dtype=torch.float64))) * dt_ds

    total, _ = integrate.quad(shifted_density, 0.0, 1.0, limit=200, epsabs=1e-11)
    assert abs(total - 1.0) < 1e-7


@pytest.mark.parametrize(
    "target, base, alpha", [(1024 * 1024, 256 * 256, 4.0), (4096, 1024, 2.0), (1024, 1024, 1.0), (256, 1024, 0.5)]
)
def test_resolution_shift_is_the_square_root_of_the_pixel_ratio(target, base, alpha):
    assert flow.resolution_shift(target, base) == pytest.approx(alpha, rel=1e-15)


# --------------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------------


def test_interpolation_is_data_at_t0_noise_at_t1_and_linear_between(seed, gen):
    x0, eps = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 0.3], dtype=torch.float64)
    xt = flow.interpolate(x0, eps, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], eps[1])
    torch.testing.assert_close(xt[2], 0.7 * x0[2] + 0.3 * eps[2], rtol=1e-14, atol=1e-14, msg=lambda m: f"seed={seed}\n{m}")


def test_loss_equals_a_float64_hand_computation(seed, gen):
    v, x0, eps = (torch.randn(5, 3, 6, 6, generator=gen) for _ in range(3))
    ref = ((v.double() - (eps.double() - x0.double())) ** 2).flatten(1).mean(1)
    got = flow.per_sample_loss(v, x0, eps)
    assert got.shape == (5,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0, msg=lambda m: f"seed={seed}\n{m}")


def test_loss_is_computed_in_fp32_for_bf16_inputs(seed, gen):
    v, x0, eps = (torch.randn(2, 4, 8, 8, generator=gen).bfloat16() for _ in range(3))
    ref = ((v.double() - (eps.double() - x0.double())) ** 2).flatten(1).mean(1)
    got = flow.per_sample_loss(v, x0, eps)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0, msg=lambda m: f"seed={seed}\n{m}")


def test_loss_is_zero_at_the_velocity_eps_minus_x0(seed, gen):
    x0, eps = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 8, 8, generator=gen)
    assert torch.equal(flow.per_sample_loss(eps - x0, x0, eps), torch.zeros(4)), f"seed={seed}"


def test_loss_is_positive_for_any_other_velocity(seed, gen):
    x0, eps = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 8, 8, generator=gen)
    v = eps - x0
    v[2, 1, 3, 5] += 0.5  # one element of one sample
    loss = flow.per_sample_loss(v, x0, eps)
    torch.testing.assert_close(loss, torch.tensor([0.0, 0.0, 0.25 / (3 * 64), 0.0]), msg=lambda m: f"seed={seed}\n{m}")
    # the velocity x0 - eps (the opposite convention) is as wrong as it gets
    assert (flow.per_sample_loss(x0 - eps, x0, eps) > 0).all(), f"seed={seed}"


def test_x0_estimate_inverts_the_interpolation(seed, gen):
    x0, eps = torch.randn(6, 2, 4, 4, generator=gen, dtype=torch.float64), torch.randn(6, 2, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.rand(6, generator=gen, dtype=torch.float64)
    x_t = flow.interpolate(x0, eps, t)
    torch.testing.assert_close(flow.x0_estimate(x_t, t, eps - x0), x0, rtol=1e-12, atol=1e-12, msg=lambda m: f"seed={seed}\n{m}")


# --------------------------------------------------------------------------------------------------
# Text dropout
# --------------------------------------------------------------------------------------------------


def text_batch(gen: torch.Generator, B: int, L: int = 5, C: int = 8, P: int = 6):
    context, pooled = torch.randn(B, L, C, generator=gen), torch.randn(B, P, generator=gen)
    empty_context, empty_pooled = torch.randn(L, C, generator=gen), torch.randn(P, generator=gen)
    return context, pooled, empty_context, empty_pooled


def test_drop_text_replaces_exactly_the_dropped_rows_with_the_empty_encoding(seed, gen):
    context, pooled, empty_context, empty_pooled = text_batch(gen, 64)
    out_ctx, out_pool, dropped = flow.drop_text(context, pooled, empty_context, empty_pooled, 0.5, gen)
    assert dropped.dtype == torch.bool and dropped.shape == (64,)
    assert 0 < int(dropped.sum()) < 64, f"seed={seed}: degenerate draw"
    for i in range(64):
        want_ctx, want_pool = (empty_context, empty_pooled) if dropped[i] else (context[i], pooled[i])
        assert torch.equal(out_ctx[i], want_ctx) and torch.equal(out_pool[i], want_pool), f"seed={seed}, row {i}"


@pytest.mark.parametrize("p", [0.1, 0.463])
def test_drop_text_drops_at_rate_p(p, seed, gen):
    n = 20_000
    context, pooled, empty_context, empty_pooled = text_batch(gen, n, L=1, C=1, P=1)
    _, _, dropped = flow.drop_text(context, pooled, empty_context, empty_pooled, p, gen)
    k = int(dropped.sum())
    result = stats.binomtest(k, n, p)
    assert result.pvalue > ALPHA, f"seed={seed}: {k}/{n} dropped at p={p} (binomial p-value {result.pvalue:.2e})"


@pytest.mark.parametrize("p, expected", [(0.0, False), (1.0, True)])
def test_drop_text_at_p_zero_keeps_all_and_at_p_one_drops_all(p, expected, seed, gen):
    context, pooled, empty_context, empty_pooled = text_batch(gen, 32)
    out_ctx, _, dropped = flow.drop_text(context, pooled, empty_context, empty_pooled, p, gen)
    assert (dropped == expected).all()
    assert torch.equal(out_ctx, empty_context.expand_as(context) if expected else context)


def test_drop_text_rejects_an_empty_encoding_of_another_length(gen):
    context, pooled, _, empty_pooled = text_batch(gen, 4, L=5)
    with pytest.raises(ValueError, match=r"empty-caption context \(7, 8\).*\(5, 8\)"):
        flow.drop_text(context, pooled, torch.zeros(7, 8), empty_pooled, 0.1, gen)


# --------------------------------------------------------------------------------------------------
# Euler sampling, against flows known in closed form
# --------------------------------------------------------------------------------------------------


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor, mu: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[eps - x0 | x_t = x] for data N(mu, sigma^2 I), in float64.

    x_t ~ N((1-t) mu, s^2 I) with s^2 = (1-t)^2 sigma^2 + t^2, so the Gaussian conditional expectation is
    -mu + (t - (1-t) sigma^2) / s^2 * (x - (1-t) mu). Its flow from x_1 = z ends at x_0 = mu + sigma z.
    """
    t = t.double()[:, None]
    s2 = (1 - t) ** 2 * sigma**2 + t**2
    return -mu + (t - (1 - t) * sigma**2) / s2 * (x - (1 - t) * mu)


def conditional_gaussian_model(sigma: float):
    """A 'model' whose text condition is the data mean itself: context (B, 1, D) holds mu."""
    return lambda x, t, context, pooled: gaussian_velocity(x, t, context[:, 0], sigma)


def analytic_problem(gen: torch.Generator, B: int = 256, D: int = 4):
    noise = torch.randn(B, D, generator=gen, dtype=torch.float64)
    mu = torch.randn(1, 1, D, generator=gen, dtype=torch.float64).expand(B, 1, D)
    pooled = torch.zeros(B, 1, dtype=torch.float64)
    return noise, mu, pooled


def test_sigma_schedule_runs_from_one_to_exactly_zero_through_the_shift():
    for shift in (1.0, 3.0):
        sigmas = flow.sigma_schedule(10, shift)
        assert sigmas.shape == (11,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
        assert (sigmas.diff() < 0).all()
        ref = flow.shift_time(torch.linspace(1, 0, 11, dtype=torch.float64), shift)
        torch.testing.assert_close(sigmas.double(), ref, rtol=0, atol=1e-7)


def test_euler_is_exact_for_data_concentrated_at_a_point(seed, gen):
    """The point-mass field (x - mu) / t is linear along each ray to mu: Euler lands on mu at any step count."""
    noise, mu, pooled = analytic_problem(gen)
    for steps in (1, 3, 10):
        x0 = flow.euler_sample(conditional_gaussian_model(0.0), noise, mu, pooled, steps)
        torch.testing.assert_close(x0, mu[:, 0], rtol=0, atol=1e-6, msg=lambda m: f"seed={seed}, steps={steps}\n{m}")


def euler_errors(model, noise, context, pooled, exact, step_counts, **kwargs) -> list[float]:
    return [
        float((flow.euler_sample(model, noise, context, pooled, steps, **kwargs) - exact).abs().max())
        for steps in step_counts
    ]


def assert_first_order(errors: list[float], seed: int) -> None:
    """Each doubling of the step count halves the error (Euler is first order). A sampler converging to
    anything but the exact endpoint would plateau instead: the ratio would fall toward 1."""
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(1.6 < r < 2.4 for r in ratios), f"seed={seed}: errors {errors}, ratios {ratios}"
    assert errors[-1] < 0.1, f"seed={seed}: errors {errors}"


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_converges_at_first_order_to_the_exact_gaussian_flow(shift, seed, gen):
    sigma = 0.5
    noise, mu, pooled = analytic_problem(gen)
    exact = mu[:, 0] + sigma * noise
    errors = euler_errors(conditional_gaussian_model(sigma), noise, mu, pooled, exact, (16, 32, 64, 128), shift=shift)
    assert_first_order(errors, seed)


@pytest.mark.parametrize("cfg_scale, shift", [(4.0, 1.0), (2.5, 3.0), (0.0, 1.0)])
def test_euler_with_cfg_converges_to_the_flow_of_the_guided_field(cfg_scale, shift, seed, gen):
    """With equal spreads the guided field v_u + w (v_c - v_u) is linear in mu, so it is the exact flow of
    N(mu_u + w (mu_c - mu_u), sigma^2): its endpoint is known in closed form."""
    sigma = 0.4
    noise, mu_c, pooled = analytic_problem(gen)
    mu_u = torch.randn(1, mu_c.shape[-1], generator=gen, dtype=torch.float64)
    empty_pooled = torch.zeros(1, dtype=torch.float64)
    guided_mean = mu_u + cfg_scale * (mu_c[:, 0] - mu_u)
    exact = guided_mean + sigma * noise
    errors = euler_errors(
        conditional_gaussian_model(sigma), noise, mu_c, pooled, exact, (16, 32, 64, 128),
        cfg_scale=cfg_scale, shift=shift, empty_context=mu_u, empty_pooled=empty_pooled,
    )
    assert_first_order(errors, seed)


def test_guided_velocity_queries_the_empty_encoding_as_unconditional(seed, gen):
    B, L, C = 3, 2, 4
    x, t = torch.randn(B, 5, generator=gen), torch.rand(B, generator=gen)
    context, pooled = torch.randn(B, L, C, generator=gen), torch.randn(B, 6, generator=gen)
    empty_context, empty_pooled = torch.randn(L, C, generator=gen), torch.randn(6, generator=gen)
    seen = []

    def model(x, t, context, pooled):
        seen.append((context.clone(), pooled.clone()))
        return context.sum((1, 2))[:, None] + pooled.sum(1)[:, None] + 0 * x

    w = 3.0
    v = flow.guided_velocity(model, x, t, context, pooled, empty_context, empty_pooled, w)
    (ctx_seen, pool_seen), = seen
    assert torch.equal(ctx_seen[B:], empty_context.expand(B, L, C)) and torch.equal(pool_seen[B:], empty_pooled.expand(B, 6))
    v_c = context.sum((1, 2)) + pooled.sum(1)
    v_u = empty_context.sum() + empty_pooled.sum()
    torch.testing.assert_close(v[:, 0], v_u + w * (v_c - v_u), msg=lambda m: f"seed={seed}\n{m}")
