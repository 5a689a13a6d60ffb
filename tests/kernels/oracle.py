"""Float64 ground truth: forward-mode AD (``torch.func.jvp``) through attention written as three ops."""

import torch

# Max-abs error relative to the largest reference value. float32 and float64 backends accumulate in their
# own precision; bfloat16/float16 round the softmax weights before the value matmuls, as FlashAttention does.
RELATIVE_TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 2e-2,
}


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return scores.softmax(dim=-1) @ v


def exact_attention_jvp(q, k, v, dq, dk, dv) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, dout) in float64 from the inputs' own (possibly rounded) values."""
    primals = tuple(t.double() for t in (q, k, v))
    tangents = tuple(t.double() for t in (dq, dk, dv))
    return torch.func.jvp(naive_attention, primals, tangents)


def random_attention_inputs(batch, heads, seq_q, seq_k, head_dim, dtype=torch.float32, device="cpu"):
    """q, k, v, dq, dk, dv with unit-normal entries."""
    shapes = [(batch, heads, s, head_dim) for s in (seq_q, seq_k, seq_k, seq_q, seq_k, seq_k)]
    return [torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device) for shape in shapes]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double().cpu()
    return ((actual.double().cpu() - expected).abs().max() / expected.abs().max()).item()


def assert_matches_exact_jvp(out, dout, inputs, seed: int) -> None:
    """out and dout are within the tolerance of the inputs' dtype of the float64 JVP of naive attention."""
    expected_out, expected_dout = exact_attention_jvp(*inputs)
    tolerance = RELATIVE_TOLERANCE[inputs[0].dtype]
    assert out.dtype == dout.dtype == inputs[0].dtype
    for name, actual, expected in (("out", out, expected_out), ("dout", dout, expected_dout)):
        error = relative_error(actual, expected)
        assert error < tolerance, f"{name}: relative error {error:.2e} >= {tolerance:.0e} (seed {seed})"
