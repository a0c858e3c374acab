"""inference: stream_generate on tiny models, incremental detokenization, stop strings, parameters."""

from __future__ import annotations

import dataclasses
import gc
import threading
import weakref

import pytest
import torch

from inference.detok import IncrementalDetokenizer
from inference.generate import PromptTooLong, StopMatcher, stream_generate
from inference.params import GenerationParams, InvalidParams, parse_settings, split_settings
from models.loader import LoadOptions, load_model, token_lookup

ARCHS = ("llama", "qwen2", "gemma3")
GREEDY = GenerationParams(max_tokens=16, temperature=0.0)
UNICODE_TEXT = "Café au lait, naïve résumé ✓ done 🎉🚀 ok 👍🏽 end — “quoted” 中文\n\tnext line"



@pytest.fixture(scope="module")
def models(tiny_models, model_cache):
    """Each tiny model loaded once for the module (float32, torch's kernels: same numbers on every machine)."""
    return {arch: load_model(path, model_cache, LoadOptions(dtype="float32", kernels="torch"))
            for arch, path in tiny_models.items()}


def prompt_of(lm, text: str = "The quick brown fox") -> list[int]:
    return lm.tokenizer(text)["input_ids"]


def run(lm, prompt, params, cancel=None):
    """(chunks, joined text, last chunk)."""
    chunks = list(stream_generate(lm, prompt, params, cancel))
    return chunks, "".join(c.text for c in chunks), chunks[-1]


