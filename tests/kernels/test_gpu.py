"""CUDA-only checks at SD3 shapes (run with ``pytest -m gpu`` on a GPU machine)."""

import pytest
import torch

import kernels
from tests.kernels.oracle import assert_matches_exact_jvp, random_attention_inputs

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def needs_cuda():
    if not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA device; it is deselected by default (marker 'gpu')")


def test_auto_selects_triton_on_cuda():
    assert kernels.select_backend(torch.zeros(1, 1, 4, 64, device="cuda", dtype=torch.bfloat16)) == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq, head_dim", [(589, 64), (4250, 64), (1031, 128)])
def test_fused_kernel_matches_float64_at_model_shapes(seed, dtype, seq, head_dim):
    inputs = random_attention_inputs(1, 4, seq, seq, head_dim, dtype, "cuda")
    out, dout = kernels.attention_jvp(*inputs, backend="triton")
    assert_matches_exact_jvp(out, dout, inputs, seed)


def test_func_jvp_of_attention_uses_the_fused_kernel(seed):
    q, k, v, dq, dk, dv = random_attention_inputs(2, 24, 410, 410, 64, torch.bfloat16, "cuda")
    with torch.no_grad():
        _, dout = torch.func.jvp(kernels.attention, (q, k, v), (dq, dk, dv))
    _, expected = kernels.attention_jvp(q, k, v, dq, dk, dv, backend="triton")
    assert torch.equal(dout, expected), f"seed {seed}"
