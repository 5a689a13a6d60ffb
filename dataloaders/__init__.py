"""Streaming Arrow shards from object storage: writer, manifest, loader with exact and elastic resume.

Public API:
- ``DatasetWriter`` (write shards + manifest to any fsspec URL), ``python -m dataloaders.prepare``.
- ``open_dataset(url)`` -> ``StreamingDataset``; ``.loader(...)`` -> ``StreamingLoader``.
- ``build_loader(cfg, rank=, world_size=, global_batch_size=, seed=)``: the trainer's entry point.
- ``empty_condition(url_or_dataset)``, ``load_text_encoder(url)``, ``DemoTextEncoder``.
"""

from dataloaders.dataset import (
    ReadOptions,
    StreamingDataset,
    StreamingLoader,
    build_loader,
    empty_condition,
    open_dataset,
)
from dataloaders.errors import (
    CorruptShardError,
    DataError,
    ManifestError,
    SchemaMismatchError,
    StorageAccessError,
)
from dataloaders.text_encoders import DemoTextEncoder, load_text_encoder
from dataloaders.writer import DatasetWriter

__all__ = [
    "CorruptShardError", "DataError", "DatasetWriter", "DemoTextEncoder", "ManifestError", "ReadOptions",
    "SchemaMismatchError", "StorageAccessError", "StreamingDataset", "StreamingLoader", "build_loader",
    "empty_condition", "load_text_encoder", "open_dataset",
]
