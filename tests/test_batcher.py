"""Continuous batching: batched rows give exactly what single-stream generation gives, rows join and
leave between steps, each stops alone, and a session's KV prefix is reused across turns."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from inference import kv
from inference.batcher import BatchScheduler, PrefixCache
from inference.generate import stream_generate
from inference.params import GenerationParams
from models.loader import LoadOptions, load_model

PROMPTS = ["The capital of France is", "Once upon a time", "def fib(n):", "1, 2, 3, 4,", "Hello, my name"]
GREEDY = GenerationParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def lm(request, tiny_models, model_cache):
    """torch's kernels: a padded batch's rows must give exactly their single replies. (The AVX2 kernel
    quantizes activations, so a last-bit difference of padded attention can flip a random model's
    near-tie; tests/test_native_kernels.py covers that kernel.)"""
    return load_model(tiny_models[request.param], model_cache, LoadOptions(dtype="float32", kernels="torch"))


def single(lm, prompt: str, params=GREEDY) -> str:
    return "".join(chunk.text for chunk in stream_generate(lm, lm.encode(prompt), params))


def run_concurrently(scheduler, lm, prompts, params=GREEDY, stagger_s=0.01):
    results, errors = {}, []

    def run(prompt, delay):
        time.sleep(delay)
        try:
            results[prompt] = "".join(c.text for c in scheduler.stream(lm.encode(prompt), params, threading.Event()))
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(p, i * stagger_s)) for i, p in enumerate(prompts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    return results


def test_batched_rows_match_single_stream(lm):
    expected = {p: single(lm, p) for p in PROMPTS}
    scheduler = BatchScheduler(lm, max_batch=8)
    assert run_concurrently(scheduler, lm, PROMPTS) == expected
    assert scheduler.steps < len(PROMPTS) * GREEDY.max_tokens  # steps were shared between rows


def test_rows_join_and_leave_mid_flight(lm):
    """Different lengths and staggered arrivals: rows leave early and others join a running batch."""
    scheduler = BatchScheduler(lm, max_batch=3)  # fewer slots than requests: some wait for a slot
    params = [GenerationParams(max_tokens=n, temperature=0) for n in (3, 15, 7, 11, 5)]
    expected = {p: single(lm, p, q) for p, q in zip(PROMPTS, params)}
    results, threads = {}, []
    for index, (prompt, param) in enumerate(zip(PROMPTS, params)):
        def run(prompt=prompt, param=param, delay=index * 0.02):
            time.sleep(delay)
            results[prompt] = "".join(c.text for c in scheduler.stream(lm.encode(prompt), param, threading.Event()))
        threads.append(threading.Thread(target=run))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == expected


def queue_then_run(scheduler, lm, prompts, params=GREEDY):
    """Queue every prompt before the decode loop starts, so the loop sees them all at once."""
    scheduler._running = True  # holds back the loop thread that the first stream() would start
    results, threads = {}, []
    for prompt in prompts:
        def run(prompt=prompt):
            results[prompt] = "".join(c.text for c in scheduler.stream(lm.encode(prompt), params, threading.Event()))
        threads.append(threading.Thread(target=run))
        threads[-1].start()
    deadline = time.monotonic() + 10
    while len(scheduler._pending) < len(prompts) and time.monotonic() < deadline:
        time.sleep(0.005)
    threading.Thread(target=scheduler._loop, daemon=True).start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_prompts_arriving_together_are_prefilled_in_one_forward(lm):
    """Different lengths, left-padded into one prefill: each row still gets exactly its own reply."""
    prompts = PROMPTS + ["A slightly longer line:"]
    expected = {p: single(lm, p) for p in prompts}
    scheduler = BatchScheduler(lm, max_batch=8, prefill_chunk=512)
    assert queue_then_run(scheduler, lm, prompts) == expected
    assert scheduler.prefills == 1


def test_requests_arriving_a_few_ms_apart_at_an_idle_loop_share_one_prefill(lm):
    """The idle loop waits for arrivals (`gather_s` after each, `gather_max_s` in all, and no longer once
    the batch is full) before prefilling; without the wait the first request is prefilled alone and the
    rest after it."""
    prompts = PROMPTS[:4]
    expected = {p: single(lm, p) for p in prompts}
    gathering = BatchScheduler(lm, max_batch=4, gather_s=2.0, gather_max_s=10.0)  # ends at the 4th arrival
    started = time.monotonic()
    assert run_concurrently(gathering, lm, prompts, stagger_s=0.005) == expected
    assert gathering.prefills == 1
    assert time.monotonic() - started < 8  # a full batch does not wait out the window
    alone = BatchScheduler(lm, max_batch=8, gather_s=0.0)
    assert run_concurrently(alone, lm, prompts, stagger_s=0.03) == expected
    assert alone.prefills > 1


def test_a_lone_request_waits_at_most_the_gather_cap(lm):
    expected = single(lm, PROMPTS[0])
    scheduler = BatchScheduler(lm, max_batch=8, gather_s=30.0, gather_max_s=0.05)  # a window far past the cap
    started = time.monotonic()
    text = "".join(c.text for c in scheduler.stream(lm.encode(PROMPTS[0]), GREEDY, threading.Event()))
    assert text == expected
    assert time.monotonic() - started < 10  # the 50 ms cap plus the reply, not the 30 s window
    assert BatchScheduler(lm, max_batch=1).gather_s == 0  # a batch of one has nobody to wait for


def test_prompts_of_very_different_lengths_are_not_padded_together(lm):
    short, long = PROMPTS[0], "word " * 200
    expected = {p: single(lm, p) for p in (short, long)}
    scheduler = BatchScheduler(lm, max_batch=8, prefill_chunk=512)
    assert queue_then_run(scheduler, lm, [short, long]) == expected
    assert scheduler.prefills == 2


def test_long_prompts_are_prefilled_in_chunks_between_decode_steps(lm):
    """A chunk smaller than the prompts: each prompt goes in a few tokens at a time, interleaved with
    the decode steps of the rows already streaming, and the replies do not change."""
    expected = {p: single(lm, p) for p in PROMPTS}
    scheduler = BatchScheduler(lm, max_batch=8, prefill_chunk=3)
    assert queue_then_run(scheduler, lm, PROMPTS) == expected
    assert scheduler.prefills >= sum(-(-len(lm.encode(p)) // 3) for p in PROMPTS if len(lm.encode(p)) > 3)


def test_chunked_prefill_continues_a_cached_prefix(lm):
    scheduler = BatchScheduler(lm, max_batch=2, prefill_chunk=4)
    first = lm.encode("A story about a cat. " * 4)
    list(scheduler.stream(first, GREEDY, threading.Event(), session_key="s"))
    follow = first + lm.encode(" And then the dog ran far away from home")
    chunks = list(scheduler.stream(follow, GREEDY, threading.Event(), session_key="s"))
    assert chunks[-1].timings["cached_prompt_tokens"] >= len(first) - 1
    assert "".join(c.text for c in chunks) == "".join(c.text for c in stream_generate(lm, follow, GREEDY))


def test_a_request_cancelled_while_its_prompt_is_fed_ends_alone(lm):
    scheduler = BatchScheduler(lm, max_batch=4, prefill_chunk=2)
    cancel = threading.Event()
    cancel.set()
    chunks = list(scheduler.stream(lm.encode("A long prompt that takes several chunks to feed"), GREEDY, cancel))
    assert chunks[-1].finish_reason == "cancelled" and chunks[-1].completion_tokens == 0
    assert "".join(c.text for c in scheduler.stream(lm.encode(PROMPTS[0]), GREEDY, threading.Event())) \
        == single(lm, PROMPTS[0])


def test_cancel_stops_one_row_alone(lm):
    scheduler = BatchScheduler(lm, max_batch=4)
    long = GenerationParams(max_tokens=200, temperature=0)
    cancel = threading.Event()
    chunks, other = [], {}

    def victim():
        for chunk in scheduler.stream(lm.encode("Count with me:"), long, cancel):
            chunks.append(chunk)
            if len(chunks) == 2:
                cancel.set()

    def survivor():
        other["text"] = "".join(c.text for c in scheduler.stream(lm.encode(PROMPTS[0]), GREEDY, threading.Event()))

    threads = [threading.Thread(target=victim), threading.Thread(target=survivor)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert chunks[-1].finish_reason == "cancelled"
    assert chunks[-1].completion_tokens <= 4  # stopped within a token or two of the cancel
    assert other["text"] == single(lm, PROMPTS[0])


def test_consumer_going_away_cancels(lm):
    scheduler = BatchScheduler(lm, max_batch=2)
    cancel = threading.Event()
    stream = scheduler.stream(lm.encode("Tell me"), GenerationParams(max_tokens=500, temperature=0), cancel)
    next(stream)
    stream.close()
    assert cancel.is_set()
    deadline = time.monotonic() + 10
    while scheduler._running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not scheduler._running  # the loop went idle instead of finishing 500 tokens


def test_prefix_cache_reuses_the_last_turn_and_keeps_output(lm):
    scheduler = BatchScheduler(lm, max_batch=2)
    first = lm.encode("A story about a cat. " * 10)
    list(scheduler.stream(first, GREEDY, threading.Event(), session_key="s1"))
    follow = first + lm.encode(" And then the dog")
    chunks = list(scheduler.stream(follow, GREEDY, threading.Event(), session_key="s1"))
    assert chunks[-1].timings["cached_prompt_tokens"] >= len(first) - 1
    reference = "".join(c.text for c in stream_generate(lm, follow, GREEDY))
    assert "".join(c.text for c in chunks) == reference
    other = list(scheduler.stream(follow, GREEDY, threading.Event(), session_key="s2"))
    assert other[-1].timings["cached_prompt_tokens"] == 0  # one session's cache never serves another
    scheduler.forget("s1")
    again = list(scheduler.stream(follow, GREEDY, threading.Event(), session_key="s1"))
    assert again[-1].timings["cached_prompt_tokens"] == 0


def test_prefix_cache_respects_its_byte_cap():
    layer = (torch.zeros(1, 1, 10, 4), torch.zeros(1, 1, 10, 4))
    size = kv.layers_bytes([layer])
    cache = PrefixCache(max_bytes=size * 2)
    for key in ("a", "b", "c"):
        cache.put(key, list(range(10)), [layer])
    assert cache.bytes <= size * 2
    assert cache.take("a", list(range(12)))[0] == 0  # the oldest went first
    assert cache.take("c", list(range(12)))[0] == 10


def test_join_and_select_keep_rows_aligned():
    def batch(length, value):
        keys = torch.full((1, 1, length, 2), float(value))
        return kv.Batch(kv.cache_from_layers([(keys, keys.clone())], None), torch.ones(1, length, dtype=torch.long))

    joined = kv.join(batch(3, 1), batch(5, 2))
    assert joined.mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    keys = joined.cache.layers[0].keys
    assert keys[0, 0, :2].abs().sum() == 0 and keys[0, 0, 2:].eq(1).all()
    only_first = kv.select(joined, [0])
    assert only_first.mask.tolist() == [[1, 1, 1]]  # padding columns trimmed
    assert only_first.cache.layers[0].keys.shape[2] == 3
    assert kv.select(joined, []) is None
