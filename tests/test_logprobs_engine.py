"""Per-token logprobs from the decode loop: only for requests that ask, the model's own distribution,
tokens named by their exact bytes, and the same figures whether a request runs alone or batched."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from inference.batcher import BatchScheduler
from inference.generate import stream_generate
from inference.logprobs import TokenTexts
from inference.params import GenerationParams, InvalidParams
from models.loader import LoadOptions, load_model

ARCHS = ("llama", "qwen2", "gemma3")


@pytest.fixture(scope="module")
def models(tiny_models, model_cache):
    return {arch: load_model(path, model_cache, LoadOptions(dtype="float32", kernels="torch"))
            for arch, path in tiny_models.items()}


def entries(chunks):
    return [entry for chunk in chunks for entry in (chunk.logprobs or [])]


@pytest.mark.parametrize("arch", ARCHS)
def test_logprobs_are_the_models_log_softmax_and_name_each_token(models, arch):
    lm = models[arch]
    prompt = lm.tokenizer("The quick brown fox")["input_ids"]
    params = GenerationParams(max_tokens=8, temperature=0.0, logprobs=3)
    chunks = list(stream_generate(lm, prompt, params))
    found = entries(chunks)
    assert len(found) == chunks[-1].completion_tokens > 0
    ids = list(prompt)
    produced = []
    with torch.inference_mode():
        for entry in found:
            expected = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
            token = int(expected.argmax())
            assert math.isclose(entry.logprob, float(expected[token]), abs_tol=1e-3)
            assert [round(alt.logprob, 3) for alt in entry.top] == [round(v, 3) for v in expected.topk(3).values.tolist()]
            assert entry.top[0].bytes == entry.bytes  # greedy: the chosen token is the best one
            ids.append(token)
            produced.append(token)
    # the bytes of the tokens are exactly the reply's text
    assert bytes(b for entry in found for b in entry.bytes).decode("utf-8", "replace") == \
        lm.tokenizer.decode(produced, skip_special_tokens=True)


def test_token_texts_give_exact_bytes_for_partial_characters(models):
    for arch in ARCHS:
        lm = models[arch]
        texts = TokenTexts(lm.tokenizer)
        ids = lm.tokenizer("naïve 🎉 ok", add_special_tokens=False)["input_ids"]
        assert bytes(b for token in ids for b in texts(token)[1]) == "naïve 🎉 ok".encode(), arch


def test_only_requests_that_ask_get_logprobs_and_batching_gives_the_same(models):
    lm = models["llama"]
    prompt = lm.tokenizer("Hello there")["input_ids"]
    plain = list(stream_generate(lm, prompt, GenerationParams(max_tokens=6, temperature=0.0)))
    assert all(chunk.logprobs is None for chunk in plain)
    alone = entries(stream_generate(lm, prompt, GenerationParams(max_tokens=6, temperature=0.0, logprobs=2)))
    scheduler = BatchScheduler(lm, max_batch=4, prefix_cache_bytes=0)
    results = {}

    def consume(name, params):
        results[name] = list(scheduler.stream(prompt, params, threading.Event()))

    threads = [threading.Thread(target=consume, args=(name, params)) for name, params in (
        ("asks", GenerationParams(max_tokens=6, temperature=0.0, logprobs=2)),
        ("sampled", GenerationParams(max_tokens=6, temperature=0.9, seed=1)),
        ("plain", GenerationParams(max_tokens=6, temperature=0.0)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    batched = entries(results["asks"])
    assert [e.bytes for e in batched] == [e.bytes for e in alone]
    assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-3) for a, b in zip(batched, alone))
    assert all(chunk.logprobs is None for name in ("sampled", "plain") for chunk in results[name])


def test_logprobs_setting_is_bounded():
    for bad in (-1, 21, 2.5):
        with pytest.raises(InvalidParams, match="logprobs"):
            GenerationParams(logprobs=bad)
