"""Fresh randomness for every numerical test, with the seed printed on failure so it can be replayed, and
one intra-op thread for the tests that ask for it.

Set ``FLOWSCALE_TEST_SEED`` to replay a failing run with the seed its assertion message reported.
"""

from __future__ import annotations

import os

import pytest
import torch


def fresh_seed() -> int:
    replay = os.environ.get("FLOWSCALE_TEST_SEED")
    if replay:
        return int(replay)
    return int.from_bytes(os.urandom(8), "little") % 2**63


@pytest.fixture
def seed() -> int:
    """A new seed per test (os.urandom), or ``FLOWSCALE_TEST_SEED`` when replaying."""
    return fresh_seed()


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a small, shared CPU, two threads contend and a step is ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