def reference_greedy(lm, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens computed the slow way: a full forward pass per token, no KV cache."""
    ids = list(prompt)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            token = int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token in lm.stop_token_ids:
                break
            out.append(token)
            ids.append(token)
    return out


# ----- stream_generate ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_deltas_join_to_the_decoded_tokens(models, arch):
    lm = models[arch]
    prompt = prompt_of(lm)
    chunks, text, last = run(lm, prompt, GenerationParams(max_tokens=24, temperature=0.0))
    tokens = reference_greedy(lm, prompt, 24)
    assert last.completion_tokens == len(tokens)
    assert last.prompt_tokens == len(prompt)
    assert text == lm.tokenizer.decode(tokens, skip_special_tokens=True)
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert all(c.text for c in chunks[:-1])  # no empty chunks mid-stream
    assert all("\ufffd" not in c.text for c in chunks) or "\ufffd" in lm.tokenizer.decode(tokens)
    counts = [c.completion_tokens for c in chunks]
    assert counts == sorted(counts)


@pytest.mark.parametrize("arch", ARCHS)
def test_max_tokens_gives_length(models, arch):
    lm = models[arch]
    _, _, last = run(lm, prompt_of(lm), GenerationParams(max_tokens=5, temperature=0.0))
    assert last.finish_reason == "length"
    assert last.completion_tokens == 5
    assert set(last.timings) == {"ttft_s", "total_s", "tokens_per_second"}
    assert last.timings["total_s"] >= last.timings["ttft_s"] >= 0


def test_greedy_is_deterministic(models):
    lm = models["qwen2"]
    prompt = prompt_of(lm)
    _, first, _ = run(lm, prompt, GREEDY)
    _, second, _ = run(lm, prompt, GREEDY)
    _, top1, _ = run(lm, prompt, GenerationParams(max_tokens=16, temperature=1.0, top_k=1))
    assert first == second == top1


def test_repetition_penalty_generates(models):
    """A penalty other than 1 runs through the whole stream (it once failed on the model's read-only
    logits) and changes what greedy decoding repeats."""
    lm = models["gemma3"]
    chunks, text, last = run(lm, prompt_of(lm), GenerationParams(max_tokens=24, temperature=0.0,
                                                                 repetition_penalty=5.0))
    assert last.finish_reason == "length" and last.completion_tokens == 24
    _, plain, _ = run(lm, prompt_of(lm), GenerationParams(max_tokens=24, temperature=0.0))
    assert text != plain


def test_same_seed_same_output(models):
    lm = models["llama"]
    prompt = prompt_of(lm)

    def sample(seed):
        return run(lm, prompt, GenerationParams(max_tokens=12, temperature=1.0, top_k=0, top_p=1.0, seed=seed))[1]

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1  # the seed matters


@pytest.mark.parametrize("arch", ARCHS)
def test_stop_token_ends_with_stop(models, arch):
    lm = models[arch]
    prompt = prompt_of(lm)
    first = reference_greedy(lm, prompt, 8)
    # stop on a token the model produces: the first one, or a later one it had not produced before
    k = next((k for k in range(1, len(first)) if first[k] not in first[:k]), 0)
    stopping = dataclasses.replace(lm, stop_token_ids=lm.stop_token_ids | {first[k]})
    chunks, text, last = run(stopping, prompt, GREEDY)
    assert last.finish_reason == "stop"
    assert last.completion_tokens == k
    assert text == lm.tokenizer.decode(first[:k], skip_special_tokens=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_stop_string_spanning_two_deltas(models, arch):
    lm = models[arch]
    prompt = prompt_of(lm, "Hello there")
    params = GenerationParams(max_tokens=24, temperature=0.0)
    chunks, full, _ = run(lm, prompt, params)
    texts = [c.text for c in chunks if c.text]
    # a stop string made of the end of one delta and the start of the next
    i = next(i for i in range(1, len(texts) - 1) if texts[i].strip() and texts[i + 1].strip())
    stop = texts[i][-2:] + texts[i + 1][:2]
    expected = full[: full.index(stop)]
    _, text, last = run(lm, prompt, dataclasses.replace(params, stop=(stop,)))
    assert text == expected
    assert last.finish_reason == "stop"
    assert stop not in text


def test_stop_string_never_seen_releases_everything(models):
    lm = models["qwen2"]
    prompt = prompt_of(lm)
    _, plain, _ = run(lm, prompt, GREEDY)
    # stop strings that begin like the tail of the reply force text to be held back, then released
    stops = (plain[-1:] + "\x00never", plain[-2:] + "\x01never")
    _, text, last = run(lm, prompt, dataclasses.replace(GREEDY, stop=stops))
    assert text == plain
    assert last.finish_reason == "length"


class SlowModel(torch.nn.Module):
    """`model` whose every forward takes 20 ms more (sleeping, the GIL released): a cancel set from
    another thread lands during a step, as it does with a real model; with a tiny model's 2 ms steps
    the decode loop could run several steps before the other thread even gets the GIL."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config
        self.plain_cache = getattr(model, "plain_cache", False)

    def forward(self, **kwargs):
        import time

        time.sleep(0.02)
        return self.inner(**kwargs)


def test_cancel_from_another_thread_stops_within_one_token(models):
    lm = dataclasses.replace(models["llama"], runtime={})
    lm.model = SlowModel(lm.model)
    cancel, first_seen = threading.Event(), threading.Event()

    def canceller():
        first_seen.wait(10)
        cancel.set()

    thread = threading.Thread(target=canceller)
    thread.start()
    chunks = []
    for chunk in stream_generate(lm, prompt_of(lm), GenerationParams(max_tokens=100, temperature=0.0), cancel):
        chunks.append(chunk)
        if len(chunks) == 1:
            first_seen.set()
            assert cancel.wait(10)
    thread.join()
    last = chunks[-1]
    assert last.finish_reason == "cancelled"
    assert last.completion_tokens <= chunks[0].completion_tokens + 1
    assert last.completion_tokens < 100


def test_cancelled_before_start(models):
    lm = models["gemma3"]
    cancel = threading.Event()
    cancel.set()
    chunks, text, last = run(lm, prompt_of(lm), GREEDY, cancel)
    assert (len(chunks), text, last.finish_reason, last.completion_tokens) == (1, "", "cancelled", 0)


def test_a_finished_stream_no_longer_holds_the_model(tiny_models, model_cache):
    """Once the caller has the last chunk, the decode loop has let go of the model: an unload right after a
    reply frees it (the loop's thread used to hold it a moment longer)."""
    lm = load_model(tiny_models["gemma3"], model_cache, LoadOptions(dtype="float32", kernels="torch"))
    model = weakref.ref(lm.model)
    run(lm, prompt_of(lm), GREEDY)
    del lm
    gc.collect()
    assert model() is None


def test_prompt_too_long(models):
    lm = models["qwen2"]
    assert lm.context_length == 256
    with pytest.raises(PromptTooLong, match="256 tokens"):
        next(stream_generate(lm, [65] * 256, GREEDY))
    with pytest.raises(PromptTooLong, match="empty"):
        next(stream_generate(lm, [], GREEDY))


def test_reply_is_capped_by_the_context_window(models):
    lm = models["qwen2"]
    _, _, last = run(lm, [65] * 253, GenerationParams(max_tokens=50, temperature=0.0))
    assert last.completion_tokens <= 3
    assert last.finish_reason in ("length", "stop")


def test_concurrent_streams_on_one_model(models):
    """Each stream owns its KV cache: two threads on one model get what each would get alone."""
    lm = models["gemma3"]
    prompts = [prompt_of(lm, "Hello there"), prompt_of(lm, "The weather is")]
    alone = [run(lm, p, GREEDY)[1] for p in prompts]
    results: dict[int, str] = {}

    def worker(i):
        results[i] = run(lm, prompts[i], GREEDY)[1]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[0], results[1]] == alone


