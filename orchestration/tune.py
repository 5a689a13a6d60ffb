"""Search a job's hyper-parameters with Ray Tune: each trial is the ordinary job with sampled values.

    python orchestration/tune.py                                   # embedded default: the digits demo's samplers
    python orchestration/tune.py --config tune-warmup-demo         # sCD tangent warmup, on the newest demo teacher
    python orchestration/tune.py --config tune-timesteps-2b data.url=s3://bucket/ds run.storage_path=s3://b/runs
    ray job submit --working-dir . -- python orchestration/tune.py --config tune-timesteps-demo

A sweep preset is a job preset (``base: demo.yaml``) with a ``tune`` section: the metric, the space (dotted
config keys), the search, the scheduler, the number of trials. Relaunching with ``run.name=SWEEP`` restores
the sweep: finished trials are kept, interrupted ones resume from their checkpoints.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestration import cli, sweep  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, doc=__doc__, script=__file__, preset="tune-timesteps-demo", runner=sweep)


if __name__ == "__main__":
    sys.exit(main())
