"""Read a GGUF file's header: metadata, tensor table and sizes, without touching the weights.

gguf-py's `GGUFReader` builds a numpy view per array element (18 s for the 262k-token
vocabulary of the bundled model); this reader parses the header in one pass with `struct`
and numpy, so listing a catalog of models stays instant.

Large arrays (a vocabulary's tokens, scores, types and merges) are only stepped over: the metadata
keeps where they are and reads them from the file when asked (`GGUFMetadata`). Loading a converted
model never asks, and a header kept in a cache holds no 262k Python strings (~25 MiB, 0.65 s).
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value types -> (struct format, numpy dtype)
_SCALARS = {
    0: ("<B", np.uint8),
    1: ("<b", np.int8),
    2: ("<H", np.uint16),
    3: ("<h", np.int16),
    4: ("<I", np.uint32),
    5: ("<i", np.int32),
    6: ("<f", np.float32),
    7: ("<?", np.bool_),
    10: ("<Q", np.uint64),
    11: ("<q", np.int64),
    12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9

# ggml tensor types -> (name, elements per block, bytes per block). Mirrors ggml's table.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
}

# general.file_type -> the name llama.cpp gives it.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
}

_MAX_COUNT = 1 << 26  # more keys, tensors or array items than this means a damaged header
DEFERRED_ITEMS = 4096  # arrays at least this long are read from the file when asked for, not parsed


class GGUFError(ValueError):
    """The file is not a GGUF file we can read; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: innermost dimension first
    ggml_type: int
    offset: int  # absolute offset of the data in the file

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)  # Python ints: a corrupt shape must not wrap around int64

    @property
    def n_bytes(self) -> int:
        _, block, size = GGML_TYPES[self.ggml_type]
        return self.n_elements // block * size

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]


@dataclass(frozen=True)
class DeferredArray:
    """Where a large metadata array lies in its file: `GGUFMetadata` reads it when asked."""

    path: Path
    offset: int  # of the array's item type
    count: int

    def read(self) -> list:
        with self.path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cursor = _Cursor(buf, self.path)
            cursor.pos = self.offset
            return cursor.array(defer=False)


class GGUFMetadata(dict):
    """The header's key-value pairs; a large array is read from the file each time it is looked up
    (`[]`, `get`, `items`, `values`), so nothing keeps it in memory longer than its user does."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        return value.read() if isinstance(value, DeferredArray) else value

    def get(self, key, default=None):
        return self[key] if key in self else default

    def items(self):
        return [(key, self[key]) for key in self]

    def values(self):
        return [self[key] for key in self]

    def length(self, key: str) -> int:
        """The number of items of an array value (0 if absent), without reading a deferred one."""
        value = super().get(key)
        return value.count if isinstance(value, DeferredArray) else len(value or ())


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: GGUFMetadata
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0
    file_size: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_value(self, key: str, default=None):
        """`{architecture}.{key}`, e.g. `arch_value("context_length")`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def context_length(self) -> int:
        return int(self.arch_value("context_length", 2048))

    @property
    def quantization(self) -> str:
        file_type = self.metadata.get("general.file_type")
        if file_type in FILE_TYPES:
            return FILE_TYPES[file_type]
        counts: dict[str, int] = {}
        for tensor in self.tensors:
            if len(tensor.shape) >= 2:
                counts[tensor.type_name] = counts.get(tensor.type_name, 0) + tensor.n_elements
        return max(counts, key=counts.get) if counts else "unknown"

    @property
    def chat_template(self) -> str | None:
        template = self.metadata.get("tokenizer.chat_template")
        return template if isinstance(template, str) and template.strip() else None

    @property
    def n_parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def estimate_memory(self, bytes_per_param: float | None = 2) -> int:
        """Bytes the weights take, plus a working margin (KV cache, activations).

        `bytes_per_param`: of the dequantized weights; None for weights kept quantized on the CPU
        (int4 where the blocks are Q4_0/Q4_1/Q4_K, int8 for other matrices, float32 vectors).
        """
        if bytes_per_param is None:
            weights = sum(_quantized_bytes(t) for t in self.tensors)
        else:
            weights = self.n_parameters * bytes_per_param
        return int(weights * 1.15) + 64 * 1024 * 1024


