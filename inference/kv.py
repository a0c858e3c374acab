"""KV-cache surgery for continuous batching: rows of different lengths share one left-padded cache.

Every layer is kept whole (a plain `DynamicLayer`, sliding-window layers included: the model's own
masks still apply the window), so rows can be padded, joined and split by simple tensor ops. A row's
padding is marked 0 in the batch's 2-D attention mask; its positions are counted without padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def new_cache():
    from transformers import DynamicCache

    return DynamicCache()


def cache_from_layers(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    cache = new_cache()
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
    return Batch(cache_from_layers(layers), mask)


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
    return Batch(cache_from_layers(layers), mask[:, start:].contiguous())


def row_layers(batch: Batch, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One row's KV without its padding, as [1, heads, tokens, dim] tensors (copies)."""
    start = int((batch.mask[row] > 0).nonzero()[0])
    return [(k[row:row + 1, :, start:].clone(), v[row:row + 1, :, start:].clone()) for k, v in cache_layers(batch.cache)]


def layers_bytes(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
