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


def test_metrics_reach_a_sqlite_store_in_order(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = open_run(uri, "exp", "run-a", {"model.depth": "2"}, "model:\n  depth: 2\n")
    assert open_run(uri, "exp", "run-a", {}, "") == run_id  # the same name finds the same run
    tracker = Tracker(uri, run_id, system_metrics=False)
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": float(step), "val/loss_t0.5": 2.0 * step}, step)
    assert tracker.close() == 0
    client = MlflowClient(uri)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0, 2.0, 3.0]
    assert client.get_run(run_id).data.params == {"model.depth": "2"}


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
