"""How a column of samples is laid out in Arrow, and back.

A tensor column of per-sample shape S and dtype D is a ``fixed_size_list<V>[prod(S)]`` whose flat values
are the row-major tensor bytes; D and S travel in the field metadata (and in the manifest). Arrow has no
bfloat16, so bf16 is stored as its raw 16 bits in ``uint16`` and viewed back as bf16 on read: no pickle,
no conversion, and a reader gets zero-copy numpy views of a shard's buffer. Scalar columns (``sample_id``,
labels) are plain Arrow integers/floats; text columns are Arrow strings.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import torch

# dtype name (also torch's) -> (numpy storage dtype, Arrow storage type). torch is imported only where a
# tensor is made: loader worker processes read shards without it.
_DTYPES: dict[str, tuple[np.dtype, pa.DataType]] = {
    "float64": (np.dtype(np.float64), pa.float64()),
    "float32": (np.dtype(np.float32), pa.float32()),
    "float16": (np.dtype(np.float16), pa.float16()),
    "bfloat16": (np.dtype(np.uint16), pa.uint16()),
    "int64": (np.dtype(np.int64), pa.int64()),
    "int32": (np.dtype(np.int32), pa.int32()),
    "int16": (np.dtype(np.int16), pa.int16()),
    "int8": (np.dtype(np.int8), pa.int8()),
    "uint8": (np.dtype(np.uint8), pa.uint8()),
    "bool": (np.dtype(np.uint8), pa.uint8()),
}
_NUMPY_NAMES = {np.dtype(np.float64): "float64", np.dtype(np.float32): "float32",
                np.dtype(np.float16): "float16", np.dtype(np.int64): "int64", np.dtype(np.int32): "int32",
                np.dtype(np.int16): "int16", np.dtype(np.int8): "int8", np.dtype(np.uint8): "uint8",
                np.dtype(np.bool_): "bool"}


@dataclass(frozen=True)
class ColumnSpec:
    """One column: ``kind`` is 'tensor' (per-sample array), 'scalar' (one number) or 'string'."""

    name: str
    kind: str
    dtype: str = ""
    shape: tuple[int, ...] = ()

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> "ColumnSpec":
        return cls(d["name"], d["kind"], d.get("dtype", ""), tuple(d.get("shape", ())))

    def arrow_field(self) -> pa.Field:
        meta = {b"flowscale": json.dumps(self.to_json()).encode()}
        if self.kind == "string":
            return pa.field(self.name, pa.string(), nullable=False, metadata=meta)
        storage = _DTYPES[self.dtype][1]
        if self.kind == "scalar":
            return pa.field(self.name, storage, nullable=False, metadata=meta)
        size = int(np.prod(self.shape)) if self.shape else 1
        return pa.field(self.name, pa.list_(storage, size), nullable=False, metadata=meta)


def _as_numpy(values: Any) -> tuple[np.ndarray, str]:
    """A batch of values as a numpy array in its storage dtype, plus the logical dtype name."""
    torch = sys.modules.get("torch")  # a tensor means torch is imported
    if torch is not None and isinstance(values, torch.Tensor):
        t = values.detach().cpu().contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise TypeError(f"tensor dtype {t.dtype} cannot be stored; use one of {sorted(_DTYPES)}")
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16), name
        if t.dtype == torch.bool:
            return t.to(torch.uint8).numpy(), name
        return t.numpy(), name
    arr = np.ascontiguousarray(values)
    name = _NUMPY_NAMES.get(arr.dtype)
    if name is None:
        raise TypeError(f"numpy dtype {arr.dtype} cannot be stored; use one of {sorted(_NUMPY_NAMES.values())}")
    return (arr.astype(np.uint8) if name == "bool" else arr), name


def infer_spec(name: str, values: Any) -> ColumnSpec:
    """The column a batch of values (leading dim = samples) describes."""
    if isinstance(values, (list, tuple)) and values and isinstance(values[0], str):
        return ColumnSpec(name, "string")
    arr, dtype = _as_numpy(values)
    if arr.ndim == 0:
        raise ValueError(f"column '{name}': expected a batch (leading sample dimension), got a scalar")
    kind = "scalar" if arr.ndim == 1 else "tensor"
    return ColumnSpec(name, kind, dtype, tuple(int(s) for s in arr.shape[1:]))


def to_arrow(spec: ColumnSpec, values: Any) -> pa.Array:
    """A batch of values as the Arrow array of ``spec``; raises naming the column if they do not fit."""
    if spec.kind == "string":
        if not all(isinstance(v, str) for v in values):
            raise TypeError(f"column '{spec.name}' holds strings; got {type(values[0]).__name__}")
        return pa.array(list(values), pa.string())
    got = infer_spec(spec.name, values)
    if (got.kind, got.dtype, got.shape) != (spec.kind, spec.dtype, spec.shape):
        raise ValueError(
            f"column '{spec.name}': got {got.kind} {got.dtype}{list(got.shape)}, "
            f"but the dataset's schema says {spec.kind} {spec.dtype}{list(spec.shape)}"
        )
    arr, _ = _as_numpy(values)
    flat = pa.array(arr.reshape(-1), type=_DTYPES[spec.dtype][1])
    if spec.kind == "scalar":
        return flat
    return pa.FixedSizeListArray.from_arrays(flat, int(np.prod(spec.shape)) if spec.shape else 1)


def column_numpy(spec: ColumnSpec, array: pa.Array | pa.ChunkedArray) -> np.ndarray | list[str]:
    """A shard's column as a numpy array (rows, *shape) in storage dtype, zero-copy where Arrow allows."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    if spec.kind == "string":
        return array.to_pylist()
    if spec.kind == "tensor":
        # .values ignores the list array's offset, so slice the flat values by hand.
        width = array.type.list_size
        flat = array.values.slice(array.offset * width, len(array) * width)
        return flat.to_numpy(zero_copy_only=True).reshape((len(array),) + spec.shape)
    return array.to_numpy(zero_copy_only=True)


def to_torch(spec: ColumnSpec, arr: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Storage-dtype rows (numpy, or a tensor from ``empty_rows``) as a tensor of the logical dtype."""
    import torch

    t = torch.from_numpy(arr) if isinstance(arr, np.ndarray) else arr
    if spec.dtype == "bfloat16":
        return t.view(torch.bfloat16)
    if spec.dtype == "bool":
        return t.to(torch.bool)
    return t


def empty_rows(spec: ColumnSpec, n: int) -> tuple[torch.Tensor, np.ndarray]:
    """An uninitialised (n, *shape) storage-dtype tensor and a numpy view of it to fill."""
    import torch

    t = torch.from_numpy(np.empty((n,) + tuple(spec.shape), _DTYPES[spec.dtype][0]))
    return t, t.numpy()


def schema_of(specs: Sequence[ColumnSpec]) -> pa.Schema:
    return pa.schema([s.arrow_field() for s in specs])
