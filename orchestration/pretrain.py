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
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra.config import load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from orchestration import job

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="demo", help="preset name (configs/NAME.yaml) or YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 run.name=my-run")
    parser.add_argument("--dump-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.dump_config:
        return job.print_config(args.config, args.overrides)
    return job.run_job(lambda: load_config(args.config, args.overrides), recipe="rectified_flow")


if __name__ == "__main__":
    sys.exit(main())
