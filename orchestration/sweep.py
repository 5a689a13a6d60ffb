"""A Ray Tune sweep over a flowscale job: each trial is a driver function that runs the ordinary job
(``orchestration.driver.run``: a TorchTrainer, its checkpoints and MLflow run) with the trial's sampled
values, the Train V2 pattern.

- The search space (``tune.space``, dotted config keys) is checked before Ray starts.
- Each trial reports its evaluations to Tune through a Train callback that forwards only results carrying
  the objective; the time axis is the training step.
- A trial's job is named after the sweep and the trial, so a restored trial resumes its own checkpoint.
- MLflow: one parent run per sweep, a child run per trial (``mlflow.parentRunId``) that always ends
  FINISHED, KILLED (stopped early, interrupted) or FAILED; the parent gets the best trial, ``summary.csv``
  and comparison plots.
- Tune's TensorBoard event files go into each trial's directory under the sweep.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from infra.config import (ConfigError, JobConfig, all_keys, apply_overrides, build_config, dump_config,
                          flat_params, redact_url)
from orchestration import driver

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform")
TRIAL_DRIVER_CPUS = 0.01  # Tune schedules only the trial's driver; its Train workers take their own resources


# --------------------------------------------------------------------------------------------------
# The search space, checked before Ray
# --------------------------------------------------------------------------------------------------


def distribution(name: str, spec) -> tuple[str, object]:
    """(kind, argument) of one space entry, or a ConfigError naming it."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"tune.space.{name} must be one of {{{', '.join(d + ': ...' for d in DISTRIBUTIONS)}}}, "
                          f"got {spec!r}")
    kind, arg = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"tune.space.{name}.{kind} must be a non-empty list, got {arg!r}")
    else:
        if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, (int, float)) for v in arg)):
            raise ConfigError(f"tune.space.{name}.{kind} must be [low, high], got {arg!r}")
        if not arg[0] < arg[1] or (kind == "loguniform" and arg[0] <= 0):
            raise ConfigError(f"tune.space.{name}.{kind}={arg} is an empty range"
                              + (" (loguniform needs 0 < low < high)" if kind == "loguniform" else " (low < high)"))
    return kind, arg


def is_override_set(kind: str, arg) -> bool:
    """A choice or grid whose options are mappings: each option is a set of overrides (e.g. a sampler family
    with its parameters), under a label that is not itself a config key."""
    return kind in ("choice", "grid") and all(isinstance(option, dict) for option in arg)


def check_space(cfg: JobConfig) -> None:
    """Every key of ``tune.space`` and ``tune.points_to_evaluate`` is a config key, every range is non-empty,
    and every value the space can produce (a range's ends) makes a valid job config."""
    t = cfg.tune
    if not t.space:
        raise ConfigError("tune.space is empty: give at least one dotted config key and its distribution")
    keys, base = set(all_keys()), cfg.model_dump(mode="json")

    def check_value(key: str, value, where: str) -> None:
        if key not in keys or key.startswith("tune."):
            raise ConfigError(f"{where}: '{key}' is not a config key a trial can set")
        try:
            build_config(apply_overrides(base, [f"{key}={json.dumps(value)}"]), source=where)
        except ConfigError as e:
            raise ConfigError(f"{where}: {key}={value!r} makes an invalid job config: {e}") from None

    for name, spec in t.space.items():
        kind, arg = distribution(name, spec)
        if is_override_set(kind, arg):
            for i, option in enumerate(arg):
                for key, value in option.items():
                    where = f"tune.space.{name}.{kind}[{i}]"
                    if isinstance(value, dict):
                        if t.search != "optuna":
                            raise ConfigError(f"{where}.{key}: a distribution inside an option needs tune.search=optuna "
                                              f"(a conditional space)")
                        nested_kind, nested = distribution(f"{name}.{kind}[{i}].{key}", value)
                        for v in (nested if nested_kind in ("choice", "grid") else nested):
                            check_value(key, v, where)
                    else:
                        check_value(key, value, where)
            continue
        for value in arg:
            check_value(name, value, f"tune.space.{name}")
        if kind == "grid" and t.search == "optuna":
            raise ConfigError(f"tune.space.{name}: grid entries need tune.search=grid (Optuna samples: use choice)")
    for i, point in enumerate(t.points_to_evaluate):
        for key, value in point.items():
            check_value(key, value, f"tune.points_to_evaluate[{i}]")
    if t.points_to_evaluate and t.search != "optuna":
        raise ConfigError("tune.points_to_evaluate needs tune.search=optuna")
    metric = t.metric
    if metric.startswith("quality/") and not cfg.sample.quality:
        raise ConfigError(f"tune.metric={metric} needs a quality score of the grids: set sample.quality (e.g. digits)")
    if t.scheduler == "asha" and not (cfg.train.eval_every or cfg.train.val_every):
        raise ConfigError("tune.scheduler=asha compares trials at evaluations: set train.eval_every")


