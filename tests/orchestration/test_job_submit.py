"""`ray job submit --working-dir . -- python orchestration/pretrain.py` (and tune.py) against a head started
with `ray start --head` on 127.0.0.1 with token authentication (the Ray head of `python -m infra.local`)."""

from __future__ import annotations

import pytest

from dataloaders.prepare import ensure_digits
from tests.orchestration.conftest import submit_job

TINY = ["model.depth=2", "model.head_dim=16", "train.global_batch_size=8", "train.log_every=2", "train.val_batches=1",
        "sample.steps=2", "sample.num_per_prompt=1", "mlflow.system_metrics=false",
        "cluster.poll_interval_s=0.1"]


@pytest.fixture
def ray_head(local_stack):
    """The client environment of a stack of which only the Ray head runs."""
    from infra import local

    stack = local.open_stack(local_stack.ports, num_cpus=2, create=True)
    local.start(stack, next(s for s in local.SERVICES if s.name == "ray"))
    return local_stack.env()


def test_job_submitted_to_a_local_head_succeeds(ray_head, tmp_path):
    data = ensure_digits(tmp_path / "digits")
    out = submit_job(
        ray_head, "orchestration/pretrain.py", *TINY, "train.steps=4", "checkpoint.every=0", "cluster.max_failures=0",
        f"data.url={data}", f"run.storage_path={tmp_path / 'runs'}", "run.name=submitted",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout + out.stderr
    assert "step 4/4" in out.stdout
    assert (tmp_path / "runs" / "submitted" / "checkpoint_00000004" / "COMPLETE").exists()


def test_sweep_submitted_to_a_local_head_succeeds(ray_head, tmp_path):
    """tune.py as a submitted job: its trials run on the cluster the job's driver joins, and it prints where
    the sweep is and the best trial."""
    data = ensure_digits(tmp_path / "digits")
    out = submit_job(
        ray_head, "orchestration/tune.py", *TINY, "train.steps=4", "train.eval_every=2", "checkpoint.every=0",
        "sample.quality=", "sample.prompts=[]", "cluster.max_failures=0", "tune.metric=val/loss",
        "tune.search=grid", "tune.points_to_evaluate=[]", "tune.scheduler=none", "tune.num_samples=1",
        "tune.space={optim.lr: {grid: [0.001, 0.0001]}}", f"data.url={data}",
        f"run.storage_path={tmp_path / 'runs'}", "run.name=submitted-sweep",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "trials       2: 2 finished, 0 stopped early, 0 failed" in out.stdout, out.stdout[-3000:]
    assert f"tensorboard --logdir {tmp_path / 'runs' / 'submitted-sweep'}" in out.stdout
    jobs = sorted((tmp_path / "runs" / "submitted-sweep" / "jobs").iterdir())
    assert len(jobs) == 2 and all((p / "checkpoint_00000004" / "COMPLETE").exists() for p in jobs)
