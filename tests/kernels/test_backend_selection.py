"""How ``attention_jvp`` picks its backend, and how users override it."""

import pytest
import torch

import kernels
from tests.kernels.oracle import random_attention_inputs


def test_auto_uses_reference_on_cpu():
    q = torch.zeros(1, 1, 4, 64)
    assert kernels.select_backend(q) == "reference"


def test_auto_uses_reference_for_float64():
    q = torch.zeros(1, 1, 4, 64, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    assert kernels.select_backend(q) == "reference"


def test_environment_overrides_auto_and_argument_overrides_environment(monkeypatch):
    q = torch.zeros(1, 1, 4, 64)
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    assert kernels.select_backend(q) == "triton"
    assert kernels.select_backend(q, "reference") == "reference"


def test_unknown_backend_names_its_source(monkeypatch):
    q = torch.zeros(1, 1, 4, 64)
    with pytest.raises(ValueError, match="'cudnn' \\(from backend argument\\)"):
        kernels.select_backend(q, "cudnn")
    monkeypatch.setenv(kernels.BACKEND_ENV, "flash")
    with pytest.raises(ValueError, match=f"'flash' \\(from {kernels.BACKEND_ENV}\\)"):
        kernels.select_backend(q)


def test_backends_agree_and_return_lse_on_request(seed):
    inputs = random_attention_inputs(1, 2, 19, 21, 64, device="cuda" if torch.cuda.is_available() else "cpu")
    results = {name: kernels.attention_jvp(*inputs, backend=name, return_lse=True) for name in ("reference", "triton")}
    for reference, fused in zip(results["reference"], results["triton"]):
        assert torch.allclose(reference, fused, rtol=1e-4, atol=1e-5), f"seed {seed}"


def test_tangent_mismatch_names_the_tangent():
    q, k, v, dq, dk, dv = random_attention_inputs(1, 2, 4, 6, 16)
    with pytest.raises(ValueError, match=r"tangent dk must match its primal: got \(1, 2, 4, 16\)"):
        kernels.attention_jvp(q, k, v, dq, dq, dv)
