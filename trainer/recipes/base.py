"""The train spec: everything the loop, the job's workers, the sampling CLI and the final grids need from a
recipe. A recipe subclasses ``Recipe``, implements the four abstract methods and overrides the hooks it has
a use for; the rest are no-ops. ``trainer.recipes`` registers it by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn as nn

from infra.config import JobConfig
from trainer.rng import RankStreams


class Recipe(ABC):
    """One way of training an MM-DiT (a model, an objective, validation and sampling), driven by
    ``trainer.loop.Trainer``.

    ``empty_condition`` is the dataset's encoding of the empty caption (``text_tokens`` (L, C_ctx),
    ``text_pooled`` (C_pool,)): what text dropout substitutes and what CFG uses as unconditional.
    """

    name: ClassVar[str]
    # Sampler settings by grid name: the loop samples each at every evaluation from the EMA weights, and the
    # job writes each from the final checkpoint. An empty dict means the recipe's own defaults.
    sample_grids: ClassVar[dict[str, dict]] = {"samples": {}}

    def __init__(self, cfg: JobConfig, empty_condition: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.empty_context = empty_condition["text_tokens"].float()
        self.empty_pooled = empty_condition["text_pooled"].float()

    # ---- driver side -------------------------------------------------------------------------------

    @classmethod
    def resolve_config(cls, cfg: JobConfig, runs_dir: str) -> JobConfig:
        """Fill in what the recipe derives before a job starts (say, a teacher and its architecture), on the
        driver, before any worker exists. ``runs_dir`` holds the local runs (``RUN/checkpoint_STEP``)."""
        return cfg

    # ---- model ---------------------------------------------------------------------------------------

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model on the meta device; the loop parallelizes, materialises and initialises it."""

    def init_model(self, model: nn.Module) -> None:
        """Called once on the materialised (possibly sharded) model, on every rank, before the optimizer is
        built: load frozen companions (a teacher) or start the weights from a checkpoint."""

    # ---- the objective -------------------------------------------------------------------------------

    def at_step(self, step: int) -> None:
        """Called before each ``loss`` with the optimizer step about to be taken (step-dependent objectives)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict, streams: RankStreams) -> tuple[torch.Tensor, dict]:
        """(scalar loss to back-propagate, unreduced metrics). Random draws come from ``streams``, which the
        loop reseeds per rank and step. A metric reported as ``NAME_sum`` and ``NAME_count`` is logged as
        their ratio after reduction over ranks, and as ``NAME_fraction``, the count's share of the global batch."""

    @abstractmethod
    def validation_losses(self, model: nn.Module, batches: list[dict], seed: int) -> dict[str, torch.Tensor]:
        """Sums over the samples of ``batches`` of a validation loss per bucket (the loop divides by the
        sample count over all ranks and averages the buckets into ``val/loss``)."""

    # ---- sampling --------------------------------------------------------------------------------------

    @abstractmethod
    def sample(self, model: nn.Module, context: torch.Tensor, pooled: torch.Tensor, generator: torch.Generator,
               steps: int | None = None, cfg_scale: float | None = None) -> torch.Tensor:
        """Latents (B, C, H, W) sampled for the text conditions ``context`` (B, L, C_ctx), ``pooled``
        (B, C_pool); ``steps`` and ``cfg_scale`` default to the config's."""

    def reference_samples(self, context: torch.Tensor, pooled: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """Grids to show next to the model's own at each evaluation (say, the teacher's), by name."""
        return {}
