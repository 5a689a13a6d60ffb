"""``attention_jvp``: attention and its forward-mode derivative in one pass, with backend selection.

Backends:
  "triton"    - fused kernel (``jvp_triton.py``), CUDA tensors of float32/bfloat16/float16, head_dim 16-128;
  "reference" - PyTorch, streamed over key blocks (``jvp_reference.py``), any device and dtype.
"auto" (the default) takes Triton where it applies and the reference elsewhere. The environment variable
FLOWSCALE_ATTENTION_JVP_BACKEND overrides the default, which also reaches the JVP rule of
``kernels.attention`` inside a model, where no argument can be passed.
"""

import functools
import os

import torch

from kernels.jvp_reference import streaming_attention_jvp

BACKENDS = ("auto", "triton", "reference")
BACKEND_ENV = "FLOWSCALE_ATTENTION_JVP_BACKEND"


@functools.cache
def _triton_import_error() -> str | None:
    """Why the Triton backend cannot be imported here, or None if it can (checked once per process)."""
    try:
        import kernels.jvp_triton  # noqa: F401
    except Exception as error:  # a missing, or installed but broken, Triton must not break `import kernels`
        return f"{type(error).__name__}: {error}"
    return None


def _triton_applies(q: torch.Tensor) -> bool:
    if not q.is_cuda or _triton_import_error() is not None:
        return False
    from kernels.jvp_triton import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS

    return q.dtype in SUPPORTED_DTYPES and q.shape[-1] in SUPPORTED_HEAD_DIMS


def select_backend(q: torch.Tensor, backend: str | None = None) -> str:
    """The backend ``attention_jvp`` uses for ``q``: ``backend`` if given, else $FLOWSCALE_ATTENTION_JVP_BACKEND,
    else "auto"; "auto" resolves to "triton" or "reference"."""
    requested = backend or os.environ.get(BACKEND_ENV) or "auto"
    if requested not in BACKENDS:
        source = "backend argument" if backend else BACKEND_ENV
        raise ValueError(f"unknown attention JVP backend {requested!r} (from {source}); choose one of {BACKENDS}")
    if requested == "auto":
        return "triton" if _triton_applies(q) else "reference"
    if requested == "triton" and _triton_import_error() is not None:
        raise RuntimeError(f"attention JVP backend 'triton' requested but Triton fails to import: {_triton_import_error()}")
    return requested


def check_attention_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q (B, H, Sq, D), k and v (B, H, Sk, D), one device and dtype; raises naming the offending shapes."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects q, k, v of shape (batch, heads, seq, head_dim); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "attention expects q (B, H, Sq, D) and k, v (B, H, Sk, D) with equal B, H and D; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if len({q.dtype, k.dtype, v.dtype}) != 1 or len({q.device, k.device, v.device}) != 1:
        raise ValueError(
            f"attention expects q, k, v on one device with one dtype; got q {q.dtype} on {q.device}, "
            f"k {k.dtype} on {k.device}, v {v.dtype} on {v.device}"
        )


def attention_jvp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    backend: str | None = None,
    return_lse: bool = False,
):
    """Softmax attention ``out = softmax(q k^T / sqrt(D)) v`` and its JVP ``dout`` along (dq, dk, dv).

    Shapes (B, H, Sq, D) for q and dq, (B, H, Sk, D) for k, v, dk, dv; no mask. Returns ``(out, dout)`` in
    the input dtype, or ``(out, dout, lse)`` with the float32 (float64 for float64 inputs) log-sum-exp of
    the scaled scores, shape (B, H, Sq), if ``return_lse``. Rows with no key (Sk = 0) give zeros, not NaN.
    Not differentiable: sCD treats the tangent as stop-gradient (SCD.md section 6).
    """
    check_attention_shapes(q, k, v)
    for name, primal, tangent in (("dq", q, dq), ("dk", k, dk), ("dv", v, dv)):
        if tangent.shape != primal.shape or tangent.dtype != primal.dtype or tangent.device != primal.device:
            raise ValueError(
                f"tangent {name} must match its primal: got {tuple(tangent.shape)} {tangent.dtype} on "
                f"{tangent.device}, primal {tuple(primal.shape)} {primal.dtype} on {primal.device}"
            )
    if select_backend(q, backend) == "triton":
        from kernels.jvp_triton import triton_attention_jvp

        out, dout, lse = triton_attention_jvp(q, k, v, dq, dk, dv)
    else:
        out, dout, lse = streaming_attention_jvp(q, k, v, dq, dk, dv)
    return (out, dout, lse) if return_lse else (out, dout)
