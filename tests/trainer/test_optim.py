"""AdamW's weight-decay groups, the LR schedule at its boundaries and the EMA of the weights (trainer.optim),
against values worked out by hand from the config's documented behaviour (infra.config.OptimConfig)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from infra.config import OptimConfig, load_config
from trainer.models.mmdit import RMSNorm, build_mmdit
from trainer.optim import EMA, build_optimizer, lr_factor

# --------------------------------------------------------------------------------------------------
# Weight decay
# --------------------------------------------------------------------------------------------------


def _norm_scales_and_biases(model: nn.Module) -> tuple[set[str], set[str]]:
    norms = {n for n, p in model.named_parameters()
             if isinstance(model.get_submodule(n.rpartition(".")[0]), (nn.LayerNorm, RMSNorm))}
    return norms, {n for n, _ in model.named_parameters() if n.endswith(".bias")}


def test_weight_decay_shrinks_matrices_and_leaves_biases_and_norm_scales(seed, gen):
    """With zero gradients AdamW's update is zero, so one step is the decoupled decay alone:
    p <- p (1 - lr wd) for weight matrices (and conv kernels), p unchanged for biases and norm scales."""
    model = build_mmdit(load_config("demo", ["model.depth=2", "model.head_dim=16", "model.qk_norm=true"]).model)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    frozen = model.final_layer.linear.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = OptimConfig(lr=0.1, weight_decay=0.3)
    optimizer = build_optimizer(model, cfg)
    assert not any(p is frozen for group in optimizer.param_groups for p in group["params"]), "a frozen parameter"
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    optimizer.step()

    norm_scales, biases = _norm_scales_and_biases(model)
    assert norm_scales and biases, "the model should have both kinds of undecayed parameters"
    kept = norm_scales | biases
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        factor = 1.0 if name in kept else 1 - cfg.lr * cfg.weight_decay
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=1e-12, atol=0,
                                   msg=lambda m: f"{name} (dim {p.dim()}, seed {seed}): {m}")


# --------------------------------------------------------------------------------------------------
# LR schedule: linear warmup from 0 over 4 steps, decay to min_lr_ratio = 0.1 over steps 4..14
# --------------------------------------------------------------------------------------------------

WARMUP, TOTAL, MIN = 4, 14, 0.1


def _factors(schedule: str, steps) -> list[float]:
    cfg = OptimConfig(warmup_steps=WARMUP, schedule=schedule, min_lr_ratio=MIN)
    return [lr_factor(step, TOTAL, cfg) for step in steps]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_warmup_rises_linearly_to_the_peak_then_decay_starts_from_it(schedule):
    # step 0 takes the first 1/4 of the ramp (never a zero LR); the last warmup step and the first decay
    # step are both at the peak
    assert _factors(schedule, [0, 1, 2, 3, 4]) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0], abs=1e-15)


def test_constant_schedule_stays_at_the_peak_after_warmup():
    assert _factors("constant", [4, 9, 13, 14, 100]) == [1.0] * 5


@pytest.mark.parametrize("schedule,midpoint,last", [
    ("linear", 0.1 + 0.9 * 0.5, 0.1 + 0.9 * 0.1),  # progress 5/10 and 9/10
    ("cosine", 0.1 + 0.9 * 0.5, 0.1 + 0.9 * 0.5 * (1 + math.cos(0.9 * math.pi))),
], ids=["linear", "cosine"])
def test_decay_passes_its_midpoint_and_ends_at_min_lr_ratio(schedule, midpoint, last):
    """Progress (step - warmup) / (total - warmup): 1/2 at step 9; the last step taken, 13, is 9/10 of the
    way; at step 14 = total and after, the factor is min_lr_ratio."""
    mid, at_last, at_end, after = _factors(schedule, [9, TOTAL - 1, TOTAL, 10 * TOTAL])
    assert mid == pytest.approx(midpoint, abs=1e-15) and at_last == pytest.approx(last, abs=1e-15)
    assert at_end == pytest.approx(MIN, abs=1e-15) and after == pytest.approx(MIN, abs=1e-15)
    steps = range(WARMUP, TOTAL + 1)
    factors = _factors(schedule, steps)
    assert all(a > b for a, b in zip(factors, factors[1:])), f"not decreasing: {factors}"


def test_schedule_without_warmup_starts_at_the_peak():
    cfg = OptimConfig(warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert [lr_factor(s, 10, cfg) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-15)


# --------------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------------


def _ema_sequence(decay: float, warmup: bool, values: list[float]) -> list[float]:
    """The shadow of a one-element model that starts at 0 and takes ``values`` before each update."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, decay, warmup)
    out = []
    for v in values:
        with torch.no_grad():
            model.weight.fill_(v)
        ema.update(model)
        out.append(float(ema.shadow["weight"]))
    return out


def test_ema_without_warmup_is_the_plain_exponential_average():
    # s <- 0.9 s + 0.1 p from s = 0:  0.1, 0.09 + 0.2, 0.261 + 0.3
    assert _ema_sequence(0.9, False, [1.0, 2.0, 3.0]) == pytest.approx([0.1, 0.29, 0.561], abs=1e-6)


def test_ema_warmup_uses_decay_one_over_ten_then_two_over_eleven():
    # d_n = min(0.9, (1 + n) / (10 + n)): 0.1, 2/11, 1/4;  s = 0.9, 2/11 * 0.9 + 9/11 * 2 = 1.8, 0.45 + 2.25
    assert _ema_sequence(0.9, True, [1.0, 2.0, 3.0]) == pytest.approx([0.9, 1.8, 2.7], abs=1e-6)


def test_ema_warmup_decay_reaches_the_configured_decay_and_stays():
    ema = EMA(nn.Linear(1, 1), 0.9, warmup=True)
    decays = []
    for n in (0, 1, 79, 80, 500):  # (1 + n) / (10 + n) >= 0.9 from n = 80 on
        ema.updates = n
        decays.append(ema.current_decay())
    assert decays[:3] == pytest.approx([0.1, 2 / 11, 80 / 89], abs=1e-15) and decays[3:] == [0.9, 0.9]
    assert EMA(nn.Linear(1, 1), 0.9, warmup=False).current_decay() == 0.9
