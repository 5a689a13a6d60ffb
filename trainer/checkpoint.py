"""Sharded checkpoints of the whole training state with torch.distributed.checkpoint (DCP).

Every rank writes its own shard files into one directory (``__{rank}_0.distcp``; rank 0 adds
``.metadata``), so a launcher can upload or merge them as they are. Only tensors go through DCP (no
pickled objects): model, AdamW moments, EMA, step counters. The LR schedule is a pure function of the
step and is re-derived. The loader's position (plain JSON) and the resolved config sit beside the shards.
``COMPLETE`` is written last: a directory without it was interrupted and is never loaded. DCP reshards on
load, so a checkpoint written by N ranks loads on M. DCP's own ``.metadata`` is a pickle; it is only ever
read through an allow-list unpickler, so loading a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from torch.distributed.tensor import DTensor

from trainer.models.mmdit import canonical_name
from trainer.parallelize import world

COMPLETE = "COMPLETE"  # written last: its presence marks a whole checkpoint
META = "flowscale.json"  # step, world size, recipe, training seconds
LOADER = "loader.json"  # the data loader's position
CONFIG = "config.yaml"  # the run's resolved config


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used, with the path and what is missing."""


class _MetadataUnpickler(pickle.Unpickler):
    """DCP writes its ``.metadata`` with pickle, and its reader unpickles whatever is there. This one resolves
    only what that file is made of (DCP's metadata classes, torch.Size, dtypes, layouts, paths), so loading a
    checkpoint from any storage cannot run code."""

    DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                   "torch.distributed.checkpoint.planner")
    ALLOWED = {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
               ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        if module in self.DCP_MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        elif (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"checkpoint metadata refers to {module}.{name}, which no checkpoint holds; refusing to load it"
        )


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the metadata read through ``_MetadataUnpickler`` (tensors are already read
    with ``weights_only=True``)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"checkpoint {self.path}: {e}") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _optimizer_tensors(trainer) -> tuple[dict[str, torch.Tensor], list]:
    """AdamW state keyed by parameter name (initialised if the optimizer has not stepped yet)."""
    osd = get_optimizer_state_dict(trainer.model, trainer.optimizer)
    flat = {f"{fqn}/{key}": value for fqn, state in osd["state"].items() for key, value in state.items()}
    return flat, osd["param_groups"]


def _tensor_state(trainer) -> dict[str, Any]:
    optim, _ = _optimizer_tensors(trainer)
    return {
        "model": get_model_state_dict(trainer.model),
        "optimizer": optim,
        "ema": trainer.ema.state_dict(),
        "progress": {
            "step": torch.tensor(trainer.step),
            "nonfinite_total": torch.tensor(trainer.nonfinite_total),
            "train_seconds": torch.tensor(trainer.train_seconds, dtype=torch.float64),
        },
    }


