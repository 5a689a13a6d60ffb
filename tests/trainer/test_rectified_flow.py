"""The rectified-flow recipe's loss path (trainer.recipes.rectified_flow): the text condition the model
receives is the sample's own or, at the configured rate flow.text_dropout, the empty caption's encoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from scipy import stats

from infra.config import load_config
from trainer.recipes.rectified_flow import RectifiedFlowRecipe
from trainer.rng import RankStreams

pytestmark = pytest.mark.usefixtures("one_thread")

B, STEPS, L, C = 64, 40, 16, 64  # 2,560 draws per rate


class TextRecorder(nn.Module):
    """Stands in for the MM-DiT and records the text condition of every sample it is given."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, context, pooled):
        self.seen.append((context.detach().clone(), pooled.detach().clone()))
        return torch.zeros_like(x)


def _dropped_per_sample(rate: float, seed: int, gen: torch.Generator) -> torch.Tensor:
    """Run the recipe's loss for STEPS steps; (STEPS * B,) bool, True where the model got the empty caption.
    A sample gets either its own text or the empty one, both tokens and pooled."""
    cfg = load_config("demo", [f"flow.text_dropout={rate}", f"train.seed={seed}"])
    empty = {"text_tokens": torch.randn(L, C, generator=gen), "text_pooled": torch.randn(C, generator=gen)}
    recipe, model, streams = RectifiedFlowRecipe(cfg, empty), TextRecorder(), RankStreams(seed, rank=0)
    dropped = []
    for step in range(STEPS):
        batch = {"latent": torch.randn(B, 1, 8, 8, generator=gen), "text_tokens": torch.randn(B, L, C, generator=gen),
                 "text_pooled": torch.randn(B, C, generator=gen)}
        recipe.loss(model, batch, streams.at_step(step))
        context, pooled = model.seen[-1]
        own = (context == batch["text_tokens"]).flatten(1).all(1) & (pooled == batch["text_pooled"]).all(1)
        blank = (context == empty["text_tokens"]).flatten(1).all(1) & (pooled == empty["text_pooled"]).all(1)
        assert bool((own ^ blank).all()), f"a sample got a mixed or foreign text condition (seed {seed})"
        dropped.append(blank)
    return torch.cat(dropped)


@pytest.mark.parametrize("rate", [0.1, 0.35])
def test_text_is_dropped_at_the_configured_rate(rate, seed, gen):
    k = int(_dropped_per_sample(rate, seed, gen).sum())
    pvalue = stats.binomtest(k, STEPS * B, rate).pvalue
    assert pvalue > 1e-6, f"{k} of {STEPS * B} samples dropped at text_dropout={rate} (p = {pvalue:.2g}, seed {seed})"


def test_text_is_never_dropped_at_rate_zero(seed, gen):
    assert not _dropped_per_sample(0.0, seed, gen).any(), f"seed {seed}"
