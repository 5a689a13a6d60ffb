"""Attention and its JVP in PyTorch, streamed over key blocks (SCD.md section 6).

The CPU backend of ``kernels.attention_jvp`` and the readable statement of what the Triton kernel computes.
Naive forward-mode AD through attention keeps S, P, dS and dP (each B x H x Sq x Sk) alive; here only one key
block of scores exists at a time and the state carried between blocks is O(Sq x head_dim) per head.

Per query row, with running max m and un-normalised weights p = exp(S_j - m) for key block j:

    l   = sum p                       O~  = sum p V_j
    mu~ = sum rowsum(p * dS_j)        AB~ = sum p dV_j + (p * dS_j) V_j

all rescaled by exp(m_old - m_new) when m grows. Epilogue: O = O~ / l, dO = AB~ / l - (mu~ / l) O,
LSE = m + log l. The spec's separate A~ and B~ are summed into one accumulator AB~ because only their sum
reaches dO. Per block, one matmul p @ [V_j | dV_j] gives O~'s and A~'s terms, and every pass over the
(Sq x block) matrices is in place: on CPU these elementwise passes, not the matmuls, dominate.
"""

import math

import torch

DEFAULT_BLOCK_K = 256


def streaming_attention_jvp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    block_k: int = DEFAULT_BLOCK_K,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, dout, lse) for softmax(q k^T / sqrt(d)) v and its tangent; shapes already validated.

    Low-precision inputs are accumulated in float32 (float64 stays float64); out and dout come back in the
    input dtype, lse in the accumulator dtype.
    """
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1])
    # [dq | q] @ [k | dk]^T = dq k^T + q dk^T: the tangent scores in one matmul of twice the inner size.
    q_dq = torch.cat([dq, q], dim=-1).to(acc_dtype).mul_(scale)
    q_scaled = q.to(acc_dtype) * scale

    batch_heads, seq_q, head_dim = q.shape[:-2], q.shape[-2], q.shape[-1]
    m = q_scaled.new_full((*batch_heads, seq_q, 1), -math.inf)
    l = q_scaled.new_zeros((*batch_heads, seq_q, 1))
    mu = torch.zeros_like(l)
    out_acc = q_scaled.new_zeros((*batch_heads, seq_q, head_dim))
    tangent_acc = torch.zeros_like(out_acc)

    for start in range(0, k.shape[-2], block_k):
        k_j = k[..., start:start + block_k, :].to(acc_dtype)
        dk_j = dk[..., start:start + block_k, :].to(acc_dtype)
        v_j = v[..., start:start + block_k, :].to(acc_dtype)
        dv_j = dv[..., start:start + block_k, :].to(acc_dtype)

        scores = q_scaled @ k_j.transpose(-1, -2)
        tangent_scores = q_dq @ torch.cat([k_j, dk_j], dim=-1).transpose(-1, -2)

        m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
        # A row whose scores are all -inf keeps m = -inf; subtracting 0 instead avoids inf - inf = NaN.
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        rescale = torch.exp(m - m_safe)
        p = scores.sub_(m_safe).exp_()
        p_ds = tangent_scores.mul_(p)

        l.mul_(rescale).add_(p.sum(dim=-1, keepdim=True))
        mu.mul_(rescale).add_(p_ds.sum(dim=-1, keepdim=True))
        pv, p_dv = (p @ torch.cat([v_j, dv_j], dim=-1)).split(head_dim, dim=-1)
        out_acc.mul_(rescale).add_(pv)
        tangent_acc.mul_(rescale).add_(p_dv).add_(p_ds @ v_j)
        m = m_new

    # l == 0 only when no key contributed (empty key set, or every score -inf): return zeros there, not 0/0
    # (the NaN that NVlabs/rcm#5 fixed in its kernel).
    empty = l == 0
    l_safe = torch.where(empty, torch.ones_like(l), l)
    out = out_acc / l_safe
    dout = tangent_acc / l_safe - (mu / l_safe) * out
    lse = torch.where(empty, torch.full_like(m, -math.inf), m + torch.log(l_safe)).squeeze(-1)
    return out.to(q.dtype), dout.to(q.dtype), lse
