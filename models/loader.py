"""Load a GGUF model for generation: convert once into a cached checkpoint, then load that.

The first load of a file converts it into a cache folder: on the CPU by default its quantized
blocks into the int4/int8 kernels' layouts (models/quant_checkpoint.py,
`<cache>/converted/<sha256>-q<format>-<layout>/`), otherwise dequantized (models/convert.py,
`<cache>/converted/<sha256>-<dtype>/`). Every later load memory-maps that safetensors file and reads
the tokenizer (Gemma's `tokenizer.model`, models/spm_tokenizer.py; transformers' `tokenizer.json` for
the others), the two in parallel.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import spm_tokenizer
from .convert import MODEL_BUILD_LOCK, build_config, checkpoint_problem, convert_to_checkpoint, import_transformers
from .cpu_matmul import cpu_has_native_bf16, use_float32_for_wide_inputs
from .decode_step import make_decode_step
from .gguf_file import GGUFHeader, read_header
from .progress import ProgressFn
from .quant_checkpoint import load_quantized_model
from .templates import KNOWN_STOP_TOKENS, ChatFormat, FimTokens, chat_format_for, fim_tokens

log = logging.getLogger(__name__)

DEFAULT_MAX_CONTEXT = 8192  # cap on the context we serve, to bound KV-cache memory on small machines
QUANTIZATIONS = ("none", "8bit", "4bit")
WEIGHTS = ("auto", "quantized", "dense")
KERNELS = ("auto", "torch", "native")
QUANT_FORMAT = 3  # version of the quantized cache layout (models/quant_checkpoint.py)


class LoadError(RuntimeError):
    """A model could not be loaded; the message says why in words a person understands."""


@dataclass(frozen=True)
class LoadOptions:
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # "auto" | "bfloat16" | "float16" | "float32"
    quantization: str = "none"  # "none" | "8bit" | "4bit" (bitsandbytes, CUDA only)
    # "quantized": keep the GGUF's quantized blocks (int4/int8 CPU kernels); "dense": dequantize to
    # `dtype` (the exact path); "auto": quantized on the CPU, dense on CUDA.
    weights: str = "auto"
    # CPU kernels of quantized weights: "auto" = the AVX2 int8 kernel where the CPU lacks native
    # bfloat16 and it builds (models/native_kernels.py), torch's elsewhere; "torch" = torch's always;
    # "native" = the AVX2 kernel on any AVX2 CPU (an error if it can't be had).
    kernels: str = "auto"
    max_context: int = DEFAULT_MAX_CONTEXT


@dataclass
class LoadedModel:
    """A model ready to generate: weights, tokenizer and how to format a chat for it."""

    model: torch.nn.Module
    tokenizer: object
    chat_format: ChatFormat
    context_length: int
    device: torch.device
    dtype: torch.dtype
    architecture: str
    stop_token_ids: frozenset[int]
    memory_bytes: int
    weights: str = "dense"  # "quantized" | "dense": how the weights are held
    kernels: str = "torch"  # "native" | "torch": what multiplies the int8 weights of decode steps
    runtime: dict = field(default_factory=dict)  # engine state that lives and dies with these weights
    decode_step: object = None  # models/decode_step.py's loop for `model`, where it covers the model
    fim: FimTokens | None = None  # fill-in-the-middle tokens, for code models that have them

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor | None = None):
        """Logits [rows, vocab] of one decode step: tokens and positions [rows, 1], one new token per row;
        `mask` [rows, length] (0 = left padding, the new column included) or None when nothing is padded."""
        step = self.decode_step
        if step is not None and step.model is self.model:
            return step(tokens, positions, cache, mask)
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1]

    def render_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` in this model's chat format, ending with the assistant's turn."""
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_format.template, add_generation_prompt=True, tokenize=False
        )
        return self.encode(text)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoadError("CUDA was asked for, but no CUDA device is available")
    return device


