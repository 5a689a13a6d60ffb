"""Kernel tests: fresh random inputs every run (seed printed on failure), Triton on CPU via its interpreter."""

import os

import pytest
import torch

# TRITON_INTERPRET is set in tests/conftest.py: it must be in place before anything imports Triton.

SEED_ENV = "KERNEL_TEST_SEED"


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (set KERNEL_TEST_SEED to replay one); tests put it in their assertion messages."""
    value = int(os.environ[SEED_ENV]) if SEED_ENV in os.environ else torch.seed()
    torch.manual_seed(value)
    return value
