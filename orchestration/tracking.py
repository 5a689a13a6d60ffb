"""MLflow tracking that never blocks or kills training.

The driver opens (or, for a retried or relaunched run, finds and reopens) the MLflow run keyed by the Ray
run name, logs the resolved config and, when the job's outcome is known, ends the run FINISHED, FAILED or
KILLED. Inside the job only world rank 0 logs, through a background thread: a slow or unreachable
tracking server costs the training loop nothing, and every failed call is counted and reported instead of
raised. A worker failure that Ray retries leaves the run RUNNING: only the driver ends it.
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


# MLflow 3's UI picks an experiment's view from this tag; without it a new experiment opens in the GenAI view
# (traces, evaluation runs) instead of the model-training one.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_id(client, experiment: str, tracking_uri: str) -> str:
    """The experiment's id, created (as a model-training experiment) if new."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client.create_experiment(experiment, artifact_location=artifact_root(tracking_uri),
                                        tags=dict([EXPERIMENT_KIND]))
    if EXPERIMENT_KIND[0] not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def source_tags(source: str) -> dict[str, str]:
    """Who ran what: the entry script, the user and, in a git checkout, the commit."""
    import getpass
    import subprocess

    tags = {"mlflow.source.name": source, "mlflow.source.type": "LOCAL", "mlflow.user": getpass.getuser()}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return tags
    if commit.returncode == 0:
        tags["mlflow.source.git.commit"] = commit.stdout.strip()
    return tags


def find_run(tracking_uri: str, experiment: str, run_name: str):
    """The MLflow run of the flowscale run named ``run_name`` in ``experiment``, or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                               max_results=1)
    return found[0] if found else None


def open_run(tracking_uri: str, experiment: str, run_name: str, params: dict[str, str], config_yaml: str,
             tags: dict[str, str] | None = None) -> str:
    """The id of the MLflow run named ``run_name`` in ``experiment``, RUNNING: created if new, reopened if a
    relaunch of the same run name finds it ended. Driver side."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    exp_id = experiment_id(client, experiment, tracking_uri)
    found = find_run(tracking_uri, experiment, run_name)
    if found:
        run_id = found.info.run_id
        if found.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        for key, value in (tags or {}).items():
            client.set_tag(run_id, key, value)
        return run_id
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **(tags or {})})
    items = list(params.items())
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in items[i : i + 100]])
    client.log_text(run.info.run_id, config_yaml, "config.yaml")
    return run.info.run_id


def end_run(tracking_uri: str, run_id: str, status: str, error: str | None = None, force: bool = False) -> None:
    """End the run as FINISHED, FAILED or KILLED, with the error (redacted of URL passwords) as a tag and a
    note. A run that has already ended keeps its status unless ``force``: when Tune stops a trial, the trial's
    job may see its workers vanish and fail after the sweep has recorded it KILLED. Driver side; a tracking
    failure is reported, never raised."""
    from mlflow.tracking import MlflowClient

    from infra.config import redact_url

    # MLflow prints "View run at URI" on ending a run with the URI as given, password included; the job's
    # closing summary says where the run is, redacted.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    client = MlflowClient(tracking_uri)
    try:
        if not force and client.get_run(run_id).info.status != "RUNNING":
            return
        if error:
            error = redact_url(error)
            client.set_tag(run_id, "error", error[:5000])
            client.set_tag(run_id, "mlflow.note.content", f"**{status}**\n\n```\n{error[:20000]}\n```")
        client.set_terminated(run_id, status=status)
    except Exception as e:  # tracking must never turn a finished job into a failed one
        log.warning("could not end MLflow run %s as %s: %s", run_id, status, redact_url(str(e)))


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

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit(self._log_text, text, artifact_file)

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

    def _log_text(self, text: str, artifact_file: str) -> None:
        self._client().log_text(self.run_id, text, artifact_file)

    def _set_tag(self, key: str, value: str) -> None:
        self._client().set_tag(self.run_id, key, value)

