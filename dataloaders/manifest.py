"""The manifest: the one JSON object that makes a set of shards a dataset.

It is written last, in a single put (or a rename on local disk), so a dataset whose writer died half-way
has no manifest and cannot be opened. It records the format version, the columns (dtype, shape), every
shard (relative path, rows, bytes, checksum), the encoder that produced the text columns, the stored
encoding of the empty caption and, since issue 14, the record-batch index (``shards/index.py``; optional,
so that datasets written before it still read). Its sha256 fingerprints the dataset in a loader's resume
state.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

from dataloaders.columns import ColumnSpec
from dataloaders.errors import ManifestError

# Shard checksums. CRC32 (zlib, ~4.5 GB/s per core, GIL released) catches truncation and bit rot at a
# quarter of sha256's cost, which at 1 GB/s of shards per worker is the difference between hashing being
# free and hashing being the bottleneck; sha256 stays readable for datasets that want a cryptographic one.
CHECKSUMS = {
    "crc32": lambda data: f"{zlib.crc32(data):08x}",
    "sha256": lambda data: hashlib.sha256(data).hexdigest(),
}
DEFAULT_CHECKSUM = "crc32"

FORMAT = "flowscale-arrow-shards"
VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset root
    rows: int
    bytes: int
    checksum: str  # "<algorithm>:<hex digest>", see CHECKSUMS


@dataclass
class Manifest:
    columns: list[ColumnSpec]
    shards: list[ShardInfo]
    text_encoder: dict[str, Any] = field(default_factory=dict)
    empty_condition: ShardInfo | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    url: str = ""  # where it was read from (not stored)
    fingerprint: str = ""  # sha256 of the stored text (not stored)
    record_batch_index: ShardInfo | None = None  # rows = the number of record batches it lists

    @property
    def num_samples(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def root(self) -> str:
        return manifest_root(self.url)

    def column(self, name: str) -> ColumnSpec:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"dataset {self.url} has no column '{name}'; columns: {[c.name for c in self.columns]}")

    def to_json(self) -> str:
        def shard(s: ShardInfo) -> dict:
            return {"path": s.path, "rows": s.rows, "bytes": s.bytes, "checksum": s.checksum}

        doc = {
            "format": FORMAT,
            "version": VERSION,
            "num_samples": self.num_samples,
            "columns": [c.to_json() for c in self.columns],
            "shards": [shard(s) for s in self.shards],
            "text_encoder": self.text_encoder,
            "empty_condition": shard(self.empty_condition) if self.empty_condition else None,
            "extra": self.extra,
        }
        if self.record_batch_index is not None:
            doc["record_batch_index"] = shard(self.record_batch_index)
        return json.dumps(doc, indent=1)


def manifest_url(url: str) -> str:
    """A dataset URL (its root folder or its manifest) as the manifest's URL."""
    url = url.rstrip("/")
    return url if url.endswith(".json") else f"{url}/{MANIFEST_NAME}"


def manifest_root(url: str) -> str:
    return manifest_url(url).rsplit("/", 1)[0]


def parse_manifest(text: str | bytes, url: str) -> Manifest:
    """Validate and parse a manifest's text; every problem is a ManifestError naming the URL and key."""
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"manifest {url} is not valid JSON ({e}); was it written by dataloaders.writer?") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ManifestError(f"manifest {url} is not a {FORMAT} manifest (key 'format' is {doc.get('format')!r})"
                            if isinstance(doc, dict) else f"manifest {url} must be a JSON object")
    if doc.get("version") != VERSION:
        raise ManifestError(f"manifest {url} has format version {doc.get('version')!r}; this reader reads {VERSION}")
    try:
        columns = [ColumnSpec.from_json(c) for c in doc["columns"]]
        shards = [_shard(s, url) for s in doc["shards"]]
        empty = doc.get("empty_condition")
        empty_info = _shard(empty, url) if empty else None
        index = doc.get("record_batch_index")
        index_info = _shard(index, url) if index else None
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"manifest {url} is malformed: missing or bad key {e}") from None
    names = [c.name for c in columns]
    if "sample_id" not in names:
        raise ManifestError(f"manifest {url} declares no 'sample_id' column (columns: {names})")
    if not shards:
        raise ManifestError(f"manifest {url} lists no shards")
    if sum(s.rows for s in shards) != doc.get("num_samples"):
        raise ManifestError(f"manifest {url}: num_samples={doc.get('num_samples')} but the shards hold "
                            f"{sum(s.rows for s in shards)} rows")
    fingerprint = hashlib.sha256(text if isinstance(text, bytes) else text.encode()).hexdigest()
    return Manifest(columns, shards, doc.get("text_encoder") or {}, empty_info, doc.get("extra") or {}, url, fingerprint,
                    index_info)


def checksum(data: bytes, algorithm: str = DEFAULT_CHECKSUM) -> str:
    return f"{algorithm}:{CHECKSUMS[algorithm](data)}"


def checksum_matches(data: bytes, expected: str) -> bool:
    algorithm = expected.split(":", 1)[0]
    return checksum(data, algorithm) == expected


def _shard(d: dict, url: str) -> ShardInfo:
    if "checksum" not in d and "sha256" in d:  # manifests written before "checksum" held "<algorithm>:<hex>"
        d = {**d, "checksum": f"sha256:{d['sha256']}"}
    info = ShardInfo(d["path"], int(d["rows"]), int(d["bytes"]), str(d["checksum"]))
    if info.checksum.split(":", 1)[0] not in CHECKSUMS:
        raise ManifestError(f"manifest {url}: shard {info.path} has checksum {info.checksum!r}; known algorithms: "
                            f"{sorted(CHECKSUMS)}")
    return info
