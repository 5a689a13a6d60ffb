"""TrigFlow and the sCD tangent (SCD.md sections 1-3, 5-6), in float64 on fresh random inputs: the RF wrapper
against flows whose velocity is known in closed form, g against autograd's total derivative along the
teacher ODE, the JVP rearrangement, and the wrapped model's JVP against math attention."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from scipy import stats

import kernels
from infra.config import load_config
from trainer import trigflow
from trainer.models.mmdit import build_mmdit
from trainer.recipes.scd import TrigFlowStudent

SIGMA_D = 0.5
TINY = ["model.depth=2", "model.head_dim=16"]


def _perturb(model: torch.nn.Module, gen: torch.Generator, scale: float = 0.1) -> torch.nn.Module:
    """Leave adaLN-Zero's identity init so every block and head matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return model


def _student(gen: torch.Generator, guidance_embed: bool = False) -> TrigFlowStudent:
    cfg = load_config("demo", TINY).model.model_copy(update={"guidance_embed": guidance_embed})
    with torch.device("meta"):
        student = TrigFlowStudent(cfg)
    student.to_empty(device="cpu")
    student.init_weights(0)
    return _perturb(student.double(), gen)


def _teacher(gen: torch.Generator) -> torch.nn.Module:
    return _perturb(build_mmdit(load_config("demo", TINY).model).double(), gen)


def _condition(gen: torch.Generator, n: int):
    return torch.randn(n, 16, 64, generator=gen, dtype=torch.float64), torch.randn(n, 64, generator=gen, dtype=torch.float64)


def _taus(gen: torch.Generator, n: int, lo: float = 0.05, hi: float = 1.52) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# The RF -> TrigFlow wrapper against closed-form flows
# --------------------------------------------------------------------------------------------------


def test_wrapper_gives_the_exact_trigflow_velocity_of_gaussian_data(seed, gen):
    """Latents l ~ N(mu, s^2) per element: the exact RF velocity E[n - l | x_t] wrapped at the equal-SNR
    point must equal the exact TrigFlow velocity E[-sin l + cos n | x_in]."""
    shape = (3, 2, 4, 4)
    mu = torch.randn(shape[1:], generator=gen, dtype=torch.float64)
    std = 0.2 + torch.rand(shape[1:], generator=gen, dtype=torch.float64)

    def rf_velocity(x, t, *_):  # Gaussian conditioning of (n, l) on x = (1 - t) l + t n
        t = trigflow.expand_like(t, x)
        var = (1 - t) ** 2 * std**2 + t**2
        centred = x - (1 - t) * mu
        return t / var * centred - (mu + (1 - t) * std**2 / var * centred)

    x_in = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    tau = _taus(gen, shape[0], 0.01, math.pi / 2 - 0.01)
    c, s = trigflow.expand_like(torch.cos(tau), x_in), trigflow.expand_like(torch.sin(tau), x_in)
    var = c**2 * std**2 + s**2
    centred = x_in - c * mu
    exact = -s * (mu + c * std**2 / var * centred) + c * s / var * centred
    wrapped = trigflow.trigflow_velocity(rf_velocity, x_in, tau, None, None)
    torch.testing.assert_close(wrapped, exact, rtol=1e-10, atol=1e-12, msg=lambda m: f"seed {seed}: {m}")


def test_single_point_data_is_exactly_consistent_and_samplers_return_it(seed, gen):
    """All data at one point a: every PF-ODE trajectory ends at a, so f(x_tau, tau) = sigma_d a for any x_tau,
    tau, and the 1-, 2- and 3-step samplers return sigma_d a from any noise."""
    a = torch.randn(1, 2, 4, 4, generator=gen, dtype=torch.float64)

    def F(x_in, tau):
        return trigflow.trigflow_velocity(lambda x, t, *_: (x - a) / trigflow.expand_like(t, x), x_in, tau, None, None)

    x_tau = torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64)
    tau = _taus(gen, 5, 0.01, 1.56)
    f = trigflow.consistency_fn(F(x_tau / SIGMA_D, tau), x_tau, tau, SIGMA_D)
    torch.testing.assert_close(f, (SIGMA_D * a).expand_as(f), rtol=1e-9, atol=1e-10, msg=lambda m: f"seed {seed}: {m}")
    noise = torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64)
    T = trigflow.max_time(SIGMA_D)
    for times in ([T], trigflow.sampling_times(2, T), [T, 1.3, 0.7]):
        x0 = trigflow.consistency_sample(F, noise, SIGMA_D, times, gen)
        torch.testing.assert_close(x0, (SIGMA_D * a).expand_as(x0), rtol=1e-9, atol=1e-10,
                                   msg=lambda m: f"times {times} (seed {seed}): {m}")


