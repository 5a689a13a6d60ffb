"""Pretrain an MM-DiT with rectified flow on Ray Train + FSDP2.

    python orchestration/pretrain.py                         # embedded default: digits demo, 2 CPU workers
    python orchestration/pretrain.py --config mmdit-2b data.url=s3://bucket/ds cluster.num_workers=64 \\
        cluster.use_gpu=true run.storage_path=s3://bucket/runs
    ray job submit --working-dir . -- python orchestration/pretrain.py --config demo

The config is validated, the dataset opened and the storage path probed before any Ray resource is
taken. Relaunching with ``run.name=NAME`` resumes that run from its last checkpoint.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestration import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, doc=__doc__, script=__file__, recipe="rectified_flow", preset="demo")


if __name__ == "__main__":
    sys.exit(main())