def pick_dtype(device: torch.device, preference: str = "auto") -> torch.dtype:
    """bfloat16 on CPU (twice float32's decode speed here), bf16/fp16 on CUDA by what the card has."""
    if preference != "auto":
        try:
            return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[preference]
        except KeyError:
            raise LoadError(f"unknown dtype {preference!r}; use auto, bfloat16, float16 or float32") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def activation_dtype(preference: str = "auto") -> torch.dtype:
    """Activations of a quantized model: bfloat16 where the CPU has it natively, else float32
    (the int4/int8 kernels take bfloat16 inputs either way; see models/qlinear.py)."""
    if preference != "auto":
        return pick_dtype(torch.device("cpu"), preference)
    from .qlinear import compute_dtype

    return compute_dtype()


def bytes_per_param(dtype: torch.dtype, quantization: str = "none") -> float:
    if quantization == "4bit":
        return 0.6
    if quantization == "8bit":
        return 1.1
    return torch.finfo(dtype).bits / 8


_memo_lock = threading.Lock()  # one writer at a time for digests.json
_folder_locks: dict[str, threading.Lock] = {}  # one conversion at a time per checkpoint folder
_folder_locks_guard = threading.Lock()


def _read_memo(memo_file: Path) -> dict:
    try:
        return json.loads(memo_file.read_text())
    except (OSError, ValueError):
        return {}


def file_digest(path: Path, memo_file: Path) -> str:
    """sha256 of the file, remembered by (path, size, mtime) so a catalog of large files stays fast.

    Safe to call from several threads at once (the manager loads models in parallel).
    """
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    with _memo_lock:
        known = _read_memo(memo_file).get(key)
    if known:
        return known
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(4 << 20), b""):
            digest.update(block)
    with _memo_lock:
        memo = _read_memo(memo_file)  # re-read: another thread may have added entries meanwhile
        memo[key] = digest.hexdigest()
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_file)
    return memo[key]


def _folder_lock(folder: Path) -> threading.Lock:
    with _folder_locks_guard:
        return _folder_locks.setdefault(str(folder), threading.Lock())


def checkpoint_dir(cache_root: Path, gguf_path: Path, dtype: torch.dtype, weights: str = "dense") -> Path:
    """The cache folder of one file's conversion: dense in `dtype`, or quantized in this machine's
    packed int4 layout (the folder name carries its fingerprint)."""
    digest = file_digest(gguf_path, cache_root / "digests.json")
    if weights == "quantized":
        from .qlinear import int4_layout_tag

        return cache_root / "converted" / f"{digest[:24]}-q{QUANT_FORMAT}-{int4_layout_tag()}"
    return cache_root / "converted" / f"{digest[:24]}-{str(dtype).removeprefix('torch.')}"


def pick_weights(device: torch.device, options: LoadOptions) -> str:
    """"quantized" or "dense" for this load; quantized weights need the CPU kernels."""
    if options.weights not in WEIGHTS:
        raise LoadError(f"unknown weights {options.weights!r}; use one of {', '.join(WEIGHTS)}")
    if options.weights == "quantized" and device.type != "cpu":
        raise LoadError("quantized GGUF weights run on the CPU kernels; on CUDA use weights=dense "
                        "(and quantization=8bit|4bit for bitsandbytes)")
    if options.weights == "auto":
        return "quantized" if device.type == "cpu" and options.quantization == "none" else "dense"
    return options.weights


def _weights_for(options: LoadOptions) -> str | None:
    """How loads with `options` hold their weights, or None where they can't load at all (each load
    then says why; the app still starts)."""
    try:
        return pick_weights(pick_device(options.device), options)
    except LoadError:
        return None


def import_model_code(options: LoadOptions = LoadOptions()) -> float:
    """Import the model code loads with `options` use; return the seconds it took.

    Quantized CPU weights run on our own model code (models/cpu_model.py, imported in milliseconds);
    chats render through Jinja (models/chat_template.py, ~0.1 s to import).
    Dense weights (CUDA, or `weights="dense"`) run on transformers' model code, whose first import
    otherwise costs the first model load seconds (its modeling modules pull in torch.distributed,
    sympy and dynamo): the app imports it once at start, so loading a model while the app runs costs
    only the header, the weights and the tokenizer.
    """
    import importlib

    from .convert import SUPPORTED_ARCHITECTURES

    started = time.perf_counter()
    from . import chat_template, cpu_model  # noqa: F401

    chat_template.prepare()

    if _weights_for(options) == "dense":
        import_transformers(tokenizers=True)
        for architecture in SUPPORTED_ARCHITECTURES:
            importlib.import_module(f"transformers.models.{architecture}.modeling_{architecture}")
    return time.perf_counter() - started


