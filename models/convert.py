"""Turn a GGUF file into a transformers checkpoint folder (config, tokenizer, safetensors).

This is the slow, once-per-file step. It reads the header with our own reader (a small fraction of
the time of each of the three passes `from_pretrained(gguf_file=...)` makes; bench/RESULTS.md),
then gives the numbers the meaning transformers' GGUF loader gives them: the config, the tensor names
and the per-architecture tensor fix-ups (llama's q/k permutation, Gemma's norm offset) from
models/gguf_arch.py (transformers' tables, written out for our three architectures and tested against
them), and the tokenizer from transformers' GGUF tokenizer builders, so our checkpoint is the one
transformers would have built.

Where transformers' own steps are slow we take faster routes to the same result: Gemma's tokenizer as a
SentencePiece model of its own vocabulary (models/spm_tokenizer.py; other SentencePiece files get their
merges derived in numpy), the weights dequantized in numpy without gguf-py (models/quant_blocks.py) and
streamed into `model.safetensors` a megabyte at a time, never all in memory at once. A first conversion
of a Gemma model imports neither transformers nor gguf-py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import gguf_arch, spm_tokenizer
from .gguf_file import GGML_TYPES, GGUFError, GGUFHeader, TensorInfo
from .merges import sentencepiece_merges
from .progress import ProgressFn
from .quant_blocks import dequantize

log = logging.getLogger(__name__)


# transformers builds a model under process-wide patches (torch's default dtype, a no-op
# `PreTrainedModel.tie_weights`) that it saves and restores without a lock: two builds at once
# can leave them in place for good, and every later Gemma then gets an untied, random lm_head.
# Every build of one of transformers' models in this process takes this lock (our own model code,
# models/cpu_model.py, patches nothing and does not).
MODEL_BUILD_LOCK = threading.Lock()
_IMPORT_LOCK = threading.Lock()
_imported: set[str] = set()


def import_transformers(tokenizers: bool = False) -> None:
    """Import the parts of transformers the app uses, once, under one lock: its lazy module is not safe
    to import from two threads at once, and models load in parallel. Its config and model classes and
    cache; with `tokenizers`, its fast tokenizer and GGUF tokenizer builders (~1.3 s more).
    A quantized Gemma model needs none of it, converting or loading."""
    with _IMPORT_LOCK:
        if "core" not in _imported:
            from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache  # noqa: F401
            _imported.add("core")
        if tokenizers and "tokenizers" not in _imported:
            import transformers.integrations.gguf.gguf_tokenizer_mapping  # noqa: F401
            from transformers import PreTrainedTokenizerFast  # noqa: F401
            _imported.add("tokenizers")

# Architectures we load and test. Others may work through transformers, but we refuse them
# with a clear message rather than serve a model nobody has checked.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")


class UnsupportedModel(GGUFError):
    """The GGUF is readable but describes a model we cannot load."""


def build_config(header: GGUFHeader) -> dict:
    """The `config.json` this GGUF describes, as transformers' GGUF loader builds and saves it
    (models/gguf_arch.py), without `dtype`."""
    arch = header.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(
            f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    try:
        return gguf_arch.checkpoint_config(arch, header.metadata, {t.name for t in header.tensors},
                                           header.metadata.length("tokenizer.ggml.tokens"), _rope_freqs(header))
    except gguf_arch.UnreadableConfig as error:
        raise UnsupportedModel(f"{header.path.name}: {error}") from error


def _rope_freqs(header: GGUFHeader) -> np.ndarray | None:
    """A Llama GGUF's `rope_freqs` tensor (Llama 3.1 / 3.2's rotary scaling), or None."""
    info = next((t for t in header.tensors if t.name == "rope_freqs.weight"), None)
    if info is None or header.architecture != "llama":
        return None
    if info.ggml_type not in GGML_TYPES or info.n_elements > 1 << 16:
        raise UnsupportedModel(f"{header.path.name}: rope_freqs is not a small float tensor")
    rows = info.n_elements // (info.shape[0] if info.shape else 1)
    return dequantize(read_rows(header, info, (0, rows)), info.ggml_type)


def transformers_config(config: dict):
    """transformers' config object for a `config.json` dict (for transformers' own model classes)."""
    import_transformers()
    from transformers import AutoConfig

    values = dict(config)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def tokenizer_fields(header: GGUFHeader) -> tuple[dict, dict]:
    """(tokenizer_dict, tokenizer_config) in the shape transformers' GGUF tokenizer builders take."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    meta = header.metadata
    grouped = {
        group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokens = grouped["tokenizer"].get("tokens")
    if not tokens:
        raise UnsupportedModel(f"{header.path.name} carries no tokenizer vocabulary")
    tokenizer_config = grouped["tokenizer_config"]
    if grouped["tokenizer"].get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokens[token_id] if token_id is not None and token_id < len(tokens) else None
    return grouped["tokenizer"], tokenizer_config


def build_tokenizer(header: GGUFHeader) -> tuple[str, dict]:
    """(`tokenizer.json` text, tokenizer_config) built by transformers' GGUF tokenizer builders.

    We keep the `tokenizers.Tokenizer`'s JSON: wrapping it in a transformers class first would
    deep-copy (pickle) its 262k-token vocabulary for nothing. Where transformers would derive the
    merges from the vocabulary (SentencePiece files), we derive them (see `derive_merges`), let it
    build the tokenizer without any, and write ours into its JSON: passing 515k merges through
    `tokenizers` and back costs seconds.
    """
    tokenizer_dict, tokenizer_config = tokenizer_fields(header)
    merges = sentencepiece_merges(header.architecture, tokenizer_dict)
    text = None
    if merges is not None:
        text, extra = _tokenizer_json(header, dict(tokenizer_dict, merges=[]))
        if text.count(_NO_MERGES) == 1:
            text = text.replace(_NO_MERGES, '"merges":' + merges)
        else:  # a `tokenizers` that writes an empty merge list otherwise: let transformers derive them
            text = None
    if text is None:
        text, extra = _tokenizer_json(header, tokenizer_dict)
    tokenizer_config.update(extra)
    return text, {k: v for k, v in tokenizer_config.items() if v is not None and k != "chat_template"}


_NO_MERGES = '"merges":[]'  # how a BPE model without merges appears in `Tokenizer.to_str()`


def _tokenizer_json(header: GGUFHeader, tokenizer_dict: dict) -> tuple[str, dict]:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    try:
        backend, extra = convert_gguf_tokenizer(header.architecture, tokenizer_dict)
    except (ValueError, KeyError) as error:
        raise UnsupportedModel(f"cannot build the tokenizer of {header.path.name}: {error}") from error
    return backend.to_str(), extra


def write_tokenizer(header: GGUFHeader, folder: Path) -> None:
    """The tokenizer files of `header`: a SentencePiece model where models/spm_tokenizer.py builds one
    (Gemma's), transformers' `tokenizer.json` otherwise."""
    if spm_tokenizer.applies_to(header):
        spm_tokenizer.write_tokenizer(header, folder)
    else:
        save_tokenizer(*build_tokenizer(header), folder)


def save_tokenizer(tokenizer_json: str, tokenizer_config: dict, folder: Path) -> None:
    (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


# ----- weights -----------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
CHUNK_BYTES = 1 << 20  # float32 bytes dequantized at once from a tensor that needs no fix-up
SERIAL_VALUES = 32768  # torch converts fewer values than this on the calling thread alone
WORKERS = 2  # threads dequantizing (numpy and torch release the GIL): 15% faster than one here
LOOKAHEAD = 2  # pieces dequantized ahead of the one being written: bounds the memory in flight


@dataclass(frozen=True)
class WeightSlot:
    """One tensor of `model.safetensors`: the GGUF tensor it comes from and its place in the file."""

    name: str  # the transformers parameter name
    source: TensorInfo
    shape: tuple[int, ...]  # as transformers expects it, outermost dimension first
    begin: int  # byte range in the file's data section
    end: int
    fix_up: bool  # the architecture's tensor processor changes it, so it is converted whole


@dataclass
class WeightPlan:
    """Every tensor `model.safetensors` gets, and what turns GGUF tensors into them."""

    slots: list[WeightSlot]
    fix_ups: gguf_arch.FixUps  # the architecture's tensor fix-ups
    name_map: dict[str, str]  # GGUF tensor name -> transformers parameter name

    def process(self, weights: np.ndarray, info: TensorInfo) -> gguf_arch.Processed:
        return self.fix_ups.process(weights, info.name)


def plan_weights(header: GGUFHeader, config: dict, dtype: torch.dtype) -> WeightPlan:
    """Which GGUF tensor fills which parameter, with what shape, at which offset of the file.

    Shapes come from the model's module tree on the meta device (no memory, see `model_skeleton`).
    """
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"cannot write {dtype} weights; use one of {', '.join(map(str, SAFETENSORS_DTYPES))}")
    skeleton = model_skeleton(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    del skeleton
    name_map = gguf_arch.name_map(header.architecture, shapes)
    plan = WeightPlan([], gguf_arch.FixUps(header.architecture, config), name_map)
    sources = {name_map[info.name]: info for info in header.tensors if info.name in name_map}
    missing = set(shapes) - set(sources) - {"lm_head.weight"}
    if missing:
        raise UnsupportedModel(
            f"{header.path.name} lacks {len(missing)} weights the model needs, e.g. {sorted(missing)[0]}"
        )
    offset = 0
    for name, info in sources.items():
        shape = shapes[name]
        fix_up = _needs_fix_up(plan, info)
        if info.n_elements != math.prod(shape) or not fix_up and tuple(reversed(info.shape)) != shape:
            raise _shape_error(header, info, tuple(reversed(info.shape)), name, shape)
        size = math.prod(shape) * dtype.itemsize
        plan.slots.append(WeightSlot(name, info, shape, offset, offset + size, fix_up))
        offset += size
    return plan


def model_skeleton(config: dict, own_code: bool = True):
    """The model of `config` (a `config.json` dict) on the meta device, for its parameter names and
    shapes: our own (models/cpu_model.py, same names) where it covers the config, which spares a first
    conversion importing transformers' model code (~5 s here); transformers' model otherwise, or with
    `own_code=False`."""
    from .cpu_model import ModelConfig, build_model

    skeleton = build_model(ModelConfig(config)) if own_code else None
    if skeleton is None:
        hf_config = transformers_config(config)
        from transformers import AutoModelForCausalLM

        with MODEL_BUILD_LOCK, torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(hf_config)
    return skeleton


def _needs_fix_up(plan: WeightPlan, info: TensorInfo) -> bool:
    """Whether the fix-ups change this tensor, asked with an empty tensor of its shape (they return the
    array they were given for a tensor they leave alone); a tensor left alone can be converted a few
    rows at a time."""
    probe = np.zeros((0, *reversed(info.shape[:-1])), dtype=np.float32)
    return plan.process(probe, info).weights is not probe


def _shape_error(header: GGUFHeader, info: TensorInfo, got: tuple, name: str, want: tuple) -> UnsupportedModel:
    return UnsupportedModel(
        f"{header.path.name}: tensor {info.name} has shape {list(got)}, "
        f"but the model expects {list(want)} for {name}"
    )


def safetensors_header(slots: list[WeightSlot], dtype: torch.dtype) -> bytes:
    """The header of a safetensors file holding `slots`: its length (8 bytes, little-endian), then
    JSON naming each tensor's dtype, shape and byte range, padded with spaces to a multiple of 8."""
    entries: dict = {"__metadata__": {"format": "pt"}}
    for slot in slots:
        entries[slot.name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(slot.shape),
                              "data_offsets": [slot.begin, slot.end]}
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _pieces(slot: WeightSlot) -> list[tuple[int, int]]:
    """Row ranges of `slot`'s GGUF tensor converted one at a time (one range if it needs a fix-up)."""
    row_length = slot.source.shape[0] if slot.source.shape else 1
    rows = slot.source.n_elements // row_length if row_length else 0
    step = max(1, rows if slot.fix_up else CHUNK_BYTES // (4 * row_length))
    return [(first, min(first + step, rows)) for first in range(0, rows, step)] or [(0, 0)]


def read_rows(header: GGUFHeader, info: TensorInfo, rows: tuple[int, int]) -> np.ndarray:
    """The raw bytes of rows `rows` (first, last) of a GGUF tensor, as uint8."""
    _, block, block_bytes = GGML_TYPES[info.ggml_type]
    row_length = info.shape[0] if info.shape else 1
    if row_length % block:
        raise UnsupportedModel(f"cannot dequantize {info.name} ({info.type_name}): rows of {row_length} values")
    row_bytes = row_length // block * block_bytes
    first, last = rows
    with header.path.open("rb") as source:  # read, not mapped: mapped pages would count as our memory
        source.seek(info.offset + first * row_bytes)
        raw = source.read((last - first) * row_bytes)
    if len(raw) != (last - first) * row_bytes:
        raise GGUFError(f"{header.path.name} is truncated: tensor {info.name} runs past the end of the file")
    return np.frombuffer(raw, dtype=np.uint8)


def _piece_bytes(header: GGUFHeader, plan: WeightPlan, slot: WeightSlot, rows: tuple[int, int],
                 dtype: torch.dtype) -> np.ndarray:
    """Rows `rows` of `slot` dequantized, fixed up if needed, and converted to `dtype`, as bytes."""
    info = slot.source
    raw = read_rows(header, info, rows)
    try:
        weights = dequantize(raw, info.ggml_type)  # flat: one numpy pass
    except (NotImplementedError, ValueError) as error:
        raise UnsupportedModel(f"cannot dequantize {info.name} ({info.type_name}): {error}") from error
    if slot.fix_up:
        result = plan.process(weights.reshape(tuple(reversed(info.shape))), info)
        if tuple(result.weights.shape) != slot.shape:
            raise _shape_error(header, info, tuple(result.weights.shape), slot.name, slot.shape)
        weights = result.weights
    return _converted_bytes(np.ascontiguousarray(weights).reshape(-1), dtype)


def _converted_bytes(weights: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Flat float32 `weights` converted to `dtype` as torch converts them, as bytes.

    `SERIAL_VALUES` at a time, below the size at which torch splits a conversion across its
    threads: two pieces converting at once, each with its own thread team, on a busy two-core
    machine spin-wait for each other (an order of magnitude slower for the bundled model).
    """
    if dtype == torch.float32:
        return weights.view(np.uint8)
    if not weights.flags.writeable:  # a view of the file's bytes (an F32 tensor): torch wants its own memory
        weights = weights.copy()
    source = torch.from_numpy(weights)
    converted = torch.empty(len(weights), dtype=dtype)
    for first in range(0, len(weights), SERIAL_VALUES):
        converted[first:first + SERIAL_VALUES] = source[first:first + SERIAL_VALUES]
    return converted.view(torch.uint8).numpy()


def write_weights(header: GGUFHeader, config, dtype: torch.dtype, path: Path,
                  progress: ProgressFn | None = None) -> None:
    """Write `model.safetensors`: every GGUF tensor dequantized to `dtype` under its transformers name.

    Streamed: the header first (shapes and offsets are known from the plan), then the tensors a few
    megabytes at a time, so memory holds a few pieces rather than the whole model.
    """
    plan = plan_weights(header, config, dtype)
    head = safetensors_header(plan.slots, dtype)
    jobs = iter([(index, slot, rows) for index, slot in enumerate(plan.slots) for rows in _pieces(slot)])
    total = plan.slots[-1].end if plan.slots else 0
    pending: deque = deque()
    written = 0
    with path.open("wb") as out, ThreadPoolExecutor(max_workers=WORKERS) as pool:

        def submit_next() -> None:
            job = next(jobs, None)
            if job is not None:
                index, slot, rows = job
                pending.append((index, slot, pool.submit(_piece_bytes, header, plan, slot, rows, dtype)))

        try:
            for _ in range(LOOKAHEAD):
                submit_next()
            out.write(head)
            while pending:
                index, slot, piece = pending.popleft()
                data = piece.result()
                submit_next()
                out.write(data)
                written += data.nbytes
                if progress and written == slot.end:
                    fraction = written / total if total else 1.0
                    progress(fraction, f"converting tensors {index + 1}/{len(plan.slots)}")
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    if written != total:
        raise RuntimeError(f"wrote {written:,} bytes of weights for {header.path.name}, expected {total:,}")


CHECKPOINT_FILES = ("config.json", "tokenizer_config.json", "source.json", "model.safetensors")


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint folder cannot be used as it is (missing, cut short, damaged), or None.

    A folder is renamed into place only once complete, but a crash or power loss before the data
    reached the disk, a full disk or a hand edit can still leave it broken. Cheap enough for every
    load: the small JSON files are parsed, the large ones checked for their length and ending.
    """
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    for name in CHECKPOINT_FILES[:3]:
        try:
            json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"{name} is damaged ({exc})"
    return _tokenizer_problem(folder) or safetensors_problem(folder / "model.safetensors")


def _tokenizer_problem(folder: Path) -> str | None:
    """The tokenizer is ours (`tokenizer.model`, models/spm_tokenizer.py) or transformers' (`tokenizer.json`)."""
    if (folder / spm_tokenizer.MODEL_FILE).is_file():
        return spm_tokenizer.model_problem(folder)
    if not (folder / "tokenizer.json").is_file():
        return "missing tokenizer.json"
    with (folder / "tokenizer.json").open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 16))
        if not handle.read().rstrip().endswith(b"}"):
            return "tokenizer.json is cut short"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file at `path` is damaged (a header that does not parse, a size that is not
    the one its header gives), or None."""
    name = path.name
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            (head_len,) = struct.unpack("<Q", handle.read(8))
            if head_len > size - 8:
                return f"{name} is cut short"
            head = json.loads(handle.read(head_len))
        ends = [entry["data_offsets"][1] for key, entry in head.items() if key != "__metadata__"]
    except (OSError, ValueError, struct.error, AttributeError, KeyError, TypeError, IndexError) as exc:
        return f"{name} has a damaged header ({exc})"
    expected = 8 + head_len + max(ends, default=0)
    if size != expected:
        return f"{name} is {size:,} bytes, its header says {expected:,}"
    return None


def convert_to_checkpoint(header: GGUFHeader, out_dir: Path, dtype: torch.dtype,
                          progress: ProgressFn | None = None, quantized: bool = False) -> Path:
    """Write config, tokenizer and `model.safetensors` for `header` into `out_dir`, atomically.

    `quantized`: keep the GGUF's quantized matrices in the CPU kernels' layouts
    (models/quant_checkpoint.py) instead of dequantizing them to `dtype`.
    The folder appears complete or not at all: it is written beside its final name and renamed.
    """
    if not spm_tokenizer.applies_to(header):  # transformers' tokenizer builders (our Gemma tokenizer needs none)
        import_transformers(tokenizers=True)
    started = time.perf_counter()
    config = {**build_config(header), "dtype": str(dtype).removeprefix("torch.")}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", suffix=".partial", dir=out_dir.parent))
    try:
        # The tokenizer (mostly Python) builds and saves on a second thread while numpy converts the weights.
        with ThreadPoolExecutor(max_workers=1) as pool:
            tokenizer = pool.submit(write_tokenizer, header, staging)
            if quantized:
                from .quant_checkpoint import write_quantized_weights

                write_quantized_weights(header, config, staging / "model.safetensors", progress)
            else:
                write_weights(header, config, dtype, staging / "model.safetensors", progress)
            tokenizer.result()
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (staging / "source.json").write_text(json.dumps({
            "gguf": str(header.path), "dtype": str(dtype).removeprefix("torch."), "quantized": quantized,
            "seconds": round(time.perf_counter() - started, 2),
        }))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("converted %s in %.1f s", header.path.name, time.perf_counter() - started)
    return out_dir
