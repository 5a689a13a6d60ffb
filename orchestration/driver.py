"""The driver of a flowscale Ray Train job: resolve and check the config, then
``ScalingConfig -> RunConfig -> TorchTrainer(train_worker) -> fit()``, then the final grids.

``prepare(cfg)`` fills the run's defaults and fails fast (before any Ray resource is taken) on a bad config,
an unreachable dataset or an unwritable storage path. ``run(cfg)`` runs the prepared job on the connected (or
a new local) Ray cluster and returns a ``JobResult``; it is what the entry scripts' CLI calls, and it can be
called from inside another Ray task. The per-worker side is ``orchestration.worker``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from dataloaders.errors import DataError
from infra.config import ConfigError, JobConfig, dump_config, flat_params, redact_url
from orchestration import paths
from trainer import checkpoint
from trainer.recipes import recipe_class


@dataclass
class JobResult:
    """What a finished (or failed) job leaves behind."""

    cfg: JobConfig
    run_dir: str
    checkpoint: str | None = None  # the last reported checkpoint: a directory, or a URL for remote storage
    metrics: dict = field(default_factory=dict)  # the last reported metrics
    grids: list[str] = field(default_factory=list)  # local PNGs of the final sample grids
    mlflow_run_id: str | None = None
    error: BaseException | None = None
    interrupted: bool = False  # KeyboardInterrupt propagates instead; a job result is never interrupted


# --------------------------------------------------------------------------------------------------
# Before Ray: resolve and check
# --------------------------------------------------------------------------------------------------


def resolve(cfg: JobConfig) -> JobConfig:
    """Fill the run's defaults (a fresh run name, local storage, tracking and cache, the demo dataset), then
    what the recipe derives (``Recipe.resolve_config``: an sCD teacher and its architecture)."""
    recipe = recipe_class(cfg.recipe)
    cfg = cfg.model_copy(deep=True)
    if not cfg.run.name:
        # A new id per submission; relaunching with the same name (run.name=...) resumes that run.
        cfg.run.name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    if not cfg.run.storage_path:
        cfg.run.storage_path = str(paths.runs_dir())
    elif "://" not in cfg.run.storage_path:
        cfg.run.storage_path = str(Path(cfg.run.storage_path).expanduser().resolve())
    if not cfg.run.cache_dir:
        cfg.run.cache_dir = str(paths.cache_dir())
    if cfg.mlflow.enabled and not cfg.mlflow.tracking_uri:
        # MLflow's own variable first (what `python -m infra.local env` and a cluster's secrets set), then a
        # SQLite store beside the local runs.
        local = cfg.run.storage_path if "://" not in cfg.run.storage_path else str(paths.HOME)
        cfg.mlflow.tracking_uri = (os.environ.get("MLFLOW_TRACKING_URI")
                                   or f"sqlite:///{Path(local).parent / 'mlflow.db'}")
    if not cfg.mlflow.experiment:
        cfg.mlflow.experiment = cfg.name
    if not cfg.data.url:
        from dataloaders.prepare import ensure_digits

        cfg.data.url = ensure_digits(paths.demo_dataset_dir())
    local_runs = cfg.run.storage_path if "://" not in cfg.run.storage_path else str(paths.runs_dir())
    return recipe.resolve_config(cfg, local_runs)


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
        raise ConfigError(f"run.storage_path={redact_url(cfg.run.storage_path)} is not writable: "
                          f"{redact_url(str(e))}") from None


def prepare(cfg: JobConfig) -> JobConfig:
    """``resolve`` then ``preflight``: the config a job runs with, or an error before anything started."""
    cfg = resolve(cfg)
    preflight(cfg)
    return cfg


# Errors that mean bad input (config, data, storage, checkpoint), reported without a traceback.
INPUT_ERRORS = (ConfigError, DataError, ValueError, OSError, checkpoint.CheckpointError)


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


def forget_dead_cluster() -> None:
    """Remove Ray's ray_current_cluster file when no GCS on this machine serves the address it names. The file
    names the cluster `ray start` last started here; one killed without `ray stop` leaves it behind. Ray Train's
    placement-group cleaner finds its cluster through it, fails on the dead one, and every trial Tune stops
    keeps its workers' resources: the next trial never starts."""
    try:
        from ray._common.utils import reset_ray_address
        from ray._private.services import find_bootstrap_address, find_gcs_addresses
    except ImportError:  # another Ray layout: nothing to clean
        return
    named = find_bootstrap_address(None)
    if named and named not in find_gcs_addresses():
        reset_ray_address()


