"""Distil a pretrained MM-DiT into a 1- and 2-step generator with sCD (or consistency-train it: sCT).

    python orchestration/distill.py                               # embedded default: the latest demo teacher
    python orchestration/distill.py --teacher ~/flowscale/runs/RUN/checkpoint_00000800 [--config PRESET] \\
        distill.tangent_warmup_steps=1000 cluster.num_workers=8 cluster.use_gpu=true

The same Ray Train job as pretraining (checkpoints, failure recovery, resume by run name, MLflow), with
the sCD recipe. The student takes the teacher's architecture and starts from its EMA weights; the teacher
checkpoint can be a local directory or any fsspec URL (each node's workers fetch it once into run.cache_dir).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestration import cli  # noqa: E402

TEACHER = ("distill.teacher", "pretraining checkpoint: a directory or URL; default the newest local one")


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, doc=__doc__, script=__file__, recipe="scd", preset="distill-demo",
                    flags={"--teacher": TEACHER})


if __name__ == "__main__":
    sys.exit(main())
