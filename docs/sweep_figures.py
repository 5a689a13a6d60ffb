"""The tables and plots of docs/SWEEPS.md from sweeps' summary.csv files (each sweep's parent MLflow run holds
one; `mlflow artifacts download -r PARENT_RUN_ID -a summary.csv`).

    python docs/sweep_figures.py --preset tune-timesteps-seeds-demo --out docs/images/sweep-timesteps.png \\
        default.csv seeds.csv

Rows of several sweeps are pooled by configuration (a sweep that did not search train.seed ran the preset's
seed); a trial stopped early by ASHA counts in the plot (hollow) but not in the mean of a configuration, and a
configuration trained twice under one seed (a searcher repeating a point: the same run) counts once.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra.config import load_config  # noqa: E402
from orchestration.sweep import plot  # noqa: E402

FIXED = ("trial", "run", "status")


def value(text: str):
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read(path: Path, seed: int) -> list[dict]:
    rows = []
    for raw in csv.DictReader(path.open()):
        row = {k: v if k in FIXED else value(v) for k, v in raw.items()}
        for k in row:
            if k.startswith(("final ", "best ")):
                row[k] = math.nan if row[k] is None else float(row[k])
        row.setdefault("train.seed", seed)
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summaries", nargs="+", type=Path)
    parser.add_argument("--preset", required=True, help="the sweep preset (its metric, mode and seed)")
    parser.add_argument("--out", type=Path, required=True, help="the plot (PNG)")
    args = parser.parse_args()
    cfg = load_config(args.preset, [f"run.name={args.out.stem}"])
    rows = [r for path in args.summaries for r in read(path, cfg.train.seed)]
    metric = f"final {cfg.tune.metric}"
    keys = sorted({k for r in rows for k in r if "." in k and not k.startswith(("final ", "best ")) and k != "train.seed"})
    configs: dict[tuple, list[dict]] = {}
    for r in rows:
        configs.setdefault(tuple((k, r.get(k)) for k in keys if r.get(k) is not None), []).append(r)
    sign = 1 if cfg.tune.mode == "min" else -1
    table = []
    for config, members in configs.items():
        # A configuration trained twice with one seed (a searcher repeating a point) is the same run: once.
        done = list({r["train.seed"]: r for r in reversed(members) if r["status"] == "FINISHED"}.values())
        values = [r[metric] for r in done]
        table.append((statistics.mean(values) if values else math.nan, config, done, members))
    table.sort(key=lambda t: (math.isnan(t[0]), sign * t[0]))
    print(f"| configuration | {cfg.tune.metric} per seed (finished) | mean | sd | stopped early |")
    print("| --- | --- | --- | --- | --- |")
    for mean, config, done, members in table:
        label = " ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                         for k, v in config)
        per_seed = ", ".join(f"{r[metric]:.2f} (seed {r['train.seed']})" for r in sorted(done, key=lambda r: r["train.seed"]))
        sd = f"{statistics.stdev(r[metric] for r in done):.2f}" if len(done) > 1 else "-"
        stopped = ", ".join(f"{r[metric]:.2f} at step {r['steps']} (seed {r['train.seed']})"
                            for r in members if r["status"] == "STOPPED") or "-"
        print(f"| {label} | {per_seed or '-'} | {mean:.2f} | {sd} | {stopped} |")
    print(plot(cfg, rows, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
