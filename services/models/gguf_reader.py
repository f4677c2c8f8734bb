"""A small GGUF (v2/v3) reader: metadata, tensor directory, and dequantisation to float32.

File layout (little endian):

    "GGUF" u32 version | u64 tensor_count | u64 kv_count
    kv_count x (string key, u32 value_type, value)            string = u64 length + utf-8 bytes
    tensor_count x (string name, u32 n_dims, n_dims x u64 ne, u32 ggml_type, u64 offset)
    padding to `general.alignment` (default 32) | tensor data (offsets are relative to its start)

ggml lists dimensions fastest-first: ne = [cols, rows] for a matrix, so the numpy shape is ne
reversed. Quantised types store each row as blocks of 32 values:

    Q8_0: f16 d, 32 x i8 q             x = d * q                              (34 bytes)
    Q4_1: f16 d, f16 m, 16 x u8 qs     x[j] = d * (qs[j] & 15) + m,
                                        x[j + 16] = d * (qs[j] >> 4) + m      (20 bytes)
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
QK = 32  # values per quantisation block


class GGMLType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 8
    BF16 = 30


# bytes per block and values per block, for the types we can decode
_BLOCK = {
    GGMLType.F32: (4, 1),
    GGMLType.F16: (2, 1),
    GGMLType.BF16: (2, 1),
    GGMLType.Q4_0: (18, QK),
    GGMLType.Q4_1: (20, QK),
    GGMLType.Q8_0: (34, QK),
}

# GGUF metadata value types -> struct format (scalars); 8 = string, 9 = array
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # numpy order (slowest first): ne reversed
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        return raw.decode("utf-8", errors="surrogateescape")

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type in _SCALARS:  # read numeric arrays in one go
                dtype = np.dtype(_SCALARS[item_type].replace("?", "b1"))
                values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return values.tolist()
            return [self.value(item_type) for _ in range(count)]
        if value_type in _SCALARS:
            return self.scalar(_SCALARS[value_type])
        raise ValueError(f"unknown GGUF value type {value_type} at byte {self.pos}")


class GGUFFile:
    """An open GGUF file: `metadata` (key -> value) and `tensors` (name -> GGUFTensor)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        cur = _Cursor(self._map)
        if self._map[:4] != GGUF_MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file")
        cur.pos = 4
        self.version = cur.scalar("<I")
        if self.version < 2:
            raise ValueError(f"GGUF version {self.version} unsupported (need 2 or 3)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name, n_dims = cur.string(), cur.scalar("<I")
            ne = [cur.scalar("<Q") for _ in range(n_dims)]
            infos.append((name, ne, cur.scalar("<I"), cur.scalar("<Q")))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensor] = {}
        for name, ne, ggml_type, rel in infos:
            shape = tuple(int(d) for d in reversed(ne))
            self.tensors[name] = GGUFTensor(
                name, ggml_type, shape, data_start + rel, _nbytes(ggml_type, shape)
            )

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._map.close()

    def __iter__(self) -> Iterator[GGUFTensor]:
        return iter(self.tensors.values())

    def raw(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mapped file."""
        return np.frombuffer(self._map, dtype=np.uint8, count=tensor.nbytes, offset=tensor.offset)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 in numpy shape order (a fresh array)."""
        tensor = self.tensors[name]
        return dequantize(self.raw(tensor), tensor.ggml_type, tensor.shape)


def _nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    if ggml_type not in _BLOCK:
        raise NotImplementedError(f"ggml type {ggml_type} not supported (F32, F16, BF16, Q4_0, Q4_1, Q8_0)")
    block_bytes, block_values = _BLOCK[GGMLType(ggml_type)]
    numel = int(np.prod(shape, dtype=np.int64))
    if numel % block_values:
        raise ValueError(f"{numel} values are not whole blocks of {block_values}")
    return numel // block_values * block_bytes


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """Decode the bytes of one tensor to float32 of `shape`."""
    kind = GGMLType(ggml_type)
    if kind == GGMLType.F32:
        out = raw.view("<f4").astype(np.float32)
    elif kind == GGMLType.F16:
        out = raw.view("<f2").astype(np.float32)
    elif kind == GGMLType.BF16:
        out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        blocks = raw.reshape(-1, _BLOCK[kind][0])
        d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)  # (n_blocks, 1)
        if kind == GGMLType.Q8_0:
            out = d * blocks[:, 2:].view(np.int8).astype(np.float32)
        else:
            packed = blocks[:, 4:] if kind == GGMLType.Q4_1 else blocks[:, 2:]
            # low nibbles are values 0..15 of the block, high nibbles values 16..31
            q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)
            if kind == GGMLType.Q4_1:
                m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
                out = d * q + m
            else:  # Q4_0: symmetric around 8
                out = d * (q - 8.0)
    return out.reshape(shape)