def save(trainer, directory: str | Path, loader_state: dict | None = None, config_yaml: str | None = None) -> Path:
    """Write the trainer's state into ``directory`` (every rank calls this with the same path)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dcp.save(_tensor_state(trainer), checkpoint_id=str(directory))
    rank, world_size = world()
    if rank == 0:
        if loader_state is not None:
            (directory / LOADER).write_text(json.dumps(loader_state))
        if config_yaml is not None:
            (directory / CONFIG).write_text(config_yaml)
        meta = {"step": trainer.step, "world_size": world_size, "recipe": trainer.recipe.name,
                "train_seconds": trainer.train_seconds}
        (directory / META).write_text(json.dumps(meta))
        (directory / COMPLETE).write_text("")
    return directory


def check_complete(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    missing = [name for name in (COMPLETE, META, ".metadata") if not (directory / name).exists()]
    if missing:
        raise CheckpointError(
            f"checkpoint {directory} is incomplete (missing {', '.join(missing)}): it was interrupted while "
            f"being written; use an earlier checkpoint"
        )
    SafeFileSystemReader(str(directory)).read_metadata()  # refuses metadata that would run code
    return directory


def load(trainer, directory: str | Path) -> dict | None:
    """Restore the trainer in place (resharding as needed); returns the loader state, if saved."""
    directory = check_complete(directory)
    state = _tensor_state(trainer)
    dcp.load(state, storage_reader=SafeFileSystemReader(str(directory)))
    trainer.model.load_state_dict(state["model"])
    _, groups = _optimizer_tensors(trainer)
    nested: dict[str, dict] = {}
    for key, value in state["optimizer"].items():
        fqn, name = key.rsplit("/", 1)
        nested.setdefault(fqn, {})[name] = value
    set_optimizer_state_dict(trainer.model, trainer.optimizer, {"state": nested, "param_groups": groups})
    trainer.ema.load_state_dict(state["ema"])
    trainer.nonfinite_total = int(state["progress"]["nonfinite_total"])
    trainer.train_seconds = float(state["progress"]["train_seconds"])
    trainer.set_step(int(state["progress"]["step"]))
    loader = directory / LOADER
    return json.loads(loader.read_text()) if loader.exists() else None


def load_weights(model: torch.nn.Module, directory: str | Path, ema: bool = True) -> dict:
    """Load a checkpoint's EMA (default) or raw weights into a model, unsharded or sharded by FSDP2.

    An unsharded model loads in one process without collectives (sampling, a rank-0 evaluation); a model
    with DTensor parameters loads with a distributed ``dcp.load`` that every rank must call, each rank
    reading only its own shards (the sharded sCD teacher). Parameters are matched by canonical name, so a
    checkpoint written with activation checkpointing or compile wrappers loads into a bare model.
    Returns the checkpoint's metadata.
    """
    directory = check_complete(directory)
    prefix = "ema.shadow." if ema else "model."
    stored = {
        prefix + canonical_name(key[len(prefix):]): key
        for key in SafeFileSystemReader(str(directory)).read_metadata().state_dict_metadata
        if key.startswith(prefix)
    }
    params = dict(model.named_parameters())
    keys = {}
    for n in params:
        wanted = prefix + canonical_name(n)
        if wanted not in stored:
            raise CheckpointError(
                f"checkpoint {directory} has no weight '{wanted}': it was written for another model; compare "
                f"its config.yaml with this job's model.* settings"
            )
        keys[n] = stored[wanted]
    target = {keys[n]: torch.empty_like(p, dtype=torch.float32) for n, p in params.items()}
    sharded = any(isinstance(p, DTensor) for p in params.values())
    dcp.load(target, storage_reader=SafeFileSystemReader(str(directory)), no_dist=not sharded)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(target[keys[n]].to(p.dtype))
    return json.loads((directory / META).read_text())


# --------------------------------------------------------------------------------------------------
# Checkpoints on storage: a local directory or any fsspec URL (s3://...)
# --------------------------------------------------------------------------------------------------


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser().resolve()


def read_config(uri: str) -> dict:
    """The resolved config a complete checkpoint was saved with, as a plain dict (empty if it saved none).
    Reads two small files, never the weights, wherever the checkpoint lives."""
    import yaml

    if not is_remote(uri):
        saved = check_complete(local_path(uri)) / CONFIG
        text = saved.read_text() if saved.exists() else ""
    else:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        path = path.rstrip("/")
        if not fs.exists(f"{path}/{COMPLETE}"):
            raise CheckpointError(f"checkpoint {uri} does not exist or is incomplete (no {COMPLETE} in it)")
        text = fs.cat_file(f"{path}/{CONFIG}").decode() if fs.exists(f"{path}/{CONFIG}") else ""
    return yaml.safe_load(text) or {}


def fetch(uri: str, cache_dir: str | Path) -> Path:
    """A local directory holding the checkpoint at ``uri``: the directory itself when local; otherwise a copy
    under ``cache_dir``, downloaded once per URI and machine. Every process of a node may call this at once:
    each downloads into its own scratch directory and renames it into place, so an interrupted download is
    never taken for a checkpoint and the first finished copy wins. Credentials and endpoints come from the
    environment, as for the data."""
    if not is_remote(uri):
        return local_path(uri)
    import fsspec

    cache = Path(cache_dir).expanduser()
    target = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (target / COMPLETE).exists():
        return target
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(f"{path.rstrip('/')}/{COMPLETE}"):
        raise CheckpointError(f"checkpoint {uri} does not exist or is incomplete (no {COMPLETE} in it)")
    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=cache))
    try:
        fs.get(path.rstrip("/") + "/", str(scratch), recursive=True)
        scratch.rename(target)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
        if not (target / COMPLETE).exists():  # not just another process finishing first
            raise
    return target


def latest(runs_dir: str | Path, recipe: str) -> Path | None:
    """The newest complete checkpoint of ``recipe`` under ``runs_dir/*/``."""
    found = []
    for meta in Path(runs_dir).expanduser().glob(f"*/checkpoint_*/{META}"):
        directory = meta.parent
        if (directory / COMPLETE).exists() and json.loads(meta.read_text()).get("recipe") == recipe:
            found.append((meta.stat().st_mtime, directory))
    return max(found)[1] if found else None


def recipe_of(directory: str | Path) -> str:
    """The name of the recipe that wrote the complete checkpoint in ``directory``."""
    return json.loads((check_complete(directory) / META).read_text())["recipe"]
