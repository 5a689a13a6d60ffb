"""The pretraining job on a real local Ray cluster with a real MLflow SQLite store: it trains, checkpoints
and tracks; a killed worker, a relaunch under the same name and a resume on fewer workers all continue
from the last checkpoint; bad input fails before any worker starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from orchestration import pretrain
from tests.orchestration.conftest import REPO, STEPS, job_args, mlflow_run, run_sample_cli
from trainer import checkpoint
from trainer.models.mmdit import MMDiT
from infra.config import load_config



def final_weights(ws, name: str, step: int = STEPS) -> dict[str, torch.Tensor]:
    directory = ws["root"] / "runs" / name / f"checkpoint_{step:08d}"
    model = MMDiT(load_config("demo", ["model.depth=2", "model.head_dim=16"]).model)
    checkpoint.load_weights(model, directory, ema=False)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def reference_run(ray_cluster, workspace):
    """One uninterrupted run that the recovery tests compare against."""
    # Validation every 10 steps and grids every 15 touch neither the weights nor the random streams.
    assert pretrain.main(job_args(workspace, "reference", "train.val_every=10", "train.eval_every=15",
                                  f"train.record_sample_ids={workspace['root'] / 'ids' / 'reference'}")) == 0
    return final_weights(workspace, "reference")


def test_job_trains_checkpoints_and_tracks_in_mlflow(reference_run, workspace):
    run_dir = workspace["root"] / "runs" / "reference"
    kept = sorted(p.name for p in run_dir.glob("checkpoint_0*"))
    assert kept == ["checkpoint_00000020", "checkpoint_00000030"]  # keep-last-2 of 10, 20, 30
    assert (run_dir / "samples.png").stat().st_size > 0
    client, run = mlflow_run(workspace, "reference")
    for key in ("loss", "grad_norm", "lr", "samples_per_s", "tokens_per_s", "step_time_s", "data_wait_fraction",
                "peak_memory_gib", "val/loss", "val/loss_t0.5"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [5, 10, 15, 20, 25, 30]
    assert run.data.params["model.depth"] == "2" and run.data.params["train.steps"] == str(STEPS)
    assert run.data.tags["checkpoint.latest"].endswith("reference/checkpoint_00000030")
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "config.yaml" in artifacts and "samples.png" in artifacts


def test_a_finished_job_is_a_finished_model_training_run_with_its_source(reference_run, workspace):
    client, run = mlflow_run(workspace, "reference")
    assert run.info.status == "FINISHED" and run.info.end_time >= run.info.start_time
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the training view, not GenAI
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "orchestration/pretrain.py" and tags["mlflow.user"]
    assert len(tags.get("mlflow.source.git.commit", "0" * 40)) == 40
    assert tags["flowscale.recipe"] == "rectified_flow" and tags["flowscale.dataset"] == workspace["data"]
    assert not [t for t in tags if t.startswith("checkpoint.step")]  # one tag for the latest, not one each
    listed = client.download_artifacts(run.info.run_id, "checkpoints.tsv", str(workspace["root"]))
    rows = [line.split("\t") for line in Path(listed).read_text().splitlines()[1:]]
    assert [int(step) for step, _ in rows] == [10, 20, 30] and rows[-1][1] == tags["checkpoint.latest"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [10, 15, 20, 30]
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    for step in (15, 30):  # the image view steps through training
        assert any(f"samples+step+{step}+" in p for p in grids), grids


def first_checkpoint_registered(run_dir: Path) -> bool:
    """Ray Train lists a checkpoint in its snapshot only once every worker's shards are persisted."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return "checkpoint_00000010" in snapshot.read_text()
    except OSError:
        return False


def test_sample_cli_writes_a_grid_and_npz_from_a_checkpoint(reference_run, workspace, tmp_path):
    import numpy as np

    out = run_sample_cli(str(workspace["root"] / "runs" / "reference" / "checkpoint_00000030"), tmp_path)
    assert out.returncode == 0, out.stderr
    data = np.load(tmp_path / "samples.npz", allow_pickle=False)
    assert data["images"].dtype == np.float32 and data["images"].shape == (4, 1, 8, 8)
    assert 0.0 <= data["images"].min() and data["images"].max() <= 1.0
    assert list(data["prompts"]) == ["a handwritten digit 3"] * 2 + ["a handwritten digit 7"] * 2
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_sample_cli_names_a_missing_checkpoint(tmp_path):
    out = run_sample_cli(str(tmp_path / "nope"), tmp_path)
    assert out.returncode == 2 and str(tmp_path / "nope") in out.stderr


