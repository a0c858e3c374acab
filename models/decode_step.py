"""One decode step (one new token per row) of a quantized CPU model, without transformers' call stack.

A decode step of a small model is many small operations: Gemma 3 270M runs 18 layers of 7 matrix
products, 6 norms, rotary embeddings and attention per token. Through transformers' modules each
step also pays for decorators, keyword plumbing, output records and mask builders, which on a small
CPU is a large share of the step once the kernels are fast (bench/RESULTS.md). `DecodeStep` runs
the same layers in a plain loop: the model's own modules for every weight (the quantized linears, the
fused norms, the rotary embedding), the same KV cache object (so the batcher's cache surgery and the
prefill path are unchanged), and the same masking rules (left padding, sliding windows).

Where the AVX2 kernels serve every product of every layer (models/native_kernels.py), the whole layer
stack goes further still: one C call a step (native/layers.c, `NativeLayers`), with the same cache
buffers, masks and windows; the loop below stays the path for everything else (other dtypes, wide
batches, layers some product of which the kernels cannot read).

Covered: the architectures the converter supports (llama, qwen2, gemma3), built by our own model code
(models/cpu_model.py, the default for quantized weights) or by transformers (same module layout);
`make_decode_step` returns None for anything else (e.g. attention logit soft-capping), and callers
then use the model's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_model import rotate, visible_keys

NATIVE_MAX_ROWS = 32  # batches of fewer rows run the C layer stack; wider ones the loop
ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu_tanh": 1}  # native/layers.c's `act`


class DecodeStep:
    """`step(tokens, positions, cache, mask)` -> logits [rows, vocab] for one new token per row.

    tokens, positions: [rows, 1]; cache: the model's KV cache (updated in place);
    mask: None when no row is padded, else [rows, length] with 0 for left padding, the new token's
    column included.
    """

    def __init__(self, model, gemma: bool):
        config = model.config
        inner = model.model
        self.model, self.gemma = model, gemma
        self.embed, self.norm, self.head, self.rotary = inner.embed_tokens, inner.norm, model.lm_head, inner.rotary_emb
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.softcap = getattr(config, "final_logit_softcapping", None)
        types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        self.layer_types = types
        self.layers = [(layer, window if types[i] == "sliding_attention" and window else None)
                       for i, layer in enumerate(inner.layers[:config.num_hidden_layers])]
        self.native = NativeLayers.build(self)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor | None = None):
        x = self.embed(tokens)
        rotations = self._rotations(x, positions)
        if self.native is not None and self.native.run(x, rotations, cache, mask):
            return self._logits(x)
        masks: dict = {}
        for index, (layer, window) in enumerate(self.layers):
            cos, sin = rotations[self.layer_types[index]]
            attention_mask = self._mask(masks, mask, positions, window)
            x = self._layer(layer, x, cos, sin, cache, index, attention_mask, window)
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.norm(x))[:, -1]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _rotations(self, x: torch.Tensor, positions: torch.Tensor) -> dict:
        if self.gemma:
            return {kind: self.rotary(x, positions, kind) for kind in set(self.layer_types)}
        rotation = self.rotary(x, positions)
        return {kind: rotation for kind in set(self.layer_types)}

    def _layer(self, layer, x, cos, sin, cache, index: int, attention_mask, window):
        attention = layer.self_attn
        rows = x.shape[0]
        h = layer.input_layernorm(x)
        q = attention.q_proj(h).view(rows, 1, self.heads, self.head_dim)
        k = attention.k_proj(h).view(rows, 1, self.kv_heads, self.head_dim)
        v = attention.v_proj(h).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.gemma:
            q, k = attention.q_norm(q), attention.k_norm(k)
        q, k = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin)
        keys, values = cache.update(k, v, index)
        if window is not None and attention_mask is None and keys.shape[-2] > window:
            keys, values = keys[:, :, -window:], values[:, :, -window:]  # unpadded: the last `window` tokens
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attention_mask, scale=attention.scaling,
                                             enable_gqa=self.heads != self.kv_heads)
        out = attention.o_proj(out.transpose(1, 2).reshape(rows, 1, -1))
        mlp = layer.mlp
        if self.gemma:
            x = x + layer.post_attention_layernorm(out)
            h = layer.pre_feedforward_layernorm(x)
            return x + layer.post_feedforward_layernorm(mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)))
        x = x + out
        h = layer.post_attention_layernorm(x)
        return x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))

    @staticmethod
    def _mask(masks: dict, mask, positions, window):
        """The boolean attention mask [rows, 1, 1, length] of a padded batch (None when unpadded)."""
        if mask is None:
            return None
        if window not in masks:
            masks[window] = visible_keys(mask, positions, mask.shape[-1], window)
        return masks[window]


class NativeLayers:
    """The layer stack of a `DecodeStep` as one call into native/layers.c.

    Built once per model from its modules' own buffers (the C side keeps pointers to them: the
    modules must outlive this object, which `DecodeStep` guarantees by holding both). `run` serves a
    step when it can (float32 activations, fewer than `NATIVE_MAX_ROWS` rows, left padding only, a
    cache whose layers lend their buffers) and returns False otherwise, so the caller runs the loop.
    """

    def __init__(self, kernels, config, specs, rope_kinds: list[str]):
        self.kernels, self.config, self.specs, self.rope_kinds = kernels, config, specs, rope_kinds

    @classmethod
    def build(cls, step: "DecodeStep") -> "NativeLayers | None":
        from .native_kernels import LayerConfig, LayerSpec, LinearSpec
        from .qlinear import FusedRMSNorm, Int4Linear, Int8Linear

        kernels = getattr(step.head, "native", None)
        config = step.model.config
        act = ACTIVATIONS.get(getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None))
        if kernels is None or act is None:
            return None
        norms = []

        def linear(module):
            if isinstance(module, Int8Linear) and module.native is not None:
                spec = (8, module.q, module.scale32)
            elif isinstance(module, Int4Linear) and module.native is not None:
                spec = (4, module.nibbles, module.native_scales)
            else:
                raise _Unsupported()
            bias = module.bias
            if bias is not None and bias.dtype != torch.float32:
                raise _Unsupported()
            bits, weights, scales = spec
            return LinearSpec(bits, 0, module.out_features, module.in_features, weights.data_ptr(), scales.data_ptr(),
                              bias.data_ptr() if bias is not None else None)

        def norm(module, size: int):
            if module is None:
                return None
            if not isinstance(module, FusedRMSNorm) or module.weight.numel() != size:
                raise _Unsupported()
            norms.append(module.eps)
            return module.weight.data_ptr()

        kinds = sorted(set(step.layer_types))
        specs = (LayerSpec * len(step.layers))()
        hidden, ffn = config.hidden_size, config.intermediate_size
        queries, kvs = step.heads * step.head_dim, step.kv_heads * step.head_dim
        shapes = {"q": (queries, hidden), "k": (kvs, hidden), "v": (kvs, hidden), "o": (hidden, queries),
                  "gate": (ffn, hidden), "up": (ffn, hidden), "down": (hidden, ffn)}  # what layers.c assumes
        if step.head_dim % 2 or step.heads % step.kv_heads:
            return None
        try:
            for index, (spec, (layer, window)) in enumerate(zip(specs, step.layers)):
                attention, mlp = layer.self_attn, layer.mlp
                for name, module in (("q", attention.q_proj), ("k", attention.k_proj), ("v", attention.v_proj),
                                     ("o", attention.o_proj), ("gate", mlp.gate_proj), ("up", mlp.up_proj),
                                     ("down", mlp.down_proj)):
                    if (getattr(module, "out_features", None), getattr(module, "in_features", None)) != shapes[name]:
                        raise _Unsupported()
                    setattr(spec, name, linear(module))
                spec.norm_in = norm(layer.input_layernorm, hidden)
                if step.gemma:
                    spec.norm_attn_out = norm(layer.post_attention_layernorm, hidden)
                    spec.norm_ff_in = norm(layer.pre_feedforward_layernorm, hidden)
                    spec.norm_ff_out = norm(layer.post_feedforward_layernorm, hidden)
                    spec.norm_q, spec.norm_k = norm(attention.q_norm, step.head_dim), norm(attention.k_norm,
                                                                                             step.head_dim)
                else:
                    spec.norm_ff_in = norm(layer.post_attention_layernorm, hidden)
                spec.window = window or 0
                spec.rope = kinds.index(step.layer_types[index])
        except _Unsupported:
            return None
        if len(set(norms)) != 1:
            return None
        settings = LayerConfig(hidden=config.hidden_size, heads=step.heads, kv_heads=step.kv_heads,
                               head_dim=step.head_dim, ffn=config.intermediate_size, act=act, threads=0,
                               eps=norms[0], scaling=step.layers[0][0].self_attn.scaling)
        return cls(kernels, settings, specs, kinds)

    def run(self, x: torch.Tensor, rotations: dict, cache, mask: torch.Tensor | None) -> bool:
        rows = x.shape[0]
        layers = getattr(cache, "layers", None)
        if (x.dtype != torch.float32 or rows >= NATIVE_MAX_ROWS or x.shape[1] != 1 or not layers
                or len(layers) < len(self.specs)
                or not all(hasattr(layer, "reserve") and getattr(layer, "is_initialized", False) for layer in layers)):
            return False
        keys = layers[0].keys
        if (keys.dtype != torch.float32 or keys.dim() != 4 or keys.shape[0] != rows
                or keys.shape[1] != self.config.kv_heads or keys.shape[-1] != self.config.head_dim):
            return False
        length = keys.shape[-2]
        start = self._starts(mask, rows, length)
        if start is None:
            return False
        for spec, layer in zip(self.specs, layers):
            key_buffer, value_buffer, current = layer.reserve(1)
            if current != length:
                return False  # not written yet: nothing changed but spare room
            spec.keys, spec.values, spec.capacity = key_buffer.data_ptr(), value_buffer.data_ptr(), key_buffer.shape[-2]
        cos = torch.stack([rotations[kind][0].reshape(rows, -1) for kind in self.rope_kinds]).float().contiguous()
        sin = torch.stack([rotations[kind][1].reshape(rows, -1) for kind in self.rope_kinds]).float().contiguous()
        self.config.threads = torch.get_num_threads()
        flat = x.view(rows, -1)
        if not flat.is_contiguous():
            return False
        self.kernels.decode_layers(self.config, self.specs, flat, start, length, cos, sin)
        for layer in layers[:len(self.specs)]:
            layer.advance(length + 1)
        return True

    @staticmethod
    def _starts(mask: torch.Tensor | None, rows: int, length: int) -> torch.Tensor | None:
        """Each row's first real cache column (its left padding before it), or None if some row's mask
        is not left padding followed by real tokens."""
        if mask is None:
            return torch.zeros(rows, dtype=torch.int64)
        if mask.shape != (rows, length + 1):
            return None
        real = mask.to(torch.int64)
        if not bool((real[:, 1:] >= real[:, :-1]).all()) or not bool((real[:, -1] == 1).all()):
            return None
        return ((length + 1) - real.sum(1)).contiguous()


class _Unsupported(Exception):
    pass


def make_decode_step(model) -> DecodeStep | None:
    """A `DecodeStep` for `model`, or None where this module does not cover its architecture."""
    config = model.config
    kind = getattr(config, "model_type", "")
    if kind not in ("llama", "qwen2", "gemma3_text", "gemma3"):
        return None
    if getattr(config, "attn_logit_softcapping", None) is not None or getattr(config, "use_bidirectional_attention", False):
        return None
    if not hasattr(model, "model") or not hasattr(model.model, "rotary_emb"):
        return None
    return DecodeStep(model, gemma=kind.startswith("gemma"))
