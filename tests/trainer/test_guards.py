"""Numerical guards of the loop: a non-finite step is skipped and counted; too many in a row stop the job
with an error naming the step, before anything is checkpointed over; activation checkpointing and per-block
compile change memory and speed, not numbers."""

from __future__ import annotations

import pytest
import torch

from infra.config import load_config
from trainer.loop import NonFiniteError, Trainer
from trainer.recipes.rectified_flow import RectifiedFlowRecipe

EMPTY = {"text_tokens": torch.zeros(16, 64), "text_pooled": torch.zeros(64)}
BASE = ["model.depth=2", "model.head_dim=16", "train.global_batch_size=4", "train.eval_every=0",
        "train.log_every=1", "optim.warmup_steps=0"]


def batches(n: int, poison: set[int] = frozenset()):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        latent = torch.randn(4, 1, 8, 8, generator=g)
        if i in poison:
            latent[0, 0, 0, 0] = float("nan")
        yield {"latent": latent, "text_tokens": torch.randn(4, 16, 64, generator=g),
               "text_pooled": torch.randn(4, 64, generator=g)}


class Recorder:
    def __init__(self):
        self.logged, self.checkpoints = [], []

    def on_log(self, step, metrics): self.logged.append((step, metrics))
    def on_eval(self, *a): ...
    def should_checkpoint(self, step, final): return True
    def on_checkpoint(self, step, trainer): self.checkpoints.append(step)


def test_a_nonfinite_step_is_skipped_and_counted():
    cfg = load_config("demo", BASE + ["train.steps=4"])
    hooks = Recorder()
    trainer = Trainer(cfg, RectifiedFlowRecipe(cfg, EMPTY), hooks)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit(batches(4, poison={0}))
    step1 = dict(hooks.logged)[1]
    assert step1["nonfinite_steps"] == 1.0
    assert dict(hooks.logged)[4]["nonfinite_steps"] == 1.0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())  # later steps trained


def test_too_many_nonfinite_steps_in_a_row_stop_with_the_step_named():
    cfg = load_config("demo", BASE + ["train.steps=10", "train.max_nonfinite_steps=3"])
    hooks = Recorder()
    trainer = Trainer(cfg, RectifiedFlowRecipe(cfg, EMPTY), hooks)
    with pytest.raises(NonFiniteError, match="3 consecutive non-finite steps ending at step 5"):
        trainer.fit(batches(10, poison={2, 3, 4}))
    assert hooks.checkpoints == [1, 2]  # nothing was saved from the failing steps


def loss_and_grads(*overrides: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One step's loss and gradients of a fresh demo trainer, off adaLN-Zero's identity so every block matters."""
    cfg = load_config("demo", BASE + ["train.steps=1", *overrides])
    trainer = Trainer(cfg, RectifiedFlowRecipe(cfg, EMPTY))
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.02)
    loss, _ = trainer.recipe.loss(trainer.model, next(batches(1)), trainer.streams.at_step(0))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    loss_a, grads_a = loss_and_grads("train.activation_checkpointing=false")
    loss_b, grads_b = loss_and_grads("train.activation_checkpointing=true")
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_per_block_compile_gives_the_same_loss_and_gradients():
    loss_a, grads_a = loss_and_grads("train.compile=false")
    loss_b, grads_b = loss_and_grads("train.compile=true")
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
