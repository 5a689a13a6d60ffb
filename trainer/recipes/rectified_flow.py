"""The train spec of rectified-flow pretraining: model, loss, validation and sampling (SD3 recipe)."""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer import flow
from trainer.models.mmdit import MMDiT
from trainer.recipes.base import Recipe
from trainer.rng import RankStreams


class RectifiedFlowRecipe(Recipe):
    """Pretraining an MM-DiT with rectified flow. Text dropout substitutes the empty caption's encoding,
    exactly what CFG uses as unconditional."""

    name = "rectified_flow"

    def build_model(self) -> nn.Module:
        """The model on the meta device; the loop materialises and initialises it after parallelizing."""
        with torch.device("meta"):
            return MMDiT(self.cfg.model)

    def loss(self, model: nn.Module, batch: dict, streams: RankStreams) -> tuple[torch.Tensor, dict]:
        """Batch-mean velocity MSE at sampled times, with per-sample text dropout."""
        x0 = batch["latent"]
        B, device = x0.shape[0], x0.device
        t = flow.sample_timesteps(self.cfg.flow, B, streams["timesteps"], device=device)
        eps = torch.randn(x0.shape, generator=streams["noise"], device=device, dtype=x0.dtype)
        context, pooled, _ = flow.drop_text(
            batch["text_tokens"], batch["text_pooled"], self.empty_context.to(device),
            self.empty_pooled.to(device), self.cfg.flow.text_dropout, streams["dropout"],
        )
        v = model(flow.interpolate(x0, eps, t), t, context, pooled)
        per_sample = flow.per_sample_loss(v, x0, eps)
        return per_sample.mean(), {"t_mean": t.mean().detach()}

    @torch.no_grad()
    def validation_losses(self, model: nn.Module, batches: list[dict], seed: int) -> dict[str, torch.Tensor]:
        """Loss at each fixed t of ``train.val_timesteps`` over fixed batches and fixed noise: the
        quantity SD3 tracks as its predictor of sample quality. Returns sums and counts per bucket."""
        out: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            x0 = batch["latent"]
            gen = torch.Generator(device=x0.device).manual_seed(seed * 7919 + i)
            eps = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
            for t_val in self.cfg.train.val_timesteps:
                t = torch.full((x0.shape[0],), t_val, device=x0.device)
                v = model(flow.interpolate(x0, eps, t), t, batch["text_tokens"], batch["text_pooled"])
                key = f"{t_val:g}"
                out[key] = out.get(key, 0.0) + flow.per_sample_loss(v, x0, eps).sum()
        return out

    @torch.no_grad()
    def sample(
        self, model: nn.Module, context: torch.Tensor, pooled: torch.Tensor, generator: torch.Generator,
        steps: int | None = None, cfg_scale: float | None = None, shift: float | None = None,
    ) -> torch.Tensor:
        """Euler + CFG samples for the given text conditions, as latents (B, C, H, W)."""
        m, s = self.cfg.model, self.cfg.sample
        size = self.cfg.data.latent_size
        noise = torch.randn(
            (context.shape[0], m.in_channels, size, size), generator=generator, device=generator.device
        ).to(context.device)
        return flow.euler_sample(
            model, noise, context, pooled,
            steps=steps or s.steps, cfg_scale=s.cfg if cfg_scale is None else cfg_scale,
            shift=shift or s.shift,
            empty_context=self.empty_context.to(context.device), empty_pooled=self.empty_pooled.to(context.device),
        )
