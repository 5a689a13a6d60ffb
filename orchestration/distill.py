"""Distil a pretrained MM-DiT into a 1- and 2-step generator with sCD (or consistency-train it: sCT).

    python orchestration/distill.py                               # embedded default: the latest demo teacher
    python orchestration/distill.py --teacher ~/flowscale/runs/RUN/checkpoint_00000800 [--config PRESET] \\
        distill.tangent_warmup_steps=1000 cluster.num_workers=8 cluster.use_gpu=true

The same Ray Train job as pretraining (checkpoints, failure recovery, resume by run name, MLflow), with
the sCD recipe. The student takes the teacher's architecture and starts from its EMA weights; the teacher
checkpoint can be a local directory or any fsspec URL (each node's workers fetch it once into
FLOWSCALE_HOME/teachers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
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


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser().resolve()


def local_teacher(uri: str, cache: Path) -> Path:
    """A local copy of the teacher checkpoint, fetched once per URI and node (each worker calls this; the
    workers of one node share the copy).

    The copy is made in a scratch directory and renamed into place, so an interrupted download is never
    taken for a checkpoint. Credentials and endpoints come from the environment, as for the data.
    """
    if not is_remote(uri):
        return local_path(uri)
    import fsspec

    target = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (target / checkpoint.COMPLETE).exists():
        return target
    fs, path = fsspec.core.url_to_fs(uri)
    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=cache))
    try:
        fs.get(path.rstrip("/") + "/", str(scratch), recursive=True)
        scratch.rename(target)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
        if not (target / checkpoint.COMPLETE).exists():  # not just another worker finishing first
            raise
    return target


def teacher_model(uri: str) -> dict:
    """The ``model`` section the teacher was trained with (empty if it saved no config), after checking that
    the checkpoint at ``uri`` (a directory or any fsspec URL) is complete. Reads two small files, never the
    weights: a remote teacher is fetched by the workers, on their own nodes."""
    if not is_remote(uri):
        saved = checkpoint.check_complete(local_path(uri)) / "config.yaml"
        text = saved.read_text() if saved.exists() else ""
    else:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        path = path.rstrip("/")
        if not fs.exists(f"{path}/{checkpoint.COMPLETE}"):
            raise checkpoint.CheckpointError(
                f"teacher checkpoint {uri} does not exist or is incomplete (no {checkpoint.COMPLETE} in it)"
            )
        text = fs.cat_file(f"{path}/config.yaml").decode() if fs.exists(f"{path}/config.yaml") else ""
    return (yaml.safe_load(text) or {}).get("model", {})


def with_teacher(cfg: JobConfig, teacher: str | None, home: Path) -> JobConfig:
    """Fill ``distill.teacher`` (argument, config, or the newest demo pretraining checkpoint) and give the
    student the teacher's architecture. A local teacher is recorded as an absolute path, a remote one as its
    URL (the workers fetch it)."""
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
    model = teacher_model(uri)
    cfg = cfg.model_copy(deep=True)
    cfg.distill.teacher = uri if is_remote(uri) else str(local_path(uri))
    if model:
        cfg.model = ModelConfig.model_validate({**model, "guidance_embed": cfg.model.guidance_embed})
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
