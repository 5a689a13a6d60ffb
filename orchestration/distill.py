"""Distil a pretrained MM-DiT into a 1- and 2-step generator with sCD (or consistency-train it: sCT).

    python orchestration/distill.py                               # embedded default: the latest demo teacher
    python orchestration/distill.py --teacher ~/flowscale/runs/RUN/checkpoint_00000800 [--config PRESET] \\
        distill.tangent_warmup_steps=1000 cluster.num_workers=8 cluster.use_gpu=true

The same Ray Train job as pretraining (checkpoints, failure recovery, resume by run name, MLflow), with
the sCD recipe. The student takes the teacher's architecture and starts from its EMA weights; the teacher
checkpoint can be a local directory or any fsspec URL (copied to a local cache once).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from infra.config import ConfigError, JobConfig, ModelConfig, load_config  # noqa: E402
from trainer import checkpoint  # noqa: E402


def latest_pretraining_checkpoint(runs: Path) -> Path | None:
    """The newest complete rectified-flow checkpoint under ``runs/*/``."""
    found = []
    for meta in runs.glob("*/checkpoint_*/" + checkpoint.META):
        directory = meta.parent
        if (directory / checkpoint.COMPLETE).exists() and json.loads(meta.read_text()).get("recipe") == "rectified_flow":
            found.append((meta.stat().st_mtime, directory))
    return max(found)[1] if found else None


def local_teacher(uri: str, cache: Path) -> Path:
    """A local copy of the teacher checkpoint (every worker on this node reads it)."""
    if "://" not in uri or uri.startswith("file://"):
        return Path(uri.removeprefix("file://")).expanduser().resolve()
    import fsspec

    target = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (target / checkpoint.COMPLETE).exists():
        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.exists(path):
            raise checkpoint.CheckpointError(f"teacher checkpoint {uri} does not exist")
        fs.get(path.rstrip("/") + "/", str(target), recursive=True)
    return target


def with_teacher(cfg: JobConfig, teacher: str | None, home: Path) -> JobConfig:
    """Fill ``distill.teacher`` (argument, config, or the newest demo pretraining checkpoint) and give the
    student the teacher's architecture."""
    uri = teacher or cfg.distill.teacher
    if not uri and cfg.distill.mode == "scd":
        found = latest_pretraining_checkpoint(home / "runs")
        if found is None:
            raise ConfigError(
                f"no teacher: pass --teacher CHECKPOINT, or first pretrain one with "
                f"`python orchestration/pretrain.py` (it writes {home / 'runs'}/RUN/checkpoint_STEP)"
            )
        uri = str(found)
    if not uri:
        return cfg
    path = local_teacher(uri, home / "teachers")
    directory = checkpoint.check_complete(path)
    saved = directory / "config.yaml"
    cfg = cfg.model_copy(deep=True)
    cfg.distill.teacher = str(directory)
    if saved.exists():
        teacher_model = (yaml.safe_load(saved.read_text()) or {}).get("model", {})
        cfg.model = ModelConfig.model_validate({**teacher_model, "guidance_embed": cfg.model.guidance_embed})
    return cfg


def main(argv: list[str] | None = None) -> int:
    from orchestration import job

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=None, help="pretraining checkpoint (directory or URL)")
    parser.add_argument("--config", default="distill-demo", help="preset name (configs/NAME.yaml) or YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.tangent_warmup_steps=500")
    parser.add_argument("--dump-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.dump_config:
        return job.print_config(args.config, args.overrides)
    return job.run_job(lambda: load_config(args.config, args.overrides), recipe="scd",
                       prepare=lambda cfg: with_teacher(cfg, args.teacher, job.HOME))


if __name__ == "__main__":
    sys.exit(main())
