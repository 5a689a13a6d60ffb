"""Pretrain an MM-DiT with rectified flow on Ray Train + FSDP2.

    python orchestration/pretrain.py                         # embedded default: digits demo, 2 CPU workers
    python orchestration/pretrain.py --config mmdit-2b data.url=s3://bucket/ds cluster.num_workers=64 \\
        cluster.use_gpu=true run.storage_path=s3://bucket/runs
    ray job submit --working-dir . -- python orchestration/pretrain.py --config demo

The config is validated, the dataset opened and the storage path probed before any Ray resource is
taken. Relaunching with ``run.name=NAME`` resumes that run from its last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra.config import ConfigError, dump_config, flat_params, load_config  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="demo", help="preset name (configs/NAME.yaml) or YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 run.name=my-run")
    parser.add_argument("--dump-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def connect_ray():
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # A local cluster binds to loopback only; a given address (or `ray job submit`) joins that cluster.
        ray.init(address=address, **({} if address else {"_node_ip_address": "127.0.0.1"}),
                 log_to_driver=True, configure_logging=False)


def final_grid(cfg, result_checkpoint_path: str, run_dir: str) -> str | None:
    from orchestration.images import make_grid, save_png
    from orchestration.sample import sample_checkpoint

    if not cfg.sample.prompts:
        return None
    uri = result_checkpoint_path
    if cfg.run.storage_path.startswith("s3://") and "://" not in uri:
        uri = "s3://" + uri
    images, _ = sample_checkpoint(uri, cfg.sample.prompts, cfg.sample.num_per_prompt, cfg.sample.steps,
                                  cfg.sample.cfg, cfg.train.seed, device="cpu")
    out = Path(run_dir) / "samples.png" if "://" not in run_dir else Path.cwd() / f"{cfg.run.name}-samples.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(make_grid(images, nrow=cfg.sample.num_per_prompt, scale=max(1, 64 // images.shape[-1])), out)
    return str(out)


def main(argv: list[str] | None = None) -> int:
    from dataloaders.errors import DataError
    from orchestration import job

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = job.resolve(load_config(args.config, args.overrides))
        if args.dump_config:
            print(dump_config(cfg))
            return 0
        job.preflight(cfg)
    except (ConfigError, DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    run_dir = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"
    print(f"run {cfg.run.name}: {cfg.cluster.num_workers} {'GPU' if cfg.cluster.use_gpu else 'CPU'} workers, "
          f"{cfg.train.steps} steps, data {cfg.data.url}, storage {run_dir}", flush=True)
    run_id = None
    if cfg.mlflow.enabled:
        from orchestration.tracking import open_run

        try:
            run_id = open_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.run.name,
                              flat_params(cfg), dump_config(cfg))
        except Exception as e:  # tracking must never stop a job
            print(f"warning: MLflow at {cfg.mlflow.tracking_uri} is unavailable ({e}); training without it",
                  file=sys.stderr)
    connect_ray()
    result = job.launch(cfg, run_id)
    if result.error is not None:
        print(f"error: run {cfg.run.name} failed: {result.error}", file=sys.stderr)
        return 1
    grid = final_grid(cfg, result.checkpoint.path, run_dir) if result.checkpoint else None
    if grid and run_id:
        from orchestration.tracking import Tracker

        tracker = Tracker(cfg.mlflow.tracking_uri, run_id, system_metrics=False)
        tracker._submit(lambda: tracker._client().log_artifact(run_id, grid))
        tracker.close()
    print(f"\nrun          {run_dir}")
    print(f"checkpoint   {result.checkpoint.path if result.checkpoint else '-'}")
    if grid:
        print(f"sample grid  {grid}")
    if run_id:
        print(f"MLflow       {cfg.mlflow.tracking_uri} (experiment {cfg.mlflow.experiment}, run {run_id})")
        print(f"open it with: mlflow ui --backend-store-uri {cfg.mlflow.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
