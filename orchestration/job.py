"""A flowscale Ray Train job: resolve and check the config on the driver, then run the trainer's loop in
every worker with checkpoints, failure recovery and MLflow tracking.

Driver: ``resolve`` fills in the run name, storage and tracking defaults; ``preflight`` fails fast (before
any Ray resource is taken) on an unreachable dataset or storage path; ``launch`` builds ``ScalingConfig ->
RunConfig -> TorchTrainer(train_worker) -> fit()``. Worker: ``train_worker`` builds the loader and the
recipe and hands them to ``trainer.loop.Trainer`` with ``RayHooks``.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

from infra.config import ConfigError, JobConfig, build_config, dump_config
from trainer import checkpoint
from trainer.loop import TrainHooks

HOME = Path(os.environ.get("FLOWSCALE_HOME", Path.home() / "flowscale")).expanduser()


# --------------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------------


def resolve(cfg: JobConfig) -> JobConfig:
    """Fill the run's defaults: a fresh run name, local storage and tracking, the demo dataset."""
    cfg = cfg.model_copy(deep=True)
    if not cfg.run.name:
        # A new id per submission; relaunching with the same name (run.name=...) resumes that run.
        cfg.run.name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    if not cfg.run.storage_path:
        cfg.run.storage_path = str(HOME / "runs")
    elif "://" not in cfg.run.storage_path:
        cfg.run.storage_path = str(Path(cfg.run.storage_path).expanduser().resolve())
    if cfg.mlflow.enabled and not cfg.mlflow.tracking_uri:
        local = cfg.run.storage_path if "://" not in cfg.run.storage_path else str(HOME)
        cfg.mlflow.tracking_uri = f"sqlite:///{Path(local).parent / 'mlflow.db'}"
    if not cfg.mlflow.experiment:
        cfg.mlflow.experiment = cfg.name
    if not cfg.data.url:
        from dataloaders.prepare import ensure_digits

        cfg.data.url = ensure_digits(HOME / "datasets" / "digits")
    return cfg


def storage(cfg: JobConfig):
    """(storage_path, storage_filesystem) for Ray's RunConfig. s3:// with a custom endpoint (an S3-compatible
    store) goes through s3fs wrapped as a pyarrow filesystem, with a bucket-relative path: s3fs follows the
    standard AWS settings (credentials chain, checksum modes) that such stores need."""
    path = cfg.run.storage_path
    endpoint = cfg.run.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL", "")
    if path.startswith("s3://") and endpoint:
        import s3fs
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return path[len("s3://"):], PyFileSystem(FSSpecHandler(s3fs.S3FileSystem(endpoint_url=endpoint)))
    return path, None


def preflight(cfg: JobConfig) -> None:
    """Fail before any worker starts: the dataset's manifest must open and match the model, the storage
    path must be writable."""
    from dataloaders.dataset import check_shapes, open_dataset

    ds = open_dataset(cfg.data.url, dict(cfg.data.storage_options), cfg.data.retries, cfg.data.timeout_s)
    check_shapes(ds.manifest, cfg.data)
    probe = f".flowscale-write-probe-{uuid.uuid4().hex}"
    path, fs = storage(cfg)
    try:
        if fs is not None:
            fs.create_dir(path, recursive=True)
            with fs.open_output_stream(f"{path}/{probe}") as f:
                f.write(b"ok")
            fs.delete_file(f"{path}/{probe}")
        elif "://" in path:
            import fsspec

            fsys, p = fsspec.core.url_to_fs(path)
            fsys.pipe(f"{p}/{probe}", b"ok")
            fsys.rm(f"{p}/{probe}")
        else:
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / probe).write_text("ok")
            (Path(path) / probe).unlink()
    except Exception as e:
        raise ConfigError(f"run.storage_path={cfg.run.storage_path} is not writable: {e}") from None