def connect_ray() -> None:
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if not address:
            forget_dead_cluster()
        # A given address (or `ray job submit`) joins that cluster. Otherwise a new local cluster, bound to
        # loopback: address=None would join the cluster named in /tmp/ray/ray_current_cluster, which a
        # killed job leaves behind, and wait there for a GCS that is gone.
        ray.init(address=address or "local", **({} if address else {"_node_ip_address": "127.0.0.1"}),
                 log_to_driver=True, configure_logging=False)


def stop_on_sigterm() -> None:
    """``ray job stop`` sends SIGTERM to the entrypoint: handle it as Ctrl-C, so the run is recorded as KILLED
    before the process goes. Installed after ``ray.init``, whose own handler would abort the process."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def launch(cfg: JobConfig, mlflow_run_id: str | None, callbacks: list | None = None):
    """Run the job on the connected Ray cluster; returns Ray Train's Result. ``callbacks`` are Ray Train
    callbacks (a sweep's trial forwards its reports to Tune through one)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestration.worker import train_worker

    scaling_config = ScalingConfig(
        num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
        resources_per_worker={"CPU": cfg.cluster.cpus_per_worker, **({"GPU": 1} if cfg.cluster.use_gpu else {})},
    )
    path, fs = storage(cfg)
    run_config = RunConfig(
        name=cfg.run.name, storage_path=path, storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
        logging_config=LoggingConfig(log_level="WARNING"),
        callbacks=callbacks or [],
    )
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "mlflow_run_id": mlflow_run_id},
        scaling_config=scaling_config,
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
    )
    with controller_env(cfg):
        return trainer.fit()


POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


@contextlib.contextmanager
def controller_env(cfg: JobConfig):
    """The environment Ray Train passes to the controller it starts in ``fit()``: its poll interval.

    A worker's ``report`` waits until the controller has polled the previous one (Ray Train keeps one
    result per worker), and the controller polls every 2 s by default: a job reporting every second
    trained at half speed. Ray propagates the variable from the process that calls ``fit()`` (a job's
    driver, a sweep's trial), so it is set there for the call and restored after."""
    saved = os.environ.get(POLL_INTERVAL_ENV)
    os.environ[POLL_INTERVAL_ENV] = str(cfg.cluster.poll_interval_s)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(POLL_INTERVAL_ENV, None)
        else:
            os.environ[POLL_INTERVAL_ENV] = saved


def open_tracking(cfg: JobConfig, source: str, tags: dict[str, str] | None = None) -> str | None:
    """The MLflow run of this job (created, or found and reopened for a relaunch), or None without tracking.
    ``tags`` are added to the run's own (a sweep's trial names its parent run)."""
    if not cfg.mlflow.enabled:
        return None
    from orchestration.tracking import open_run, source_tags

    tags = {**source_tags(source), "flowscale.recipe": cfg.recipe, "flowscale.dataset": redact_url(cfg.data.url),
            **(tags or {})}
    try:
        return open_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.run.name, flat_params(cfg),
                        dump_config(cfg), tags)
    except Exception as e:  # tracking must never stop a job
        print(f"warning: MLflow at {redact_url(cfg.mlflow.tracking_uri)} is unavailable "
              f"({redact_url(str(e))}); training without it", file=sys.stderr)
        return None


def checkpoint_uri(cfg: JobConfig, path: str) -> str:
    """A checkpoint Ray Train reported, as a URL every reader opens: with s3:// storage on a custom endpoint,
    Ray is given a bucket-relative path (``storage``), which alone would read as a local directory."""
    if cfg.run.storage_path.startswith("s3://") and "://" not in path:
        return "s3://" + path
    return path


