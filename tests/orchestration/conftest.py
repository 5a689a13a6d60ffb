"""Shared pieces of the job tests: one local Ray cluster per module (its workers see an S3 endpoint and
credentials, as a user's shell would), a workspace with the digits dataset and an MLflow SQLite store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataloaders.prepare import ensure_digits
from orchestration import driver
from tests.conftest import REPO

STEPS = 30


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """A local cluster whose workers see AWS credentials and an S3 endpoint, as a user's shell would."""
    import ray

    from tests.conftest import S3_ENV

    saved = dict(os.environ)
    os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": s3_server})
    driver.forget_dead_cluster()
    ray.init("local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    yield
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    from orchestration import paths

    root = tmp_path_factory.mktemp("pretrain")
    paths.HOME = root  # the jobs' local defaults (caches, grids of S3-stored runs) stay inside the test's directory
    return {"root": root, "data": ensure_digits(root / "digits"), "runs": root / "runs",
            "mlflow": f"sqlite:///{root / 'mlflow.db'}"}


def job_args(ws, name: str, *extra: str) -> list[str]:
    return [
        "model.depth=2", "model.head_dim=16", "train.global_batch_size=16", f"train.steps={STEPS}",
        "train.log_every=5", "train.eval_every=0", "train.val_batches=1", "optim.schedule=constant",
        "optim.warmup_steps=0", "checkpoint.every=10", "checkpoint.keep=2", "sample.steps=3",
        "sample.num_per_prompt=1", "cluster.max_failures=2", "cluster.poll_interval_s=0.1",
        "mlflow.system_metrics=false",
        f"data.url={ws['data']}", f"run.storage_path={ws['runs']}", f"run.name={name}",
        f"mlflow.tracking_uri={ws['mlflow']}", *extra,
    ]


def mlflow_run(ws, name: str, experiment: str = "demo"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(ws["mlflow"])
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`flowscale.run_name` = '{name}'")
    return client, run


def run_sample_cli(checkpoint_uri: str, out: Path, steps: int = 3) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "orchestration/sample.py", "--checkpoint", checkpoint_uri, "--prompt", "a handwritten digit 3",
         "--prompt", "a handwritten digit 7", "--num-per-prompt", "2", "--steps", str(steps), "--cfg", "2.0", "--seed", "1",
         "--out", str(out / "grid.png"), "--out-npz", str(out / "samples.npz")],
        cwd=REPO, capture_output=True, text=True, timeout=300)


def submit_job(env: dict[str, str], script: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir . -- python SCRIPT ARGS`` from the repository, to the cluster that
    ``env`` names (RAY_ADDRESS, the token variables); waits for the job to end."""
    return subprocess.run(["ray", "job", "submit", "--working-dir", ".", "--", "python", script, *args],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)
