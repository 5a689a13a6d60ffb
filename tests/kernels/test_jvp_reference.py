"""The PyTorch backend: online softmax over key blocks equals forward-mode AD through naive attention."""

import math

import pytest
import torch

from kernels.jvp_reference import streaming_attention_jvp
from tests.kernels.oracle import assert_matches_exact_jvp, random_attention_inputs, relative_error


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64_jvp_of_naive_attention(seed, dtype):
    # Query and key lengths differ and neither is a multiple of the block, so the last block is partial.
    inputs = random_attention_inputs(2, 3, 37, 53, 64, dtype)
    out, dout, _ = streaming_attention_jvp(*inputs, block_k=16)
    assert_matches_exact_jvp(out, dout, inputs, seed)


def test_result_does_not_depend_on_block_size(seed):
    inputs = random_attention_inputs(1, 2, 29, 41, 32, torch.float64)
    _, streamed, _ = streaming_attention_jvp(*inputs, block_k=5)
    _, single_block, _ = streaming_attention_jvp(*inputs, block_k=1024)
    assert relative_error(streamed, single_block) < 1e-12, f"seed {seed}"


def test_rescales_accumulators_when_the_running_max_grows(seed):
    # Scores that grow by ~10 per key block: every block raises the running max, and without the
    # exp(m_old - m_new) rescaling the earlier blocks would dominate the result.
    q, k, v, dq, dk, dv = random_attention_inputs(1, 1, 8, 64, 16, torch.float64)
    direction = torch.randn(16, dtype=torch.float64)
    q = q + 3 * direction
    k = k + torch.linspace(0, 8, 64, dtype=torch.float64)[:, None] * direction
    out, dout, _ = streaming_attention_jvp(q, k, v, dq, dk, dv, block_k=8)
    assert_matches_exact_jvp(out, dout, (q, k, v, dq, dk, dv), seed)


def test_log_sum_exp_of_scaled_scores(seed):
    q, k, *rest = random_attention_inputs(2, 2, 19, 23, 64, torch.float64)
    _, _, lse = streaming_attention_jvp(q, k, *rest, block_k=8)
    expected = torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(64), dim=-1)
    assert relative_error(lse, expected) < 1e-12, f"seed {seed}"


def test_empty_key_set_gives_zeros_not_nan():
    inputs = random_attention_inputs(1, 2, 5, 0, 16, torch.float32)
    out, dout, lse = streaming_attention_jvp(*inputs)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(dout, torch.zeros_like(dout))
    assert torch.isneginf(lse).all()
