"""The growing KV cache: the same results as transformers' concatenating cache, without a copy per step."""

from __future__ import annotations

import pytest
import torch

from inference import kv
from models.loader import LoadOptions, load_model


@pytest.fixture(scope="module")
def gemma(tiny_models, model_cache):
    return load_model(tiny_models["gemma3"], model_cache, LoadOptions(dtype="float32"))


def greedy(lm, cache, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    tokens, logits = [], []
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(steps):
            out = lm.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            logits.append(out.logits[0, -1])
            tokens.append(int(out.logits[0, -1].argmax()))
            ids = torch.tensor([[tokens[-1]]])
    return tokens, torch.stack(logits)


def test_growing_cache_matches_the_concatenating_one(gemma):
    from transformers import DynamicCache

    prompt = gemma.encode("The quick brown fox jumps over the lazy dog.")
    steps = kv.GROW_TOKENS + 20  # crosses a growth of the buffers
    want_tokens, want = greedy(gemma, DynamicCache(), prompt, steps)
    cache = kv.new_cache(gemma.model)
    got_tokens, got = greedy(gemma, cache, prompt, steps)
    assert got_tokens == want_tokens
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    layer = cache.layers[0]
    assert isinstance(layer, kv.GrowingLayer)
    assert layer.keys.shape[-2] == len(prompt) + steps - 1
    assert layer.keys.data_ptr() == layer._key_buffer.data_ptr()  # a view, not a copy
    assert layer._key_buffer.shape[-2] % kv.GROW_TOKENS == 0


def test_a_step_copies_only_the_new_token(gemma):
    cache = kv.new_cache(gemma.model)
    prompt = gemma.encode("hello there")
    greedy(gemma, cache, prompt, 3)
    buffer = cache.layers[0]._key_buffer
    greedy(gemma, cache, [5], 2)
    assert cache.layers[0]._key_buffer is buffer  # no reallocation inside the spare room


def test_replaced_keys_are_taken_over(gemma):
    """Code that assigns a layer's keys (transformers' own cache surgery) is not overwritten."""
    cache = kv.new_cache(gemma.model)
    greedy(gemma, cache, gemma.encode("one two three"), 2)
    layer = cache.layers[0]
    layer.keys, layer.values = layer.keys[:, :, :2].clone(), layer.values[:, :, :2].clone()
    keys = torch.randn(1, layer.keys.shape[1], 1, layer.keys.shape[-1])
    new_keys, _ = layer.update(keys, keys.clone())
    assert new_keys.shape[-2] == 3 and torch.equal(new_keys[:, :, 2:], keys)
