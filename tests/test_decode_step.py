"""`models/decode_step.py`: one decode step without transformers' call stack gives the logits the
model's own forward gives, for every architecture, single rows and left-padded batches, and past a
sliding window."""

from __future__ import annotations

import shutil

import pytest
import torch

from gguf_factory import WINDOWED, write_tiny_gguf
from inference import kv
from models import native_kernels
from models.decode_step import make_decode_step
from models.loader import LoadOptions, load_model

ARCHS = ["llama", "qwen2", "gemma3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, model_cache):
    """Quantized tiny models (the path that gets a decode step), torch's kernels (same numbers
    everywhere); gemma3 with a 32-token sliding window, so a short test crosses it."""
    folder = tmp_path_factory.mktemp("decode-step")
    loaded = {}
    for arch in ARCHS:
        path = write_tiny_gguf(folder / f"m-{arch}.gguf", arch, **WINDOWED)
        loaded[arch] = load_model(path, model_cache, LoadOptions(weights="quantized", kernels="torch"))
    return loaded


def model_step(lm, tokens, positions, cache, mask=None):
    out = lm.model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                   logits_to_keep=1)
    return out.logits[:, -1]


def prefill(lm, rows: list[list[int]]):
    """Two identical left-padded caches of `rows`, and their mask."""
    length = max(map(len, rows))
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    caches = []
    for _ in range(2):
        cache = kv.new_cache(lm.model)
        lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                 logits_to_keep=1)
        caches.append(kv.zero_padding(kv.Batch(cache, mask)).cache)
    return caches, mask


def close(a, b, tolerance=1e-4):
    return (a - b).norm() / b.norm() < tolerance


@pytest.mark.parametrize("arch", ARCHS)
def test_single_row_steps_match_the_models_forward(models, arch):
    lm = models[arch]
    step = make_decode_step(lm.model)
    assert step is not None
    prompt = lm.encode("The quick brown fox jumps")
    with torch.inference_mode():
        (ours, theirs), _ = prefill(lm, [prompt])
        token, position = prompt[-1], len(prompt)
        for _ in range(40):  # past gemma3's 32-token window
            tokens, positions = torch.tensor([[token]]), torch.tensor([[position]])
            want = model_step(lm, tokens, positions, theirs)
            got = step(tokens, positions, ours)
            assert got.shape == want.shape and close(got, want), position
            token, position = int(want[0].argmax()), position + 1


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batches_match_the_models_forward(models, arch):
    lm = models[arch]
    step = make_decode_step(lm.model)
    rows = [lm.encode(text) for text in ("Hello", "The quick brown fox jumps over the lazy dog and the cat",
                                         "One two three")]
    with torch.inference_mode():
        (ours, theirs), mask = prefill(lm, rows)
        tokens = torch.tensor([[r[-1]] for r in rows])
        positions = torch.tensor([[len(r)] for r in rows])
        for _ in range(30):  # the longest row crosses gemma3's window
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
            want = model_step(lm, tokens, positions, theirs, mask)
            got = step(tokens, positions, ours, mask)
            # masked attention sums in another order than transformers' own masked path; the int8 kernel's
            # bfloat16 inputs can turn such a last-bit difference into one bfloat16 step
            assert close(got, want, 5e-3)
            tokens, positions = want.argmax(-1, keepdim=True), positions + 1


def test_unsupported_architectures_keep_the_models_forward():
    class Config:
        model_type = "mamba"

    class Model:
        config = Config()

    assert make_decode_step(Model()) is None
    Config.model_type, Config.attn_logit_softcapping = "gemma3_text", 50.0
    assert make_decode_step(Model()) is None


@pytest.mark.parametrize("arch", ARCHS)
def test_the_engine_decodes_through_it_with_the_same_replies(models, arch):
    import dataclasses

    from inference.generate import stream_generate
    from inference.params import GenerationParams

    lm = models[arch]
    assert lm.decode_step is not None and lm.decode_step.model is lm.model
    plain = dataclasses.replace(lm, decode_step=None, runtime={})  # the model's own forward
    prompt = lm.encode("Once upon a time")
    params = GenerationParams(max_tokens=24, temperature=0)
    replies = ["".join(c.text for c in stream_generate(model, prompt, params)) for model in (lm, plain)]
    assert replies[0] == replies[1] and replies[0]


def test_dense_models_and_other_weights_use_the_models_forward(models, tmp_path, model_cache):
    import dataclasses

    dense_path = write_tiny_gguf(tmp_path / "d.gguf", "llama")
    assert load_model(dense_path, model_cache, LoadOptions(weights="dense")).decode_step is None
    lm = models["llama"]
    other = dataclasses.replace(lm, model=load_model(dense_path, model_cache, LoadOptions(weights="dense")).model)
    tokens, positions = torch.tensor([[1]]), torch.tensor([[0]])
    with torch.inference_mode():  # the step belongs to the old weights: not used for the new ones
        want = other.model(input_ids=tokens, position_ids=positions, cache=kv.new_cache(other.model)).logits[:, -1]
        assert torch.equal(other.decode(tokens, positions, kv.new_cache(other.model)), want)