def _quantized_bytes(tensor: TensorInfo) -> float:
    if len(tensor.shape) < 2:
        return 4.0 * tensor.n_elements
    if tensor.type_name in ("Q4_0", "Q4_1", "Q4_K"):
        return tensor.n_elements * (0.5 + 8 / 32)  # nibbles, then a float32 scale and zero per 32
    return tensor.n_elements * 1.0 + 4 * (tensor.n_elements // tensor.shape[0])


class _Cursor:
    """Reads little-endian GGUF values from a buffer, checking every length against its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path
        self.end = len(buf)

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.end:
            raise self.truncated()

    def truncated(self) -> GGUFError:
        return GGUFError(f"{self.path.name} is truncated or corrupt (header runs past the end of the file)")

    def scalar(self, fmt: str):
        size = struct.calcsize(fmt)
        self.need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        self.need(length)
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def count(self) -> int:
        value = self.scalar("<Q")
        if value > _MAX_COUNT:
            raise GGUFError(f"{self.path.name} is corrupt (an item count of {value} in its header)")
        return value

    def value(self, value_type: int):
        if value_type in _SCALARS:
            return self.scalar(_SCALARS[value_type][0])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            return self.array()
        raise GGUFError(f"{self.path.name} is corrupt (unknown value type {value_type})")

    def array(self, defer: bool = True):
        start = self.pos
        item_type = self.scalar("<I")
        n = self.count()
        if defer and n >= DEFERRED_ITEMS and item_type in (*_SCALARS, _STRING):
            self.skip_items(item_type, n)
            return DeferredArray(self.path, start, n)
        if item_type in _SCALARS:
            dtype = np.dtype(_SCALARS[item_type][1]).newbyteorder("<")
            self.need(n * dtype.itemsize)
            items = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()
            self.pos += n * dtype.itemsize
            return items.tolist()
        if item_type == _STRING:
            return self.strings(n)
        return [self.value(item_type) for _ in range(n)]

    def skip_items(self, item_type: int, n: int) -> None:
        if item_type in _SCALARS:
            self.need(n * struct.calcsize(_SCALARS[item_type][0]))
            self.pos += n * struct.calcsize(_SCALARS[item_type][0])
            return
        buf, pos, end = self.buf, self.pos, self.end
        length_at = struct.Struct("<Q").unpack_from
        for _ in range(n):
            if pos + 8 > end:
                raise self.truncated()
            pos += 8 + length_at(buf, pos)[0]
        if pos > end:
            raise self.truncated()
        self.pos = pos

    def strings(self, n: int) -> list[str]:
        """`n` length-prefixed strings: a vocabulary has 100k-260k of them, so this loop stays tight."""
        buf, pos, end = self.buf, self.pos, self.end
        length_at = struct.Struct("<Q").unpack_from
        items = []
        append = items.append
        for _ in range(n):
            if pos + 8 > end:
                raise self.truncated()
            (length,) = length_at(buf, pos)
            pos += 8
            if pos + length > end:
                raise self.truncated()
            append(buf[pos : pos + length].decode("utf-8", errors="replace"))
            pos += length
        self.pos = pos
        return items


def read_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF file's metadata and tensor table; raise `GGUFError` for anything unreadable."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with path.open("rb") as handle:
            if file_size < 24:
                raise GGUFError(f"{path.name} is not a GGUF file (only {file_size} bytes)")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, path, file_size)
    except OSError as error:
        raise GGUFError(f"cannot read {path.name}: {error.strerror or error}") from error


def _parse(buf, path: Path, file_size: int) -> GGUFHeader:
    cursor = _Cursor(buf, path)
    cursor.need(4)
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise GGUFError(f"{path.name} is not a GGUF file (bad magic bytes)")
    cursor.pos = 4
    version = cursor.scalar("<I")
    if version not in (2, 3):
        raise GGUFError(f"{path.name} uses GGUF version {version}; versions 2 and 3 are supported")
    n_tensors, n_kv = cursor.count(), cursor.count()
    metadata = GGUFMetadata()
    for _ in range(n_kv):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.scalar("<I")
        if n_dims > 8:
            raise GGUFError(f"{path.name} is corrupt (tensor {name} has {n_dims} dimensions)")
        shape = tuple(cursor.scalar("<Q") for _ in range(n_dims))
        infos.append((name, shape, cursor.scalar("<I"), cursor.scalar("<Q")))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT)) or DEFAULT_ALIGNMENT
    data_offset = -(-cursor.pos // alignment) * alignment
    header = GGUFHeader(path, version, metadata, [], data_offset, file_size)
    for name, shape, ggml_type, offset in infos:
        if ggml_type not in GGML_TYPES:
            raise GGUFError(f"{path.name} has tensor {name} of unsupported type {ggml_type}")
        tensor = TensorInfo(name, shape, ggml_type, data_offset + offset)
        if tensor.offset + tensor.n_bytes > file_size:
            raise GGUFError(
                f"{path.name} is truncated: tensor {name} ends at byte {tensor.offset + tensor.n_bytes:,} "
                f"but the file has {file_size:,} bytes"
            )
        header.tensors.append(tensor)
    if not header.architecture:
        raise GGUFError(f"{path.name} does not say its architecture (general.architecture)")
    return header


def tensor_data(header: GGUFHeader, tensor: TensorInfo) -> np.ndarray:
    """The tensor's raw bytes as a read-only memory map (uint8)."""
    return np.memmap(header.path, dtype=np.uint8, mode="r", offset=tensor.offset, shape=(tensor.n_bytes,))
