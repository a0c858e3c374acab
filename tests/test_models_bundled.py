"""The real bundled Gemma 3 270M: its Q4_K_M weights dequantize into a model that knows English."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from inference.generate import stream_generate
from inference.params import GenerationParams
from models.gguf_file import read_header
from models.loader import load_model, token_lookup
from models.templates import GEMMA

pytestmark = pytest.mark.slow

PARAGRAPH = (
    "The sun rises in the east and sets in the west. Every morning, people wake up, drink a cup of "
    "coffee, and go to work. Children walk to school with their friends, and the shops in the town "
    "open their doors for the day."
)


@pytest.fixture(scope="module")
def gemma(bundled_model, model_cache):
    """The bundled model, loaded once for the module with the app's default options."""
    return load_model(bundled_model, model_cache)


def mean_nll(lm, ids: list[int]) -> float:
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids], device=lm.device)).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:], device=lm.device)).item()


def test_header(bundled_model):
    header = read_header(bundled_model)
    assert header.architecture == "gemma3"
    assert header.quantization == "Q4_K_M"
    assert header.context_length == 32768
    assert 250e6 < header.n_parameters < 300e6


def test_loaded_model(gemma):
    assert gemma.architecture == "gemma3"
    assert gemma.chat_format is GEMMA  # the base model's file carries no template
    assert token_lookup(gemma.tokenizer)("<end_of_turn>") in gemma.stop_token_ids
    assert gemma.context_length == 8192  # the served cap, below the model's 32k


def test_english_is_far_more_likely_than_the_same_tokens_shuffled(gemma):
    ids = gemma.tokenizer(PARAGRAPH)["input_ids"]
    body = ids[1:]
    shuffled = body[:]
    random.Random(0).shuffle(shuffled)
    plain, scrambled = mean_nll(gemma, ids), mean_nll(gemma, [ids[0], *shuffled])
    assert plain < 3.5, plain  # a broken dequantization gives ~ln(262k) = 12.5
    assert plain < 0.6 * scrambled, (plain, scrambled)


def test_greedy_continuation_is_deterministic_and_fluent(gemma):
    prompt = gemma.tokenizer("The capital of France is")["input_ids"]
    params = GenerationParams(max_tokens=12, temperature=0.0)
    first = "".join(chunk.text for chunk in stream_generate(gemma, prompt, params))
    second = "".join(chunk.text for chunk in stream_generate(gemma, prompt, params))
    assert first == second
    words = first.split()
    assert len(words) >= 4, first
    if "Paris" not in first:  # a 270M base model may wander; it must still write English words
        letters = sum(ch.isascii() and (ch.isalpha() or ch in " .,'") for ch in first)
        assert letters >= 0.9 * len(first), first
        assert "France" in first or "capital" in first or "city" in first, first


QUALITY_TEXT = (Path(__file__).parent / "quality_text.txt").read_text()


@pytest.fixture(scope="module")
def exact_nll(bundled_model, model_cache):
    from models.loader import LoadOptions

    exact = load_model(bundled_model, model_cache, LoadOptions(weights="dense", dtype="bfloat16"))
    ids = exact.tokenizer(QUALITY_TEXT)["input_ids"]
    assert 450 < len(ids) < 600
    return ids, mean_nll(exact, ids), exact.memory_bytes


@pytest.mark.parametrize("shortlist", [True, False], ids=["shortlist-head", "int8-head"])
def test_quantized_weights_keep_the_quality_of_the_exact_path(gemma, model_cache, bundled_model, exact_nll,
                                                              shortlist):
    """The quality gate of the quantized CPU path: mean next-token NLL over a fixed ~510-token English
    text within 1% of the exact (dequantized bfloat16) path's, with either output projection (the
    shortlist head is the default where the CPU lacks native bfloat16, the int8 one elsewhere)."""
    from models.loader import checkpoint_dir
    from models.quant_checkpoint import load_quantized_model

    assert gemma.weights == "quantized"  # the CPU default
    folder = checkpoint_dir(model_cache, bundled_model, gemma.dtype, "quantized")
    model = load_quantized_model(folder, gemma.dtype, shortlist=shortlist)
    assert (type(model.lm_head).__name__ == "ShortlistHead") is shortlist
    ids, exact, exact_bytes = exact_nll
    quantized = mean_nll(dataclasses.replace(gemma, model=model), ids)
    assert abs(quantized - exact) <= 0.01 * exact, (quantized, exact)
    assert gemma.memory_bytes < 0.75 * exact_bytes


def chunked_nll(lm, ids: list[int], chunk: int = 16) -> float:
    """Mean NLL with the text fed `chunk` tokens at a time through the KV cache: the decode-sized
    inputs the AVX2 kernel serves (a single forward over the whole text takes the prefill path)."""
    from inference import kv

    cache, logits = kv.new_cache(lm.model), []
    with torch.inference_mode():
        for start in range(0, len(ids), chunk):
            piece = torch.tensor([ids[start:start + chunk]], device=lm.device)
            positions = torch.arange(start, start + piece.shape[1], device=lm.device)[None]
            logits.append(lm.model(input_ids=piece, cache=cache, position_ids=positions, use_cache=True).logits[0])
    logits = torch.cat(logits)[:-1].float()
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:], device=lm.device)).item()


@pytest.mark.parametrize("chunk", [16, 120], ids=["decode-sized", "prefill-sized"])
def test_avx2_kernels_keep_the_quality_of_the_exact_path(bundled_model, model_cache, exact_nll, chunk):
    """The AVX2 kernels quantize activations to int8 (models/native_kernels.py): the same 1% gate,
    measured on inputs of the sizes they serve (decode steps, and prompts shorter than
    `WIDE_ROWS_INT4`, fed in one forward), with the int8 output projection they use."""
    import shutil

    from models import native_kernels
    from models.loader import LoadOptions

    if not native_kernels.cpu_has_avx2() or not shutil.which("cc"):
        pytest.skip("the kernels need an x86 CPU with AVX2 and a C compiler")
    native = load_model(bundled_model, model_cache, LoadOptions(kernels="native"))
    assert native.kernels == "native"
    assert type(native.model.lm_head).__name__ == "Int8Linear" and native.model.lm_head.native is not None
    ids, exact, _ = exact_nll
    measured = chunked_nll(native, ids, chunk)
    assert abs(measured - exact) <= 0.01 * exact, (measured, exact)


def test_the_native_decode_step_keeps_the_quality_of_the_exact_path(bundled_model, model_cache, exact_nll):
    """The whole layer stack in C (models/native/layers.c) as the engine runs it, one token a step,
    under the same 1% gate."""
    import shutil

    from inference import kv
    from models import native_kernels
    from models.loader import LoadOptions

    if not native_kernels.cpu_has_avx2() or not shutil.which("cc"):
        pytest.skip("the kernels need an x86 CPU with AVX2 and a C compiler")
    native = load_model(bundled_model, model_cache, LoadOptions(kernels="native"))
    assert native.decode_step is not None and native.decode_step.native is not None
    ids, exact, _ = exact_nll
    cache, logits = kv.new_cache(native.model), []
    with torch.inference_mode():
        first = native.model(input_ids=torch.tensor([ids[:1]]), cache=cache, use_cache=True).logits[0]
        logits.append(first[-1:])
        for position, token in enumerate(ids[1:-1], start=1):
            logits.append(native.decode(torch.tensor([[token]]), torch.tensor([[position]]), cache))
    measured = torch.nn.functional.cross_entropy(torch.cat(logits).float(), torch.tensor(ids[1:])).item()
    assert abs(measured - exact) <= 0.01 * exact, (measured, exact)
