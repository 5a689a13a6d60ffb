"""`ray job submit --working-dir . -- python orchestration/pretrain.py` against a head started with
`ray start --head` on 127.0.0.1 (token authentication on, Ray's default since 2.59)."""

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


@pytest.fixture
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


def test_job_submitted_to_a_local_head_succeeds(ray_head, tmp_path):
    address, env = ray_head
    data = ensure_digits(tmp_path / "digits")
    submit = lambda: subprocess.run(  # noqa: E731
        ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
         "python", "orchestration/pretrain.py", "model.depth=2", "model.head_dim=16", "train.steps=4",
         "train.global_batch_size=8", "train.log_every=2", "checkpoint.every=0", "train.val_batches=1",
         "sample.steps=2", "sample.num_per_prompt=1", "cluster.max_failures=0", "mlflow.system_metrics=false",
         f"data.url={data}", f"run.storage_path={tmp_path / 'runs'}", "run.name=submitted",
         f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=600,
    )
    out = submit()
    for _ in range(10):  # a fresh head's job agent can take a few seconds to register
        if "No available agent" not in out.stderr:
            break
        time.sleep(3)
        out = submit()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout + out.stderr
    assert "step 4/4" in out.stdout
    assert (tmp_path / "runs" / "submitted" / "checkpoint_00000004" / "COMPLETE").exists()
