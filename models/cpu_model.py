"""Our own model code for quantized CPU models: Gemma 3, Llama and Qwen 2, without importing transformers.

Importing transformers' model code costs a fresh process 3-4 s here (its modeling modules pull in
torch.distributed, sympy and dynamo; bench/RESULTS.md), more than loading and running the model. The
quantized CPU path needs none of it: `install_quantized` (models/qlinear.py) replaces every weight
with its own modules, and decode steps run in models/decode_step.py. What is left is the module tree,
a forward pass for prompts and the rotary embedding, written here.

The modules carry transformers' parameter names and attribute layout (`model.layers[i].self_attn.q_proj`,
`mlp.act_fn`, `input_layernorm`, ...) so the quantized checkpoint, `install_quantized` and `DecodeStep`
serve both. The arithmetic follows the architectures as transformers computes them (tests compare the
two on the same checkpoint). The config is the checkpoint's `config.json`, read as plain JSON.

`build_model` returns None for a config this module does not cover (another architecture, a rotary
scaling other than default / linear / llama3, attention soft-capping, bidirectional attention); the
caller then builds transformers' model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("gemma3_text", "llama", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class ModelConfig:
    """A checkpoint's `config.json` as attributes (absent keys read as None), plus `head_dim`."""

    def __init__(self, data: dict):
        self.__dict__.update(data)
        if not data.get("head_dim"):
            self.head_dim = data["hidden_size"] // data["num_attention_heads"]

    def __getattr__(self, name: str):  # only called for attributes that are not set
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    @classmethod
    def from_folder(cls, folder: Path) -> "ModelConfig":
        return cls(json.loads((Path(folder) / "config.json").read_text()))

    @property
    def gemma(self) -> bool:
        return self.model_type == "gemma3_text"

    @property
    def activation(self) -> str | None:
        return self.hidden_activation or self.hidden_act

    def kinds(self) -> list[str]:
        """Each layer's attention kind ("full_attention" | "sliding_attention")."""
        return list(self.layer_types or ["full_attention"] * self.num_hidden_layers)[:self.num_hidden_layers]

    def rope(self, kind: str) -> dict:
        """The rotary parameters of layers of `kind` (Gemma 3 has one set per kind)."""
        parameters = self.rope_parameters or {"rope_type": "default", "rope_theta": self.rope_theta or 10000.0}
        return parameters[kind] if isinstance(parameters.get(kind), dict) else parameters


def unsupported(config: ModelConfig) -> str | None:
    """Why this module can't run `config` (None if it can)."""
    if config.model_type not in ARCHITECTURES:
        return f"architecture {config.model_type!r}"
    if config.attn_logit_softcapping is not None or config.use_bidirectional_attention:
        return "attention soft-capping or bidirectional attention"
    if config.activation not in ACTIVATIONS:
        return f"activation {config.activation!r}"
    if config.rope_parameters is None and (config.rope_scaling or config.rope_local_base_freq):
        return "rotary parameters in an older config shape (rope_scaling / rope_local_base_freq)"
    if config.gemma and not config.layer_types:
        return "a Gemma config without layer_types"
    for kind in set(config.kinds()):
        rope = config.rope(kind)
        if rope.get("rope_type", "default") not in ROPE_TYPES or rope.get("partial_rotary_factor", 1.0) != 1.0:
            return f"rotary embedding {rope.get('rope_type')!r}"
    return None


def build_model(config: ModelConfig) -> "CausalLM | None":
    """The model of `config` with its weights on the meta device (to be filled by `install_quantized`),
    or None where `unsupported` says this module does not cover it."""
    if unsupported(config):
        return None
    with torch.device("meta"):
        return CausalLM(config)


