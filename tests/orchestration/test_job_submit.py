"""`ray job submit --working-dir . -- python orchestration/pretrain.py` (and tune.py) against a head started
with `ray start --head` on 127.0.0.1 (token authentication on, Ray's default since 2.59)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from dataloaders.prepare import ensure_digits

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    gcs, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    subprocess.run(
        ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--num-cpus=2", "--disable-usage-stats"],
        check=True, capture_output=True, env=env, timeout=180,
    )
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True, env=env, timeout=120)


TINY = ["model.depth=2", "model.head_dim=16", "train.global_batch_size=8", "train.log_every=2", "train.val_batches=1",
        "sample.steps=2", "sample.num_per_prompt=1", "mlflow.system_metrics=false"]


def submit(address: str, env: dict, *entrypoint: str) -> subprocess.CompletedProcess:
    run = lambda: subprocess.run(  # noqa: E731
        ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--", "python", *entrypoint],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=600,
    )
    out = run()
    for _ in range(10):  # a fresh head's job agent can take a few seconds to register
        if "No available agent" not in out.stderr:
            break
        time.sleep(3)
        out = run()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout + out.stderr
    return out


def test_job_submitted_to_a_local_head_succeeds(ray_head, tmp_path):
    address, env = ray_head
    data = ensure_digits(tmp_path / "digits")
    out = submit(address, env, "orchestration/pretrain.py", *TINY, "train.steps=4", "checkpoint.every=0",
                 "cluster.max_failures=0", f"data.url={data}", f"run.storage_path={tmp_path / 'runs'}",
                 "run.name=submitted", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    assert "step 4/4" in out.stdout
    assert (tmp_path / "runs" / "submitted" / "checkpoint_00000004" / "COMPLETE").exists()


def test_sweep_submitted_to_a_local_head_succeeds(ray_head, tmp_path):
    """tune.py as a submitted job: its trials run on the cluster the job's driver joins, and it prints where
    the sweep is and the best trial."""
    address, env = ray_head
    data = ensure_digits(tmp_path / "digits")
    out = submit(address, env, "orchestration/tune.py", *TINY, "train.steps=4", "train.eval_every=2",
                 "checkpoint.every=0", "sample.quality=", "sample.prompts=[]", "cluster.max_failures=0",
                 "tune.metric=val/loss", "tune.search=grid", "tune.points_to_evaluate=[]", "tune.scheduler=none",
                 "tune.num_samples=1",
                 "tune.space={optim.lr: {grid: [0.001, 0.0001]}}", f"data.url={data}",
                 f"run.storage_path={tmp_path / 'runs'}", "run.name=submitted-sweep",
                 f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    assert "trials       2: 2 finished, 0 stopped early, 0 failed" in out.stdout, out.stdout[-3000:]
    assert f"tensorboard --logdir {tmp_path / 'runs' / 'submitted-sweep'}" in out.stdout
    jobs = tmp_path / "runs" / "submitted-sweep" / "jobs"
    assert sorted(p.name for p in jobs.iterdir()) and all(
        (p / "checkpoint_00000004" / "COMPLETE").exists() for p in jobs.iterdir())
