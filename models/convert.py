"""Turn a GGUF file into a transformers checkpoint folder (config, tokenizer, safetensors).

This is the slow, once-per-file step. It reads the header with our own reader (0.5 s for the
bundled model, against 18 s for each of the three passes `from_pretrained(gguf_file=...)` makes),
then reuses transformers' own GGUF tables for what the numbers mean: the config key mapping, the
tokenizer builders and the per-architecture tensor fix-ups (llama's q/k permutation, Gemma's
norm offset), so our checkpoint is the one transformers would have built.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .gguf_file import GGUFError, GGUFHeader, tensor_data

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]

# transformers builds a model under process-wide patches (torch's default dtype, a no-op
# `PreTrainedModel.tie_weights`) that it saves and restores without a lock: two builds at once
# can leave them in place for good, and every later Gemma then gets an untied, random lm_head.
# Every model build in this process (conversion skeleton, checkpoint load) takes this lock.
MODEL_BUILD_LOCK = threading.Lock()

# Architectures we load and test. Others may work through transformers, but we refuse them
# with a clear message rather than serve a model nobody has checked.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")


class UnsupportedModel(GGUFError):
    """The GGUF is readable but describes a model we cannot load."""


def build_config(header: GGUFHeader):
    """The transformers config this GGUF describes, built as transformers' GGUF loader builds it."""
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    arch = header.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(
            f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    config: dict = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(arch, {}))
    for key, value in header.metadata.items():
        prefix, _, rest = key.partition(".")
        target = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if target is None or target == -1 or isinstance(value, list) and prefix != arch:
            continue
        config[target] = value
    names = {t.name for t in header.tensors}
    config["tie_word_embeddings"] = "output.weight" not in names
    if config.get("model_type") == "gemma3":
        config["model_type"] = "gemma3_text"  # a GGUF holds only Gemma 3's text backbone
    config.setdefault("vocab_size", len(header.metadata.get("tokenizer.ggml.tokens", [])))
    model_type = config.pop("model_type")
    return AutoConfig.for_model(model_type, **config)


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


def build_tokenizer(header: GGUFHeader):
    """(fast tokenizer backend, tokenizer_config) built by transformers' GGUF tokenizer builders.

    We keep the `tokenizers.Tokenizer` itself and save it as `tokenizer.json`: wrapping it in a
    transformers class first would deep-copy (pickle) its 262k-token vocabulary for nothing.
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    tokenizer_dict, tokenizer_config = tokenizer_fields(header)
    try:
        backend, extra = convert_gguf_tokenizer(header.architecture, tokenizer_dict)
    except (ValueError, KeyError) as error:
        raise UnsupportedModel(f"cannot build the tokenizer of {header.path.name}: {error}") from error
    tokenizer_config.update(extra)
    return backend, {k: v for k, v in tokenizer_config.items() if v is not None and k != "chat_template"}


def save_tokenizer(backend, tokenizer_config: dict, folder: Path) -> None:
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def dequantized_state_dict(header: GGUFHeader, config, dtype: torch.dtype,
                           progress: ProgressFn | None = None) -> dict[str, torch.Tensor]:
    """Every GGUF tensor dequantized to `dtype`, under its transformers parameter name."""
    from gguf import quants
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    with MODEL_BUILD_LOCK, torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    config_dict = config.to_dict()
    processor = TENSOR_PROCESSORS.get(header.architecture, TensorProcessor)(config=config_dict)
    name_map = get_gguf_hf_weights_map(skeleton, processor)
    expected = set(skeleton.state_dict().keys())
    del skeleton
    state: dict[str, torch.Tensor] = {}
    total = len(header.tensors)
    for index, info in enumerate(header.tensors):
        try:
            weights = quants.dequantize(np.asarray(tensor_data(header, info)), info.ggml_type)
            weights = weights.reshape(tuple(reversed(info.shape)))  # GGUF lists the innermost dim first
        except (NotImplementedError, ValueError) as error:
            raise UnsupportedModel(f"cannot dequantize {info.name} ({info.type_name}): {error}") from error
        result = processor.process(weights=weights, name=info.name, tensor_key_mapping=name_map,
                                   parsed_parameters={"config": config_dict})
        if result.name in name_map:
            state[name_map[result.name]] = torch.from_numpy(np.ascontiguousarray(result.weights)).to(dtype)
        if progress and (index % 16 == 0 or index == total - 1):
            progress((index + 1) / total, f"dequantizing tensors {index + 1}/{total}")
    missing = expected - set(state) - {"lm_head.weight"}
    if missing:
        raise UnsupportedModel(
            f"{header.path.name} lacks {len(missing)} weights the model needs, e.g. {sorted(missing)[0]}"
        )
    return state


def convert_to_checkpoint(header: GGUFHeader, out_dir: Path, dtype: torch.dtype,
                          progress: ProgressFn | None = None) -> Path:
    """Write config, tokenizer and `model.safetensors` for `header` into `out_dir`, atomically.

    The folder appears complete or not at all: it is written beside its final name and renamed.
    """
    from safetensors.torch import save_file

    # Import on this thread first: transformers' lazy module is not safe to import from two at once.
    import transformers.integrations.gguf.gguf_tokenizer_mapping  # noqa: F401
    import transformers.modeling_gguf_pytorch_utils  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    started = time.perf_counter()
    config = build_config(header)
    config.dtype = dtype
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", suffix=".partial", dir=out_dir.parent))
    try:
        # The tokenizer (mostly Python) builds on a second thread while numpy dequantizes the weights.
        with ThreadPoolExecutor(max_workers=1) as pool:
            tokenizer = pool.submit(build_tokenizer, header)
            state = dequantized_state_dict(header, config, dtype, progress)
            if progress:
                progress(0.97, "writing the converted weights")
            save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
            del state
            save_tokenizer(*tokenizer.result(), staging)
        config.save_pretrained(staging)
        (staging / "source.json").write_text(json.dumps({
            "gguf": str(header.path), "dtype": str(dtype).removeprefix("torch."),
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
