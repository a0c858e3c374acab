"""What a GGUF of the architectures we serve means as a checkpoint: its config, which tensor is which
parameter, and the fix-ups some tensors need. Written here instead of read from transformers' tables.

A first conversion used to import transformers (1.45 s here: its GGUF tables and config classes) for
three small tables, and gguf-py for its tensor-name table. For Llama, Qwen 2 and Gemma 3 they are short
and fixed:

- the config: llama.cpp's metadata keys mapped to transformers' config keys (the mapping table of
  transformers' GGUF loader), over the defaults of transformers' config classes for what a GGUF does not
  say, in the shape transformers' `save_pretrained` writes (`config.json`): the config this converter has
  built since it began (transformers' loader also renames some llama-named models, which it never did);
- the names: `blk.N.attn_q.weight` is `model.layers.N.self_attn.q_proj.weight`, and so on;
- the fix-ups: llama.cpp stores Llama's q/k rows permuted for its interleaved rotary layout (undone
  here), and Gemma's norm weights as 1 + w (transformers' Gemma keeps w);
- Llama 3.1 / 3.2's rotary scaling, which llama.cpp stores as a `rope_freqs` tensor (one divisor per
  frequency) and transformers' GGUF loader drops: `llama3_rope` finds the "llama3" parameters that give
  those divisors, so the model runs with the frequencies it was trained with;
- Gemma 3 27B's attention scale, which no GGUF key holds: llama.cpp (and Google's reference code) scale
  its queries by 1/sqrt(hidden / heads) = 1/sqrt(168); transformers' loader gives every size its default
  1/sqrt(256), right for the other sizes (llama.cpp takes their head_dim, 256 in each)
  (`gemma3_query_scalar`).

Tests check each against transformers' own (config.json, name map, converted bytes), so a transformers
release that changes them shows up there; the two departures above are tested on their own.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

# transformers' model type for each GGUF architecture (a GGUF holds only Gemma 3's text backbone)
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}

_SHARED_KEYS = {
    "context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta", "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads", "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
# "<arch>.<key>" -> config key
ARCH_KEYS = {
    "llama": {**_SHARED_KEYS, "rope.dimension_count": "head_dim"},
    "qwen2": dict(_SHARED_KEYS),
    "gemma3": {**_SHARED_KEYS, "attention.key_length": "head_dim", "attention.sliding_window": "sliding_window"},
}
OTHER_KEYS = {
    "general.name": "_model_name_or_path",
    "tokenizer.ggml.bos_token_id": "bos_token_id", "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id", "tokenizer.ggml.padding_token_id": "pad_token_id",
}

# transformers' config class defaults (5.24), for what the GGUF does not say
_COMMON = {"initializer_range": 0.02, "use_cache": True, "rms_norm_eps": 1e-6, "attention_dropout": 0.0}
DEFAULTS = {
    "llama": {**_COMMON, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "hidden_act": "silu",
              "max_position_embeddings": 2048, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
              "pretraining_tp": 1, "attention_bias": False, "mlp_bias": False, "rope_theta": 10000.0},
    "qwen2": {**_COMMON, "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
              "max_position_embeddings": 32768, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
              "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28,
              "rope_theta": 10000.0},
    "gemma3_text": {**_COMMON, "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
                    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072,
                    "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "attention_bias": False,
                    "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": None,
                    "attn_logit_softcapping": None, "use_bidirectional_attention": False,
                    "_sliding_window_pattern": 6, "rope_theta": 1000000.0},
}
log = logging.getLogger(__name__)
GEMMA_LOCAL_ROPE_THETA = 10000.0  # Gemma 3's sliding-window layers (`rope_local_base_freq`)


class UnreadableConfig(ValueError):
    """The GGUF's metadata does not describe a config of its architecture."""