def test_checkpoints_stored_in_s3_resume_and_sample(ray_cluster, workspace, s3_bucket, tmp_path, capsys):
    import s3fs

    storage = f"{s3_bucket}/runs"
    assert pretrain.main(job_args(workspace, "in-s3", "train.steps=10", f"run.storage_path={storage}")) == 0
    fs = s3fs.S3FileSystem()
    assert fs.exists(f"{storage}/in-s3/checkpoint_00000010/COMPLETE")
    capsys.readouterr()
    assert pretrain.main(job_args(workspace, "in-s3", "train.steps=20", f"run.storage_path={storage}")) == 0
    _, run = mlflow_run(workspace, "in-s3")
    assert run.data.tags["resumed_from_step"] == "10"
    printed = next(line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("checkpoint "))
    assert printed == f"{storage}/in-s3/checkpoint_00000020"  # what the job says is what sampling takes
    out = run_sample_cli(printed, tmp_path)
    assert out.returncode == 0, out.stderr


def kill_one_worker_after_first_checkpoint(run_dir: Path, timeout: float = 300) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if first_checkpoint_registered(run_dir):
            for proc in psutil.process_iter(["cmdline"]):
                if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                    proc.kill()
                    return True
        time.sleep(0.2)
    return False


def test_killed_worker_recovers_from_checkpoint_bit_for_bit(reference_run, workspace):
    killed: list[bool] = []
    killer = threading.Thread(
        target=lambda: killed.append(kill_one_worker_after_first_checkpoint(workspace["root"] / "runs" / "killed")))
    killer.start()
    assert pretrain.main(job_args(workspace, "killed")) == 0
    killer.join()
    assert killed == [True]
    _, run = mlflow_run(workspace, "killed")
    assert run.data.tags["resumed_from_step"] in {"10", "20"}
    recovered = final_weights(workspace, "killed")
    for name, value in reference_run.items():
        assert torch.equal(recovered[name], value), name


def test_relaunch_with_the_same_run_name_resumes(reference_run, workspace):
    assert pretrain.main(job_args(workspace, "relaunched", "train.steps=20")) == 0
    assert pretrain.main(job_args(workspace, "relaunched")) == 0
    _, run = mlflow_run(workspace, "relaunched")  # one MLflow run for both launches
    assert run.data.tags["resumed_from_step"] == "20"
    resumed = final_weights(workspace, "relaunched")
    for name, value in reference_run.items():
        assert torch.equal(resumed[name], value), name


def trained_ids(directory: Path) -> dict[int, list[int]]:
    """step -> the global batch's sample ids, ranks concatenated in rank order, from train.record_sample_ids."""
    steps: dict[int, dict[int, list[int]]] = {}
    worlds: dict[int, int] = {}
    for path in sorted(directory.glob("rank_*.jsonl")):
        rank = int(path.stem.split("_")[1])
        for line in path.read_text().splitlines():
            row = json.loads(line)
            assert rank not in steps.setdefault(row["step"], {}), f"step {row['step']} trained twice"
            assert worlds.setdefault(row["step"], row["world"]) == row["world"]
            steps[row["step"]][rank] = row["ids"]
    assert all(len(ranks) == worlds[s] for s, ranks in steps.items())
    return {step: sum((ranks[r] for r in sorted(ranks)), []) for step, ranks in sorted(steps.items())}


def test_resume_on_one_worker_continues_the_same_data_order(reference_run, workspace):
    ids = workspace["root"] / "ids"
    assert pretrain.main(job_args(workspace, "elastic", "train.steps=20",
                                  f"train.record_sample_ids={ids / 'elastic'}")) == 0
    assert pretrain.main(job_args(workspace, "elastic", "cluster.num_workers=1",
                                  f"train.record_sample_ids={ids / 'elastic'}")) == 0
    state = (workspace["root"] / "runs" / "elastic" / f"checkpoint_{STEPS:08d}" / checkpoint.LOADER).read_text()
    assert f'"samples_seen": {STEPS * 16}' in state
    # The sample ids each step trained on: 2 ranks up to step 20, then 1 rank, the same global batches.
    reference, resumed = trained_ids(ids / "reference"), trained_ids(ids / "elastic")
    assert sorted(reference) == sorted(resumed) == list(range(1, STEPS + 1))
    assert all(len(reference[s]) == 16 for s in reference)
    assert resumed == reference
    assert len({i for s in reference for i in reference[s]}) > 16  # the batches differ from step to step
    # One rank draws other noise than two, so weights differ slightly, but the same batches in the same
    # order keep them far closer than a different data order would.
    resumed = final_weights(workspace, "elastic")
    drift = max(float((resumed[n] - v).abs().max()) for n, v in reference_run.items())
    moved = max(float((final_weights(workspace, "elastic", 20)[n] - v).abs().max()) for n, v in reference_run.items())
    assert drift < moved, (drift, moved)


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "orchestration/pretrain.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_config_typo_fails_before_ray_starts():
    out = run_cli("model.dpeth=3")
    assert out.returncode == 2
    assert "unknown config key 'model.dpeth'" in out.stderr and "model.depth" in out.stderr
    assert "Ray" not in out.stdout + out.stderr


