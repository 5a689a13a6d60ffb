"""The written-out tangents of sCD's JVP pass (trainer.models.tangent), in float64 on fresh random inputs:
each layer's rule against torch.func.jvp of the layer, the whole network's against torch.func.jvp of a
copy with math attention, and the fused pass's primal and gradients against a plain forward."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from infra.config import load_config
from trainer import trigflow
from trainer.models import mmdit, tangent
from trainer.recipes.scd import TrigFlowStudent


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _jvp(fn, primals, tangents):
    with torch.no_grad():
        return torch.func.jvp(fn, primals, tangents)[1]


def _close(actual, expected, seed, what):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what} (seed {seed}): {m}")


# --------------------------------------------------------------------------------------------------
# One layer at a time
# --------------------------------------------------------------------------------------------------


def test_elementwise_and_linear_tangents(seed, gen):
    x, dx = _randn(gen, 3, 5, 16), _randn(gen, 3, 5, 16)
    W = _randn(gen, 8, 16)
    _close(tangent.linear(W, dx), _jvp(lambda a: F.linear(a, W, _randn(gen, 8)), (x,), (dx,)), seed, "linear")
    _close(tangent.silu(x, dx), _jvp(F.silu, (x,), (dx,)), seed, "silu")
    _close(tangent.gelu_tanh(x, dx), _jvp(lambda a: F.gelu(a, approximate="tanh"), (x,), (dx,)), seed, "gelu")


def test_normalisation_tangents(seed, gen):
    x, dx = 2 + 3 * _randn(gen, 3, 5, 16), _randn(gen, 3, 5, 16)
    eps = 1e-6
    _close(tangent.layer_norm(x, dx, eps), _jvp(lambda a: F.layer_norm(a, (16,), eps=eps), (x,), (dx,)), seed,
           "layer_norm")
    norm = mmdit.RMSNorm(16).double()
    with torch.no_grad():
        norm.weight.copy_(_randn(gen, 16))
    _close(tangent.rms_norm(x, dx, norm.weight.detach(), norm.eps), _jvp(norm, (x,), (dx,)), seed, "rms_norm")


def test_modulation_gate_and_time_embedding_tangents(seed, gen):
    h, dh = _randn(gen, 3, 5, 16), _randn(gen, 3, 5, 16)
    shift, scale, dshift, dscale = (_randn(gen, 3, 16) for _ in range(4))
    _close(tangent.modulate(h, dh, scale, dshift, dscale),
           _jvp(mmdit.modulate, (h, shift, scale), (dh, dshift, dscale)), seed, "modulate")
    s, ds = _randn(gen, 3, 5, 16), _randn(gen, 3, 5, 16)
    _close(tangent.gated_residual(ds, scale, dscale, h, dh),
           _jvp(lambda r, g, y: r + g[:, None] * y, (s, scale, h), (ds, dscale, dh)), seed, "gated residual")
    t, dt = 1000 * torch.rand(3, generator=gen, dtype=torch.float64), _randn(gen, 3)
    _close(tangent.timestep_embedding(t, dt, 32), _jvp(lambda a: mmdit.timestep_embedding(a, 32), (t,), (dt,)),
           seed, "timestep_embedding")


def test_rf_to_trigflow_conversion_tangents(seed, gen):
    x_in, dx_in = _randn(gen, 3, 2, 4, 4), _randn(gen, 3, 2, 4, 4)
    tau, dtau = 0.01 + 1.55 * torch.rand(3, generator=gen, dtype=torch.float64), _randn(gen, 3)
    x_rf, t_rf = trigflow.rf_inputs(x_in, tau)
    dx_rf, dt_rf = trigflow.rf_inputs_tangent(x_in, tau, dx_in, dtau)
    ref_x, ref_t = _jvp(trigflow.rf_inputs, (x_in, tau), (dx_in, dtau))
    _close(dx_rf, ref_x, seed, "dx_rf")
    _close(dt_rf, ref_t, seed, "dt_rf")
    v, dv = _randn(gen, 3, 2, 4, 4), _randn(gen, 3, 2, 4, 4)
    F_value = trigflow.trigflow_from_rf(v, x_in, tau)
    _close(trigflow.trigflow_from_rf_tangent(F_value, dv, x_in, tau, dx_in, dtau),
           _jvp(trigflow.trigflow_from_rf, (v, x_in, tau), (dv, dx_in, dtau)), seed, "dF")


# --------------------------------------------------------------------------------------------------
# The whole network
# --------------------------------------------------------------------------------------------------


def _math_attention(q, k, v):
    """Softmax attention written out: PyTorch's own forward-mode formulas, no custom rule."""
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


