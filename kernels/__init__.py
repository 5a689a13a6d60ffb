"""Attention for flowscale: the single entry point every model layer calls, and its fused JVP.

``attention(q, k, v)``      - softmax attention (SDPA primal) usable under ``torch.func.jvp`` and backward;
``attention_jvp(q, k, v, dq, dk, dv)`` - (out, dout) in one pass, Triton on CUDA, streamed PyTorch elsewhere;
``attention_with_tangent(q, k, v, dq, dk, dv)`` - the same with a differentiable out (sCD's fused pass).
Triton is imported only when its backend is used.
"""

from kernels.attention import AttentionWithJVP, attention, attention_with_tangent
from kernels.jvp import BACKEND_ENV, BACKENDS, attention_jvp, select_backend

__all__ = ["attention", "attention_with_tangent", "attention_jvp", "AttentionWithJVP", "select_backend", "BACKENDS", "BACKEND_ENV"]