def load_tokenizer(folder: Path):
    """Our SentencePiece tokenizer where the folder has its model, else transformers' fast tokenizer from
    `tokenizer.json`, straight into the Rust backend."""
    if (folder / spm_tokenizer.MODEL_FILE).is_file():
        return spm_tokenizer.SentencePieceTokenizer.from_folder(folder)
    from transformers import PreTrainedTokenizerFast

    settings = json.loads((folder / "tokenizer_config.json").read_text())
    keys = ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token")
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                   **{k: settings[k] for k in keys if settings.get(k) is not None})


def load_weights(folder: Path, device: torch.device, dtype: torch.dtype, quantization: str):
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": dtype}
    if quantization != "none":
        if device.type != "cuda":
            raise LoadError(f"{quantization} quantization needs a CUDA GPU (bitsandbytes); this machine has none")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=quantization == "8bit", load_in_4bit=quantization == "4bit",
            bnb_4bit_compute_dtype=dtype,
        )
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    with MODEL_BUILD_LOCK:  # see its comment: transformers' loading is not thread-safe
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        use_float32_for_wide_inputs(model)
    return model.eval()


def token_lookup(tokenizer):
    """token -> id (None if absent), for either kind of tokenizer `load_tokenizer` gives. Token by token:
    transformers' `get_vocab()` would build a 262k-entry dict for a handful of lookups."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return tokenizer.token_to_id if backend is None else backend.token_to_id


def stop_ids(tokenizer, chat_format: ChatFormat) -> frozenset[int]:
    lookup = token_lookup(tokenizer)
    ids = {lookup(token) for token in (*chat_format.stop_tokens, *KNOWN_STOP_TOKENS)} - {None}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def pick_kernels(cache_root: Path, options: LoadOptions):
    """The AVX2 int8 kernels a quantized model should use (models/native_kernels.py), or None."""
    from . import native_kernels

    if options.kernels not in KERNELS:
        raise LoadError(f"unknown kernels {options.kernels!r}; use one of {', '.join(KERNELS)}")
    if options.kernels == "torch" or (options.kernels == "auto" and not native_kernels.cpu_wants_native()):
        return None
    if options.kernels == "native" and not native_kernels.cpu_has_avx2():
        raise LoadError("kernels='native' needs an x86 CPU with AVX2 and FMA; use 'auto' or 'torch'")
    kernels = native_kernels.load_kernels(cache_root / "kernels")
    if kernels is None and options.kernels == "native":
        raise LoadError("the AVX2 int8 kernel could not be built here (see the log); use 'auto' or 'torch'")
    return kernels


def prepare_kernels(cache_root: Path, options: LoadOptions) -> threading.Thread | None:
    """Build (or load) the AVX2 kernels on a background thread where loads with `options` use quantized
    weights: a first start runs the C compiler (~2 s of one core) while the app starts up, rather than
    during the first conversion, which keeps both cores busy. Loads then find the kernels ready."""
    if _weights_for(options) != "quantized":
        return None

    def build() -> None:
        try:
            pick_kernels(cache_root, options)
        except LoadError:  # the load that needs them says why
            pass

    thread = threading.Thread(target=build, name="kernel-build", daemon=True)
    thread.start()
    return thread


def prepare_checkpoint(header: GGUFHeader, cache_root: Path, dtype: torch.dtype, weights: str,
                       progress: ProgressFn | None = None) -> Path:
    """The cached checkpoint folder of `header`'s file, converted first if missing or damaged."""
    report = progress or (lambda fraction, message: None)
    folder = checkpoint_dir(cache_root, header.path, dtype, weights)
    with _folder_lock(folder):  # a second load of the same file waits for the first conversion
        problem = checkpoint_problem(folder)
        if problem:
            if folder.exists():
                log.warning("rebuilding the cached checkpoint %s: %s", folder, problem)
                report(0.0, "rebuilding a damaged conversion cache")
            else:
                report(0.0, "converting the GGUF file (first load only)")
            convert_to_checkpoint(header, folder, dtype, progress=lambda f, m: report(0.9 * f, m),
                                  quantized=weights == "quantized")
        else:
            if spm_tokenizer.applies_to(header) and not (folder / spm_tokenizer.MODEL_FILE).is_file():
                report(0.0, "building the tokenizer (once)")  # a folder converted before we built Gemma's
                spm_tokenizer.write_tokenizer(header, folder)
            refresh_config(header, folder)
    return folder


