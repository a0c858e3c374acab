"""One decode step (one new token per row) of a quantized CPU model, without transformers' call stack.

A decode step of a small model is many small operations: Gemma 3 270M runs 18 layers of 7 matrix
products, 6 norms, rotary embeddings and attention per token. Through transformers' modules each
step also pays for decorators, keyword plumbing, output records and mask builders, which on a small
CPU is a large share of the step once the kernels are fast (bench/RESULTS.md). `DecodeStep` runs
the same layers in a plain loop: the model's own modules for every weight (the quantized linears, the
fused norms, the rotary embedding), the same KV cache object (so the batcher's cache surgery and the
prefill path are unchanged), and the same masking rules (left padding, sliding windows).

Covered: the architectures the converter supports (llama, qwen2, gemma3) as transformers builds them;
`make_decode_step` returns None for anything else (e.g. attention logit soft-capping), and callers
then use the model's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor | None = None):
        x = self.embed(tokens)
        rotations = self._rotations(x, positions)
        masks: dict = {}
        for index, (layer, window) in enumerate(self.layers):
            cos, sin = rotations[self.layer_types[index]]
            attention_mask = self._mask(masks, mask, positions, window)
            x = self._layer(layer, x, cos, sin, cache, index, attention_mask, window)
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
        q, k = _rotate(q.transpose(1, 2), cos, sin), _rotate(k.transpose(1, 2), cos, sin)
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
            allowed = mask.bool()
            if window is not None:
                key_positions = mask.cumsum(-1) - 1
                allowed = allowed & (positions - key_positions < window)
            masks[window] = allowed[:, None, None, :]
        return masks[window]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [rows, heads, 1, dim] with cos/sin [rows, 1, dim] (rotate-half form)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


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
