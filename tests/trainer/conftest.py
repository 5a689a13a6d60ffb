"""Fresh randomness for every numerical test, with the seed printed on failure so it can be replayed.

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
