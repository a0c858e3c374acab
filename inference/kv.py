"""KV-cache surgery for continuous batching: rows of different lengths share one left-padded cache.

Every layer is kept whole (a `GrowingLayer`, sliding-window layers included: the model's own masks
still apply the window), so rows can be padded, joined and split by simple tensor ops. A row's
padding is marked 0 in the batch's 2-D attention mask; its positions are counted without padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


GROW_TOKENS = 256  # spare room a layer's buffers get when they grow: one copy per 256 tokens, not per token


class GrowingLayer:
    """One layer's keys and values, as views of buffers with spare room.

    transformers' `DynamicLayer` concatenates every step, copying the whole cache (at 2,000 tokens of
    history, ~70 MB a step for Gemma 3 270M); here a step copies only its new tokens, and the buffers
    are reallocated once every `GROW_TOKENS` tokens. Plain for our own models (models/cpu_model.py);
    for transformers' models the same class is mixed into its `DynamicLayer` (`transformers_cache`).
    """

    keys = values = None
    is_initialized = False
    _key_buffer = _value_buffer = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = key_states.new_empty(0)
        self.values = value_states.new_empty(0)
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] if self.is_initialized and self.keys.numel() else 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.numel() else 0
        total = length + key_states.shape[-2]
        if not self._owns_views(key_states, total):
            self._key_buffer = _grown(self.keys if length else None, key_states, total)
            self._value_buffer = _grown(self.values if length else None, value_states, total)
        self._key_buffer[:, :, length:total] = key_states
        self._value_buffer[:, :, length:total] = value_states
        self.keys = self._key_buffer[:, :, :total]
        self.values = self._value_buffer[:, :, :total]
        return self.keys, self.values

    def reserve(self, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Room for `new_tokens` more tokens that someone else writes into the buffers (the native
        decode step): (key buffer, value buffer, current length). `advance` then shows them."""
        length = self.keys.shape[-2]
        total = length + new_tokens
        if not self._owns_views(self.keys, total):
            self._key_buffer = _grown(self.keys, self.keys[:, :, :0], total)
            self._value_buffer = _grown(self.values, self.values[:, :, :0], total)
            self.keys = self._key_buffer[:, :, :length]
            self.values = self._value_buffer[:, :, :length]
        return self._key_buffer, self._value_buffer, length

    def advance(self, total: int) -> None:
        self.keys = self._key_buffer[:, :, :total]
        self.values = self._value_buffer[:, :, :total]

    def _owns_views(self, states, total: int) -> bool:
        """Whether keys/values are still views of our buffers (nobody replaced them) with room."""
        buffer = self._key_buffer
        return (buffer is not None and buffer.shape[-2] >= total and self.keys.numel() > 0
                and self.keys.data_ptr() == buffer.data_ptr() and self.values.data_ptr()
                == self._value_buffer.data_ptr() and buffer.shape[:2] == states.shape[:2]
                and buffer.shape[-1] == states.shape[-1] and buffer.dtype == states.dtype)


