"""The distillation job on a real local Ray cluster: it starts a student from a pretraining checkpoint,
tracks the sCD metrics and the student/teacher grids in MLflow, and its checkpoints sample in 1 and 2
steps; without a teacher it says which command to run first."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from orchestration import distill, pretrain
from tests.orchestration.conftest import REPO, job_args, mlflow_run, run_sample_cli

DISTILL_STEPS = 6


@pytest.fixture(scope="module")
def teacher(ray_cluster, workspace):
    assert pretrain.main(job_args(workspace, "teacher", "train.steps=10")) == 0
    return workspace["root"] / "runs" / "teacher" / "checkpoint_00000010"


def distill_args(ws, name: str, *extra: str) -> list[str]:
    return [
        "train.global_batch_size=16", f"train.steps={DISTILL_STEPS}", "train.log_every=3", "train.eval_every=0",
        "train.val_batches=1", "train.val_timesteps=[0.5]", "checkpoint.every=3", "sample.num_per_prompt=1",
        "distill.tangent_warmup_steps=4", "cluster.max_failures=0", "cluster.poll_interval_s=0.1",
        "mlflow.system_metrics=false",
        f"data.url={ws['data']}", f"run.storage_path={ws['runs']}", f"run.name={name}",
        f"mlflow.tracking_uri={ws['mlflow']}", *extra,
    ]


@pytest.fixture(scope="module")
def student(teacher, workspace):
    assert distill.main(["--teacher", str(teacher), *distill_args(workspace, "student")]) == 0
    return workspace["root"] / "runs" / "student" / f"checkpoint_{DISTILL_STEPS:08d}"


def test_distillation_tracks_scd_metrics_and_grids(student, workspace):
    client, run = mlflow_run(workspace, "student", experiment="distill-demo")
    assert run.info.status == "FINISHED" and run.data.tags["flowscale.recipe"] == "scd"
    assert run.data.tags["mlflow.source.name"] == "orchestration/distill.py"
    metrics = run.data.metrics
    for key in ("loss", "tangent_warmup_r", "tangent_norm", "logvar_mean", "val/loss", "grad_norm"):
        assert key in metrics, key
    assert any(f"tau{i}_loss" in metrics for i in range(4))
    assert [m.value for m in client.get_metric_history(run.info.run_id, "tangent_warmup_r")] == [0.5, 1.0]  # r = min(1, i / 4) at iterations i = 2, 5
    # The logged loss is the step's mean over both ranks' samples: the tau buckets' means weighted by their
    # shares of the batch must give it back, at every logged step.
    history = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
               for key in ["loss", *(f"tau{i}_loss{s}" for i in range(4) for s in ("", "_fraction"))]}
    assert sorted(history["loss"]) == [3, 6]
    for step, loss in history["loss"].items():
        shares = [(history[f"tau{i}_loss_fraction"][step], history[f"tau{i}_loss"].get(step)) for i in range(4)]
        assert sum(f for f, _ in shares) == pytest.approx(1.0)
        assert sum(f * m for f, m in shares if f) == pytest.approx(loss, rel=1e-5), (step, loss, shares)
    assert run.data.params["model.depth"] == "2"  # the student took the teacher's architecture
    images = " ".join(a.path for a in client.list_artifacts(run.info.run_id, "images"))
    for grid in ("student_1step", "student_2step", "teacher"):
        assert grid in images, images
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "student_1step.png" in artifacts and "student_2step.png" in artifacts


@pytest.mark.parametrize("steps", [1, 2])
def test_a_student_checkpoint_samples_in_one_and_two_steps(student, tmp_path, steps):
    out = run_sample_cli(str(student), tmp_path, steps=steps)
    assert out.returncode == 0, out.stderr
    images = np.load(tmp_path / "samples.npz", allow_pickle=False)["images"]
    assert images.shape == (4, 1, 8, 8) and np.isfinite(images).all()


def test_without_a_teacher_it_names_the_command_to_run_first(tmp_path):
    out = subprocess.run([sys.executable, "orchestration/distill.py"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "FLOWSCALE_HOME": str(tmp_path)})
    assert out.returncode == 2
    assert "python orchestration/pretrain.py" in out.stderr and "--teacher" in out.stderr


def test_a_teacher_in_object_storage_is_fetched_by_the_workers_once_per_node(teacher, s3_bucket, workspace, tmp_path):
    """The driver reads only the teacher's config (for the architecture); the workers fetch the weights into
    run.cache_dir once, and the run records the URL."""
    import s3fs

    from infra.config import load_config
    from trainer import checkpoint
    from trainer.recipes.scd import SCDRecipe

    fs = s3fs.S3FileSystem()
    uri = f"{s3_bucket}/teacher/checkpoint_00000010"
    fs.put(str(teacher) + "/", uri.removeprefix("s3://"), recursive=True)
    cfg = SCDRecipe.resolve_config(load_config("distill-demo", [f"distill.teacher={uri}"]), str(tmp_path))
    assert cfg.distill.teacher == uri and cfg.model.depth == 2  # the test teacher's depth
    assert not any(tmp_path.iterdir())  # no weights fetched by the driver

    cache = tmp_path / "cache"
    assert distill.main(["--teacher", uri, *distill_args(workspace, "student-of-s3", f"run.cache_dir={cache}")]) == 0
    _, run = mlflow_run(workspace, "student-of-s3", experiment="distill-demo")
    assert run.data.params["distill.teacher"] == uri
    (copy,) = [p for p in cache.iterdir()]
    checkpoint.check_complete(copy)
    assert sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file()) == \
        sorted(p.relative_to(teacher) for p in teacher.rglob("*") if p.is_file())
    fs.rm(uri.removeprefix("s3://"), recursive=True)  # later workers on this node read the local copy
    assert checkpoint.fetch(uri, cache) == copy

    with pytest.raises(checkpoint.CheckpointError, match=f"{s3_bucket}/missing does not exist"):
        SCDRecipe.resolve_config(load_config("distill-demo", [f"distill.teacher={s3_bucket}/missing"]), str(tmp_path))