def test_consistency_function_is_the_identity_at_tau_zero(seed, gen):
    x = torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64)
    F = torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64) * 100
    assert torch.equal(trigflow.consistency_fn(F, x, torch.zeros(4, dtype=torch.float64), SIGMA_D), x), f"seed {seed}"


# --------------------------------------------------------------------------------------------------
# Times
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p_mean,p_std", [(-0.8, 1.6), (-1.0, 1.4), (0.2, 1.6)])
def test_training_times_are_log_normal_in_sigma(p_mean, p_std, seed, gen):
    tau = trigflow.sample_tau(20_000, p_mean, p_std, SIGMA_D, gen, t_max=math.pi / 2)
    n = (torch.log(SIGMA_D * torch.tan(tau.double())) - p_mean) / p_std
    assert stats.kstest(n.numpy(), "norm").pvalue > 1e-4, f"seed {seed}"
    clamped = trigflow.sample_tau(20_000, p_mean, p_std, SIGMA_D, gen)
    assert float(clamped.max()) <= trigflow.max_time(SIGMA_D) + 1e-6 and float(clamped.min()) > 0, f"seed {seed}"  # fp32


def test_sampling_times_default_to_T_then_1_1_and_refuse_missing_times():
    T = math.atan(80 / SIGMA_D)
    assert trigflow.sampling_times(1, T) == [T]
    assert trigflow.sampling_times(2, T) == [T, 1.1]
    assert trigflow.sampling_times(3, T, [1.3, 0.8]) == [T, 1.3, 0.8]
    with pytest.raises(ValueError, match="3 sampling steps need 2 intermediate times.*sample_mid_times"):
        trigflow.sampling_times(3, T)


def test_tangent_warmup_shapes():
    assert [trigflow.tangent_warmup(s, 100, "linear") for s in (0, 25, 100, 300)] == [0.0, 0.25, 1.0, 1.0]
    cosine = [trigflow.tangent_warmup(s, 100, "cosine") for s in (0, 50, 100, 300)]
    assert cosine[0] == 0.0 and math.isclose(cosine[1], 0.5) and cosine[2:] == [1.0, 1.0]
    assert trigflow.tangent_warmup(0, 100, "none") == 1.0 and trigflow.tangent_warmup(0, 0, "linear") == 1.0


# --------------------------------------------------------------------------------------------------
# The tangent and the JVP
# --------------------------------------------------------------------------------------------------