def launch(cfg: JobConfig, mlflow_run_id: str | None, recipe: str = "rectified_flow"):
    """Run the job on the connected Ray cluster; returns Ray Train's Result."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    path, fs = storage(cfg)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "mlflow_run_id": mlflow_run_id, "recipe": recipe,
                           "teacher_cache": str(HOME / "teachers")},
        scaling_config=ScalingConfig(
            num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker, **({"GPU": 1} if cfg.cluster.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
    )
    return trainer.fit()


# --------------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------------


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
        if self.rank != 0:
            return
        if metrics:
            say(f"step {step} | validation loss {metrics['val/loss']:.4f}")
        if self.tracker:
            self.tracker.log_metrics(metrics, step)
            from orchestration.images import make_grid

            for name, grid in (images or {}).items():
                self.tracker.log_image(make_grid(grid, nrow=self.cfg.sample.num_per_prompt, scale=4), name, step)

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
                uri = f"{self.cfg.run.storage_path.rstrip('/')}/{self.cfg.run.name}/{name}"
                self.tracker.set_tag("checkpoint.latest", uri)
                self.tracker.set_tag(f"checkpoint.step_{step:08d}", uri)
        finally:
            shutil.rmtree(local, ignore_errors=True)


def build_recipe(name: str, cfg: JobConfig, empty: dict):
    if name == "rectified_flow":
        from trainer.recipes.rectified_flow import RectifiedFlowRecipe

        return RectifiedFlowRecipe(cfg, empty)
    if name == "scd":
        from trainer.recipes.scd import SCDRecipe

        return SCDRecipe(cfg, empty)
    raise ConfigError(f"unknown recipe {name!r}")


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

    quiet_report_logging()

    from dataloaders.dataset import build_loader, open_dataset
    from orchestration.images import latents_to_images
    from orchestration.tracking import Tracker
    from trainer.loop import Trainer

    cfg = build_config(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.cluster.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    data = cfg.data
    loader = build_loader(data, rank=rank, world_size=world_size,
                          global_batch_size=cfg.train.global_batch_size, seed=cfg.train.seed)
    val_cfg = data.model_copy(update={"num_workers": 0})
    val_loader = build_loader(val_cfg, rank=rank, world_size=world_size,
                              global_batch_size=cfg.train.global_batch_size, seed=cfg.train.seed + 1)
    val_iter = iter(val_loader)
    val_batches = [next(val_iter) for _ in range(cfg.train.val_batches)]
    empty = open_dataset(data.url, dict(data.storage_options)).empty_condition()
    recipe_cfg = cfg
    if loop_config["recipe"] == "scd" and cfg.distill.teacher:
        from orchestration.distill import local_teacher

        # The run's config keeps the teacher's URL; the recipe reads this node's copy.
        recipe_cfg = cfg.model_copy(deep=True)
        recipe_cfg.distill.teacher = str(local_teacher(cfg.distill.teacher, Path(loop_config["teacher_cache"])))
    recipe = build_recipe(loop_config["recipe"], recipe_cfg, empty)
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
        trainer.fit(loader, val_batches, eval_condition(cfg, data.url), latents_to_images)
    finally:
        if tracker:
            failures = tracker.close()
            if failures:
                say(f"warning: {failures} MLflow calls failed or were dropped; training was not affected")
        loader.close()


# --------------------------------------------------------------------------------------------------
# The driver's command line, shared by pretrain.py and distill.py
# --------------------------------------------------------------------------------------------------


def final_grids(cfg: JobConfig, recipe: str, checkpoint_path: str, run_dir: str) -> list[str]:
    """Sample grids from the final checkpoint's EMA weights, one PNG per sampler setting."""
    from orchestration.images import make_grid, save_png
    from orchestration.sample import sample_checkpoint

    if not cfg.sample.prompts:
        return []
    uri = checkpoint_path
    if cfg.run.storage_path.startswith("s3://") and "://" not in uri:
        uri = "s3://" + uri
    settings = {"samples": cfg.sample.steps} if recipe == "rectified_flow" else {"samples-1step": 1, "samples-2step": 2}
    out_dir = Path(run_dir) if "://" not in run_dir else HOME / "grids" / cfg.run.name  # remote runs: locally
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, steps in settings.items():
        images, _ = sample_checkpoint(uri, cfg.sample.prompts, cfg.sample.num_per_prompt, steps, cfg.sample.cfg,
                                      cfg.train.seed, device="cpu")
        out = out_dir / f"{name}.png"
        save_png(make_grid(images, nrow=cfg.sample.num_per_prompt, scale=max(1, 64 // images.shape[-1])), out)
        written.append(str(out))
    return written


def connect_ray() -> None:
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # A local cluster binds to loopback only; a given address (or `ray job submit`) joins that cluster.
        ray.init(address=address, **({} if address else {"_node_ip_address": "127.0.0.1"}),
                 log_to_driver=True, configure_logging=False)


def print_config(preset: str, overrides: list[str]) -> int:
    """``--dump-config``: the resolved config as YAML, or the error."""
    from infra.config import load_config

    try:
        print(dump_config(load_config(preset, overrides)))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run_job(cfg_source, recipe: str, prepare=None) -> int:
    """Resolve and check the config, open the MLflow run, run the Ray Train job, write the final grids and
    say where everything is. ``cfg_source()`` returns the loaded config; ``prepare(cfg)`` may adjust it
    (the distillation job fills in its teacher). Returns the process exit code."""
    from dataloaders.errors import DataError
    from infra.config import flat_params

    try:
        cfg = resolve(cfg_source())
        if prepare is not None:
            cfg = prepare(cfg)
        preflight(cfg)
    except (ConfigError, DataError, ValueError, OSError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    run_dir = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"
    print(f"run {cfg.run.name}: {recipe}, {cfg.cluster.num_workers} {'GPU' if cfg.cluster.use_gpu else 'CPU'} "
          f"workers, {cfg.train.steps} steps, data {cfg.data.url}, storage {run_dir}", flush=True)
    run_id = None
    if cfg.mlflow.enabled:
        from orchestration.tracking import open_run

        try:
            run_id = open_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.run.name,
                              flat_params(cfg), dump_config(cfg))
        except Exception as e:  # tracking must never stop a job
            print(f"warning: MLflow at {cfg.mlflow.tracking_uri} is unavailable ({e}); training without it",
                  file=sys.stderr)
    connect_ray()
    result = launch(cfg, run_id, recipe=recipe)
    if result.error is not None:
        print(f"error: run {cfg.run.name} failed: {result.error}", file=sys.stderr)
        return 1
    grids = final_grids(cfg, recipe, result.checkpoint.path, run_dir) if result.checkpoint else []
    if grids and run_id:
        from orchestration.tracking import Tracker

        tracker = Tracker(cfg.mlflow.tracking_uri, run_id, system_metrics=False)
        for grid in grids:
            tracker.log_artifact(grid)
        tracker.close()
    print(f"\nrun          {run_dir}")
    print(f"checkpoint   {result.checkpoint.path if result.checkpoint else '-'}")
    for grid in grids:
        print(f"sample grid  {grid}")
    if run_id:
        print(f"MLflow       {cfg.mlflow.tracking_uri} (experiment {cfg.mlflow.experiment}, run {run_id})")
        print(f"open it with: mlflow ui --backend-store-uri {cfg.mlflow.tracking_uri}")
    return 0
