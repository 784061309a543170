"""Reading and writing safetensors files with numpy alone (no torch).

The format (https://huggingface.co/docs/safetensors): 8 bytes little-endian
header length N, N bytes of JSON {name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {...}}, then the raw little-endian tensor bytes,
offsets counted from the end of the header. Tensors are read through a
read-only memory map, one at a time, so converting a model never holds the
source in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

# safetensors dtype names <-> numpy dtypes (bfloat16 through ml_dtypes, as jax does).
DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
  """One .safetensors file: names, shapes and dtypes from its header; tensors on demand."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"safetensors file {self.path!r} does not exist")
    size = os.path.getsize(self.path)
    with open(self.path, "rb") as f:
      prefix = f.read(8)
      if len(prefix) < 8:
        raise ValueError(
          f"{self.path!r} is not a safetensors file: {size} bytes, too short "
          "for a header (truncated?)"
        )
      (header_len,) = struct.unpack("<Q", prefix)
      if header_len > min(_MAX_HEADER, size - 8):
        raise ValueError(
          f"{self.path!r} is not a safetensors file or is truncated: its header "
          f"claims {header_len} bytes, the file has {size}"
        )
      try:
        header = json.loads(f.read(header_len))
      except ValueError as e:
        raise ValueError(f"{self.path!r}: the safetensors header is not JSON ({e})") from e
    self.metadata = header.pop("__metadata__", None) or {}
    self._data_start = 8 + header_len
    self._entries = {}
    for name, entry in header.items():
      dtype_name = entry.get("dtype")
      if dtype_name not in DTYPES:
        raise ValueError(
          f"{self.path!r}: tensor {name!r} has dtype {dtype_name!r}, which cannot "
          f"be converted; supported dtypes are {sorted(DTYPES)}"
        )
      shape = tuple(int(d) for d in entry["shape"])
      begin, end = (int(x) for x in entry["data_offsets"])
      expected = math.prod(shape) * DTYPES[dtype_name].itemsize
      if end - begin != expected:
        raise ValueError(
          f"{self.path!r}: tensor {name!r} of shape {shape} {dtype_name} should "
          f"take {expected} bytes, its offsets give {end - begin}"
        )
      if self._data_start + end > size:
        raise ValueError(
          f"{self.path!r} is truncated: tensor {name!r} ends at byte "
          f"{self._data_start + end}, the file has {size} bytes"
        )
      self._entries[name] = (DTYPES[dtype_name], shape, begin)
    self._map = None

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]

  def get(self, name: str) -> np.ndarray:
    """The tensor as a read-only array backed by the file (no copy)."""
    if name not in self._entries:
      raise KeyError(f"{self.path!r} has no tensor {name!r}")
    dtype, shape, begin = self._entries[name]
    if self._map is None:
      self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
    count = math.prod(shape)
    start = self._data_start + begin
    flat = self._map[start : start + count * dtype.itemsize].view(dtype.newbyteorder("<"))
    return flat.reshape(shape)


class TensorSource(Mapping):
  """The tensors of one checkpoint: one safetensors file or a sharded set
  (model.safetensors.index.json), looked up by name."""

  def __init__(self, files: list[SafetensorsFile]):
    self._files = files
    self._where: dict[str, SafetensorsFile] = {}
    for f in files:
      for name in f.keys():
        if name in self._where:
          raise ValueError(
            f"tensor {name!r} appears in both {self._where[name].path!r} and {f.path!r}"
          )
        self._where[name] = f

  @classmethod
  def open(cls, path: str | os.PathLike) -> "TensorSource":
    """A .safetensors file, a .safetensors.index.json, or a folder holding either."""
    path = os.fspath(path)
    if os.path.isdir(path):
      single = os.path.join(path, "model.safetensors")
      index = os.path.join(path, "model.safetensors.index.json")
      if os.path.isfile(index):
        return cls.open(index)
      if os.path.isfile(single):
        return cls.open(single)
      raise FileNotFoundError(
        f"{path!r} holds neither model.safetensors nor model.safetensors.index.json"
      )
    if path.endswith(".index.json"):
      if not os.path.isfile(path):
        raise FileNotFoundError(f"safetensors index {path!r} does not exist")
      with open(path, encoding="utf-8") as f:
        try:
          weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError) as e:
          raise ValueError(f"{path!r} is not a safetensors index (no weight_map): {e}") from e
      folder = os.path.dirname(path)
      shards = sorted(set(weight_map.values()))
      source = cls([SafetensorsFile(os.path.join(folder, shard)) for shard in shards])
      missing = sorted(set(weight_map) - set(source))
      if missing:
        raise ValueError(f"{path!r} lists tensors its shards do not hold: {missing[:5]}")
      return source
    return cls([SafetensorsFile(path)])

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise KeyError(name)
    return self._where[name].get(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._where[name].shape(name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)


class DictSource(dict):
  """Tensors already in memory (a torch state dict turned into numpy)."""

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self[name].shape)


def write_safetensors(
  path: str | os.PathLike,
  names_and_shapes: list[tuple[str, tuple, np.dtype]],
  produce,
  metadata: Mapping[str, str] | None = None,
) -> None:
  """Writes a safetensors file tensor by tensor.

  names_and_shapes: (name, shape, dtype) of every tensor in file order;
  produce(name) returns that tensor's array, called once each while writing,
  so only one tensor is in memory at a time.
  """
  header: dict = {}
  if metadata:
    header["__metadata__"] = dict(metadata)
  offset = 0
  for name, shape, dtype in names_and_shapes:
    dtype = np.dtype(dtype)
    if dtype not in _NAMES:
      raise ValueError(f"tensor {name!r}: dtype {dtype} has no safetensors name")
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {
      "dtype": _NAMES[dtype],
      "shape": list(shape),
      "data_offsets": [offset, offset + nbytes],
    }
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-len(blob) % 8)  # the reference writer aligns the data to 8 bytes
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype in names_and_shapes:
      array = np.ascontiguousarray(
        np.asarray(produce(name)), dtype=np.dtype(dtype).newbyteorder("<")
      )
      if array.shape != tuple(shape):
        raise ValueError(f"tensor {name!r}: produced shape {array.shape}, declared {tuple(shape)}")
      f.write(array.tobytes())
