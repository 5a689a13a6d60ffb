"""What the MLflow UI shows for a job is what happened to it: FINISHED, FAILED (with the error) or KILLED
(interrupted), a relaunch reopens and ends the run again; and no password given in a URL reaches the
tracking store, its artifacts or the checkpoints. Real local Ray cluster, real MLflow stores (SQLite, and an
`mlflow server` on 127.0.0.1 for the password test)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from orchestration import pretrain
from tests.conftest import free_port
from tests.orchestration.conftest import REPO, job_args, mlflow_run


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_a_job_that_fails_is_failed_with_its_error(ray_cluster, workspace):
    # A step of 1e30 sends the weights to inf; one non-finite step is allowed, the second stops the run.
    args = job_args(workspace, "fails", "optim.lr=1e30", "train.max_nonfinite_steps=1", "cluster.max_failures=0")
    assert pretrain.main(args) == 1
    _, run = mlflow_run(workspace, "fails")
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert "non-finite" in run.data.tags["error"]


def test_an_interrupted_job_is_killed_and_a_relaunch_reopens_and_finishes_it(ray_cluster, workspace):
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    args = job_args(workspace, "interrupted", "train.steps=400", "checkpoint.every=5")
    proc = subprocess.Popen([sys.executable, "orchestration/pretrain.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        snapshot = workspace["root"] / "runs" / "interrupted" / "checkpoint_manager_snapshot.json"

        def registered() -> bool:  # Ray Train lists a checkpoint only once every worker's shards are persisted
            return (snapshot.exists() and "checkpoint_00000005" in snapshot.read_text()) or proc.poll() is not None

        wait_for(registered, 240, "the first checkpoint")
        proc.send_signal(signal.SIGTERM)  # what `ray job stop` sends the entrypoint
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "KILLED" in stderr and "run.name=interrupted" in stderr  # how to resume
    _, run = mlflow_run(workspace, "interrupted")
    assert run.info.status == "KILLED" and run.info.end_time is not None

    assert pretrain.main(job_args(workspace, "interrupted", "train.steps=10")) == 0
    _, run = mlflow_run(workspace, "interrupted")
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["resumed_from_step"]) >= 5


@pytest.fixture
def mlflow_server(tmp_path):
    """An `mlflow server` on 127.0.0.1 with a SQLite store, serving artifacts from a local directory."""
    port = free_port()
    store, artifacts = tmp_path / "server.db", tmp_path / "artifacts"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store}", "--artifacts-destination", str(artifacts), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def healthy() -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, 120, "the MLflow server")
        yield {"port": port, "store": store, "artifacts": artifacts}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def files_containing(root: Path, secret: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_no_password_given_in_a_url_reaches_the_store_the_artifacts_or_the_checkpoint(
        ray_cluster, workspace, mlflow_server, tmp_path, capfd):
    from mlflow.tracking import MlflowClient

    uri = f"http://flowscale:TRACKING-PW@127.0.0.1:{mlflow_server['port']}"
    storage = tmp_path / "runs"
    args = job_args(workspace, "secret", "train.steps=10", f"mlflow.tracking_uri={uri}",
                    f"run.storage_path={storage}", "run.s3_endpoint=http://key:ENDPOINT-PW@127.0.0.1:1")
    assert pretrain.main(args) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id],
                                filter_string="tags.`flowscale.run_name` = 'secret'")
    assert run.info.status == "FINISHED" and "loss" in run.data.metrics  # the server took the password URI
    assert run.data.params["mlflow.tracking_uri"] == f"http://***@127.0.0.1:{mlflow_server['port']}"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "images")]  # grids went through the server
    printed = "".join(capfd.readouterr())
    for secret in (b"TRACKING-PW", b"ENDPOINT-PW"):
        assert secret not in mlflow_server["store"].read_bytes()
        assert not files_containing(mlflow_server["artifacts"], secret)
        assert not files_containing(storage, secret)  # checkpoints and their config.yaml
        assert secret.decode() not in printed
