"""Streaming Arrow shards from object storage: writer, manifest, loader with exact and elastic resume.

Public API:
- ``DatasetWriter`` (write shards + manifest to any fsspec URL), ``python -m dataloaders.prepare``.
- ``open_dataset(url)`` -> ``StreamingDataset``; ``.loader(...)`` -> ``StreamingLoader``.
- ``build_loader(cfg, rank=, world_size=, global_batch_size=, seed=)``: the trainer's entry point.
- ``empty_condition(url_or_dataset)``, ``load_text_encoder(url)``, ``DemoTextEncoder``.

The names are imported on first use, so that a submodule (a loader worker's ``dataloaders.plan``) can be
imported without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ReadOptions": "dataloaders.dataset", "StreamingDataset": "dataloaders.dataset",
    "StreamingLoader": "dataloaders.dataset", "build_loader": "dataloaders.dataset",
    "empty_condition": "dataloaders.dataset", "open_dataset": "dataloaders.dataset",
    "CorruptShardError": "dataloaders.errors", "DataError": "dataloaders.errors",
    "ManifestError": "dataloaders.errors", "SchemaMismatchError": "dataloaders.errors",
    "StorageAccessError": "dataloaders.errors",
    "DemoTextEncoder": "dataloaders.text_encoders", "load_text_encoder": "dataloaders.text_encoders",
    "DatasetWriter": "dataloaders.writer",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from dataloaders.dataset import (ReadOptions, StreamingDataset, StreamingLoader, build_loader,  # noqa: F401
                                     empty_condition, open_dataset)
    from dataloaders.errors import (CorruptShardError, DataError, ManifestError,  # noqa: F401
                                    SchemaMismatchError, StorageAccessError)
    from dataloaders.text_encoders import DemoTextEncoder, load_text_encoder  # noqa: F401
    from dataloaders.writer import DatasetWriter  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dataloaders' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