def final_grids(cfg: JobConfig, uri: str, run_dir: str) -> list[str]:
    """One PNG per entry of the recipe's ``sample_grids``, sampled from the final checkpoint's EMA weights."""
    from orchestration.images import make_grid, save_png
    from orchestration.sample import sample_checkpoint

    if not cfg.sample.prompts:
        return []
    out_dir = Path(run_dir) if "://" not in run_dir else paths.grids_dir(cfg.run.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, sampler in recipe_class(cfg.recipe).sample_grids.items():
        images, _ = sample_checkpoint(uri, cfg.sample.prompts, cfg.sample.num_per_prompt, cfg.train.seed,
                                      cfg_scale=cfg.sample.cfg, device="cpu", **sampler)
        out = out_dir / f"{name}.png"
        save_png(make_grid(images, nrow=cfg.sample.num_per_prompt, scale=max(1, 64 // images.shape[-1])), out)
        written.append(str(out))
    return written


def run(cfg: JobConfig, source: str = "", callbacks: list | None = None, tags: dict[str, str] | None = None,
        ) -> JobResult:
    """Run a prepared job (``prepare``): open its MLflow run, fit on Ray, write and log the final grids, and
    end the MLflow run with the job's outcome: FINISHED, FAILED (the error recorded) or KILLED (interrupted:
    Ctrl-C, ``ray job stop``). ``source`` names the entry script for the run's metadata; ``callbacks`` (Ray
    Train) and ``tags`` (MLflow) are what a sweep's trial adds."""
    from orchestration.tracking import end_run

    run_dir = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"
    print(f"run {cfg.run.name}: {cfg.recipe}, {cfg.cluster.num_workers} {'GPU' if cfg.cluster.use_gpu else 'CPU'} "
          f"workers, {cfg.train.steps} steps, data {redact_url(cfg.data.url)}, storage {redact_url(run_dir)}",
          flush=True)
    run_id = open_tracking(cfg, source or Path(sys.argv[0]).name, tags)
    result = JobResult(cfg, run_dir, mlflow_run_id=run_id)
    try:
        connect_ray()
        stop_on_sigterm()
        fitted = launch(cfg, run_id, callbacks)
        result.metrics, result.error = dict(fitted.metrics or {}), fitted.error
        result.checkpoint = checkpoint_uri(cfg, fitted.checkpoint.path) if fitted.checkpoint else None
        if result.error is None and result.checkpoint:
            result.grids = final_grids(cfg, result.checkpoint, run_dir)
            if result.grids and run_id:
                from orchestration.tracking import Tracker

                tracker = Tracker(cfg.mlflow.tracking_uri, run_id, system_metrics=False)
                for grid in result.grids:
                    tracker.log_artifact(grid)
                tracker.close()
    except KeyboardInterrupt:
        if run_id:
            end_run(cfg.mlflow.tracking_uri, run_id, "KILLED", "interrupted (Ctrl-C or ray job stop)")
        raise
    except Exception as e:  # Ray Train raises TrainingFailedError once the workers' retries are spent
        from ray.train import TrainingFailedError

        if not isinstance(e, TrainingFailedError):  # not the workers' error, already shown: ours
            traceback.print_exc()
        result.error = e
    if run_id:
        failed = result.error is not None
        end_run(cfg.mlflow.tracking_uri, run_id, "FAILED" if failed else "FINISHED",
                f"{type(result.error).__name__}: {result.error}" if failed else None)
    return result


def mlflow_hint(cfg: JobConfig, run_id: str) -> list[str]:
    """How to open the run: the UI command for a local store, then the run's page in the model-training view
    (MLflow 3's UI opens its GenAI view unless the link asks otherwise)."""
    uri = redact_url(cfg.mlflow.tracking_uri)
    local = uri.startswith("sqlite:")
    try:
        from mlflow.tracking import MlflowClient

        experiment = MlflowClient(cfg.mlflow.tracking_uri).get_run(run_id).info.experiment_id
    except Exception:  # the summary must not fail on tracking
        return [f"open it with: mlflow ui --backend-store-uri {uri}" if local else f"open it at: {uri}"]
    page = f"#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"
    if local:
        return [f"open it with: mlflow ui --backend-store-uri {uri}", f"          at: http://127.0.0.1:5000/{page}"]
    return [f"open it at: {uri.rstrip('/')}/{page}"]


def summary(result: JobResult) -> str:
    """Where everything is, for the closing lines of the job."""
    cfg = result.cfg
    lines = [f"run          {redact_url(result.run_dir)}", f"checkpoint   {redact_url(result.checkpoint or '-')}"]
    lines += [f"sample grid  {grid}" for grid in result.grids]
    if result.mlflow_run_id:
        uri = redact_url(cfg.mlflow.tracking_uri)
        lines.append(f"MLflow       {uri} (experiment {cfg.mlflow.experiment}, run {result.mlflow_run_id})")
        lines += mlflow_hint(cfg, result.mlflow_run_id)
    return "\n".join(lines)
