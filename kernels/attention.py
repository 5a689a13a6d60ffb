"""``attention``: the model's single attention call, differentiable in both directions.

PyTorch's fused SDPA backends have no forward-mode AD formula (pytorch/pytorch#128971, #117629), so
``torch.func.jvp`` of a model calling SDPA raises NotImplementedError, and the math fallback materialises
several S x S matrices per layer. ``AttentionWithJVP`` keeps SDPA for the primal and gives forward-mode AD a
rule that calls the fused ``attention_jvp``. ``attention_with_tangent`` is the same attention for a model
that carries tangents itself (sCD's fused pass): the primal differentiable, the tangent stop-gradient.
"""

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

from kernels.jvp import attention_jvp, check_attention_shapes


class AttentionWithJVP(torch.autograd.Function):
    """SDPA with a ``jvp`` rule; ``setup_context`` (not a ctx argument of ``forward``) is what lets
    ``torch.func`` transforms use it (SCD.md section 7)."""

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # Recompute through SDPA's own autograd: its fused backward needs the forward's log-sum-exp, which
        # the public SDPA call does not return. This path only runs when a JVP and a backward go through
        # the same call (see ``attention``), so the extra forward is confined to that case.
        inputs = [t.detach().requires_grad_(needed) for t, needed in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        wanted = [t for t in inputs if t.requires_grad]
        with torch.enable_grad():
            out = F.scaled_dot_product_attention(*inputs)
        grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return tuple(next(grads) if t.requires_grad else None for t in inputs)

    @staticmethod
    def jvp(ctx, dq, dk, dv):
        q, k, v = ctx.saved_tensors
        tangents = [torch.zeros_like(p) if t is None else t for p, t in ((q, dq), (k, dk), (v, dv))]
        # The tangent output is stop-gradient in sCD (SCD.md section 6): no graph is recorded for it.
        with torch.no_grad():
            _, dout = attention_jvp(q, k, v, *tangents)
        return dout


def _carries_tangent(*tensors: torch.Tensor) -> bool:
    """True when forward-mode AD (``torch.func.jvp`` or ``forward_ad`` dual tensors) tracks a tangent
    for one of the tensors."""
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention, shapes (B, heads, S, head_dim) for q and (B, heads, S_kv, head_dim) for k and v,
    scale 1/sqrt(head_dim), no mask.

    The primal is SDPA with the fastest backend PyTorch picks. When forward-mode AD tracks a tangent through
    q, k or v, the call goes through ``AttentionWithJVP``, whose JVP rule is the fused ``attention_jvp``;
    otherwise SDPA is called directly, so an ordinary training step keeps SDPA's fused backward and pays
    nothing for the JVP support.
    """
    check_attention_shapes(q, k, v)
    if _carries_tangent(q, k, v):
        return AttentionWithJVP.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def attention_with_tangent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                           dv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention(q, k, v)`` and its tangent along (dq, dk, dv), for a model that propagates tangents itself.

    The tangent is stop-gradient (sCD) and has the tangents' dtype. Without grad, both come from one pass
    of ``attention_jvp``. With grad, the primal is ``attention`` (SDPA and its fused backward, in the primal's
    own dtype, e.g. bf16 under autocast) and the kernel, given copies in the tangents' dtype, adds the tangent.
    Reusing the kernel's out and log-sum-exp for the primal would save one attention forward; measured on
    CPU at 30.9M parameters it was within noise (1.4%), not worth a second code path.
    """
    check_attention_shapes(q, k, v)
    if not torch.is_grad_enabled() and dq.dtype == q.dtype:
        return attention_jvp(q, k, v, dq, dk, dv)  # both from the kernel's one pass
    out = attention(q, k, v)
    with torch.no_grad():
        _, dout = attention_jvp(q.to(dq.dtype), k.to(dq.dtype), v.to(dq.dtype), dq, dk, dv)
    return out, dout