def _student(gen: torch.Generator, qk_norm: bool) -> TrigFlowStudent:
    cfg = load_config("demo", ["model.depth=3", "model.head_dim=16", f"model.qk_norm={qk_norm}"]).model
    student = TrigFlowStudent(cfg.model_copy(update={"guidance_embed": True})).double()
    student.init_weights(0)
    with torch.no_grad():  # leave adaLN-Zero's identity init, so every block, gate and head matters
        for p in student.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return student


def _inputs(gen: torch.Generator, B: int = 3):
    x_in, dx_in = _randn(gen, B, 1, 8, 8), _randn(gen, B, 1, 8, 8)
    tau = 0.01 + 1.55 * torch.rand(B, generator=gen, dtype=torch.float64)
    dtau = torch.cos(tau) * torch.sin(tau)
    context, pooled = _randn(gen, B, 16, 64), _randn(gen, B, 64)
    w = 1 + 3 * torch.rand(B, generator=gen, dtype=torch.float64)
    return x_in, tau, context, pooled, w, (dx_in, dtau)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_network_tangent_equals_forward_ad_through_math_attention(seed, gen, monkeypatch, qk_norm):
    student = _student(gen, qk_norm)
    x_in, tau, context, pooled, w, tangents = _inputs(gen)
    with torch.no_grad():
        F_value, u, J = student(x_in, tau, context, pooled, w, tangents=tangents)

    reference = copy.deepcopy(student)
    monkeypatch.setattr(kernels, "attention", _math_attention)
    with torch.no_grad():
        F_ref, J_ref = torch.func.jvp(lambda x, t: reference(x, t, context, pooled, w)[0], (x_in, tau), tangents)
    assert J.abs().max() > 1e-3, f"seed {seed}: the tangent is too small for the comparison to mean anything"
    _close(F_value, F_ref, seed, "F")
    torch.testing.assert_close(J, J_ref, rtol=1e-9, atol=1e-11, msg=lambda m: f"J (seed {seed}): {m}")


def test_fused_pass_primal_and_gradients_equal_a_plain_forward(seed, gen):
    """With grad enabled the primal is computed exactly as without tangents, and the tangent adds nothing
    to the graph: identical F and u, identical gradients, a tangent that does not require grad."""
    student = _student(gen, qk_norm=True)
    x_in, tau, context, pooled, w, tangents = _inputs(gen)
    probe = _randn(gen, *x_in.shape)

    def run(**kwargs):
        student.zero_grad(set_to_none=True)
        out = student(x_in, tau, context, pooled, w, **kwargs)
        ((out[0] * probe).sum() + out[1].sum()).backward()
        return out, {n: p.grad.clone() for n, p in student.named_parameters()}

    (F_plain, u_plain), grads_plain = run()
    (F_fused, u_fused, J), grads_fused = run(tangents=tangents)
    assert not J.requires_grad
    assert torch.equal(F_fused, F_plain) and torch.equal(u_fused, u_plain), f"seed {seed}"
    for name, grad in grads_plain.items():
        assert torch.equal(grads_fused[name], grad), f"{name} (seed {seed})"
