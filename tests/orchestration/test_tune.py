"""A Ray Tune sweep over the demo job on a real local 2-CPU Ray cluster with a real MLflow store: ASHA stops
a weak trial, a trial that fails is recorded and the sweep goes on, every MLflow child ends in a final state
under its parent, TensorBoard gets the metric per training step, a relaunch restores the sweep without
rerunning finished trials, and a bad sweep config fails before Ray starts."""

from __future__ import annotations

import csv
import io
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from orchestration import driver, tune
from tests.orchestration.conftest import REPO, job_args

# A good, a slower and a much slower learning rate (ASHA stops the last at its first rung: it reaches it
# after the others, and is the worst there), and one whose first step sends the weights to inf.
LRS = [1e-3, 1e-5, 1e-7, 1e30]


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """A local 2-CPU cluster with its dashboard: Ray Train's placement-group cleaner, which frees a stopped
    trial's workers (ray#54305), watches the controller through the State API that the dashboard serves;
    without it the trials' worker groups never started."""
    import ray

    driver.forget_dead_cluster()
    context = ray.init("local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                       _node_ip_address="127.0.0.1", configure_logging=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


def sweep_args(ws, name: str, *extra: str) -> list[str]:
    return ["--config", "tune-timesteps-demo", *job_args(ws, name), "train.steps=20", "train.eval_every=5",
            "checkpoint.every=10", "sample.quality=", "sample.prompts=[]", "train.max_nonfinite_steps=1",
            "cluster.max_failures=0", "tune.metric=val/loss", "tune.search=grid", "tune.points_to_evaluate=[]",
            "tune.grace_period=5", "tune.reduction_factor=2", "tune.max_concurrent_trials=2", "tune.num_samples=1",
            f"tune.space={{optim.lr: {{grid: {LRS}}}}}", *extra]


@pytest.fixture(scope="module")
def sweep(ray_cluster, workspace):
    assert tune.main(sweep_args(workspace, "sweep")) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(workspace["mlflow"])
    experiment = client.get_experiment_by_name("tune-timesteps-demo").experiment_id
    (parent,) = client.search_runs([experiment], filter_string="tags.`flowscale.run_name` = 'sweep'")
    children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return client, parent, children


def test_every_trial_ends_in_a_final_state_under_the_parent_run(sweep):
    _, parent, children = sweep
    assert parent.info.status == "FINISHED"
    lrs = {float(c.data.params["optim.lr"]): c.info.status for c in children}
    assert sorted(lrs) == sorted(LRS)
    assert lrs[1e30] == "FAILED"  # recorded, and the sweep went on
    assert lrs[1e-7] == "KILLED"  # stopped by ASHA
    assert lrs[1e-3] == "FINISHED"
    assert all(c.info.end_time for c in children)


def test_the_parent_holds_the_summary_the_best_trial_and_a_plot(sweep, workspace, tmp_path):
    client, parent, children = sweep
    summary = client.download_artifacts(parent.info.run_id, "summary.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(open(summary).read())))
    assert len(rows) == 4
    by_lr = {float(r["optim.lr"]): r for r in rows}
    assert by_lr[1e30]["status"] == "FAILED" and by_lr[1e-7]["status"] == "STOPPED"
    assert by_lr[1e-3]["status"] == "FINISHED" and by_lr[1e-3]["steps"] == "20"
    best = parent.data.tags["best_run"]
    assert best == by_lr[1e-3]["run"]
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert "sweep.png" in artifacts and "best" in artifacts


def test_tensorboard_gets_the_metric_at_each_training_step(sweep, workspace):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((workspace["root"] / "runs" / "sweep").glob("*/events.out.tfevents.*"))
    assert len(events) == 4
    steps = {}
    for path in events:
        acc = EventAccumulator(str(path.parent))
        acc.Reload()
        if "ray/tune/val/loss" in acc.Tags()["scalars"]:
            steps[path.parent.name] = [e.step for e in acc.Scalars("ray/tune/val/loss")]
    assert [5, 10, 15, 20] in steps.values()  # the finished trial, on the training step axis
    # The HParams view: each ended trial's dotted config keys against its final metrics.
    from tensorboard.plugins.hparams import plugin_data_pb2

    lrs = []
    for path in events:
        acc = EventAccumulator(str(path.parent))
        acc.Reload()
        try:
            content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        except KeyError:  # the failed trial reported nothing to compare
            continue
        start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        lrs.append(start.hparams["optim.lr"].number_value)
    assert sorted(lrs) == sorted(LRS[:3]), lrs  # the finished one and the two ASHA stopped


def test_a_relaunched_sweep_is_restored_without_rerunning_finished_trials(sweep, workspace):
    client, parent, children = sweep
    assert tune.main(sweep_args(workspace, "sweep")) == 0
    again = client.search_runs([parent.info.experiment_id],
                               filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_id for c in again) == sorted(c.info.run_id for c in children)  # no duplicates
    ended = {c.info.run_id: c.info.end_time for c in children}
    assert all(c.info.end_time == ended[c.info.run_id] for c in again)  # none reopened, none rerun


def test_a_bad_sweep_config_fails_before_ray_naming_the_key(tmp_path):
    for override, message in (("tune.space={flow.logit_maen: {uniform: [0, 1]}}", "'flow.logit_maen' is not a config key"),
                              ("tune.space={flow.logit_mean: {uniform: [1, 1]}}", "empty range"),
                              ("tune.space={flow.logit_std: {choice: [1.0, -1.0]}}", "flow.logit_std=-1.0")):
        out = subprocess.run([sys.executable, "orchestration/tune.py", override, f"run.storage_path={tmp_path}"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
        assert "Started a local Ray instance" not in out.stderr + out.stdout


def test_the_optuna_searcher_of_each_preset_saves_and_restores(tmp_path):
    """Tune pickles the searcher at every experiment checkpoint: a closure as the define-by-run space failed
    the embedded default's first checkpoint. The restored searcher suggests the same next points."""
    from ray.tune.search.optuna import OptunaSearch

    from infra.config import load_config
    from orchestration.sweep import OptunaSpace, optuna_points

    cfg = load_config(REPO / "configs" / "tune-timesteps-demo.yaml")

    def searcher() -> OptunaSearch:
        return OptunaSearch(space=OptunaSpace(cfg), metric=cfg.tune.metric, mode=cfg.tune.mode, seed=7,
                            points_to_evaluate=optuna_points(cfg))

    first = searcher()
    before = [first.suggest(f"t{i}") for i in range(len(cfg.tune.points_to_evaluate) + 1)]
    first.save(str(tmp_path / "searcher.pkl"))
    restored = searcher()
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert before[0]["sampler"] == 0 and before[0]["flow.logit_mean"] == 0.0  # SD3's rf/lognorm(0, 1) first
    assert [first.suggest(f"u{i}") for i in range(3)] == [restored.suggest(f"u{i}") for i in range(3)]


def test_ctrl_c_stops_the_sweep_and_the_printed_command_resumes_it(ray_cluster, workspace):
    """SIGINT mid-trial: the sweep exits 130 printing the command that resumes it, the parent and the unfinished
    children are KILLED; that command restores the sweep, and the trials continue from their checkpoints."""
    from mlflow.tracking import MlflowClient

    args = sweep_args(workspace, "interrupted", "train.steps=30", "tune.scheduler=none",
                      "tune.space={optim.lr: {grid: [0.001, 0.0001]}}")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    proc = subprocess.Popen([sys.executable, "orchestration/tune.py", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    jobs = workspace["root"] / "runs" / "interrupted" / "jobs"
    deadline = time.monotonic() + 240

    def registered() -> bool:  # Ray Train resumes from the checkpoints its controller's snapshot lists
        return any("checkpoint_00000010" in p.read_text() for p in jobs.glob("*/checkpoint_manager_snapshot.json"))

    while not registered() and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-2000:] + err[-3000:]
    resume = shlex.split(err.split("resume it from where it stopped with\n")[1].splitlines()[0])
    assert resume[:2] == ["python", "orchestration/tune.py"] and "run.name=interrupted" in resume

    client = MlflowClient(workspace["mlflow"])
    experiment = client.get_experiment_by_name("tune-timesteps-demo").experiment_id
    (parent,) = client.search_runs([experiment], filter_string="tags.`flowscale.run_name` = 'interrupted'")
    children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert parent.info.status == "KILLED" and children
    assert all(c.info.status in ("KILLED", "FINISHED") for c in children)

    again = subprocess.run([sys.executable, *resume[1:]], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "restored from" in again.stdout and "trials       2: 2 finished" in again.stdout
    assert all((job / "checkpoint_00000030" / "COMPLETE").exists() for job in jobs.iterdir())
    children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"]  # reopened, none added
    # The trial that had checkpointed continued from there rather than starting over.
    assert any(int(c.data.tags.get("resumed_from_step", 0)) >= 10 for c in children), \
        [line for line in again.stdout.splitlines() if "resumed" in line or line.startswith("run ")]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
