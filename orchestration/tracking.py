"""MLflow tracking that never blocks or kills training.

The driver opens (or, for a retried or relaunched run, finds) the MLflow run keyed by the Ray run name and
logs the resolved config. Inside the job only world rank 0 logs, through a background thread: a slow or
unreachable tracking server costs the training loop nothing, and every failed call is counted and
reported instead of raised.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import threading
from pathlib import Path
import numpy as np

log = logging.getLogger(__name__)
RUN_NAME_TAG = "flowscale.run_name"
def artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of a local SQLite store live beside the database file. MLflow's default is ``./mlruns``
    relative to wherever the command ran, which scatters a run's images across working directories."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


def open_run(tracking_uri: str, experiment: str, run_name: str, params: dict[str, str], config_yaml: str) -> str:
    """The id of the MLflow run named ``run_name`` in ``experiment``, created if new. Driver side."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifact_root(tracking_uri))
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
    items = list(params.items())
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in items[i : i + 100]])
    client.log_text(run.info.run_id, config_yaml, "config.yaml")
    return run.info.run_id


class Tracker:
    """Asynchronous MLflow logging for one run (world rank 0 of the job)."""

    def __init__(self, tracking_uri: str, run_id: str, system_metrics: bool = True):
        # MLflow's HTTP client retries for minutes by default; a tracking call that cannot land soon is
        # better dropped and counted. Users can still set these themselves.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.failures = 0
        self._queue: queue.Queue = queue.Queue(maxsize=1000)
        self._monitor = None
        self._thread = threading.Thread(target=self._drain, name="mlflow-tracker", daemon=True)
        self._thread.start()
        if system_metrics:
            self._submit(self._start_system_metrics)

    # ---- producer side (training thread): never blocks, never raises --------------------------------

    def _submit(self, fn, *args) -> None:
        try:
            self._queue.put_nowait((fn, args))
        except queue.Full:
            self.failures += 1

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._submit(self._log_metrics, dict(metrics), step)

    def log_image(self, image: np.ndarray, name: str, step: int) -> None:
        self._submit(self._log_image, image, name, step)

    def set_tag(self, key: str, value: str) -> None:
        self._submit(self._set_tag, key, value)

    def log_artifact(self, path: str) -> None:
        self._submit(self._log_artifact, path)

    def close(self, timeout: float = 30.0) -> int:
        """Flush (bounded by ``timeout``) and stop; returns how many calls failed or were dropped."""
        try:
            self._queue.put((None, ()), timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if self._thread.is_alive():  # still stuck on a call: what is left is dropped
            self.failures += self._queue.qsize()
        return self.failures

    # ---- consumer side ------------------------------------------------------------------------------

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    def _drain(self) -> None:
        while True:
            fn, args = self._queue.get()
            if fn is None:
                break
            try:
                fn(*args)
            except Exception as e:  # tracking must never take training down
                self.failures += 1
                log.warning("MLflow call %s failed (%d so far): %s", fn.__name__, self.failures, e)
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:
                self.failures += 1

    def _start_system_metrics(self) -> None:
        import mlflow
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        mlflow.set_tracking_uri(self.tracking_uri)  # the monitor logs through the global client
        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=10)
        self._monitor.start()

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client().log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )

    def _log_image(self, image: np.ndarray, name: str, step: int) -> None:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        self._client().log_image(self.run_id, Image.open(io.BytesIO(buf.getvalue())), key=name, step=step)

    def _log_artifact(self, path: str) -> None:
        self._client().log_artifact(self.run_id, path)

    def _set_tag(self, key: str, value: str) -> None:
        self._client().set_tag(self.run_id, key, value)

