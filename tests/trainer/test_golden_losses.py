"""Each recipe's fixed-seed fp32 CPU run reproduces its stored loss and gradient-norm curve
(``tests/trainer/golden.py`` says how the runs are made and how to regenerate them).

The tolerance: on one machine and torch build the runs are bit for bit (also across intra-op thread counts);
what moves them elsewhere is rounding (another CPU's kernels, another torch release). Perturbing every
initial weight by one ulp moved the 20-step curves by at most 1e-5 relative (sCD's loss; rectified flow
2e-7), so RTOL = 1e-4 leaves a 10x margin, and ATOL absorbs sCD losses passing near zero. A change of the
objective (text dropout off, a sign or a weighting flipped) moves them by 1e-2 or more.
"""

from __future__ import annotations

import math

import pytest

from tests.trainer import golden

RTOL, ATOL = 1e-4, 1e-6


@pytest.mark.parametrize("recipe", sorted(golden.RUNS))
def test_fixed_seed_run_reproduces_the_golden_loss_and_grad_norm_curve(recipe):
    expected = golden.stored(recipe)
    actual = golden.run(recipe)
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for got, want in zip(actual, expected):
        for key in ("loss", "grad_norm"):
            assert math.isclose(got[key], want[key], rel_tol=RTOL, abs_tol=ATOL), (
                f"{recipe} step {want['step']}: {key} {got[key]!r} != golden {want[key]!r}. If numerics changed on "
                f"purpose, regenerate with `python -m tests.trainer.golden` and say why in the commit"
            )
