"""The fused Triton kernel against float64 forward-mode AD; compiled on CUDA, interpreted on CPU.

Shapes are small and tiles are forced to 16 so that several query and key blocks, partial ones included, are
exercised while the interpreter stays fast.
"""

import math

import pytest
import torch

from tests.conftest import require
from tests.kernels.oracle import assert_matches_exact_jvp, random_attention_inputs, relative_error

require("triton")
from kernels import jvp_triton  # noqa: E402  (after the check: an error of our own module is not a missing extra)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_runs_compiled_on_cuda_or_interpreted_on_cpu():
    assert DEVICE == "cuda" or jvp_triton.is_interpreting(), (
        "kernels.jvp_triton was imported before tests/conftest.py set TRITON_INTERPRET=1; "
        "run with TRITON_INTERPRET=1 in the environment"
    )


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64_jvp_of_naive_attention(seed, dtype, head_dim):
    inputs = random_attention_inputs(1, 2, 37, 45, head_dim, dtype, DEVICE)
    out, dout, _ = jvp_triton.triton_attention_jvp(*inputs, block_m=16, block_n=16)
    assert_matches_exact_jvp(out, dout, inputs, seed)


def test_log_sum_exp_of_scaled_scores(seed):
    q, k, *rest = random_attention_inputs(2, 1, 21, 30, 64, torch.float32, DEVICE)
    _, _, lse = jvp_triton.triton_attention_jvp(q, k, *rest, block_m=16, block_n=16)
    expected = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) / math.sqrt(64), dim=-1)
    assert lse.dtype == torch.float32
    assert relative_error(lse, expected) < 1e-5, f"seed {seed}"


def test_strided_inputs_from_a_head_transpose(seed):
    # The model splits heads with a (B, S, H, D) -> (B, H, S, D) transpose; the kernel reads it through strides.
    b, s, h, d = 2, 20, 3, 64
    inputs = [torch.randn(b, s, h, d, device=DEVICE).transpose(1, 2) for _ in range(6)]
    assert not inputs[0].is_contiguous()
    out, dout, _ = jvp_triton.triton_attention_jvp(*inputs, block_m=16, block_n=16)
    assert_matches_exact_jvp(out, dout, inputs, seed)


def test_default_tiles(seed):
    inputs = random_attention_inputs(1, 1, 33, 17, 64, torch.float32, DEVICE)
    out, dout, _ = jvp_triton.triton_attention_jvp(*inputs)
    assert_matches_exact_jvp(out, dout, inputs, seed)


def test_empty_key_set_gives_zeros_not_nan():
    inputs = random_attention_inputs(1, 2, 5, 0, 64, torch.bfloat16, DEVICE)
    out, dout, lse = jvp_triton.triton_attention_jvp(*inputs, block_m=16, block_n=16)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(dout, torch.zeros_like(dout))
    assert torch.isneginf(lse).all()


def test_rejects_unsupported_head_dim_and_dtype():
    with pytest.raises(ValueError, match="head_dim in .* got 96"):
        jvp_triton.triton_attention_jvp(*random_attention_inputs(1, 1, 4, 4, 96, torch.float32, DEVICE))
    with pytest.raises(TypeError, match="float64"):
        jvp_triton.triton_attention_jvp(*random_attention_inputs(1, 1, 4, 4, 64, torch.float64, DEVICE))


@pytest.mark.parametrize("head_dim", jvp_triton.SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("dtype", jvp_triton.SUPPORTED_DTYPES)
def test_autotuning_keeps_some_tiles_and_only_small_ones_for_wide_inputs(dtype, head_dim):
    """On CUDA the kernel autotunes over ``TILES``; float32 inputs and head_dim 128 keep tiles of at most 64 x 64
    (two float32 accumulators and three score tiles must fit in registers), the others keep all."""
    configs = jvp_triton._attention_jvp_autotuned.configs
    kept = jvp_triton._fitting(configs, {"Q": torch.empty(0, dtype=dtype)}, HEAD_DIM=head_dim)
    wide = dtype == torch.float32 or head_dim > 64
    assert kept and (len(kept) < len(configs) if wide else len(kept) == len(configs))
    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 for c in kept) or not wide