def _grown(current: torch.Tensor | None, states: torch.Tensor, total: int) -> torch.Tensor:
    """A buffer for `total` tokens plus room to grow, holding `current`'s tokens first."""
    capacity = (total // GROW_TOKENS + 1) * GROW_TOKENS
    buffer = states.new_empty(*states.shape[:2], capacity, states.shape[-1])
    if current is not None:
        buffer[:, :, :current.shape[-2]] = current
    return buffer


class KVCache:
    """The cache of our own models (models/cpu_model.py): one `GrowingLayer` per layer, made on first use."""

    def __init__(self):
        self.layers: list[GrowingLayer] = []

    def update(self, keys: torch.Tensor, values: torch.Tensor, index: int):
        while len(self.layers) <= index:
            self.layers.append(GrowingLayer())
        return self.layers[index].update(keys, values)

    def get_seq_length(self, index: int = 0) -> int:
        return self.layers[index].get_seq_length() if index < len(self.layers) else 0


def new_cache(owner):
    """An empty cache for `owner` (a model, or a cache of the kind wanted): our `KVCache` for our own
    models (`plain_cache`; None also means ours), transformers' `DynamicCache` of growing layers for its models."""
    if owner is None or isinstance(owner, KVCache) or getattr(owner, "plain_cache", False):
        return KVCache()
    return transformers_cache()


_TRANSFORMERS_LAYER = None


def transformers_cache():
    """transformers' `DynamicCache` whose layers are `GrowingLayer`s (transformers imported on first use)."""
    global _TRANSFORMERS_LAYER
    from models.convert import import_transformers

    import_transformers()
    from transformers import DynamicCache

    if _TRANSFORMERS_LAYER is None:
        from transformers.cache_utils import DynamicLayer

        class TransformersGrowingLayer(GrowingLayer, DynamicLayer):
            pass

        _TRANSFORMERS_LAYER = TransformersGrowingLayer
    cache = DynamicCache()
    cache.layer_class_to_replicate = _TRANSFORMERS_LAYER
    return cache


def cache_from_layers(layers: list[tuple[torch.Tensor, torch.Tensor]], owner):
    """A cache of `owner`'s kind (see `new_cache`) holding `layers`."""
    cache = new_cache(owner)
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


@dataclass
class Batch:
    """The running batch: one cache, one attention mask row per request."""

    cache: object
    mask: torch.Tensor  # [rows, length], 1 for real tokens, 0 for left padding
    padded: bool | None = None  # whether any row has padding (worked out from `mask` when not given)

    def __post_init__(self) -> None:
        if self.padded is None:
            self.padded = not bool(self.mask.all())

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]


def _pad_left(tensor: torch.Tensor, amount: int, dim: int) -> torch.Tensor:
    if amount == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [amount, 0]
    return F.pad(tensor, pad)


def join(batch: Batch | None, other: Batch) -> Batch:
    """Rows of `other` appended to `batch`, both left-padded to a common length."""
    if batch is None or batch.rows == 0:
        return other
    length = max(batch.length, other.length)
    layers = []
    for (k1, v1), (k2, v2) in zip(cache_layers(batch.cache), cache_layers(other.cache)):
        k = torch.cat([_pad_left(k1, length - k1.shape[-2], 2), _pad_left(k2, length - k2.shape[-2], 2)])
        v = torch.cat([_pad_left(v1, length - v1.shape[-2], 2), _pad_left(v2, length - v2.shape[-2], 2)])
        layers.append((k, v))
    mask = torch.cat([_pad_left(batch.mask, length - batch.length, 1), _pad_left(other.mask, length - other.length, 1)])
    return Batch(cache_from_layers(layers, batch.cache), mask)


def zero_padding(batch: Batch) -> Batch:
    """Zero the keys and values a left-padded prefill computed for its padding.

    Padding is masked out of attention, but a padded query sees no key at all, and what it leaves
    behind may be NaN; masked weights times NaN values would still poison the real rows.
    """
    if bool(batch.mask.all()):
        return batch
    pad = (batch.mask == 0)[:, None, :, None]
    for keys, values in cache_layers(batch.cache):
        keys.masked_fill_(pad, 0)
        values.masked_fill_(pad, 0)
    return batch


def select(batch: Batch, keep: list[int]) -> Batch | None:
    """Only the rows `keep`, with columns that are padding in every remaining row trimmed."""
    if not keep:
        return None
    index = torch.tensor(keep, dtype=torch.long)
    mask = batch.mask.index_select(0, index)
    start = int((mask.sum(0) > 0).nonzero()[0]) if mask.any() else 0
    layers = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
              for k, v in cache_layers(batch.cache)]
    return Batch(cache_from_layers(layers, batch.cache), mask[:, start:].contiguous())


def row_layers(batch: Batch, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One row's KV without its padding, as [1, heads, tokens, dim] tensors (copies)."""
    start = int((batch.mask[row] > 0).nonzero()[0])
    return [(k[row:row + 1, :, start:].clone(), v[row:row + 1, :, start:].clone()) for k, v in cache_layers(batch.cache)]


def layers_bytes(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
