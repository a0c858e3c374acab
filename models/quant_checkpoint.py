"""The quantized conversion cache: a GGUF's weights kept in the layouts the CPU kernels read.

`write_quantized_weights` writes `model.safetensors` with, for each matrix of the model,

- `<name>.packed` (uint8, torch's packed int4 layout) and `<name>.scales_zeros` (float32
  [out, in/32, 2]) where the GGUF blocks are Q4_0 / Q4_1 / Q4_K: repacked exactly; the same values
  also as `<name>.nibbles` (uint8 [out, in/2]), the layout of the AVX2 kernel (models/native_kernels.py);
- `<name>.q` (int8 [out, in]) and `<name>.scale` (float32 [out]) for every other matrix and for the
  token embedding (looked up by row, so it needs the int8 layout);

and `<name>` in float32 for vectors (norms, biases). Streamed a few rows at a time, like the dense
conversion. `load_quantized_model` memory-maps that file and builds the model around it: a warm load maps
what it needs instead of converting anything.

An int8 output projection over a large vocabulary can also have `<name>.coarse.packed` /
`.coarse.scales_zeros`, an int4 rounding of it for `ShortlistHead`, in `coarse.safetensors` beside it:
built by the first load that uses the shortlist (torch's kernels on a CPU without native bfloat16), not
by the conversion, whose first start it slowed by ~1 s (~4 s of one core) for a head most CPUs never use.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .convert import (CHUNK_BYTES, MODEL_BUILD_LOCK, UnsupportedModel, WeightPlan, WeightSlot, _piece_bytes,
                      import_transformers, plan_weights, read_rows, safetensors_problem)
from .gguf_file import GGUFHeader
from .native_kernels import pack_nibbles
from .progress import ProgressFn
from .qlinear import GROUP, pack_int4
from .quant_blocks import Int8Rows, int4_rows, int8_rows, is_int4_exact, round_int4

log = logging.getLogger(__name__)

EMBEDDING = "model.embed_tokens.weight"
ROW_ALIGN = 64  # int4 rows packed together: torch packs blocks of rows, so chunks start on a multiple
OUTPUT_NAMES = (EMBEDDING, "lm_head.weight")  # what may project the output (the embedding when tied)
COARSE_MIN_ROWS = 32768  # vocabularies at least this large can get a coarse int4 copy (ShortlistHead)
COARSE_FILE = "coarse.safetensors"


@dataclass(frozen=True)
class Part:
    """One tensor of the quantized file."""

    name: str
    dtype: str  # safetensors dtype: U8, I8, F32
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * {"U8": 1, "I8": 1, "F32": 4}[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes


@dataclass
class QuantSlot:
    slot: WeightSlot
    kind: str  # "int4" | "int8" | "dense"
    parts: list[Part]


def choose_kind(slot: WeightSlot) -> str:
    """int4 where the GGUF blocks repack exactly (and torch's packing fits), int8 for other matrices."""
    if len(slot.shape) != 2:
        return "dense"
    rows, cols = slot.shape
    if slot.name != EMBEDDING and is_int4_exact(slot.source.ggml_type) and rows % 16 == 0 and cols % GROUP == 0:
        return "int4"
    return "int8"


def _int4_parts(name: str, rows: int, cols: int, nibbles: bool = True) -> list[Part]:
    parts = [Part(name + ".packed", "U8", (rows, cols // 2)), Part(name + ".scales_zeros", "F32", (rows, cols // GROUP, 2))]
    return parts + [Part(name + ".nibbles", "U8", (rows, cols // 2))] if nibbles else parts


def _parts(slot: WeightSlot, kind: str) -> list[Part]:
    if kind == "dense":
        return [Part(slot.name, "F32", slot.shape)]
    rows, cols = slot.shape
    if kind == "int4":
        return _int4_parts(slot.name, rows, cols)
    return [Part(slot.name + ".q", "I8", (rows, cols)), Part(slot.name + ".scale", "F32", (rows,))]


def plan_quantized(header: GGUFHeader, config) -> tuple[WeightPlan, list[QuantSlot]]:
    plan = plan_weights(header, config, torch.float32)
    slots, offset = [], 0
    for slot in plan.slots:
        kind = choose_kind(slot)
        parts = []
        for part in _parts(slot, kind):
            parts.append(Part(part.name, part.dtype, part.shape, offset, offset + part.nbytes))
            offset += part.nbytes
        slots.append(QuantSlot(slot, kind, parts))
    return plan, slots


def _header_bytes(parts: list[Part]) -> bytes:
    entries: dict = {"__metadata__": {"format": "pt", "layout": "quantized"}}
    for part in parts:
        entries[part.name] = {"dtype": part.dtype, "shape": list(part.shape), "data_offsets": [part.begin, part.end]}
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _row_ranges(quant: QuantSlot) -> list[tuple[int, int]]:
    slot = quant.slot
    rows = _gguf_rows(slot)
    if quant.kind == "dense" or slot.fix_up:
        return [(0, rows)]
    cols = slot.shape[1]
    step = max(1, CHUNK_BYTES // (4 * cols))
    if any(part.name.endswith(".packed") for part in quant.parts):
        step = max(ROW_ALIGN, step // ROW_ALIGN * ROW_ALIGN)
    return [(first, min(first + step, rows)) for first in range(0, rows, step)]


def _gguf_rows(slot: WeightSlot) -> int:
    """Rows as the GGUF counts them (a vector is one row); a matrix's rows are its outputs."""
    return slot.source.n_elements // slot.source.shape[0] if slot.source.shape else 1


def _row_permutation(plan: WeightPlan, slot: WeightSlot) -> np.ndarray:
    """How the architecture's fix-up reorders this matrix's rows (llama's q/k un-permutation)."""
    rows = slot.shape[0]
    probe = np.arange(rows, dtype=np.float32).reshape(rows, 1)
    result = plan.process(probe, slot.source).weights
    order = np.asarray(result).reshape(-1)
    if order.shape != (rows,) or not np.array_equal(np.sort(order), probe.reshape(-1)):
        raise UnsupportedModel(f"{slot.source.name}: its fix-up is not a row reordering")
    return order.astype(np.int64)


def _convert_rows(header: GGUFHeader, plan: WeightPlan, quant: QuantSlot,
                  rows: tuple[int, int]) -> list[np.ndarray]:
    """The bytes of each part for rows `rows` of one matrix (or the whole tensor)."""
    slot = quant.slot
    if quant.kind == "int4":
        count, cols = rows[1] - rows[0], slot.shape[1]
        groups = int4_rows(read_rows(header, slot.source, rows), slot.source.ggml_type, count, cols)
        q = groups.q
        scale, low = groups.scale, groups.min
        if slot.fix_up:
            order = _row_permutation(plan, slot)
            q, scale, low = q[order], scale[order], low[order]
        return _int4_bytes(q, scale, low)
    weights = _piece_bytes(header, plan, slot, rows, torch.float32).view(np.float32)
    if quant.kind == "dense":
        return [weights.view(np.uint8)]
    table = int8_rows(weights.reshape(rows[1] - rows[0], slot.shape[1]))
    return [table.q.view(np.uint8), table.scale.view(np.uint8)]


def _int4_bytes(q: np.ndarray, scale: np.ndarray, low: np.ndarray, nibbles: bool = True) -> list[np.ndarray]:
    packed = pack_int4(torch.from_numpy(q)).numpy()
    scales_zeros = np.stack([scale, 8 * scale - low], axis=-1).astype(np.float32)
    pieces = [packed.view(np.uint8), scales_zeros.view(np.uint8)]
    return pieces + [pack_nibbles(q.astype(np.uint8))] if nibbles else pieces


def write_quantized_weights(header: GGUFHeader, config, path: Path, progress: ProgressFn | None = None) -> None:
    """Write the quantized `model.safetensors` for `header`, streamed a few rows at a time."""
    plan, slots = plan_quantized(header, config)
    head = _header_bytes([part for quant in slots for part in quant.parts])
    base = len(head)
    jobs = [(index, quant, rows) for index, quant in enumerate(slots) for rows in _row_ranges(quant)]
    total = sum(part.end - part.begin for quant in slots for part in quant.parts)
    with path.open("wb") as out, ThreadPoolExecutor(max_workers=2) as pool:
        out.write(head)
        out.truncate(base + total)
        futures = [pool.submit(_convert_rows, header, plan, quant, rows) for _, quant, rows in jobs[:2]]
        for position, (index, quant, rows) in enumerate(jobs):
            pieces = futures[position].result()
            if position + 2 < len(jobs):
                _, later, later_rows = jobs[position + 2]
                futures.append(pool.submit(_convert_rows, header, plan, later, later_rows))
            futures[position] = None  # let the finished piece go
            for part, data in zip(quant.parts, pieces):
                out.seek(base + part.begin + rows[0] * part.row_bytes)
                out.write(data.tobytes())
            if progress and rows[1] == _gguf_rows(quant.slot):
                progress((index + 1) / len(slots), f"quantizing tensors {index + 1}/{len(slots)}")


# ----- the coarse copy of the output table ---------------------------------------------------------

def _coarse_tables(tensors: dict) -> list[str]:
    """The int8 output tables that can have a coarse copy: large vocabularies, whole int4 groups."""
    names = []
    for name in OUTPUT_NAMES:
        table = tensors.get(name + ".q")
        if table is not None and table.shape[0] >= COARSE_MIN_ROWS and table.shape[0] % 16 == 0 \
                and table.shape[1] % GROUP == 0:
            names.append(name)
    return names


def coarse_tensors(folder: Path, tensors: dict) -> dict[str, torch.Tensor]:
    """The coarse int4 copies of the output tables in `tensors` (a checkpoint's, mapped), from
    `coarse.safetensors` in `folder`, which the first call writes (~3 s of numpy for the bundled model's
    262k rows). Rounded from the int8 values: all logits coarse, the best ones recomputed exactly."""
    wanted = [name for name in _coarse_tables(tensors) if name + ".coarse.packed" not in tensors]
    if not wanted:
        return {}
    parts, offset = [], 0
    for name in wanted:
        rows, cols = tensors[name + ".q"].shape
        for part in _int4_parts(name + ".coarse", rows, cols, nibbles=False):
            parts.append(Part(part.name, part.dtype, part.shape, offset, offset + part.nbytes))
            offset += part.nbytes
    path = folder / COARSE_FILE
    if path.is_file():  # kept by an earlier load: used if whole and of these tables' shapes, rebuilt if not
        problem = safetensors_problem(path)
        if problem is None:
            found = map_safetensors(path)
            if all(part.name in found and tuple(found[part.name].shape) == part.shape for part in parts):
                return found
            problem = "its tables do not fit this checkpoint's"
        log.warning("rebuilding %s: %s", path, problem)
    try:
        _write_coarse_file(path, parts, tensors, wanted)
    except OSError as error:  # a read-only or full cache: build it in memory this once
        log.warning("could not keep the coarse output table in %s (%s)", folder, error)
        return _coarse_in_memory(tensors, wanted)
    return map_safetensors(path)


def _coarse_rows(tensors: dict, name: str, rows: tuple[int, int]) -> list[np.ndarray]:
    q = tensors[name + ".q"][rows[0]:rows[1]].numpy()
    scale = tensors[name + ".scale"][rows[0]:rows[1]].numpy()
    coarse = round_int4(Int8Rows(q, scale).dequantize())
    return _int4_bytes(coarse.q, coarse.scale, coarse.min, nibbles=False)


def _coarse_ranges(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(ROW_ALIGN, CHUNK_BYTES // (4 * cols) // ROW_ALIGN * ROW_ALIGN)
    return [(first, min(first + step, rows)) for first in range(0, rows, step)]


def _write_coarse_file(path: Path, parts: list[Part], tensors: dict, names: list[str]) -> None:
    """Write the coarse tables as a safetensors file at `path`, atomically (beside it, then renamed)."""
    by_name = {part.name: part for part in parts}
    head = _header_bytes(parts)
    jobs = [(name, rows) for name in names for rows in _coarse_ranges(*tensors[name + ".q"].shape)]
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out, ThreadPoolExecutor(max_workers=2) as pool:
            out.write(head)
            pending = deque(pool.submit(_coarse_rows, tensors, *job) for job in jobs[:2])  # two pieces ahead
            for position, (name, rows) in enumerate(jobs):
                packed, scales_zeros = pending.popleft().result()
                if position + 2 < len(jobs):
                    pending.append(pool.submit(_coarse_rows, tensors, *jobs[position + 2]))
                for part, data in ((by_name[name + ".coarse.packed"], packed),
                                   (by_name[name + ".coarse.scales_zeros"], scales_zeros)):
                    out.seek(len(head) + part.begin + rows[0] * part.row_bytes)
                    out.write(data.tobytes())
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _coarse_in_memory(tensors: dict, names: list[str]) -> dict[str, torch.Tensor]:
    found = {}
    for name in names:
        rows, cols = tensors[name + ".q"].shape
        pieces = [_coarse_rows(tensors, name, r) for r in _coarse_ranges(rows, cols)]
        found[name + ".coarse.packed"] = torch.from_numpy(np.concatenate([p[0] for p in pieces]))
        found[name + ".coarse.scales_zeros"] = torch.from_numpy(
            np.concatenate([p[1] for p in pieces]).view(np.float32).reshape(rows, cols // GROUP, 2))
    return found


# ----- loading -----------------------------------------------------------------------------------

_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "F32": torch.float32, "BF16": torch.bfloat16}


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of one copy-on-write memory map (nothing read yet)."""
    data = np.memmap(path, dtype=np.uint8, mode="c")
    (head_len,) = struct.unpack("<Q", bytes(data[:8]))
    head = json.loads(bytes(data[8:8 + head_len]))
    buffer = torch.from_numpy(data)
    tensors = {}
    for name, entry in head.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        raw = buffer[8 + head_len + begin:8 + head_len + end]
        tensors[name] = raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return tensors


def load_quantized_model(folder: Path, dtype: torch.dtype, shortlist: bool | None = None, native=None,
                         own_code: bool = True):
    """The model in `folder` (a quantized checkpoint) with activations in `dtype`, ready to generate.

    `shortlist`: project the output through `ShortlistHead` (its coarse table built on the first such load);
    None = where the CPU has no native bfloat16 and torch's kernels serve (there torch's int4 kernel reads
    the table about twice as fast as its int8 one; the AVX2 kernel reads the int8 table faster than both,
    and a batch of rows pays the shortlist's per-row selection).
    `native`: the AVX2 int8 kernels (models/native_kernels.py) for the int8 layers' decode steps.
    `own_code`: build our own model (models/cpu_model.py, no transformers import) where it covers the
    config; False, or a config it does not cover: transformers' model class.
    """
    from .cpu_model import ModelConfig, build_model
    from .qlinear import install_quantized

    tensors = map_safetensors(folder / "model.safetensors")
    model = build_model(ModelConfig.from_folder(folder)) if own_code else None
    if model is None:
        model = _transformers_model(folder, dtype)
    if shortlist is None:
        from .cpu_matmul import cpu_has_native_bf16

        shortlist = native is None and not cpu_has_native_bf16()
    if shortlist:
        tensors = {**tensors, **coarse_tensors(folder, tensors)}
    install_quantized(model, tensors, dtype, shortlist=shortlist, native=native)
    return model.eval()


def _transformers_model(folder: Path, dtype: torch.dtype):
    """transformers' model class for the checkpoint in `folder`, its weights on the meta device."""
    import_transformers()
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(folder)
    config.dtype = dtype
    # no_init_weights: drawing random values for empty (meta) weights that are replaced anyway costs ~0.4 s
    with MODEL_BUILD_LOCK, init_empty_weights(include_buffers=False), no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