# ----- modules -----------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight), in float32; Gemma's weights are stored as offsets from 1."""

    def __init__(self, size: int, eps: float, offset: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.float() + self.offset
        return F.rms_norm(x.float(), (x.shape[-1],), scale, self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos and sin [rows, tokens, head_dim] of each position, per attention kind (rotate-half form)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.frequencies = {kind: _inverse_frequencies(config.rope(kind), config.head_dim) for kind in set(config.kinds())}
        self.default_kind = config.kinds()[0]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kind: str | None = None):
        frequencies = self.frequencies[kind or self.default_kind]
        angles = positions.to(torch.float32).unsqueeze(-1) * frequencies.to(positions.device)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def _inverse_frequencies(rope: dict, dim: int) -> torch.Tensor:
    """The rotary inverse frequencies, with the "linear" or "llama3" scaling where the config asks."""
    base = float(rope.get("rope_theta", 10000.0))
    inverse = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        return inverse / float(rope["factor"])
    if kind == "llama3":  # long wavelengths slowed by `factor`, short ones kept, a smooth blend between
        factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        original = float(rope["original_max_position_embeddings"])
        wavelength = 2 * math.pi / inverse
        scaled = torch.where(wavelength > original / low, inverse / factor, inverse)
        blend = (original / wavelength - low) / (high - low)
        smoothed = (1 - blend) * scaled / factor + blend * scaled
        medium = (wavelength >= original / high) & (wavelength <= original / low)
        return torch.where(medium, smoothed, scaled)
    return inverse


class Linear(nn.Linear):
    """`nn.Linear` that draws no initial values: its weights come from the checkpoint (and drawing them
    on the meta device imports torch._dynamo, ~3 s)."""

    def reset_parameters(self) -> None:
        pass


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, window: int | None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.window = window
        bias = bool(config.attention_bias) or config.model_type == "qwen2"
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.heads * self.head_dim, bias=bias)
        self.k_proj = Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.heads * self.head_dim, hidden, bias=bool(config.attention_bias))
        if config.gemma:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, 1.0)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, 1.0)
        self.scaling = (config.query_pre_attn_scalar if config.gemma else self.head_dim) ** -0.5

    def forward(self, x: torch.Tensor, rotation, cache, index: int, mask: torch.Tensor | None) -> torch.Tensor:
        rows, count, _ = x.shape
        q = self.q_proj(x).view(rows, count, self.heads, self.head_dim)
        k = self.k_proj(x).view(rows, count, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(rows, count, self.kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rotation
        q, k = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin)
        keys, values = cache.update(k, v, index)
        if mask is None and self.window is not None and keys.shape[-2] > self.window:
            keys, values = keys[:, :, -self.window:], values[:, :, -self.window:]  # one unpadded new token
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling,
                                             enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(rows, count, -1))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [rows, heads, tokens, dim] with cos/sin [rows, tokens, dim]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        bias = bool(config.mlp_bias)
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, window: int | None):
        super().__init__()
        offset = 1.0 if config.gemma else 0.0
        size, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, window)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(size, eps, offset)
        self.post_attention_layernorm = RMSNorm(size, eps, offset)
        if config.gemma:  # Gemma normalizes each block's input and output (the "sandwich")
            self.pre_feedforward_layernorm = RMSNorm(size, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(size, eps, offset)
        self.gemma = config.gemma

    def forward(self, x: torch.Tensor, rotation, cache, index: int, mask: torch.Tensor | None) -> torch.Tensor:
        out = self.self_attn(self.input_layernorm(x), rotation, cache, index, mask)
        if self.gemma:
            x = x + self.post_attention_layernorm(out)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + out
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Embedding):
    """The token embedding; Gemma scales it by sqrt(hidden) (`embed_scale`, read by `Int8Embedding`)."""

    def __init__(self, count: int, size: int, scale: float | None):
        super().__init__(count, size)
        self.embed_scale = scale

    def reset_parameters(self) -> None:  # no initial values: see `Linear`
        pass

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = super().forward(input_ids)
        return rows if self.embed_scale is None else rows * self.embed_scale


class Backbone(nn.Module):
    """transformers' `model.model`: embedding, layers, final norm, rotary embedding."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size,
                                      config.hidden_size ** 0.5 if config.gemma else None)
        kinds = config.kinds()
        self.windows = [config.sliding_window if kind == "sliding_attention" else None for kind in kinds]
        self.layers = nn.ModuleList(DecoderLayer(config, window) for window in self.windows)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, 1.0 if config.gemma else 0.0)
        self.rotary_emb = RotaryEmbedding(config)
        self.kinds = kinds


@dataclass
class Output:
    logits: torch.Tensor
    cache: object


class CausalLM(nn.Module):
    """The language model: `forward` takes the keyword arguments transformers' models take from the engine."""

    plain_cache = True  # runs on inference/kv.py's own cache, not transformers' (see `kv.new_cache`)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, use_cache: bool = True,
                logits_to_keep: int = 0, **unused) -> Output:
        """Logits of `input_ids` [rows, tokens] after what `cache` holds (which it then holds too).

        attention_mask: [rows, cached + tokens], 0 for left padding, or None when nothing is padded;
        position_ids: [rows, tokens], each row's positions without its padding (default: after the cache).
        """
        if cache is None:
            from inference.kv import new_cache

            cache = new_cache(self)
        inner = self.model
        rows, count = input_ids.shape
        past = cache.get_seq_length()
        if position_ids is None:
            position_ids = torch.arange(past, past + count, device=input_ids.device).expand(rows, count)
        x = inner.embed_tokens(input_ids)
        rotations = {kind: inner.rotary_emb(x, position_ids, kind) for kind in set(inner.kinds)}
        masks = {window: visible_keys(attention_mask, position_ids, past + count, window)
                 for window in set(inner.windows)}
        for index, layer in enumerate(inner.layers):
            x = layer(x, rotations[inner.kinds[index]], cache, index, masks[inner.windows[index]])
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(inner.norm(x))
        if self.config.final_logit_softcapping is not None:
            cap = self.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return Output(logits, cache)


def visible_keys(padding: torch.Tensor | None, positions: torch.Tensor, length: int,
                    window: int | None) -> torch.Tensor | None:
    """Which keys each new token sees, [rows, 1, tokens, length] (None: one unpadded token sees all
    its keys, or its last `window`, which the attention slices).

    Keys are ordered by cache column; a key's position counts its row's real tokens before it, so a
    left-padded row's window and causality follow its own positions. A padding query sees every key
    (what it computes is never read, and a query that sees nothing would produce NaN).
    """
    rows, count = positions.shape
    if padding is None and count == 1:
        return None
    if padding is None:
        keys = torch.arange(length, device=positions.device).expand(rows, length)
        real = torch.ones(rows, length, dtype=torch.bool, device=positions.device)
    else:
        keys, real = padding.cumsum(-1) - 1, padding.bool()
    distance = positions.unsqueeze(-1) - keys.unsqueeze(1)  # [rows, tokens, length]
    allowed = real.unsqueeze(1) & (distance >= 0)
    if window is not None:
        allowed &= distance < window
    allowed |= ~allowed.any(-1, keepdim=True)
    return allowed.unsqueeze(1)
