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


class SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.header = header
        self._data_start = 8 + n
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


class SafetensorsDir:
    """All tensors of a Hugging Face checkpoint directory: a sharded index or a single file."""

    def __init__(self, directory: str):
        index = os.path.join(directory, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"{directory}: no {INDEX} and no *.safetensors file")
            weight_map = {}
            for fname in files:
                for name in SafetensorsFile(os.path.join(directory, fname)).header:
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
        return self._files[fname]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._file(name).dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get(name)

    def read(self, name: str, index: tuple[slice, ...], shape: tuple[int, ...] | None = None) -> np.ndarray:
        return self._file(name).read(name, index, shape)
