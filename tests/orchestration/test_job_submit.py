"""`ray job submit --working-dir . -- python orchestration/pretrain.py` against a head started with
`ray start --head` on 127.0.0.1 with token authentication (the Ray head of `python -m infra.local`)."""

from __future__ import annotations

import pytest

from dataloaders.prepare import ensure_digits
from tests.orchestration.conftest import submit_job


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
        ray_head, "orchestration/pretrain.py", "model.depth=2", "model.head_dim=16", "train.steps=4",
        "train.global_batch_size=8", "train.log_every=2", "checkpoint.every=0", "train.val_batches=1",
        "sample.steps=2", "sample.num_per_prompt=1", "cluster.max_failures=0", "mlflow.system_metrics=false",
        f"data.url={data}", f"run.storage_path={tmp_path / 'runs'}", "run.name=submitted",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout + out.stderr
    assert "step 4/4" in out.stdout
    assert (tmp_path / "runs" / "submitted" / "checkpoint_00000004" / "COMPLETE").exists()
