"""The training loop, shared by every recipe and every launcher.

The same ``Trainer`` runs in one process, under ``torchrun``, and inside Ray Train workers: it reads rank
and world size from ``torch.distributed``, shards with FSDP2 when there is more than one rank, and talks
to the outside world only through ``TrainHooks`` (metrics, evaluation images, checkpoints). It never
imports Ray or MLflow.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist

from infra.config import JobConfig
from trainer import flops
from trainer.optim import EMA, build_optimizer, lr_factor
from trainer.parallelize import materialize, parallelize, reshard, resolve_device, world
from trainer.rng import RankStreams

if TYPE_CHECKING:  # the recipes import this module (resolve_precision)
    from trainer.recipes.base import Recipe


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class TrainHooks:
    """What a launcher plugs into the loop. Every method is called on every rank."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """Reduced metrics after a logged step."""

    def on_eval(self, step: int, metrics: dict[str, float], images: dict[str, torch.Tensor] | None) -> None:
        """Validation metrics and, on rank 0, the evaluation grids by name (images (N, C, H, W) in [0, 1])."""

    def should_checkpoint(self, step: int, final: bool) -> bool:
        return False

    def on_checkpoint(self, step: int, trainer: "Trainer") -> None:
        """Save ``trainer.state_dict()`` (all ranks participate)."""


def resolve_precision(cfg: JobConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast dtype, or None for fp32. ``auto`` picks bf16 on CUDA devices that support it."""
    if cfg.train.precision == "fp32":
        return None
    if cfg.train.precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: (v.to(device, non_blocking=True).float() if torch.is_tensor(v) and v.is_floating_point()
            else v.to(device) if torch.is_tensor(v) else v)
        for k, v in batch.items()
    }


@dataclass
class StepTimer:
    """Accumulates step and data-wait time between two log lines."""

    steps: int = 0
    samples: int = 0
    step_time: float = 0.0
    data_wait: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def reset(self) -> None:
        self.steps = self.samples = 0
        self.step_time = self.data_wait = 0.0
        self.started = time.perf_counter()


