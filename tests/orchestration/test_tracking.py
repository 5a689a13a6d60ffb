"""MLflow tracking never blocks or stops training: calls run on a background thread, failures are counted,
credentials never reach the params."""

from __future__ import annotations

import time

from orchestration.tracking import Tracker, open_run


def test_an_unreachable_tracking_server_neither_blocks_nor_raises():
    tracker = Tracker("http://127.0.0.1:9", run_id="0" * 32, system_metrics=False)  # nothing listens on :9
    started = time.perf_counter()
    for step in range(50):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)
    assert time.perf_counter() - started < 0.5
    assert tracker.close(timeout=5) > 0


def test_every_metric_reaches_a_sqlite_store_at_its_own_step_with_its_value(tmp_path):
    """Training metrics at log steps, validation metrics at evaluation steps, grids as images at their step,
    and a run that ends with the status it is given."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    from orchestration.tracking import end_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = open_run(uri, "exp", "run-a", {"model.depth": "2"}, "model:\n  depth: 2\n")
    assert open_run(uri, "exp", "run-a", {}, "") == run_id  # the same name finds the same run
    tracker = Tracker(uri, run_id, system_metrics=False)
    for step in (5, 10, 15):
        tracker.log_metrics({"loss": 1.0 / step, "grad_norm": 2.0 * step, "lr": 1e-3}, step)
    for step in (10, 15):  # an evaluation: validation losses and a grid
        tracker.log_metrics({"val/loss": 0.5 + step, "val/loss_t0.5": 0.25 + step}, step)
        tracker.log_image(np.full((4, 6, 3), step, dtype=np.uint8), "samples", step)
    assert tracker.close() == 0
    client = MlflowClient(uri)

    def history(key):
        return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]

    assert history("loss") == [(5, 1 / 5), (10, 1 / 10), (15, 1 / 15)]
    assert history("grad_norm") == [(5, 10.0), (10, 20.0), (15, 30.0)]
    assert history("lr") == [(5, 1e-3), (10, 1e-3), (15, 1e-3)]
    assert history("val/loss") == [(10, 10.5), (15, 15.5)] and history("val/loss_t0.5") == [(10, 10.25), (15, 15.25)]
    images = sorted(a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")
                    and "compressed" not in a.path)
    assert [p.split("+step+")[1].split("+")[0] for p in images] == ["10", "15"]
    assert client.get_run(run_id).data.params == {"model.depth": "2"}
    assert client.get_run(run_id).info.status == "RUNNING"
    end_run(uri, run_id, "FINISHED")
    assert client.get_run(run_id).info.status == "FINISHED" and client.get_run(run_id).info.end_time
    # An ended run keeps its status (a trial's job failing after Tune stopped it), unless forced (Tune's own).
    end_run(uri, run_id, "FAILED", "the workers vanished")
    assert client.get_run(run_id).info.status == "FINISHED" and "error" not in client.get_run(run_id).data.tags
    end_run(uri, run_id, "KILLED", "stopped early by the scheduler", force=True)
    assert client.get_run(run_id).info.status == "KILLED"


def test_credentials_never_reach_params_or_the_config_artifact():
    from infra.config import dump_config, flat_params, load_config

    cfg = load_config("demo", ["data.storage_options={key: AKIA123, secret: s3cr3t, client_kwargs: "
                               "{aws_access_key_id: AKIA, region_name: eu-west-1}}"])
    params, dumped = flat_params(cfg), dump_config(cfg)
    assert params["data.storage_options.client_kwargs.region_name"] == "eu-west-1"
    for leaked in ("AKIA", "s3cr3t"):
        assert leaked not in dumped and not any(leaked in v for v in params.values())


def test_no_schema_key_is_mistaken_for_a_credential():
    from infra.config import all_keys, is_secret

    assert [k for k in all_keys() if is_secret(k)] == []


def test_artifacts_of_a_sqlite_store_live_beside_the_database(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path.parent)  # artifacts must not follow the working directory
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = open_run(uri, "exp-artifacts", "run-b", {}, "model: {}\n")
    location = MlflowClient(uri).get_run(run_id).info.artifact_uri
    assert location.startswith((tmp_path / "mlartifacts").as_uri()), location
    assert (tmp_path / "mlartifacts").is_dir()