# --------------------------------------------------------------------------------------------------
# From the config's space to Tune's, and from a trial's values back to overrides
# --------------------------------------------------------------------------------------------------


def tune_space(cfg: JobConfig) -> dict:
    """The param_space of grid and random search."""
    from ray import tune

    make = {"choice": tune.choice, "grid": tune.grid_search,
            "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a)}
    return {name: make[kind](arg) for name, (kind, arg) in
            ((name, distribution(name, spec)) for name, spec in cfg.tune.space.items())}


class OptunaSpace:
    """A define-by-run space for Optuna: an override-set entry first picks its option (by index), then samples
    the option's own distributions, so each family searches only its own parameters. A class rather than a
    closure: Tune saves the searcher with pickle at every experiment checkpoint."""

    def __init__(self, cfg: JobConfig):
        self.space = {name: distribution(name, spec) for name, spec in cfg.tune.space.items()}

    @staticmethod
    def _suggest(trial, name: str, kind: str, arg):
        if kind == "choice":
            return arg[trial.suggest_categorical(name, list(range(len(arg))))]
        return trial.suggest_float(name, *arg, log=kind == "loguniform")

    def __call__(self, trial) -> None:
        for name, (kind, arg) in self.space.items():
            if is_override_set(kind, arg):
                option = arg[trial.suggest_categorical(name, list(range(len(arg))))]
                for key, value in option.items():
                    if isinstance(value, dict):
                        self._suggest(trial, key, *distribution(key, value))
            else:
                self._suggest(trial, name, kind, arg)


def optuna_points(cfg: JobConfig) -> list[dict]:
    """``tune.points_to_evaluate`` (dotted-key override sets) as Optuna's parameters: the index of the option
    each point belongs to, and the values of that option's distributions."""
    out = []
    for i, point in enumerate(cfg.tune.points_to_evaluate):
        params = {}
        for name, spec in cfg.tune.space.items():
            kind, arg = distribution(name, spec)
            if not is_override_set(kind, arg):
                value = point[name] if name in point else None
                params[name] = arg.index(value) if kind == "choice" else value
                continue
            matches = [j for j, option in enumerate(arg)
                       if all(point.get(k) == v for k, v in option.items() if not isinstance(v, dict))]
            if not matches:
                raise ConfigError(f"tune.points_to_evaluate[{i}] matches no option of tune.space.{name}")
            params[name] = matches[0]
            params.update({k: point[k] for k, v in arg[matches[0]].items() if isinstance(v, dict)})
        out.append(params)
    return out


def trial_overrides(cfg: JobConfig, values: dict) -> dict[str, object]:
    """A trial's Tune config -> dotted config key -> value, typed as the config types it (YAML reads `1e-5`
    in a space as a string; the summary, the plot and TensorBoard's HParams need the number)."""
    out: dict[str, object] = {}
    for name, spec in cfg.tune.space.items():
        kind, arg = distribution(name, spec)
        value = values[name]
        if not is_override_set(kind, arg):
            out[name] = value
            continue
        option = arg[value] if isinstance(value, int) else value  # Optuna gives the index, Tune the option
        for key, v in option.items():
            out[key] = values[key] if isinstance(v, dict) else v
    try:
        job = build_config(apply_overrides(cfg.model_dump(mode="json"),
                                           [f"{k}={json.dumps(v)}" for k, v in out.items()]))
    except ConfigError:  # reported where the trial runs
        return out
    return {key: _dotted(job, key) for key in out}


def _dotted(cfg: JobConfig, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def trial_config(sweep: dict, values: dict, trial_id: str) -> JobConfig:
    """The job a trial runs: the sweep's config with the trial's values, named after the sweep and trial."""
    cfg = build_config(sweep)
    overrides = [f"{k}={json.dumps(v)}" for k, v in trial_overrides(cfg, values).items()]
    cfg = build_config(apply_overrides(sweep, overrides), source=f"trial {trial_id}")
    cfg.run.name = f"{sweep['run']['name']}-{trial_id}"
    cfg.run.storage_path = f"{sweep['run']['storage_path'].rstrip('/')}/{sweep['run']['name']}/jobs"
    return cfg


# --------------------------------------------------------------------------------------------------
# The trial: a driver function (runs in a Tune trial actor)
# --------------------------------------------------------------------------------------------------


def objective_callback(metric: str):
    """Ray Train's TuneReportCallback, forwarding only the reports that carry the objective: Tune (and ASHA)
    errors on a result without it, and its one-slot queue would block on every training step."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ObjectiveReport()


def run_trial(values: dict, *, sweep: dict, parent_run_id: str | None) -> None:
    from ray import tune

    cfg = trial_config(sweep, values, tune.get_context().get_trial_id())
    tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
    result = driver.run(cfg, "orchestration/tune.py", callbacks=[objective_callback(cfg.tune.metric)], tags=tags)
    if result.error is not None:
        raise RuntimeError(f"trial {cfg.run.name} failed: {result.error}")


def end_trial_runs_callback(cfg: JobConfig):
    """A Tune callback that ends a trial's MLflow run when Tune ends the trial from outside: stopped early by
    ASHA (the trial actor is killed, so the job never ends its own run) -> KILLED; errored -> FAILED."""
    from ray import tune

    from orchestration.tracking import end_run, find_run

    class EndTrialRuns(tune.Callback):
        def end(self, trial, status: str, replaces: tuple[str, ...]) -> None:
            if not cfg.mlflow.enabled:
                return
            run = find_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, f"{cfg.run.name}-{trial.trial_id}")
            if run is not None and run.info.status in replaces:
                end_run(cfg.mlflow.tracking_uri, run.info.run_id, status,
                        "stopped early by the scheduler" if status == "KILLED" else None, force=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            # A trial Tune completes without its job finishing was stopped by the scheduler. Its job may have
            # failed already: removing the trial's placement group kills the Train controller under it.
            self.end(trial, "KILLED", replaces=("RUNNING", "FAILED"))

        def on_trial_error(self, iteration, trials, trial, **info):
            self.end(trial, "FAILED", replaces=("RUNNING",))

    return EndTrialRuns()


def tensorboard_callback(cfg: JobConfig) -> list:
    """Tune's TensorBoard logger, its HParams view keyed by the dotted config keys each trial set (the sampler
    family by name, where Tune's own logger shows Optuna's option index). [] without tensorboardX, where Tune
    writes no event files either."""
    try:
        from ray.tune.logger import TBXLoggerCallback
        from tensorboardX.summary import hparams
    except ImportError:
        return []

    class SweepTensorBoard(TBXLoggerCallback):
        def _try_log_hparams(self, trial, result: dict) -> None:
            params = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
                      for k, v in trial_overrides(cfg, trial.config).items() if v is not None}
            writer = self._trial_writer[trial].file_writer
            for summary in hparams(hparam_dict=params, metric_dict=result):
                writer.add_summary(summary)

    return [SweepTensorBoard()]


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    cfg: JobConfig
    path: str  # the sweep's directory (Tune's experiment: trials, TensorBoard event files)
    rows: list[dict] = field(default_factory=list)  # summary.csv
    best: dict | None = None
    interrupted: bool = False
    mlflow_run_id: str | None = None
    error: BaseException | None = None  # a sweep's failed trials are rows, not an error of the sweep


def concurrent_trials(cfg: JobConfig) -> int:
    """What the cluster fits of one trial (its workers plus its driver), when tune.max_concurrent_trials is 0."""
    import ray

    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    resources = ray.cluster_resources()
    c = cfg.cluster
    if c.use_gpu:
        return max(1, int(resources.get("GPU", 0) // c.num_workers))
    return max(1, int(resources.get("CPU", 1) // (c.num_workers * c.cpus_per_worker + TRIAL_DRIVER_CPUS)))


def build_tuner(cfg: JobConfig, parent_run_id: str | None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=cfg.model_dump(mode="json"), parent_run_id=parent_run_id),
        {"cpu": TRIAL_DRIVER_CPUS})
    path, fs = driver.storage(cfg)
    run_config = tune.RunConfig(name=cfg.run.name, storage_path=path, storage_filesystem=fs,
                                callbacks=[end_trial_runs_callback(cfg), *tensorboard_callback(cfg)], verbose=1)
    experiment = f"{path.rstrip('/')}/{cfg.run.name}"
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        # Finished trials keep their results; interrupted ones resume from their own checkpoints.
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=False,
                                  storage_filesystem=fs), True
    t = cfg.tune
    scheduler = None
    if t.scheduler == "asha":
        # No rung at the final evaluation: ASHA stopping a trial there kills it before its job writes the final
        # grids and ends its MLflow run (and ranks the trial as stopped). Rungs sit at grace * rf^k <= max_t, so
        # max_t is one step short of the end, and a trial past max_t runs on (stop_last_trials=False).
        scheduler = ASHAScheduler(time_attr="step", max_t=max(1, cfg.train.steps - 1), stop_last_trials=False,
                                  reduction_factor=t.reduction_factor,
                                  grace_period=t.grace_period or cfg.train.eval_every or cfg.train.val_every)
    search_alg, space = None, tune_space(cfg) if t.search != "optuna" else {}
    if t.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(space=OptunaSpace(cfg), metric=t.metric, mode=t.mode, seed=t.seed,
                                  points_to_evaluate=optuna_points(cfg) or None)
    tune_config = tune.TuneConfig(metric=t.metric, mode=t.mode, scheduler=scheduler, search_alg=search_alg,
                                  num_samples=t.num_samples, max_concurrent_trials=concurrent_trials(cfg))
    return tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config), False


def summarize(cfg: JobConfig, grid) -> tuple[list[dict], dict | None, bool]:
    """(a row per trial, the best row, whether the sweep was interrupted) from Tune's results."""
    t = cfg.tune
    sign = 1 if t.mode == "min" else -1
    rows, interrupted = [], False
    for trial in grid._experiment_analysis.trials:
        history = trial.run_metadata.metric_analysis.get(t.metric, {})
        last = trial.last_result or {}
        step = int(last.get("step", 0))
        if trial.status == "ERROR":
            status = "FAILED"
        elif trial.status == "TERMINATED":
            status = "FINISHED" if step >= cfg.train.steps else "STOPPED"
        else:
            status, interrupted = trial.status, True
        overrides = trial_overrides(cfg, trial.config) if trial.config else {}
        rows.append({"trial": trial.trial_id, "run": f"{cfg.run.name}-{trial.trial_id}", "status": status,
                     "steps": step, f"final {t.metric}": last.get(t.metric, math.nan),
                     f"best {t.metric}": history.get(t.mode, math.nan),
                     **{k: overrides.get(k) for k in sorted(overrides)}})
    scored = [r for r in rows if not math.isnan(r[f"final {t.metric}"])]
    best = min(scored, key=lambda r: sign * r[f"final {t.metric}"]) if scored else None
    return rows, best, interrupted


def summary_csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def plot(cfg: JobConfig, rows: list[dict], out: Path) -> Path | None:
    """Left: every trial's metric by configuration (best first), colour = the categorical keys (the sampler
    family, the warmup shape), repeats of a configuration under other seeds side by side. Right: the metric
    over the numeric keys that vary - the (m, s) plane when two vary together, else the metric against each
    (quality against warmup length). Stopped trials hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = f"final {cfg.tune.metric}"
    scored = [r for r in rows if not math.isnan(r[metric])]
    if not scored:
        return None
    keys = sorted({k for r in scored for k in r if "." in k and not k.startswith(("final ", "best "))})
    keys = [k for k in keys if not k.endswith("seed")]  # seeds repeat a configuration: pooled, not plotted
    numeric = [k for k in keys if all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                                      for r in scored if r.get(k) is not None)]
    categorical = [k for k in keys if k not in numeric]
    varying = [k for k in numeric if len({r.get(k) for r in scored if r.get(k) is not None}) > 1]
    group_of = lambda r: ", ".join(_short(r.get(k)) for k in categorical) or "trials"  # noqa: E731
    config_of = lambda r: " ".join([group_of(r)] + [f"{k.rsplit('.', 1)[-1]}={_short(r[k])}"  # noqa: E731
                                                    for k in numeric if r.get(k) is not None])
    groups = sorted({group_of(r) for r in scored})
    sign = 1 if cfg.tune.mode == "min" else -1
    configs: dict[str, list[dict]] = {}
    for r in scored:
        configs.setdefault(config_of(r), []).append(r)

    def pooled(members: list[dict]) -> list[dict]:
        """Trials that ran to the end, when a configuration has any: a stopped trial's metric is an earlier
        step's."""
        return [r for r in members if r["status"] != "STOPPED"] or members

    order = sorted(configs, key=lambda c: sign * sum(r[metric] for r in pooled(configs[c])) / len(pooled(configs[c])))
    plane = len(varying) == 2 and sum(all(r.get(k) is not None for k in varying) for r in scored) >= 3
    right = [tuple(varying)] if plane else varying
    fig, axes = plt.subplots(1, 1 + len(right), figsize=(max(6, 0.55 * len(order) + 2) + 5 * len(right), 4.6),
                             squeeze=False)

    def dot(ax, x, y, r, **kw):
        colour = f"C{groups.index(group_of(r))}"
        ax.scatter([x], [y], s=kw.pop("s", 55), edgecolors=colour, linewidths=1.5,
                   facecolors="none" if r["status"] == "STOPPED" else colour, **kw)

    ax = axes[0][0]
    for i, c in enumerate(order):
        members = configs[c]
        for j, r in enumerate(members):
            dot(ax, i + 0.12 * (j - (len(members) - 1) / 2), r[metric], r)
    ax.set_xticks(range(len(order)), order, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel(cfg.tune.metric)
    ax.grid(alpha=0.3)
    for g, name in enumerate(groups):
        ax.scatter([], [], color=f"C{g}", label=name)
    ax.legend(fontsize=7, title=", ".join(k.rsplit(".", 1)[-1] for k in categorical) or None, title_fontsize=7)
    for ax, key in zip(axes[0][1:], right):
        if plane:
            cells: dict[tuple, list[dict]] = {}  # repeats of a point (seeds) pooled: their mean and count
            for r in scored:
                if all(r.get(k) is not None for k in key):
                    cells.setdefault((r[key[0]], r[key[1]]), []).append(r)
            xy = list(cells)
            means = [sum(r[metric] for r in pooled(v)) / len(pooled(v)) for v in cells.values()]
            stopped = [all(r["status"] == "STOPPED" for r in v) for v in cells.values()]
            sc = ax.scatter([p[0] for p in xy], [p[1] for p in xy], c=means, s=90,
                            cmap="viridis_r" if sign > 0 else "viridis", edgecolors="k",
                            linewidths=[2.5 if s else 1 for s in stopped], linestyle=[":" if s else "-" for s in stopped])
            for p, mean, members, early in zip(xy, means, cells.values(), stopped):
                n = len(pooled(members))
                label = _short(mean) + (f" (mean of {n})" if n > 1 else "") + (" (stopped)" if early else "")
                ax.annotate(label, p, textcoords="offset points", xytext=(6, 4), fontsize=7)
            fig.colorbar(sc, ax=ax, label=cfg.tune.metric)
            ax.set_xlabel(key[0])
            ax.set_ylabel(key[1])
        else:
            for r in scored:
                if r.get(key) is not None:
                    dot(ax, r[key], r[metric], r)
            ax.set_xlabel(key)
            ax.set_ylabel(cfg.tune.metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{cfg.run.name}: {cfg.tune.metric} ({cfg.tune.mode}; hollow = stopped early)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run(cfg: JobConfig, source: str = "orchestration/tune.py") -> SweepResult:
    """Run (or restore, when a sweep of this name exists) the sweep of a prepared config."""
    from orchestration.tracking import open_run, source_tags

    path = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"
    parent = None
    if cfg.mlflow.enabled:
        params = {k: v for k, v in flat_params(cfg).items() if k.startswith("tune.") or k in ("recipe", "name")}
        parent = open_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.run.name, params, dump_config(cfg),
                          {**source_tags(source), "flowscale.sweep": "true"})
    driver.connect_ray()
    driver.stop_on_sigterm()  # `ray job stop` stops a submitted sweep as Ctrl-C does
    # Ctrl-C raises here rather than in Tune's handler, which ends the trials and returns their results as if
    # the sweep were over; the experiment state Tune saves as it goes is what a relaunch restores.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    tuner, restored = build_tuner(cfg, parent)
    print(f"sweep {cfg.run.name}: {'restored from' if restored else 'writing to'} {path}", flush=True)
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        grid = None
    rows, best, interrupted = summarize(cfg, grid) if grid is not None else ([], None, True)
    result = SweepResult(cfg, path, rows, best, interrupted, parent)
    if parent:
        record(cfg, result)
    return result


def record(cfg: JobConfig, result: SweepResult) -> None:
    """summary.csv, the plot, the best trial and its config on the parent run; end it."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from orchestration.tracking import end_run, find_run

    client, run_id = MlflowClient(cfg.mlflow.tracking_uri), result.mlflow_run_id
    client.log_text(run_id, summary_csv(result.rows), "summary.csv")
    with tempfile.TemporaryDirectory() as tmp:
        figure = plot(cfg, result.rows, Path(tmp) / "sweep.png")
        if figure:
            client.log_artifact(run_id, str(figure))
    if result.best:
        client.set_tag(run_id, "best_trial", result.best["trial"])
        client.set_tag(run_id, "best_run", result.best["run"])
        client.log_metric(run_id, f"best/{cfg.tune.metric}", result.best[f"final {cfg.tune.metric}"])
        best_run = find_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, result.best["run"])
        if best_run is not None:
            config = client.download_artifacts(best_run.info.run_id, "config.yaml", tempfile.mkdtemp())
            client.log_artifact(run_id, config, "best")
    if result.interrupted:  # the trials still running were stopped with the sweep
        experiment = client.get_run(run_id).info.experiment_id
        for child in client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}' "
                                        "and attributes.status = 'RUNNING'"):
            end_run(cfg.mlflow.tracking_uri, child.info.run_id, "KILLED", "the sweep was interrupted")
    end_run(cfg.mlflow.tracking_uri, run_id, "KILLED" if result.interrupted else "FINISHED",
            "interrupted (Ctrl-C or ray job stop)" if result.interrupted else None)


INPUT_ERRORS = driver.INPUT_ERRORS


def prepare(cfg: JobConfig) -> JobConfig:
    """The sweep's config errors (its space), then the job's own checks, all before Ray starts."""
    check_space(cfg)
    return driver.prepare(cfg)


def summary(result: SweepResult) -> str:
    cfg, t = result.cfg, result.cfg.tune
    counts = {s: sum(r["status"] == s for r in result.rows) for s in ("FINISHED", "STOPPED", "FAILED")}
    lines = [f"sweep        {result.path}",
             f"trials       {len(result.rows)}: {counts['FINISHED']} finished, {counts['STOPPED']} stopped early, "
             f"{counts['FAILED']} failed"]
    if result.best:
        best = {k: v for k, v in result.best.items() if "." in k and not k.startswith(("final ", "best "))}
        lines.append(f"best         {result.best['run']}: {t.metric} = {result.best[f'final {t.metric}']:.4g}")
        lines += [f"             {k}={v}" for k, v in best.items()]
    lines.append(f"TensorBoard  tensorboard --logdir {result.path}")
    if result.mlflow_run_id:
        uri = redact_url(cfg.mlflow.tracking_uri)
        lines.append(f"MLflow       {uri} (experiment {cfg.mlflow.experiment}, parent run {result.mlflow_run_id})")
        lines += driver.mlflow_hint(cfg, result.mlflow_run_id)
    return "\n".join(lines)