class Trainer:
    """Builds the model (meta -> parallelize -> materialize), optimizer, schedule and EMA, then trains."""

    def __init__(self, cfg: JobConfig, recipe: "Recipe", hooks: TrainHooks | None = None):
        self.cfg, self.recipe, self.hooks = cfg, recipe, hooks or TrainHooks()
        self.rank, self.world_size = world()
        self.device = resolve_device(cfg)
        self.amp_dtype = resolve_precision(cfg, self.device)
        if cfg.train.global_batch_size % self.world_size:
            raise ValueError(
                f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by the "
                f"{self.world_size} data-parallel ranks"
            )
        self.local_batch = cfg.train.global_batch_size // self.world_size
        model = recipe.build_model()
        self.model = materialize(parallelize(model, cfg, self.amp_dtype), self.device, cfg.train.seed)
        recipe.init_model(self.model)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.ema = EMA(self.model, cfg.optim.ema_decay, cfg.optim.ema_warmup)
        self.streams = RankStreams(cfg.train.seed, self.rank, self.device)
        self.set_step(0)
        self.train_seconds = 0.0  # wall-clock of training steps over all launches (compute accounting)
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        img, txt = flops.tokens(cfg)
        self.tokens_per_sample = img + txt
        self.flops_per_sample = flops.training_flops_per_sample(cfg.model, img, txt)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.peak_flops = flops.peak_tflops_for(name, cfg.train.peak_tflops) * 1e12

    # ---- state ------------------------------------------------------------------------------------

    def set_step(self, step: int) -> None:
        """Position the run at ``step``: the LR is a pure function of the step, so a resume needs no
        scheduler state."""
        self.step = step
        lr = self.cfg.optim.lr * lr_factor(step, self.cfg.train.steps, self.cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ---- one step ---------------------------------------------------------------------------------

    def autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Forward, backward, clip, guard, optimizer step. Returns unreduced local tensors."""
        self.model.train()
        self.streams.at_step(self.step)
        self.recipe.at_step(self.step)
        with self.autocast():
            loss, aux = self.recipe.loss(self.model, batch, self.streams)
        loss.backward()
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(loss.detach()))
        if finite:
            self.optimizer.step()
            self.ema.update(self.model)
            self.nonfinite_run = 0
        else:
            # Global grad norm is the same on every rank, so every rank skips together.
            self.nonfinite_total += 1
            self.nonfinite_run += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.set_step(self.step + 1)
        if self.nonfinite_run >= self.cfg.train.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.nonfinite_run} consecutive non-finite steps ending at step {self.step} "
                f"(loss {float(loss.detach()):.4g}, grad norm {float(grad_norm):.4g}); stopping. The last "
                f"checkpoint is intact; lower optim.lr or check the data"
            )
        return {"loss": loss.detach().float(), "grad_norm": grad_norm.detach().float(), **aux}

    # ---- evaluation -------------------------------------------------------------------------------

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def validate(self, batches: list[dict]) -> dict[str, float]:
        if not batches:
            return {}
        self.model.eval()
        with self.autocast():
            sums = self.recipe.validation_losses(self.model, batches, self.cfg.train.seed)
        # A forward without backward leaves FSDP2's last block gathered, its unsharded parameters registered in
        # place of the sharded ones the optimizer holds: a checkpoint at this step would not find them.
        reshard(self.model)
        keys = list(sums)
        count = sum(b["latent"].shape[0] for b in batches)
        totals = self.all_reduce_sum(torch.stack([torch.as_tensor(sums[k]).float() for k in keys] + [
            torch.tensor(float(count), device=self.device)]).to(self.device))
        per_bucket = {f"val/loss_t{k}": float(totals[i] / totals[-1]) for i, k in enumerate(keys)}
        per_bucket["val/loss"] = sum(per_bucket.values()) / len(keys)
        return per_bucket

    @torch.no_grad()
    def sample_ema(self, context: torch.Tensor, pooled: torch.Tensor, seed: int, **kwargs) -> torch.Tensor:
        """Samples from the EMA weights (swapped in and back), every rank computing the same batch."""
        reshard(self.model)
        backup = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.ema.copy_to(self.model)
        self.model.eval()
        try:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            with self.autocast():
                return self.recipe.sample(self.model, context.to(self.device), pooled.to(self.device), gen, **kwargs)
        finally:
            reshard(self.model)
            for n, p in self.model.named_parameters():
                p.copy_(backup[n])

    # ---- the loop ---------------------------------------------------------------------------------

    def fit(
        self,
        batches: Iterator[dict],
        val_batches: list[dict] | None = None,
        eval_condition: tuple[torch.Tensor, torch.Tensor] | None = None,
        to_image=None,
    ) -> dict[str, float]:
        """Train until ``train.steps``. ``eval_condition`` = (context, pooled) of the evaluation grid's
        prompts; ``to_image`` maps sampled latents to images in [0, 1] for the grid."""
        cfg = self.cfg.train
        val_batches = [to_device(b, self.device) for b in (val_batches or [])]
        timer, last = StepTimer(), {}
        it = iter(batches)
        record = self.sample_id_record()
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            batch = to_device(next(it), self.device)
            t1 = time.perf_counter()
            if record:
                record(batch)
            local = self.train_step(batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t2 = time.perf_counter()
            timer.steps += 1
            timer.samples += cfg.global_batch_size
            timer.data_wait += t1 - t0
            timer.step_time += t2 - t0
            self.train_seconds += t2 - t0
            final = self.step == cfg.steps
            if self.step % cfg.log_every == 0 or final:
                last = self.log_metrics(local, timer)
                self.hooks.on_log(self.step, last)
                timer.reset()
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or final:
                self.evaluate(val_batches, eval_condition, to_image)
            elif cfg.val_every and self.step % cfg.val_every == 0:
                self.hooks.on_eval(self.step, self.validate(val_batches), None)
            # Only a good step is checkpointed: a non-finite streak never overwrites the last good state.
            if self.nonfinite_run == 0 and self.hooks.should_checkpoint(self.step, final):
                self.hooks.on_checkpoint(self.step, self)
        return last

    def sample_id_record(self):
        """With ``train.record_sample_ids``, a function appending one JSON line per step to this rank's file:
        the step about to be trained, the world size and the batch's sample ids (what an elastic resume must
        reproduce); else None."""
        directory = self.cfg.train.record_sample_ids
        if not directory:
            return None
        path = Path(directory) / f"rank_{self.rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)

        def record(batch: dict) -> None:
            line = {"step": self.step + 1, "world": self.world_size, "ids": batch["sample_id"].tolist()}
            with path.open("a") as f:
                f.write(json.dumps(line) + "\n")

        return record

    def log_metrics(self, local: dict[str, torch.Tensor], timer: StepTimer) -> dict[str, float]:
        names = sorted(local)
        reduced = self.all_reduce_sum(torch.stack([local[k].to(self.device).float() for k in names]))
        metrics = {k: float(reduced[i]) / self.world_size for i, k in enumerate(names)}
        metrics["grad_norm"] = float(local["grad_norm"])  # already global
        # A recipe reports a per-bucket mean as NAME_sum and NAME_count (exact after reduction over ranks),
        # logged as NAME (the mean) and NAME_fraction (the bucket's share of the step's global batch).
        for key in [k for k in names if k.endswith("_sum") and k[:-4] + "_count" in metrics]:
            base = key[:-4]
            count = metrics.pop(base + "_count")
            total = metrics.pop(key)
            metrics[base] = total / count if count else float("nan")
            metrics[base + "_fraction"] = count * self.world_size / self.cfg.train.global_batch_size
        elapsed = max(time.perf_counter() - timer.started, 1e-9)
        samples_per_s = timer.samples / elapsed
        metrics.update({
            "lr": self.optimizer.param_groups[0]["lr"],
            "samples_per_s": samples_per_s,
            "tokens_per_s": samples_per_s * self.tokens_per_sample,
            "step_time_s": timer.step_time / max(timer.steps, 1),
            "data_wait_fraction": timer.data_wait / max(timer.step_time, 1e-9),
            "peak_memory_gib": peak_memory_gib(self.device),
            "nonfinite_steps": float(self.nonfinite_total),
        })
        if self.peak_flops:
            metrics["mfu"] = samples_per_s * self.flops_per_sample / (self.peak_flops * self.world_size)
        return metrics

    def evaluate(self, val_batches, eval_condition, to_image) -> None:
        """Validation losses, then one grid per entry of the recipe's ``sample_grids`` plus its
        ``reference_samples`` (say, the teacher's), all for the same prompts and seed. Every rank samples
        (the weights are sharded); rank 0 alone turns the samples into images (``to_image``, say a VAE)."""
        metrics = self.validate(val_batches)
        images = None
        if eval_condition is not None:
            seed = self.cfg.train.seed
            samples = {name: self.sample_ema(*eval_condition, seed=seed, **kw)
                       for name, kw in self.recipe.sample_grids.items()}
            context, pooled = (t.to(self.device) for t in eval_condition)
            with self.autocast():
                samples.update(self.recipe.reference_samples(context, pooled, seed))
            if self.rank == 0:
                images = {name: (to_image or (lambda x: x))(x) for name, x in samples.items()}
        self.hooks.on_eval(self.step, metrics, images)