needs_native = pytest.mark.skipif(not native_kernels.cpu_has_avx2() or not shutil.which("cc"),
                                  reason="the native layer stack needs an x86 CPU with AVX2 and a C compiler")


@pytest.fixture(scope="module")
def native_models(tmp_path_factory, model_cache):
    """The same tiny models on the AVX2 kernels, where the whole layer stack is one C call."""
    folder = tmp_path_factory.mktemp("decode-step-native")
    loaded = {}
    for arch in ARCHS:
        path = write_tiny_gguf(folder / f"m-{arch}.gguf", arch, **WINDOWED)
        loaded[arch] = load_model(path, model_cache, LoadOptions(weights="quantized", kernels="native"))
    return loaded


def loop_step(step, *args):
    """The same step through the Python loop (the native stack switched off for one call)."""
    native, step.native = step.native, None
    try:
        return step(*args)
    finally:
        step.native = native


@needs_native
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("texts", [["The quick brown fox jumps over the lazy dog and the cat"],
                                   ["Hello", "The quick brown fox jumps over the lazy dog and the cat", "One two"]])
def test_the_native_layer_stack_matches_the_loop(native_models, arch, texts):
    """Single rows and left-padded batches, past gemma3's sliding window: the same logits as the loop
    over the same kernels (up to the int8 rounding of an activation that differs in its last bit)."""
    lm = native_models[arch]
    step = make_decode_step(lm.model)
    assert step.native is not None
    rows = [lm.encode(text) for text in texts]
    with torch.inference_mode():
        (ours, theirs), mask = prefill(lm, rows)
        tokens = torch.tensor([[r[-1]] for r in rows])
        positions = torch.tensor([[len(r)] for r in rows])
        exact = 0
        for _ in range(40):
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
            padded = None if bool(mask.all()) else mask
            want = loop_step(step, tokens, positions, theirs, padded)
            got = step(tokens, positions, ours, padded)
            assert got.shape == want.shape and close(got, want, 1e-2)
            exact += bool(close(got, want, 1e-5))
            tokens, positions = want.argmax(-1, keepdim=True), positions + 1
        assert exact >= 30  # most steps agree to float32 rounding
        for mine, reference in zip(ours.layers, theirs.layers):  # the cache holds the same tokens
            assert mine.keys.shape == reference.keys.shape and close(mine.keys, reference.keys, 1e-2)


@needs_native
@pytest.mark.parametrize("arch", ARCHS)
def test_long_contexts_split_the_keys_between_threads(native_models, arch):
    """With more keys than 64 and threads to share them, a row's attention is split into pieces done
    apart and merged (native/layers.c's `attention`): the same logits as the loop, for a lone row and for
    a padded batch, inside gemma3's window and across it."""
    lm = native_models[arch]
    step = make_decode_step(lm.model)
    text = " ".join(["The quick brown fox jumps over the lazy dog and the cat sat on the mat."] * 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # four threads want eight pieces of work: a lone row's keys come in four
    try:
        for rows in ([lm.encode(text)], [lm.encode(text), lm.encode("Hello there")]):
            assert len(rows[0]) > 200
            with torch.inference_mode():
                (ours, theirs), mask = prefill(lm, rows)
                tokens = torch.tensor([[r[-1]] for r in rows])
                positions = torch.tensor([[len(r)] for r in rows])
                for _ in range(6):
                    mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
                    padded = None if bool(mask.all()) else mask
                    want = loop_step(step, tokens, positions, theirs, padded)
                    got = step(tokens, positions, ours, padded)
                    assert close(got, want, 1e-2)
                    tokens, positions = want.argmax(-1, keepdim=True), positions + 1
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_the_native_layer_stack_declines_what_it_does_not_cover(native_models):
    lm = native_models["llama"]
    step = make_decode_step(lm.model)
    prompt = lm.encode("Once upon a time")
    with torch.inference_mode():
        (cache, _), mask = prefill(lm, [prompt])
        x = torch.zeros(1, 1, lm.model.config.hidden_size)
        rotations = step._rotations(x, torch.tensor([[len(prompt)]]))
        assert not step.native.run(x.to(torch.bfloat16), rotations, cache, None)  # float32 only
        assert not step.native.run(torch.zeros(40, 1, x.shape[-1]), rotations, cache, None)  # wide batches
        holes = torch.tensor([[1, 0] + [1] * len(prompt)])  # padding that is not on the left
        assert not step.native.run(x, rotations, cache, holes)
        assert cache.layers[0].keys.shape[-2] == len(prompt)  # nothing written when declined