def test_unreachable_data_url_fails_before_ray_starts(tmp_path):
    out = run_cli(f"data.url={tmp_path / 'missing'}", f"run.storage_path={tmp_path / 'runs'}")
    assert out.returncode == 2
    assert str(tmp_path / "missing") in out.stderr
    assert "Started a local Ray instance" not in out.stdout + out.stderr


def test_unwritable_storage_path_fails_before_ray_starts(workspace, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = run_cli(f"data.url={workspace['data']}", f"run.storage_path={blocker / 'runs'}")
    assert out.returncode == 2
    assert "run.storage_path" in out.stderr and "not writable" in out.stderr


def test_an_empty_tracking_uri_takes_mlflow_tracking_uri_then_a_local_store(workspace, tmp_path, monkeypatch):
    from orchestration import driver

    cfg = load_config("demo", [f"data.url={workspace['data']}", f"run.storage_path={tmp_path / 'runs'}"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert driver.resolve(cfg).mlflow.tracking_uri == "http://127.0.0.1:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert driver.resolve(cfg).mlflow.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert driver.resolve(load_config("demo", [f"data.url={workspace['data']}", "mlflow.tracking_uri=file:///x"])
                          ).mlflow.tracking_uri == "file:///x"


def test_a_cluster_file_naming_a_dead_gcs_is_forgotten(tmp_path, monkeypatch):
    """Ray Train's placement-group cleaner finds its cluster through ray_current_cluster: naming a dead one, it
    failed and a stopped trial's resources were never freed (the next trial waited forever)."""
    from orchestration import driver

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    named = tmp_path / "ray" / "ray_current_cluster"
    named.parent.mkdir()
    named.write_text("127.0.0.1:9")  # nothing serves a GCS there
    driver.forget_dead_cluster()
    assert not named.exists()


def test_a_cluster_file_left_by_a_killed_job_does_not_hold_up_the_next(workspace):
    """A job killed with its local cluster leaves RAY_TMPDIR/ray/ray_current_cluster naming a GCS that is gone;
    without RAY_ADDRESS the next job starts its own cluster instead of waiting for that one."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        (tmp / "ray").mkdir()
        (tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # nothing listens on port 9
        env = {"RAY_TMPDIR": str(tmp), "RAY_ADDRESS": ""}
        out = run_cli(*job_args(workspace, "after-a-kill", "train.steps=2", "cluster.num_workers=1",
                                "checkpoint.every=0", "mlflow.enabled=false"), env=env, timeout=240)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        assert "step 2/2" in out.stdout
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_poll_interval_reaches_the_controller_that_fit_starts(workspace, monkeypatch):
    """Ray Train hands the controller the variables it propagates, read when ``fit()`` starts it: the
    configured interval is among them during the call, and the driver's environment is as it was after."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from orchestration import driver

    monkeypatch.delenv(driver.POLL_INTERVAL_ENV, raising=False)
    cfg = load_config("demo", [f"data.url={workspace['data']}", "cluster.poll_interval_s=0.25"])
    with driver.controller_env(cfg):
        assert get_env_vars_to_propagate()[driver.POLL_INTERVAL_ENV] == "0.25"
    assert driver.POLL_INTERVAL_ENV not in os.environ
    monkeypatch.setenv(driver.POLL_INTERVAL_ENV, "3")
    with driver.controller_env(cfg):  # the job's setting wins over the shell's
        assert get_env_vars_to_propagate()[driver.POLL_INTERVAL_ENV] == "0.25"
    assert os.environ[driver.POLL_INTERVAL_ENV] == "3"
