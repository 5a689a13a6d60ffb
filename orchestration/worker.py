"""The per-worker side of every flowscale Ray Train job: build the loader and the recipe, hand them to
``trainer.loop.Trainer`` with ``RayHooks`` (metrics, checkpoints and MLflow), restore the last checkpoint
after a failure or a relaunch. The driver side is ``orchestration.driver``."""

from __future__ import annotations

import logging
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from infra.config import JobConfig, build_config, dump_config, redact_url
from trainer import checkpoint
from trainer.loop import TrainHooks


def say(line: str) -> None:
    """One line on the worker's stdout, which Ray streams to the driver. Not ``print``: Ray Train patches it
    into its logger and also tees to a wrapped ``sys.stdout``, so every line would show twice."""
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class RayHooks(TrainHooks):
    """Reports metrics and checkpoints to Ray Train (every rank, same number of calls), logs to MLflow
    and prints the progress line (world rank 0)."""

    def __init__(self, cfg: JobConfig, loader, tracker, rank: int):
        self.cfg, self.loader, self.tracker, self.rank = cfg, loader, tracker, rank
        self.config_yaml = dump_config(cfg)
        self.last: dict[str, float] = {}
        self.checkpoints: list[str] = []  # "step<TAB>uri" of the checkpoints this launch wrote

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        import ray.train

        self.last = metrics
        ray.train.report({"step": step, **metrics})
        if self.rank == 0:
            total = self.cfg.train.steps
            eta = (total - step) * metrics["step_time_s"]
            say(f"step {step}/{total} | loss {metrics['loss']:.4f} | {metrics['samples_per_s']:.0f} samples/s"
                f" | ETA {format_eta(eta)}")
            if self.tracker:
                self.tracker.log_metrics(metrics, step)

    def on_eval(self, step: int, metrics: dict[str, float], images) -> None:
        """Every rank reports each evaluation to Ray Train (a sweep ranks trials by it; Train forwards a
        report only once every rank has made it); rank 0 adds the grids' quality, prints and tracks."""
        import ray.train

        metrics = {**metrics, **self.quality(images or {})}
        ray.train.report({"step": step, "timesteps_total": step, **metrics})
        if self.rank != 0:
            return
        if "val/loss" in metrics:
            say(f"step {step} | validation loss {metrics['val/loss']:.4f}")
        if self.tracker:
            self.tracker.log_metrics(metrics, step)
            from orchestration.images import make_grid

            for name, grid in (images or {}).items():
                tile = max(1, 64 // grid.shape[-1])  # small images upscaled to be seen; decoded ones as they are
                self.tracker.log_image(make_grid(grid, nrow=self.cfg.sample.num_per_prompt, scale=tile), name, step)

    def quality(self, images: dict) -> dict[str, float]:
        """``quality/NAME`` (Frechet distance) and ``quality/NAME_accuracy`` of each grid (``sample.quality``)."""
        if self.cfg.sample.quality != "digits" or not images:
            return {}
        from trainer.quality import score_digits

        prompts = [p for p in self.cfg.sample.prompts for _ in range(self.cfg.sample.num_per_prompt)]
        out = {}
        for name, grid in images.items():
            scores = score_digits(grid.float().cpu().numpy(), prompts)
            out[f"quality/{name}"], out[f"quality/{name}_accuracy"] = scores["frechet"], scores["accuracy"]
        return out

    def should_checkpoint(self, step: int, final: bool) -> bool:
        every = self.cfg.checkpoint.every
        return final or (every > 0 and step % every == 0)

    def on_checkpoint(self, step: int, trainer) -> None:
        import ray.train
        from ray.train import Checkpoint

        local = Path(tempfile.mkdtemp(prefix=f"flowscale-ckpt-r{self.rank}-"))
        try:
            checkpoint.save(trainer, local, self.loader.state_dict(), self.config_yaml)
            name = f"checkpoint_{step:08d}"
            ray.train.report({"step": step, **self.last}, checkpoint=Checkpoint.from_directory(str(local)),
                             checkpoint_dir_name=name)
            if self.rank == 0 and self.tracker:
                uri = redact_url(f"{self.cfg.run.storage_path.rstrip('/')}/{self.cfg.run.name}/{name}")
                self.checkpoints.append(f"{step}\t{uri}")
                self.tracker.set_tag("checkpoint.latest", uri)
                # One artifact lists them all (one tag per checkpoint would crowd the run's tags).
                self.tracker.log_text("\n".join(["step\turi", *self.checkpoints]) + "\n", "checkpoints.tsv")
        finally:
            shutil.rmtree(local, ignore_errors=True)


def eval_condition(cfg: JobConfig, url: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Text conditions of the evaluation grid: each prompt ``num_per_prompt`` times, prompt-major."""
    if not cfg.sample.prompts:
        return None
    from dataloaders.text_encoders import load_text_encoder

    encoder = load_text_encoder(url, dict(cfg.data.storage_options))
    prompts = [p for p in cfg.sample.prompts for _ in range(cfg.sample.num_per_prompt)]
    tokens, pooled = encoder.encode(prompts)
    return torch.as_tensor(tokens).float(), torch.as_tensor(pooled).float()


def quiet_report_logging() -> None:
    """Ray Train V2 logs every ``report`` call's full metrics dict at INFO from a logger named after its
    source file; at one report per log step that buries the progress line."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_worker(loop_config: dict) -> None:
    """The per-worker function of every flowscale Ray Train job: the trainer package's loop, unchanged."""
    import ray.train

    from dataloaders.dataset import build_loader, open_dataset
    from orchestration.images import image_decoder
    from orchestration.tracking import Tracker
    from trainer.loop import Trainer
    from trainer.recipes import build_recipe

    quiet_report_logging()
    cfg = build_config(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.cluster.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    data = cfg.data
    loader = build_loader(data, rank=rank, world_size=world_size,
                          global_batch_size=cfg.train.global_batch_size, seed=cfg.train.seed)
    val_loader = build_loader(data.model_copy(update={"num_workers": 0}), rank=rank, world_size=world_size,
                              global_batch_size=cfg.train.global_batch_size, seed=cfg.train.seed + 1)
    val_iter = iter(val_loader)
    val_batches = [next(val_iter) for _ in range(cfg.train.val_batches)]
    recipe = build_recipe(cfg.recipe, cfg, open_dataset(data.url, dict(data.storage_options)).empty_condition())
    run_id = loop_config.get("mlflow_run_id")
    tracker = Tracker(cfg.mlflow.tracking_uri, run_id, cfg.mlflow.system_metrics) if rank == 0 and run_id else None
    trainer = Trainer(cfg, recipe, RayHooks(cfg, loader, tracker, rank))
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            loader_state = checkpoint.load(trainer, directory)
        if loader_state is not None:
            loader.load_state_dict(loader_state)
        if rank == 0:
            say(f"resumed from {restored.path} at step {trainer.step}")
            if tracker:
                tracker.set_tag("resumed_from_step", str(trainer.step))
    try:
        to_image = image_decoder(data.url, dict(data.storage_options), trainer.device)
        trainer.fit(loader, val_batches, eval_condition(cfg, data.url), to_image)
    finally:
        if tracker:
            failures = tracker.close()
            if failures:
                say(f"warning: {failures} MLflow calls failed or were dropped; training was not affected")
        loader.close()
