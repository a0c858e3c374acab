"""GGUF weight blocks turned into the layouts torch's CPU kernels read, in numpy.

Two layouts, both per output row (so rows can be converted a few at a time and permuted freely):

- **int4, groups of 32** (`Int4Rows`): `w = scale * q - min`, q in 0..15, one (scale, min) per 32
  weights. Q4_0, Q4_1 and Q4_K blocks are exactly of this form (Q4_K: 8 sub-blocks of 32 with 6-bit
  scales and mins under a half-float super-scale), so they repack without any rounding: the values
  below are bit for bit what gguf's own dequantization computes (tests check it).
- **int8, one scale per row** (`Int8Rows`): every other type (Q5_0, Q6_K, Q8_0, F16, ...) is
  dequantized and rounded to int8 with `scale = max|w| / 127` per row. That is a second rounding,
  far finer than the 5-6 bit blocks it comes from; the quality gate in the tests measures it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gguf_file import GGML_TYPES

GROUP = 32  # weights sharing one scale and min in the int4 layout (torch's group size)
INT4_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})


@dataclass
class Int4Rows:
    """Rows of an int4 weight."""

    q: np.ndarray  # uint8 [rows, cols], values 0..15
    scale: np.ndarray  # float32 [rows, cols // 32]
    min: np.ndarray  # float32 [rows, cols // 32]

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols], computed as gguf computes it: scale * q - min."""
        values = self.q.astype(np.float32)
        rows, cols = values.shape
        grouped = values.reshape(rows, cols // GROUP, GROUP)
        return (self.scale[..., None] * grouped - self.min[..., None]).reshape(rows, cols)


@dataclass
class Int8Rows:
    q: np.ndarray  # int8 [rows, cols]
    scale: np.ndarray  # float32 [rows]

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.scale[:, None]


def type_name(ggml_type: int) -> str:
    return GGML_TYPES[ggml_type][0]


def is_int4_exact(ggml_type: int) -> bool:
    """Whether blocks of this type repack into the int4 layout without rounding."""
    return type_name(ggml_type) in INT4_TYPES


def int4_rows(raw: np.ndarray, ggml_type: int, rows: int, cols: int) -> Int4Rows:
    """Repack `rows` rows of Q4_0 / Q4_1 / Q4_K blocks (raw bytes) into the int4 layout, exactly."""
    name, block, block_bytes = GGML_TYPES[ggml_type]
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows * cols // block, block_bytes)
    if name == "Q4_K":
        q, scale, low = _q4_k(blocks)
    elif name == "Q4_0":
        d = _halves(blocks[:, 0:2])
        q, scale, low = _q4_32(blocks[:, 2:]), d, 8 * d  # d * (q - 8)
    elif name == "Q4_1":
        d, m = _halves(blocks[:, 0:2]), _halves(blocks[:, 2:4])
        q, scale, low = _q4_32(blocks[:, 4:]), d, -m  # d * q + m
    else:
        raise ValueError(f"{name} blocks are not int4 groups")
    groups = cols // GROUP
    return Int4Rows(q.reshape(rows, cols), scale.reshape(rows, groups).astype(np.float32),
                    low.reshape(rows, groups).astype(np.float32))


def _halves(two_bytes: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(two_bytes).view(np.float16).astype(np.float32).reshape(-1)


def _q4_32(qs: np.ndarray) -> np.ndarray:
    """The 32 values of each 16-byte nibble block: low nibbles are values 0..15, high ones 16..31."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def _q4_k(blocks: np.ndarray):
    """Q4_K super-blocks of 256: (values, per-32 scale, per-32 min) with w = scale * q - min."""
    d, dmin = _halves(blocks[:, 0:2]), _halves(blocks[:, 2:4])
    sc, m = _k_scales_mins(blocks[:, 4:16])
    qs = blocks[:, 16:].reshape(-1, 4, 32)  # four runs of 32 bytes: sub-block 2j low, 2j+1 high
    q = np.stack([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=2).reshape(-1, 256)
    scale = d[:, None] * sc.astype(np.float32)
    low = dmin[:, None] * m.astype(np.float32)
    return q, scale, low


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and mins of a Q4_K / Q5_K super-block, from its 12 bytes: bytes 0-3 hold
    scales 0-3 and bytes 4-7 mins 0-3 in their low 6 bits; bytes 8-11 hold the low 4 bits of scales 4-7
    (low nibble) and mins 4-7 (high nibble), whose top 2 bits are the top bits of bytes 0-3 and 4-7."""
    packed = np.asarray(packed, dtype=np.uint8)
    first, second, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([first & 0x3F, (rest & 0x0F) | ((first >> 6) << 4)], axis=1)
    mins = np.concatenate([second & 0x3F, (rest >> 4) | ((second >> 6) << 4)], axis=1)
    return scales, mins


# ----- dequantization -----------------------------------------------------------------------------
# The block types of llama.cpp's common quantizations (Q4_K_M, Q4_0, Q5_0, Q8_0, F16, ...) computed as
# gguf-py's numpy code computes them (the same float32
# operations in the same order, so the values are bit for bit equal; tests check it), so a first
# conversion needs no gguf-py, and Q5_0 / Q8_0 take about half its time (bench/RESULTS.md). Other types
# go to gguf-py.

def dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """Flat float32 values of `raw` (uint8, whole blocks) of `ggml_type`."""
    name, _, block_bytes = GGML_TYPES[ggml_type]
    raw = np.asarray(raw, dtype=np.uint8)
    if name == "F32":
        return raw.view(np.float32)
    if name == "F16":
        return raw.view(np.float16).astype(np.float32)
    if name == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    decode = _DEQUANTIZERS.get(name)
    if decode is None:
        from gguf import quants

        return quants.dequantize(raw, ggml_type)
    return decode(raw.reshape(-1, block_bytes)).reshape(-1)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    return blocks[:, 2:].view(np.int8).astype(np.float32) * _halves(blocks[:, 0:2])[:, None]


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    q = (_q4_32(blocks[:, 2:]).astype(np.int8) - np.int8(8)).astype(np.float32)
    return _halves(blocks[:, 0:2])[:, None] * q


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    d, m = _halves(blocks[:, 0:2])[:, None], _halves(blocks[:, 2:4])[:, None]
    return d * _q4_32(blocks[:, 4:]).astype(np.float32) + m


def _q5_32(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """The 32 5-bit values of each block: nibbles as in `_q4_32`, value j's fifth bit bit j of qh."""
    high = np.unpackbits(np.ascontiguousarray(qh), axis=1, bitorder="little")
    return _q4_32(qs) | (high << np.uint8(4))


def _q5_0(blocks: np.ndarray) -> np.ndarray:
    q = (_q5_32(blocks[:, 2:6], blocks[:, 6:]).astype(np.int8) - np.int8(16)).astype(np.float32)
    return _halves(blocks[:, 0:2])[:, None] * q


def _q5_1(blocks: np.ndarray) -> np.ndarray:
    d, m = _halves(blocks[:, 0:2])[:, None], _halves(blocks[:, 2:4])[:, None]
    return d * _q5_32(blocks[:, 4:8], blocks[:, 8:]).astype(np.float32) + m


def _q4_k_values(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    sc, m = _k_scales_mins(blocks[:, 4:16])
    scale = (_halves(blocks[:, 0:2])[:, None] * sc.astype(np.float32))[:, :, None]
    low = (_halves(blocks[:, 2:4])[:, None] * m.astype(np.float32))[:, :, None]
    qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return scale * (qs & np.uint8(0x0F)).reshape(n, 8, 32).astype(np.float32) - low


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    """Q6_K super-blocks of 256 in two halves of 128: value v of a half has its low 4 bits in ql (byte
    v % 64, low nibble for v < 64) and its top 2 bits in qh (byte v % 32, bits 2 * (v // 32)); 16
    int8 scales, one per 16 values, under a half-float d; w = d * scale * (q - 32)."""
    n = len(blocks)
    ql = blocks[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = (ql & np.uint8(0x0F)).reshape(n, 256) | ((qh & np.uint8(0x03)).reshape(n, 256) << np.uint8(4))
    q = (q.astype(np.int8) - np.int8(32)).astype(np.float32).reshape(n, 16, 16)
    d = _halves(blocks[:, 208:210])[:, None] * blocks[:, 192:208].view(np.int8).astype(np.float32)
    return d[:, :, None] * q


_DEQUANTIZERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
                 "Q4_K": _q4_k_values, "Q6_K": _q6_k}


def int8_rows(weights: np.ndarray) -> Int8Rows:
    """float32 [rows, cols] rounded to int8 with one scale per row (max |w| maps to 127)."""
    weights = np.asarray(weights, dtype=np.float32)
    peak = np.abs(weights).max(axis=1)
    scale = np.where(peak > 0, peak / 127, 1).astype(np.float32)
    q = np.clip(np.rint(weights / scale[:, None]), -127, 127).astype(np.int8)
    return Int8Rows(q, scale)


def round_int4(weights: np.ndarray) -> Int4Rows:
    """float32 [rows, cols] rounded to the int4 layout: per group of 32, min to max in 15 steps.

    A lossy rounding, used only for `ShortlistHead`'s coarse copy of the output projection, whose
    best-scoring rows are then recomputed from the exact table.
    """
    rows, cols = weights.shape
    groups = np.asarray(weights, dtype=np.float32).reshape(rows, cols // GROUP, GROUP)
    low, high = groups.min(axis=-1), groups.max(axis=-1)
    scale = np.where(high > low, (high - low) / 15, 1).astype(np.float32)
    q = np.clip(np.rint((groups - low[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    return Int4Rows(q.reshape(rows, cols), scale, -low.astype(np.float32))