# ----- incremental detokenization ---------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_detokenizer_never_splits_a_character(models, arch):
    tokenizer = models[arch].tokenizer
    ids = tokenizer(UNICODE_TEXT * 3, add_special_tokens=False)["input_ids"]
    assert len(ids) > 3 * IncrementalDetokenizer.CONTEXT
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(token) for token in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == UNICODE_TEXT * 3
    assert sum(1 for d in deltas if d == "") > 0  # multi-byte characters were held back somewhere


@pytest.mark.parametrize("arch", ARCHS)
def test_detokenizer_flushes_an_incomplete_character(models, arch):
    tokenizer = models[arch].tokenizer
    ids = tokenizer("ok ✓", add_special_tokens=False)["input_ids"]
    cut = ids[:-1]  # the last byte of ✓ never arrives
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(detok.add(token) for token in cut)
    assert text.startswith("ok") and "\ufffd" not in text
    assert text + detok.flush() == tokenizer.decode(cut)
    assert detok.flush() == ""


def test_detokenizer_skips_special_tokens(models):
    lm = models["qwen2"]
    vocab = token_lookup(lm.tokenizer)
    ids = [*lm.encode("Hi"), vocab("<|im_end|>"), *lm.encode(" there")]
    detok = IncrementalDetokenizer(lm.tokenizer)
    assert "".join(detok.add(t) for t in ids) + detok.flush() == "Hi there"


# ----- StopMatcher --------------------------------------------------------------------------------

def test_stop_matcher_without_stops_passes_through():
    matcher = StopMatcher(())
    assert matcher.feed("anything</s>") == ("anything</s>", False)
    assert matcher.flush() == ""


def test_stop_matcher_in_one_delta():
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("hello STOP and more") == ("hello ", True)


def test_stop_matcher_spanning_deltas():
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("hello ST") == ("hello ", False)
    assert matcher.feed("O") == ("", False)
    assert matcher.feed("P after") == ("", True)


def test_stop_matcher_releases_a_false_start():
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("a ST") == ("a ", False)
    assert matcher.feed("ONE") == ("STONE", False)


def test_stop_matcher_releases_held_text_at_the_end():
    matcher = StopMatcher(("</answer>",))
    assert matcher.feed("the end </ans") == ("the end ", False)
    assert matcher.flush() == "</ans"
    assert matcher.flush() == ""


def test_stop_matcher_earliest_of_several():
    matcher = StopMatcher(("world", "lo", ""))
    assert matcher.feed("hel") == ("he", False)
    assert matcher.feed("lo world") == ("l", True)  # "l" was held back: it might have begun "lo"


def test_stop_matcher_overlapping_prefixes():
    matcher = StopMatcher(("aab",))
    out = [matcher.feed(ch) for ch in "aaab"]
    assert "".join(text for text, _ in out) == "a"
    assert out[-1][1] is True


def test_stop_matcher_multibyte_stop():
    matcher = StopMatcher(("✓✓",))
    assert matcher.feed("done ✓") == ("done ", False)
    assert matcher.feed("✓ more") == ("", True)


# ----- GenerationParams ---------------------------------------------------------------------------

