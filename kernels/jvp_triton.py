"""Attention and its JVP in one Triton pass (SCD.md section 6; sCM paper, Appendix F).

One program per (batch * head, block of BLOCK_M queries) loops over blocks of BLOCK_N keys and keeps the
online-softmax state of ``jvp_reference.py`` in registers: running max m, denominator l, mu~ = sum rowsum(p*dS)
and two (BLOCK_M, head_dim) float32 accumulators, O~ = sum p V and AB~ = sum p dV + (p*dS) V. Six matmuls per
key block instead of the forward's two, hence about 3x the forward FLOPs, and no S x S matrix in memory.

Imported only when the Triton backend is used: on machines where Triton is missing or broken, ``import
kernels`` still works and the PyTorch backend serves. Set TRITON_INTERPRET=1 before this module is imported to
run the kernel on CPU tensors (tests do this).
"""

import math

import torch
import triton
import triton.language as tl

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    return isinstance(_attention_jvp_kernel, triton.runtime.interpreter.InterpretedFunction)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation. UPCAST feeds bfloat16 operands as float32 (same values, so the
    same result): Triton's CPU interpreter computes bfloat16 tl.dot wrongly (checked with Triton 3.9)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _attention_jvp_kernel(
    Q, K, V, DQ, DK, DV, Out, DOut, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dqb, stride_dqh, stride_dqm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_ob, stride_oh, stride_om,
    num_heads, seq_q, seq_k, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq_q

    q_rows = (batch * stride_qb + head * stride_qh) + rows[:, None] * stride_qm + dims[None, :]
    dq_rows = (batch * stride_dqb + head * stride_dqh) + rows[:, None] * stride_dqm + dims[None, :]
    q = tl.load(Q + q_rows, mask=row_ok[:, None], other=0.0)
    dq = tl.load(DQ + dq_rows, mask=row_ok[:, None], other=0.0)
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh
    dk_base = DK + batch * stride_dkb + head * stride_dkh
    dv_base = DV + batch * stride_dvb + head * stride_dvh

    # Scores are kept in base-2 units (exp2 is the fast hardware exponential); tangent scores stay natural,
    # since they only multiply p.
    qk_scale = sm_scale * 1.4426950408889634  # log2(e)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    mu_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    out_acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    tangent_acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    for start_n in range(0, seq_k, BLOCK_N):
        keys = start_n + cols
        key_ok = keys < seq_k
        k = tl.load(k_base + keys[:, None] * stride_kn + dims[None, :], mask=key_ok[:, None], other=0.0)
        dk = tl.load(dk_base + keys[:, None] * stride_dkn + dims[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_vn + dims[None, :], mask=key_ok[:, None], other=0.0)
        dv = tl.load(dv_base + keys[:, None] * stride_dvn + dims[None, :], mask=key_ok[:, None], other=0.0)

        zeros = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        scores = _dot(q, tl.trans(k), zeros, DOT_PRECISION, DOT_UPCAST) * qk_scale
        tangent_scores = _dot(dq, tl.trans(k), zeros, DOT_PRECISION, DOT_UPCAST)
        tangent_scores = _dot(q, tl.trans(dk), tangent_scores, DOT_PRECISION, DOT_UPCAST) * sm_scale
        # Keys past the end of the sequence: weight exactly 0 and no tangent contribution.
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        tangent_scores = tl.where(key_ok[None, :], tangent_scores, 0.0)

        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row with every score -inf keeps m = -inf; subtracting 0 instead avoids inf - inf = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        p_ds = p * tangent_scores

        l_i = l_i * rescale + tl.sum(p, 1)
        mu_i = mu_i * rescale + tl.sum(p_ds, 1)
        # Like FlashAttention, the weights are rounded to the input dtype for the value matmuls (float32
        # accumulation); for float32 inputs this is exact.
        out_acc = _dot(p.to(v.dtype), v, out_acc * rescale[:, None], DOT_PRECISION, DOT_UPCAST)
        tangent_acc = _dot(p.to(dv.dtype), dv, tangent_acc * rescale[:, None], DOT_PRECISION, DOT_UPCAST)
        tangent_acc = _dot(p_ds.to(v.dtype), v, tangent_acc, DOT_PRECISION, DOT_UPCAST)
        m_i = m_new

    # l == 0 only when no key contributed (empty key set, or every score -inf): store zeros, not 0/0
    # (the NaN that NVlabs/rcm#5 fixed in its kernel).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = out_acc / l_safe[:, None]
    dout = tangent_acc / l_safe[:, None] - (mu_i / l_safe)[:, None] * out
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # ln(2)

    o_rows = (batch * stride_ob + head * stride_oh) + rows[:, None] * stride_om + dims[None, :]
    tl.store(Out + o_rows, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(DOut + o_rows, dout.to(DOut.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + batch_head * seq_q + rows, lse, mask=row_ok)


# Candidate tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) for autotuning on CUDA: FlashAttention-2's forward
# tiles and their neighbours. The kernel holds two float32 (BLOCK_M, head_dim) accumulators and three
# (BLOCK_M, BLOCK_N) score tiles, so wide inputs (float32, head_dim 128) keep the smaller ones (``_fitting``).
TILES = [
    (128, 128, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 2), (128, 32, 8, 2), (128, 32, 4, 3),
    (64, 128, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (64, 32, 4, 3), (32, 64, 4, 2),
]


def _fitting(configs, named_args, **kwargs):
    """The autotuner's early prune: tiles of at most 64 x 64 for float32 inputs or head_dim > 64."""
    wide = named_args["Q"].dtype == torch.float32 or kwargs["HEAD_DIM"] > 64
    return [c for c in configs if not wide or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]


# Tuned per (sequence lengths, head_dim, dtypes): the best tiles found are kept in ``.cache`` for the process.
_attention_jvp_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in TILES],
    key=["seq_q", "seq_k", "HEAD_DIM"],
    prune_configs_by={"early_config_prune": _fitting},
)(_attention_jvp_kernel)


def tuned_tiles() -> dict[tuple, str]:
    """The tiles autotuning chose so far in this process, by its key (seq_q, seq_k, head_dim, dtypes...)."""
    return {key: str(config) for key, config in _attention_jvp_autotuned.cache.items()}


def _launch_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Fixed tiles, for the interpreter and for calls that set a block size; CUDA calls without one autotune."""
    if is_interpreting():
        # The interpreter runs each program as numpy code: small tiles keep CPU tests fast while still
        # exercising several query blocks and key blocks.
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    if dtype == torch.float32 or head_dim > 64:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)


def triton_attention_jvp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, dout, lse); shapes already validated, inputs (B, H, S, head_dim) on one device.

    out and dout have the input dtype and layout (B, H, Sq, head_dim); lse is float32 (B, H, Sq).
    ``block_m``/``block_n`` fix the tile sizes (tests use them to force many blocks); without them CUDA calls
    autotune (``TILES``), once per sequence lengths, head_dim and dtype.
    """
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"the Triton attention JVP supports {[str(d) for d in SUPPORTED_DTYPES]}, got {q.dtype}; "
            "use backend='reference' for float64"
        )
    head_dim = q.shape[-1]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"the Triton attention JVP supports head_dim in {SUPPORTED_HEAD_DIMS}, got {head_dim}; "
            "use backend='reference'"
        )
    if not q.is_cuda and not is_interpreting():
        raise RuntimeError(
            f"the Triton attention JVP needs CUDA tensors (got {q.device}); to run it on CPU set "
            "TRITON_INTERPRET=1 before triton is imported, or use backend='reference'"
        )
    # The kernel addresses the head dimension with unit stride; everything else goes through strides, so
    # the (B, S, H, D) -> (B, H, S, D) transposes of a model need no copy.
    q, k, v, dq, dk, dv = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, dq, dk, dv))
    batch, heads, seq_q, _ = q.shape
    seq_k = k.shape[-2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    dout = torch.empty_like(out)
    lse = torch.empty((batch, heads, seq_q), device=q.device, dtype=torch.float32)
    if seq_q == 0 or batch * heads == 0:
        return out, dout, lse

    # float32 inputs follow PyTorch's float32 matmul setting: IEEE by default (TF32 costs about 1e-3 relative
    # error), TF32 where it is allowed (sCD's tangent under distill.tangent_precision=tf32).
    upcast = is_interpreting() and q.dtype == torch.bfloat16
    ieee = upcast or (q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)
    args = (
        q, k, v, dq, dk, dv, out, dout, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        *out.stride()[:3],
        heads, seq_q, seq_k, 1.0 / math.sqrt(head_dim),
    )
    constants = dict(HEAD_DIM=head_dim, DOT_PRECISION="ieee" if ieee else "tf32", DOT_UPCAST=upcast)
    if is_interpreting() or block_m is not None or block_n is not None:
        config = _launch_config(head_dim, q.dtype)
        config["BLOCK_M"] = block_m or config["BLOCK_M"]
        config["BLOCK_N"] = block_n or config["BLOCK_N"]
        _attention_jvp_kernel[(triton.cdiv(seq_q, config["BLOCK_M"]), batch * heads)](*args, **constants, **config)
    else:
        grid = lambda meta: (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _attention_jvp_autotuned[grid](*args, **constants)
    return out, dout, lse
