"""Memory-mapped reading of safetensors files, FP8 and BF16 included.

The `safetensors` package writes these dtypes from numpy (through ml_dtypes) but cannot read them
back into numpy, and its other frameworks copy every tensor. This reader maps each file once and
hands out read-only views, so a checkpoint is streamed tensor by tensor, never held twice.
`read(name, index)` copies out one block of a tensor (what one device holds of it) through a map of
that tensor's bytes alone, dropped once the block is copied: a sharded load touches every byte of
the checkpoint, and pages of a long-lived map would stay resident (clean page cache, but counted in
the process's memory and, in a container, against its limit) until the whole checkpoint is.
Writing still goes through `safetensors.numpy.save_file`.
"""
from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsError(ValueError):
    """A file that is not a whole safetensors file; the message names it and what is wrong."""


def _read_header(path: str) -> tuple[dict, int]:
    """(header without __metadata__, offset of the data), checked against the file's size so that a
    truncated or foreign file is refused here, never read past its end."""
    size = os.path.getsize(path)
    if size < 8:
        raise SafetensorsError(f"{path}: {size} bytes, too short for a safetensors file (an 8-byte header "
                               "length comes first)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise SafetensorsError(f"{path}: header length {n} is past the end of the {size}-byte file "
                                   "(truncated, or not a safetensors file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise SafetensorsError(f"{path}: header is not JSON ({e}); not a safetensors file") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object; not a safetensors file")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        _check_entry(path, name, entry, size - 8 - n)
    return header, 8 + n


def _check_entry(path: str, name: str, entry, data_bytes: int) -> None:
    try:
        dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        ints = [*shape, start, end]
        ok = isinstance(dtype, str) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ints)
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise SafetensorsError(f"{path}: tensor {name} has a malformed header entry {repr(entry)[:200]}")
    if not start <= end <= data_bytes:
        raise SafetensorsError(f"{path}: tensor {name} lies at bytes {start}..{end} of the data, but the file "
                               f"holds {data_bytes} bytes of data (truncated?)")
    want = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize if dtype in DTYPES else end - start
    if end - start != want:
        raise SafetensorsError(f"{path}: tensor {name} of shape {tuple(shape)} and dtype {dtype} takes "
                               f"{end - start} bytes in the file, not {want}")


class SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        self.header, self._data_start = _read_header(path)
        self._map = None

    def _buffer(self) -> np.memmap:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        entry = self.header[name]
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
        return np.dtype(DTYPES[entry["dtype"]])

    def get(self, name: str) -> np.ndarray:
        start, end = self.header[name]["data_offsets"]
        raw = self._buffer()[self._data_start + start: self._data_start + end]
        return raw.view(self.dtype(name)).reshape(self.shape(name))

    def read(self, name: str, index: tuple[slice, ...], shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A copy of `tensor[index]`, the tensor viewed as `shape` (a reshape of the stored one, to
        address the rows and columns of a flattened dimension separately)."""
        dtype, shape = self.dtype(name), self.shape(name) if shape is None else shape
        start, end = self.header[name]["data_offsets"]
        if start == end:
            return np.empty((0,), dtype).reshape(shape)[index]
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start + start, shape=(end - start,))
        return np.array(raw.view(dtype).reshape(shape)[index])


def _read_index(path: str) -> dict[str, str]:
    """An index's weight_map (tensor name -> file name), checked to be one."""
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except (ValueError, AttributeError) as e:  # not JSON, not UTF-8, not an object
        raise SafetensorsError(f"{path}: not a safetensors index ({e or 'not a JSON object'})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SafetensorsError(f"{path}: no weight_map object of tensor name -> file name")
    return weight_map


class SafetensorsDir:
    """All tensors of a Hugging Face checkpoint directory: a sharded index or a single file."""

    def __init__(self, directory: str):
        index = os.path.join(directory, INDEX)
        if os.path.exists(index):
            weight_map = _read_index(index)
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"{directory}: no {INDEX} and no *.safetensors file")
            weight_map = {}
            for fname in files:
                for name in SafetensorsFile(os.path.join(directory, fname)).header:
                    if name in weight_map:  # which copy is meant? (a leftover shard of another save, say)
                        raise SafetensorsError(f"{directory}: tensor {name} is in both {weight_map[name]} and "
                                               f"{fname}, and no {INDEX} says which to read")
                    weight_map[name] = fname
        self.directory = directory
        self.weight_map = weight_map
        self._files: dict[str, SafetensorsFile] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self):
        return self.weight_map.keys()

    def _file(self, name: str) -> SafetensorsFile:
        fname = self.weight_map[name]
        if fname not in self._files:
            path = os.path.join(self.directory, fname)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: listed in the index for tensor {name} but missing")
            self._files[fname] = SafetensorsFile(path)
        if name not in self._files[fname].header:
            raise SafetensorsError(f"{self._files[fname].path}: holds no tensor {name}, which {INDEX} places there")
        return self._files[fname]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._file(name).dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get(name)

    def read(self, name: str, index: tuple[slice, ...], shape: tuple[int, ...] | None = None) -> np.ndarray:
        return self._file(name).read(name, index, shape)