BAD_VALUES = [
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 2.5), ("max_tokens", "10"), ("max_tokens", True),
    ("max_tokens", 10**9), ("max_tokens", float("inf")),
    ("temperature", -0.1), ("temperature", 5.5), ("temperature", float("nan")), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -1), ("top_p", None.__class__),
    ("top_k", -1), ("top_k", 1.5), ("top_k", [1]),
    ("repetition_penalty", 0.0), ("repetition_penalty", 11),
    ("seed", -1), ("seed", 1.5), ("seed", 2**64), ("seed", "42"),
    ("stop", 5), ("stop", [""]), ("stop", ["x" * 201]), ("stop", [1, 2]), ("stop", ["a"] * 9), ("stop", {"a": 1}),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_bad_values_are_refused_by_name(name, value):
    with pytest.raises(InvalidParams) as info:
        GenerationParams.from_dict({name: value})
    assert str(info.value).startswith(f"{name}:")


def test_unknown_keys_are_refused_by_name():
    with pytest.raises(InvalidParams, match="unknown setting\\(s\\): logit_bias, temprature"):
        GenerationParams.from_dict({"temprature": 0.5, "logit_bias": 1, "top_p": 0.5})


def test_good_values():
    params = GenerationParams.from_dict({"max_tokens": 64, "temperature": 0, "top_p": 1, "top_k": 0, "seed": 0,
                                         "stop": "###", "repetition_penalty": 1.1})
    assert params.stop == ("###",) and params.greedy and params.seed == 0
    assert GenerationParams.from_dict({"stop": ["a", "b"], "seed": None}).stop == ("a", "b")
    assert GenerationParams.from_dict(None) == GenerationParams()
    assert GenerationParams.from_dict(params.to_dict()) == params


def test_whole_number_floats_become_ints():
    """JSON clients send 64.0; the decode loop needs an int (range(), topk, manual_seed)."""
    params = GenerationParams.from_dict({"max_tokens": 8.0, "top_k": 5.0, "seed": 3.0})
    assert (params.max_tokens, params.top_k, params.seed) == (8, 5, 3)
    assert all(type(v) is int for v in (params.max_tokens, params.top_k, params.seed))


def test_whole_number_floats_generate(models):
    lm = models["llama"]
    params = GenerationParams.from_dict({"max_tokens": 4.0, "top_k": 5.0, "seed": 1.0, "temperature": 1})
    assert run(lm, prompt_of(lm), params)[2].completion_tokens == 4


def test_max_tokens_limit():
    with pytest.raises(InvalidParams, match="max_tokens: at most 100"):
        GenerationParams.from_dict({"max_tokens": 101}, max_tokens_limit=100)
    assert GenerationParams.from_dict({"max_tokens": 100}, max_tokens_limit=100).max_tokens == 100


# ----- parse_settings -----------------------------------------------------------------------------

def test_parse_settings_defaults():
    assert parse_settings("") == {} and parse_settings(None) == {}


def test_parse_settings_good():
    raw = '{"temperature": 0.2, "stop": ["\\n\\n"], "system_prompt": "Be brief.", "max_tokens": 32}'
    settings = parse_settings(raw)
    params, system = split_settings(settings)
    assert system == "Be brief."
    assert (params.temperature, params.stop, params.max_tokens) == (0.2, ("\n\n",), 32)
    assert parse_settings({"seed": 1}) == {"seed": 1}


def test_parse_settings_bad_json():
    with pytest.raises(InvalidParams, match="settings must be a JSON object: Expecting"):
        parse_settings('{"temperature": 0.2,')


@pytest.mark.parametrize("raw", ["[1, 2]", '"text"', "42", "null", "true"])
def test_parse_settings_not_an_object(raw):
    with pytest.raises(InvalidParams, match="settings must be a JSON object"):
        parse_settings(raw)


def test_parse_settings_unknown_key():
    with pytest.raises(InvalidParams, match="unknown setting\\(s\\): temprature"):
        parse_settings('{"temprature": 0.2}')


def test_parse_settings_bad_value_and_system_prompt():
    with pytest.raises(InvalidParams, match="^top_p:"):
        parse_settings('{"top_p": 2}')
    with pytest.raises(InvalidParams, match="^system_prompt:"):
        parse_settings('{"system_prompt": 5}')
    with pytest.raises(InvalidParams, match="max_tokens: at most 10"):
        split_settings(parse_settings('{"max_tokens": 11}'), max_tokens_limit=10)