def checkpoint_config(architecture: str, metadata, tensor_names: set[str], vocabulary: int,
                      rope_freqs: np.ndarray | None = None) -> dict:
    """The `config.json` transformers' GGUF loader would build and save for this GGUF (without
    `transformers_version` and `dtype`). `vocabulary`: the token count, for GGUFs with no vocab_size.
    `rope_freqs`: a Llama GGUF's `rope_freqs` tensor, which makes the rotary scaling "llama3" where
    transformers' loader leaves it out (`llama3_rope`)."""
    model_type = MODEL_TYPES[architecture]
    values: dict = {}
    keys = ARCH_KEYS[architecture]
    for key in metadata:
        prefix, _, rest = key.partition(".")
        target = keys.get(rest) if prefix == architecture else OTHER_KEYS.get(key)
        if target is None:
            continue
        value = metadata[key]
        if isinstance(value, list):
            if prefix == architecture:
                raise UnreadableConfig(f"{key} holds one value per layer, which {model_type} models do not take")
            continue
        values[target] = value
    values.setdefault("vocab_size", vocabulary)
    values["tie_word_embeddings"] = "output.weight" not in tensor_names
    config = {**DEFAULTS[model_type], **values, "model_type": model_type}
    theta = float(config.pop("rope_theta"))
    layers = config["num_hidden_layers"]
    if model_type == "gemma3_text":
        pattern = config["_sliding_window_pattern"]
        config["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                 for i in range(layers)]
        config["rope_parameters"] = {"full_attention": {"rope_theta": theta, "rope_type": "default"},
                                     "sliding_attention": {"rope_theta": GEMMA_LOCAL_ROPE_THETA,
                                                           "rope_type": "default"}}
        config["query_pre_attn_scalar"] = gemma3_query_scalar(config)
        return config
    config["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    if model_type == "llama":
        config.setdefault("num_key_value_heads", config["num_attention_heads"])
        config["head_dim"] = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        if rope_freqs is not None:
            config["rope_parameters"] = llama3_rope(rope_freqs, theta, config["head_dim"])
    else:
        config["layer_types"] = ["full_attention"] * layers
    return config


GEMMA3_27B_LAYERS = 62  # how llama.cpp tells Gemma 3 27B from the other sizes (1B 26, 4B 34, 12B 48, 270M 18)


def gemma3_query_scalar(config: dict) -> int:
    """Gemma 3's `query_pre_attn_scalar` (queries are scaled by its inverse square root): hidden size / heads
    for the 27B model (168; its head_dim is 128), as llama.cpp and Google's reference code take it; otherwise
    transformers' default 256, every other released size's head_dim (llama.cpp takes the GGUF's head_dim: a
    custom model with another one would differ; none is known)."""
    if config["num_hidden_layers"] == GEMMA3_27B_LAYERS:
        return config["hidden_size"] // config["num_attention_heads"]
    return DEFAULTS["gemma3_text"]["query_pre_attn_scalar"]


# ----- Llama 3's rotary scaling -------------------------------------------------------------------
def llama3_rope(divisors: np.ndarray, theta: float, head_dim: int) -> dict:
    """The rotary parameters of a `rope_freqs` tensor: "llama3" parameters giving the same divisors.

    llama.cpp divides rotary frequency i (theta^(-2i/d), wavelength w_i = 2 pi / frequency) by
    divisor[i]: 1 for short wavelengths (w < original / high), `factor` for long ones (w > original /
    low), 1 / ((1 - s) / factor + s) between, with s = (original / w - low) / (high - low). So s is a
    straight line in 1 / w, s = a / w + b, and only a and b (with `factor`) decide the frequencies. They
    are fitted to the in-between divisors and written as low = 1 (Llama 3's own value), high = 1 - 1 / b,
    original = -a / b. With one or no divisor in between (small heads) the line is underdetermined:
    low 1 and high 4 (Llama 3's) where they fit, else a high that does. The result is checked against
    every divisor. A tensor of the wrong size or with values that are not positive is refused
    (`UnreadableConfig`); divisors of another shape are logged and left out (the model runs unscaled,
    as transformers' loader runs it).
    """
    divisors = np.asarray(divisors, dtype=np.float64).reshape(-1)
    base = {"rope_theta": float(theta), "rope_type": "default"}
    if divisors.size != head_dim // 2:
        raise UnreadableConfig(f"rope_freqs holds {divisors.size} values; a head of {head_dim} has "
                               f"{head_dim // 2} rotary frequencies")
    if not np.all(np.isfinite(divisors) & (divisors > 0)):
        raise UnreadableConfig("rope_freqs holds values that are not positive numbers")
    if np.allclose(divisors, 1.0, rtol=0, atol=1e-4):
        return base
    rope = _fit_llama3(divisors, float(theta), head_dim)
    if rope is None:
        log.warning("rope_freqs does not follow Llama 3's rotary scaling; the model runs without it")
        return base
    return rope


def _fit_llama3(divisors: np.ndarray, theta: float, head_dim: int) -> dict | None:
    factor = float(divisors.max())
    if divisors.min() < 1 - 1e-4:
        return None
    wavelengths = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    kept, divided = divisors <= 1 + 1e-4, divisors >= factor * (1 - 1e-4)
    between = ~kept & ~divided
    smooth = (1 / divisors[between] - 1 / factor) / (1 - 1 / factor)
    longest, shortest = wavelengths[kept].max(initial=0.0), float(wavelengths[divided].min())
    high = 4.0
    if between.sum() >= 2:
        a, b = np.polyfit(1 / wavelengths[between], smooth, 1)
        if b >= 0:
            return None
        high, original = 1 - 1 / b, -a / b
    elif between.any():  # original = w (1 + s (high - 1)); kept need original > high * longest, divided <= shortest
        w, s = float(wavelengths[between][0]), float(smooth[0])
        top = 1 + (shortest / w - 1) / s
        if s * w < longest:
            top = min(top, w * (1 - s) / (longest - s * w))
        high = high if high < top else (1 + top) / 2
        original = w * (1 + s * (high - 1))
    else:  # kept need original > high * longest, divided original <= shortest: a power of two if one fits
        original = float(2 ** np.floor(np.log2(shortest)))
        if original <= high * longest:
            original, high = shortest, (1 + shortest / longest) / 2
    rope = {"rope_theta": theta, "rope_type": "llama3", "factor": _tidy(factor), "low_freq_factor": 1.0,
            "high_freq_factor": _tidy(high), "original_max_position_embeddings": _tidy(original)}
    if not (high > 1 and np.isfinite(original)) or not np.allclose(llama3_divisors(rope, head_dim), divisors,
                                                                     rtol=1e-4, atol=0):
        return None
    if rope["original_max_position_embeddings"].is_integer():
        rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
    return rope


def llama3_divisors(rope: dict, head_dim: int) -> np.ndarray:
    """What llama.cpp's converter stores as `rope_freqs` for "llama3" rotary parameters `rope`."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    wavelengths = 2 * np.pi * float(rope["rope_theta"]) ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (original / wavelengths - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelengths < original / high, 1.0, np.where(wavelengths > original / low, factor, between))


def _tidy(value: float) -> float:
    """`value`, or the round number it is within float32 rounding of (8.0, not 8.000000476837158;
    8192.0, not 8192.0031)."""
    value = float(value)
    for rounded in (float(round(value)), round(value, 3)):
        if abs(rounded - value) <= 1e-5 * max(1.0, abs(value)):
            return rounded
    return value


# ----- tensor names -------------------------------------------------------------------------------
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "ffn_norm": "post_attention_layernorm",
}
# Gemma's sandwich norms: its ffn_norm comes before the MLP, and two more norms follow each half
_GEMMA_LAYER_NAMES = {**_LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm",
                      "post_attention_norm": "post_attention_layernorm",
                      "post_ffw_norm": "post_feedforward_layernorm"}


def name_map(architecture: str, parameter_names) -> dict[str, str]:
    """GGUF tensor name -> parameter name, for the model's `parameter_names` (those with no GGUF
    tensor, and GGUF tensors with no parameter such as Llama 3's `rope_freqs`, are left out)."""
    layer_names = _GEMMA_LAYER_NAMES if architecture == "gemma3" else _LAYER_NAMES
    wanted = set(parameter_names)
    found: dict[str, str] = {}
    layers = {int(name.split(".")[2]) for name in wanted if name.startswith("model.layers.")}
    for gguf_base, hf_base in _TOP_NAMES.items():
        for suffix in (".weight", ".bias"):
            if hf_base + suffix in wanted:
                found[gguf_base + suffix] = hf_base + suffix
    for layer in sorted(layers):
        for gguf_base, hf_base in layer_names.items():
            for suffix in (".weight", ".bias"):
                hf_name = f"model.layers.{layer}.{hf_base}{suffix}"
                if hf_name in wanted:
                    found[f"blk.{layer}.{gguf_base}{suffix}"] = hf_name
    return found


# ----- fix-ups ------------------------------------------------------------------------------------
class Processed(NamedTuple):
    weights: np.ndarray
    name: str


class FixUps:
    """Turns a GGUF tensor (numpy, outermost dimension first) into the parameter transformers' layout
    holds. A tensor it leaves alone comes back as the same array object, so callers can ask with an
    empty array whether a tensor changes (a tensor left alone can be converted a few rows at a time)."""

    def __init__(self, architecture: str, config: dict):
        self.architecture = architecture
        self.heads = config.get("num_attention_heads")
        self.kv_heads = config.get("num_key_value_heads")

    def process(self, weights: np.ndarray, name: str, **_) -> Processed:
        if self.architecture == "gemma3" and "norm.weight" in name:
            return Processed(weights - 1, name)  # stored as 1 + w
        if self.architecture == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = self.heads if ".attn_q." in name else self.kv_heads
            if heads:
                return Processed(unpermute_rows(weights, heads), name)
        return Processed(weights, name)


def unpermute_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: within each head, rows (0, 1, 2, ...) of the rotate-half
    layout are stored interleaved as pairs (0, half, 1, half + 1, ...)."""
    half = weights.shape[0] // heads // 2
    stored = weights.reshape(heads, half, 2, *weights.shape[1:])
    return stored.swapaxes(1, 2).reshape(weights.shape)