# config.json keys a cached conversion's weights do not depend on
REFRESHED_KEYS = ("rope_parameters", "query_pre_attn_scalar")


def refresh_config(header: GGUFHeader, folder: Path) -> None:
    """Bring a cached checkpoint's `config.json` up to date where this version reads the GGUF
    differently in a way the converted weights do not depend on (`REFRESHED_KEYS`: Llama 3.1's
    rotary scaling and Gemma 3 27B's attention scale, which conversions before them had wrong).
    Written in place of the old file, atomically."""
    path = folder / "config.json"
    stored = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(stored, dict):
        return  # checkpoint_problem has read it: only a hand edit gets here, and the load will say so
    wanted = json.loads(json.dumps(build_config(header)))
    changed = [key for key in REFRESHED_KEYS if stored.get(key) != wanted.get(key)]
    if not changed:
        return
    log.info("updating %s's cached config (%s)", header.path.name, ", ".join(changed))
    from sessions.storage import atomic_write_bytes  # the project's crash-safe write (README: Layout)

    updated = {**stored, **{key: wanted.get(key) for key in changed}}
    try:
        atomic_write_bytes(path, (json.dumps(updated, indent=2, sort_keys=True) + "\n").encode())
    except OSError as error:
        raise LoadError(f"could not update the cached config {path} ({error})") from error


def load_model(gguf_path: Path, cache_root: Path, options: LoadOptions = LoadOptions(),
               progress: ProgressFn | None = None, header: GGUFHeader | None = None) -> LoadedModel:
    """Load `gguf_path`, converting it first if no cached checkpoint exists. Raises `LoadError`."""
    report = progress or (lambda fraction, message: None)
    if options.quantization not in QUANTIZATIONS:
        raise LoadError(f"unknown quantization {options.quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
    header = header or read_header(gguf_path)
    chat_format = chat_format_for(header.architecture, header.chat_template)
    device = pick_device(options.device)
    weights = pick_weights(device, options)
    dtype = pick_dtype(device, options.dtype) if weights == "dense" else activation_dtype(options.dtype)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # the AVX2 kernels (compiled by a C compiler on a first start) build while the file converts
        kernels = pool.submit(pick_kernels, cache_root, options) if weights == "quantized" else None
        folder = prepare_checkpoint(header, cache_root, dtype, weights, report)
        report(0.9, "loading weights")
        if weights == "dense" or not (folder / spm_tokenizer.MODEL_FILE).is_file():
            import_transformers(tokenizers=True)  # before the tokenizer's thread imports any of it
        native = kernels.result() if kernels is not None else None
        tokenizer_future = pool.submit(load_tokenizer, folder)
        if weights == "quantized":
            model = load_quantized_model(folder, dtype, native=native)
        else:
            model = load_weights(folder, device, dtype, options.quantization)
        tokenizer = tokenizer_future.result()
    memory = sum(p.numel() * p.element_size() for p in model.parameters())
    memory += sum(b.numel() * b.element_size() for b in model.buffers())
    context = min(int(getattr(model.config, "max_position_embeddings", None) or header.context_length),
                  header.context_length, options.max_context)
    fim = fim_tokens(header.metadata, token_lookup(tokenizer), len(tokenizer))
    report(1.0, "loaded")
    return LoadedModel(
        model=model, tokenizer=tokenizer, chat_format=chat_format, context_length=context,
        device=device, dtype=dtype, architecture=header.architecture,
        stop_token_ids=stop_ids(tokenizer, chat_format) | (fim.stops if fim else frozenset()), memory_bytes=memory,
        weights=weights,
        kernels="torch" if native is None else "native",
        decode_step=make_decode_step(model) if weights == "quantized" else None,
        fim=fim,
    )
