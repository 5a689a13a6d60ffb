"""The whole workflow on a local stack (`python -m infra.local up`), each job sent with `ray job submit` and its
data, checkpoints and tracking all remote: the digits demo prepared into the object store, pretraining and a
resubmission that resumes it, distillation from the checkpoint in the object store, and a sweep. MLflow's
server then shows the runs with their metrics and images, whose files live in the object store's bucket.

Several minutes on two cores: `python -m pytest -m stack`."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest

from tests.conftest import REPO, local_stack_at
from tests.orchestration.conftest import job_args, submit_job
from tests.orchestration.test_distill_job import distill_args
from tests.orchestration.test_tune import sweep_args

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch, \
            local_stack_at(tmp_path_factory.mktemp("stack") / "home", monkeypatch) as stack:
        stack.up(*stack.port_args, "--num-cpus=2")
        yield stack


@pytest.fixture(scope="module")
def remote(stack):
    """The client environment and the job's locations on the stack, with the digits demo in its bucket."""
    env = stack.env()
    out = subprocess.run([sys.executable, "-m", "dataloaders.prepare", "digits", "--out", "s3://datasets/digits"],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return {"env": env, "data": "s3://datasets/digits", "runs": "s3://runs", "mlflow": env["MLFLOW_TRACKING_URI"]}


def submitted(remote, script: str, *args: str) -> str:
    out = submit_job(remote["env"], script, *args)
    assert out.returncode == 0 and "succeeded" in out.stdout + out.stderr, out.stdout[-5000:] + out.stderr[-3000:]
    return out.stdout


class MlflowServer:
    """The tracking server's REST API, as any client sees it."""

    def __init__(self, uri: str):
        self.uri = uri

    def call(self, endpoint: str, body: dict | None = None, **query) -> dict:
        url = f"{self.uri}/api/2.0/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        request = urllib.request.Request(url, json.dumps(body).encode() if body is not None else None,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")

    def run(self, experiment: str, name: str) -> dict:
        experiment_id = self.call("mlflow/experiments/get-by-name", experiment_name=experiment)["experiment"]["experiment_id"]
        runs = self.call("mlflow/runs/search", {"experiment_ids": [experiment_id],
                                                "filter": f"tags.`flowscale.run_name` = '{name}'"})["runs"]
        assert len(runs) == 1, runs
        return runs[0]

    def children(self, parent: dict) -> list[dict]:
        return self.call("mlflow/runs/search", {"experiment_ids": [parent["info"]["experiment_id"]],
                                                "filter": f"tags.`mlflow.parentRunId` = '{parent['info']['run_id']}'"})["runs"]

    def artifacts(self, run: dict, path: str = "") -> list[str]:
        """The run's artifact files under ``path``, listed through the server's artifact proxy."""
        root = run["info"]["artifact_uri"].removeprefix("mlflow-artifacts:/").strip("/")
        listed = self.call("mlflow-artifacts/artifacts", path=f"{root}/{path}".rstrip("/")).get("files", [])
        return [f"{path}/{f['path']}".lstrip("/") for f in listed if not f["is_dir"]]


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def metrics(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def pretrain_args(remote, steps: int) -> list[str]:
    return [*job_args(remote, "pretrained", f"train.steps={steps}", "train.eval_every=2", "checkpoint.every=2",
                      "cluster.max_failures=0")]


@pytest.fixture(scope="module")
def pretrained(remote):
    """A 4-step pretraining, then the same run name submitted again for 8 steps."""
    first = submitted(remote, "orchestration/pretrain.py", *pretrain_args(remote, 4))
    again = submitted(remote, "orchestration/pretrain.py", *pretrain_args(remote, 8))
    return first, again


def test_resubmitting_a_run_name_resumes_it_from_the_object_store(pretrained, remote, stack):
    import s3fs

    first, again = pretrained
    assert "step 4/4" in first and "step 8/8" in again and "step 2/8" not in again
    assert "checkpoint   s3://runs/pretrained/checkpoint_00000008" in again  # a URL sample.py and --teacher take
    env = remote["env"]
    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key=env["AWS_ACCESS_KEY_ID"],
                           secret=env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)
    assert fs.exists("runs/pretrained/checkpoint_00000008/COMPLETE")
    run = MlflowServer(remote["mlflow"]).run("demo", "pretrained")
    assert run["info"]["status"] == "FINISHED"
    assert tags(run)["resumed_from_step"] == "4"
    assert tags(run)["checkpoint.latest"].endswith("pretrained/checkpoint_00000008")


@pytest.fixture(scope="module")
def distilled(pretrained, remote):
    return submitted(remote, "orchestration/distill.py", "--teacher", "s3://runs/pretrained/checkpoint_00000008",
                     *distill_args(remote, "distilled", "train.steps=4", "checkpoint.every=2", "train.eval_every=2"))


def test_distillation_starts_from_the_teacher_in_the_object_store(distilled, remote):
    assert "step 4/4" in distilled
    run = MlflowServer(remote["mlflow"]).run("distill-demo", "distilled")
    assert run["info"]["status"] == "FINISHED"
    assert params(run)["distill.teacher"] == "s3://runs/pretrained/checkpoint_00000008"
    assert {"loss", "tangent_warmup_r", "val/loss"} <= set(metrics(run))


@pytest.fixture(scope="module")
def swept(remote):
    return submitted(remote, "orchestration/tune.py", *sweep_args(
        remote, "swept", "train.steps=4", "train.eval_every=2", "checkpoint.every=2", "tune.scheduler=none",
        "tune.space={optim.lr: {grid: [0.001, 0.0001]}}"))  # without ASHA, both trials run to the end


def test_a_sweep_runs_its_trials_as_child_runs(swept, remote):
    server = MlflowServer(remote["mlflow"])
    parent = server.run("tune-timesteps-demo", "swept")
    assert parent["info"]["status"] == "FINISHED"
    children = server.children(parent)
    assert sorted(float(params(c)["optim.lr"]) for c in children) == [0.0001, 0.001]
    assert all(c["info"]["status"] == "FINISHED" for c in children)
    assert "summary.csv" in server.artifacts(parent)


def test_the_tracking_server_shows_metrics_and_images_stored_in_the_bucket(pretrained, distilled, remote):
    import s3fs

    env = remote["env"]
    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key=env["AWS_ACCESS_KEY_ID"],
                           secret=env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)
    server = MlflowServer(remote["mlflow"])
    for experiment, name in (("demo", "pretrained"), ("distill-demo", "distilled")):
        run = server.run(experiment, name)
        assert {"loss", "val/loss"} <= set(metrics(run))
        history = server.call("mlflow/metrics/get-history", run_id=run["info"]["run_id"], metric_key="loss")
        assert max(int(m["step"]) for m in history["metrics"]) >= 4
        images = [a for a in server.artifacts(run, "images") if a.endswith(".png")]
        assert images, server.artifacts(run)
        root = run["info"]["artifact_uri"].removeprefix("mlflow-artifacts:/").strip("/")
        stored = {p.removeprefix(f"mlflow/{root}/") for p in fs.find(f"mlflow/{root}")}
        assert set(images) <= stored, (images, stored)
        assert "config.yaml" in stored
