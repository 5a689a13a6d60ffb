"""``kernels.attention``: SDPA in the primal, the fused JVP under forward-mode AD, SDPA's gradients backward."""

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

import kernels
from tests.kernels.oracle import assert_matches_exact_jvp, random_attention_inputs


class TinySelfAttention(torch.nn.Module):
    """Projection -> head split -> ``kernels.attention`` -> merge, as the model's layers use it."""

    def __init__(self, width: int = 32, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(width, 3 * width)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, seq, width = x.shape
        # (B, S, 3 * W) -> 3 x (B, heads, S, W / heads)
        return self.qkv(x).view(batch, seq, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.attention(*self.split_heads(x))


def layer_inputs():
    return torch.randn(2, 13, 32), torch.randn(2, 13, 32)


def test_primal_is_sdpa(seed):
    q, k, v = random_attention_inputs(2, 3, 11, 7, 16)[:3]
    assert torch.equal(kernels.attention(q, k, v), F.scaled_dot_product_attention(q, k, v)), f"seed {seed}"


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["grad", "no_grad"])
def test_func_jvp_of_attention_equals_attention_jvp(seed, grad_enabled):
    q, k, v, dq, dk, dv = random_attention_inputs(2, 3, 11, 7, 16)
    with torch.set_grad_enabled(grad_enabled):
        out, dout = torch.func.jvp(kernels.attention, (q, k, v), (dq, dk, dv))
    expected_out, expected_dout = kernels.attention_jvp(q, k, v, dq, dk, dv)
    assert torch.allclose(out, expected_out, rtol=1e-5, atol=1e-6), f"seed {seed}"
    assert torch.equal(dout, expected_dout), f"seed {seed}"


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["grad", "no_grad"])
def test_func_jvp_through_a_layer_matches_float64(seed, grad_enabled):
    layer = TinySelfAttention()
    x, dx = layer_inputs()
    with torch.set_grad_enabled(grad_enabled):
        out, dout = torch.func.jvp(layer, (x,), (dx,))
    with torch.no_grad():
        (q, k, v), (dq, dk, dv) = torch.func.jvp(layer.split_heads, (x,), (dx,))
    assert_matches_exact_jvp(out, dout, (q, k, v, dq, dk, dv), seed)


def test_tangent_on_some_inputs_only(seed):
    q, k, v, dq, _, _ = random_attention_inputs(1, 2, 9, 12, 16)
    out, dout = torch.func.jvp(lambda query: kernels.attention(query, k, v), (q,), (dq,))
    assert_matches_exact_jvp(out, dout, (q, k, v, dq, torch.zeros_like(k), torch.zeros_like(v)), seed)


def test_forward_ad_dual_tensors(seed):
    q, k, v, dq, dk, dv = random_attention_inputs(1, 2, 9, 12, 16)
    with forward_ad.dual_level():
        out = kernels.attention(*(forward_ad.make_dual(p, t) for p, t in ((q, dq), (k, dk), (v, dv))))
        out, dout = forward_ad.unpack_dual(out)
    assert_matches_exact_jvp(out, dout, (q, k, v, dq, dk, dv), seed)


def test_gradients_of_the_custom_op_match_sdpa(seed):
    q, k, v = (t.requires_grad_() for t in random_attention_inputs(2, 3, 11, 7, 16)[:3])
    grad_out = torch.randn(2, 3, 11, 16)
    ours = torch.autograd.grad(kernels.AttentionWithJVP.apply(q, k, v), (q, k, v), grad_out)
    expected = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), grad_out)
    for name, got, want in zip("qkv", ours, expected):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), f"grad of {name}, seed {seed}"


def test_backward_after_a_jvp_with_grad_matches_sdpa(seed):
    # The fused pattern: one with-grad forward gives the primal to back-propagate and the tangent.
    layer = TinySelfAttention()
    x, dx = layer_inputs()
    out, dout = torch.func.jvp(layer, (x,), (dx,))
    assert not dout.requires_grad, "the tangent is stop-gradient and must not record a graph"
    ours = torch.autograd.grad(out.square().sum(), tuple(layer.parameters()))
    q, k, v = layer.split_heads(x)
    reference = F.scaled_dot_product_attention(q, k, v)
    expected = torch.autograd.grad(reference.square().sum(), tuple(layer.parameters()))
    for got, want in zip(ours, expected):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), f"seed {seed}"


def test_calls_without_tangents_use_sdpa_autograd_directly():
    q, k, v = (t.requires_grad_() for t in random_attention_inputs(1, 1, 4, 4, 16)[:3])
    assert "AttentionWithJVP" not in type(kernels.attention(q, k, v).grad_fn).__name__
    with forward_ad.dual_level():
        dual_q = forward_ad.make_dual(q, torch.ones_like(q))
        assert "AttentionWithJVP" in type(kernels.attention(dual_q, k, v).grad_fn).__name__


def test_shape_mismatch_names_the_shapes():
    q, k, v = random_attention_inputs(1, 2, 4, 6, 16)[:3]
    with pytest.raises(ValueError, match=r"q \(1, 2, 4, 16\), k \(1, 2, 6, 16\), v \(1, 2, 6, 8\)"):
        kernels.attention(q, k, v[..., :8])


# --------------------------------------------------------------------------------------------------
# attention_with_tangent: a model carrying its own tangents (sCD's fused pass)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["grad", "no_grad"])
def test_attention_with_tangent_gives_the_exact_jvp_and_sdpa_gradients(seed, grad_enabled):
    q, k, v, dq, dk, dv = random_attention_inputs(2, 3, 11, 7, 16, dtype=torch.float64)
    q, k, v = (t.requires_grad_(grad_enabled) for t in (q, k, v))
    with torch.set_grad_enabled(grad_enabled):
        out, dout = kernels.attention_with_tangent(q, k, v, dq, dk, dv)
    assert_matches_exact_jvp(out.detach(), dout, [t.detach() for t in (q, k, v)] + [dq, dk, dv], seed)
    assert not dout.requires_grad
    if not grad_enabled:
        return
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(F.scaled_dot_product_attention(*inputs), inputs, grad_out)
    for name, got, want in zip("qkv", grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"d{name} (seed {seed}): {m}")


def test_attention_with_tangent_keeps_a_low_precision_primal_and_a_float32_tangent(seed):
    """fp32 tangents of a bf16 primal (the fused pass under bf16 autocast): the primal is SDPA in bf16, the
    tangent is computed from float32 copies and stays float32."""
    q, k, v, dq, dk, dv = random_attention_inputs(2, 3, 11, 7, 16)
    low = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    out, dout = kernels.attention_with_tangent(*low, dq, dk, dv)
    assert out.dtype == torch.bfloat16 and out.requires_grad and dout.dtype == torch.float32
    assert torch.equal(out, F.scaled_dot_product_attention(*low)), f"seed {seed}"
    widened = [t.detach().float() for t in low]
    expected = kernels.attention_jvp(*widened, dq, dk, dv)[1]
    assert torch.equal(dout, expected), f"seed {seed}"
