"""The errors a dataset can raise: each names the URL, the shard and, where it applies, the column."""

from __future__ import annotations


class DataError(RuntimeError):
    """A dataset that cannot be read as asked; the message says where and what to do."""


class ManifestError(DataError):
    """The manifest is missing, not JSON, of an unknown format version, or inconsistent."""


class SchemaMismatchError(DataError):
    """A shard's columns, dtypes or shapes differ from those the manifest declares."""


class CorruptShardError(DataError):
    """A shard whose bytes do not match the manifest (size or checksum) or that Arrow cannot parse."""


class StorageAccessError(DataError):
    """An object that is missing, or that the credentials may not read, or that kept failing after retries."""
