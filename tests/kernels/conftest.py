"""Kernel tests: fresh random inputs every run (seed printed on failure), Triton on CPU via its interpreter."""

import os

import pytest
import torch

# Triton decides between compiling and interpreting when a kernel is defined, i.e. when kernels.jvp_triton is
# first imported, which only the Triton tests do; on a machine without CUDA they run interpreted on CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SEED_ENV = "KERNEL_TEST_SEED"


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (set KERNEL_TEST_SEED to replay one); tests put it in their assertion messages."""
    value = int(os.environ[SEED_ENV]) if SEED_ENV in os.environ else torch.seed()
    torch.manual_seed(value)
    return value
