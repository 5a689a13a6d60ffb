"""The whole sCD and sCT objective (``SCDRecipe.objective``: loss and every parameter gradient) against a
float64 reference written from SCD.md sections 1-3, for each JVP pass, inside the tangent warmup (r < 1)
and after it (r = 1), with the adaptive and the fixed weighting, under a guided teacher (w != 1).

The reference treats the bare MM-DiT as the black-box RF velocity V (its time scale is inside it) with
plain math attention, and writes out the rest itself: the RF -> TrigFlow wrapper, the guided teacher
F_u + w (F_c - F_u), the total derivative dF/dtau along dx/dtau by forward-mode AD of its own wrapper with
unit time tangent (not the recipe's rearranged one), the warmed-up tangent g, its normalisation, the
weighting lambda(tau) exp(-u) mse + u and the batch mean.
"""

from __future__ import annotations

import math

import pytest
import torch

import kernels
from tests.trainer.test_scd import EMPTY, _inputs, _perturb, _recipe_and_student, teacher, teacher_seed  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

SIGMA_D = 0.5  # SCD.md section 1 (the paper's value)
NORM_EPS = 0.1  # g / (||g||_2 + 0.1), section 3
WARMUP = 8
STEPS = {"r<1": 3, "r=1": WARMUP + 5}  # r = min(1, step / warmup): 3/8, then 1


def _math_attention(q, k, v):
    """Softmax attention written out, so forward-mode AD uses PyTorch's own formulas."""
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


def _bcast(values: torch.Tensor) -> torch.Tensor:
    return values[:, None, None, None]


def _trigflow(net, x_in, tau, context, pooled, guidance=None):
    """Section 2: (F, the conditioning vector) of the RF network ``net`` at the equal-SNR point."""
    c, s = torch.cos(tau), torch.sin(tau)
    v, cond = net(x_in / _bcast(s + c), s / (s + c), context, pooled, guidance, return_conditioning=True)
    return (_bcast(c - s) * x_in + v) / _bcast(c + s), cond


def _as_fp32(t: torch.Tensor) -> torch.Tensor:
    """The teacher hands dx/dtau over in fp32 (``TrigFlowTeacher.velocity``, SCD.md section 3: "compute ...
    the loss in fp32"); rounding here too keeps the comparison at float64 tolerance."""
    return t.float().double()


def reference_objective(student, teacher_net, x0, z, tau, context, pooled, w, *, step, mode, weighting, sampled):
    """SCD.md section 3, one iteration, in float64."""
    c, s = _bcast(torch.cos(tau)), _bcast(torch.sin(tau))
    x_tau = c * x0 + s * z
    x_in = x_tau / SIGMA_D
    guidance = w if sampled else None
    with torch.no_grad():
        if mode == "scd":
            B = x0.shape[0]
            F_c, _ = _trigflow(teacher_net, x_in, tau, context, pooled)
            F_u, _ = _trigflow(teacher_net, x_in, tau, EMPTY["text_tokens"].double().expand(B, -1, -1),
                               EMPTY["text_pooled"].double().expand(B, -1))
            dxdt = _as_fp32(SIGMA_D * (F_u + _bcast(w) * (F_c - F_u)))
        else:  # sCT: d/dtau of cos(tau) x0 + sin(tau) z
            dxdt = -s * x0 + c * z
        F_minus, dF_dtau = torch.func.jvp(lambda x, t: _trigflow(student.net, x, t, context, pooled, guidance)[0],
                                          (x_in, tau), (dxdt / SIGMA_D, torch.ones_like(tau)))
        J = c * s * dF_dtau
    r = min(1.0, step / WARMUP)
    g = -(c**2) * (SIGMA_D * F_minus - dxdt) - r * (c * s * x_tau + SIGMA_D * J)
    g = g / _bcast(g.flatten(1).norm(dim=1) + NORM_EPS)
    F, cond = _trigflow(student.net, x_in, tau, context, pooled, guidance)
    mse = (F - F_minus - g).pow(2).flatten(1).mean(1)
    if weighting == "fixed":
        return mse.mean()
    u = student.logvar(cond).squeeze(-1).float()  # the student's u is fp32, read in float64 by each term
    return (1 / (SIGMA_D * torch.tan(tau)) * torch.exp(-u.double()) * mse + u.double()).mean()


CASES = {  # id: (mode, distill.guidance)
    "scd": ("scd", "fixed"),
    "scd-sampled-w": ("scd", "sampled"),
    "sct": ("sct", "fixed"),
}


@pytest.mark.parametrize("weighting", ["adaptive", "fixed"])
@pytest.mark.parametrize("jvp_pass", ["fused", "separate", "forward_ad"])
@pytest.mark.parametrize("case", list(CASES))
def test_objective_loss_and_gradients_equal_the_spec_reference(teacher, teacher_seed, seed, gen, monkeypatch,
                                                               case, jvp_pass, weighting):
    mode, guidance = CASES[case]
    recipe, student = _recipe_and_student(
        teacher, f"distill.mode={mode}", f"distill.guidance={guidance}", "distill.cfg_scale=3.0",
        "distill.cfg_min=1.5", "distill.cfg_max=4.0", f"distill.jvp_pass={jvp_pass}",
        f"distill.weighting={weighting}", f"distill.tangent_warmup_steps={WARMUP}", "distill.tangent_warmup=linear",
    )
    assert (recipe.cfg.distill.sigma_d, recipe.cfg.distill.tangent_norm_eps) == (SIGMA_D, NORM_EPS)
    _perturb(student, seed % 2**31)  # non-zero adaLN gates and guidance embedding: every block matters
    student.double()
    teacher_net = None
    if mode == "scd":
        teacher_net = recipe.teacher.net.double()
        # The teacher hands dx/dtau over in fp32; float64 from there on, as in the reference (else the
        # rearranged x-tangent cos*sin*dxdt is formed in fp32 and J is only good to ~1e-9).
        velocity = recipe.teacher_velocity
        monkeypatch.setattr(recipe, "teacher_velocity", lambda *args: velocity(*args).double())
    x0, z, tau, ctx, pooled, _ = (t.double() for t in _inputs(gen, 0.05 + 1.45 * torch.rand(4, generator=gen)))
    w = torch.full((4,), 3.0, dtype=torch.float64)
    if guidance == "sampled":
        w = 1.5 + 2.5 * torch.rand(4, generator=gen, dtype=torch.float64)
    seeds = f"seeds {teacher_seed}, {seed}"

    for label, step in STEPS.items():
        recipe.at_step(step)
        student.zero_grad(set_to_none=True)
        loss, metrics = recipe.objective(student, x0, z, tau, ctx, pooled, w)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters()}
        assert float(metrics["tangent_warmup_r"]) == min(1.0, step / WARMUP), seeds

        student.zero_grad(set_to_none=True)
        with monkeypatch.context() as patch:
            patch.setattr(kernels, "attention", _math_attention)
            expected = reference_objective(student, teacher_net, x0, z, tau, ctx, pooled, w, step=step, mode=mode,
                                           weighting=weighting, sampled=guidance == "sampled")
        expected.backward()
        where = f"{case}, {jvp_pass}, {weighting}, {label} ({seeds})"
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-9, atol=1e-12, msg=lambda m: f"loss, {where}: {m}")
        scale = max(float(grad.abs().max()) for grad in grads.values())
        for name, p in student.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-12 * scale,
                                       msg=lambda m: f"grad of {name}, {where}: {m}")