def test_tangent_is_cos_df_dtau_along_the_teacher_ode_blended_with_the_teacher_gap_in_warmup(seed, gen):
    """g (r = 1) = cos(tau) df^-/dtau, with df^-/dtau = d/dtau f(x(tau), tau) along dx/dtau = sigma_d F_T,
    taken by reverse-mode autograd through the student (no forward mode involved). Inside the warmup the
    second term of g is scaled by r, which (substituting f = cos x - sin sigma_d F) makes
    g = r cos df^-/dtau - (1 - r) cos^2 (sigma_d F^- - dx/dtau)."""
    teacher, student = _teacher(gen), _student(gen)
    B = 2
    context, pooled = _condition(gen, B)
    tau0 = _taus(gen, B)
    x_tau = SIGMA_D * torch.randn(B, 1, 4, 4, generator=gen, dtype=torch.float64)  # 4x4: 32 backward passes
    w = 1 + 3 * torch.rand(B, generator=gen, dtype=torch.float64)
    empty = torch.zeros(16, 64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)
    with torch.no_grad():
        dxdt = SIGMA_D * trigflow.guided_trigflow_velocity(teacher, x_tau / SIGMA_D, tau0, context, pooled, *empty, w)

    def f_along_ode(tau):  # the first-order ODE path has the ODE's derivative at tau0, which is all d/dtau sees
        x = x_tau + trigflow.expand_like(tau - tau0, x_tau) * dxdt
        return trigflow.consistency_fn(student(x / SIGMA_D, tau, context, pooled)[0], x, tau, SIGMA_D)

    jac = torch.autograd.functional.jacobian(f_along_ode, tau0)  # (B, C, H, W, B)
    df_dtau = torch.stack([jac[b, ..., b] for b in range(B)])
    F_minus, J = trigflow.rearranged_jvp(lambda x, t: student(x, t, context, pooled)[0], x_tau / SIGMA_D, tau0,
                                         dxdt, SIGMA_D)
    cos = trigflow.expand_like(torch.cos(tau0), df_dtau)
    with torch.no_grad():
        teacher_gap = SIGMA_D * student(x_tau / SIGMA_D, tau0, context, pooled)[0] - dxdt
    assert (cos * df_dtau).abs().max() > 1e-3, f"seed {seed}: degenerate derivative"
    for r in (1.0, 0.3, 0.0):
        g = trigflow.scd_tangent(F_minus, J, dxdt, x_tau, tau0, SIGMA_D, r=r)
        expected = r * cos * df_dtau - (1 - r) * cos**2 * teacher_gap
        torch.testing.assert_close(g, expected, rtol=1e-7, atol=1e-9, msg=lambda m: f"r={r} (seed {seed}): {m}")


def test_rearranged_jvp_is_the_plain_jvp_scaled_by_cos_sin(seed, gen):
    student = _student(gen)
    B = 3
    context, pooled = _condition(gen, B)
    tau = _taus(gen, B, 0.01, 1.56)
    x_in = torch.randn(B, 1, 8, 8, generator=gen, dtype=torch.float64)
    dxdt = SIGMA_D * torch.randn(B, 1, 8, 8, generator=gen, dtype=torch.float64)

    def F(x, t):
        return student(x, t, context, pooled)[0]

    _, plain = torch.func.jvp(F, (x_in, tau), (dxdt / SIGMA_D, torch.ones_like(tau)))
    _, J = trigflow.rearranged_jvp(F, x_in, tau, dxdt, SIGMA_D)
    cs = trigflow.expand_like(torch.cos(tau) * torch.sin(tau), plain)
    torch.testing.assert_close(J, cs * plain, rtol=1e-10, atol=1e-12, msg=lambda m: f"seed {seed}: {m}")


def _math_attention(q, k, v):
    """Softmax attention written out: PyTorch's own forward-mode formulas, no custom JVP rule."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v


def test_jvp_of_the_wrapped_student_equals_a_math_attention_copy(seed, gen, monkeypatch):
    """The whole wrapper (RF conversion, guidance embedding, network) through kernels.attention's JVP rule
    against torch.func.jvp of an unsharded copy whose attention is plain math."""
    student = _student(gen, guidance_embed=True)
    with torch.no_grad():
        student.net.g_embedder.fc2.weight.normal_(generator=gen)  # let w matter
    B = 3
    context, pooled = _condition(gen, B)
    tau = _taus(gen, B, 0.01, 1.56)
    w = 1 + 3 * torch.rand(B, generator=gen, dtype=torch.float64)
    x_in = torch.randn(B, 1, 8, 8, generator=gen, dtype=torch.float64)
    dxdt = SIGMA_D * torch.randn(B, 1, 8, 8, generator=gen, dtype=torch.float64)
    F_minus, J = trigflow.rearranged_jvp(lambda x, t: student(x, t, context, pooled, w)[0], x_in, tau, dxdt, SIGMA_D)

    reference = copy.deepcopy(student)
    monkeypatch.setattr(kernels, "attention", _math_attention)
    cs = torch.cos(tau) * torch.sin(tau)
    with torch.no_grad():
        F_ref, J_ref = torch.func.jvp(lambda x, t: reference(x, t, context, pooled, w)[0], (x_in, tau),
                                      (trigflow.expand_like(cs, dxdt) * dxdt / SIGMA_D, cs))
    torch.testing.assert_close(F_minus, F_ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"F (seed {seed}): {m}")
    torch.testing.assert_close(J, J_ref, rtol=1e-9, atol=1e-11, msg=lambda m: f"J (seed {seed}): {m}")
