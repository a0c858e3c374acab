"""Chat logprobs and the legacy `/v1/completions` route, end to end with the official `openai` client
(and raw httpx for what it cannot send), on a tiny model with the batch scheduler on."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
from openai import OpenAI

from app_harness import app_config, running_app, wait_until

MODEL = "tiny-llama"
HELLO = [{"role": "user", "content": "Hello there"}]
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models, model_cache):
    config = app_config(tmp_path_factory.mktemp("v1-completions"), tiny_models, model_cache, kernels="torch")
    with running_app(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(app):
    with OpenAI(base_url=app.v1, api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def token_bytes(token: str) -> bytes:
    """A token's bytes from its text: `bytes:\\xe2\\x80` for a part of a character, as OpenAI writes it."""
    if token.startswith("bytes:"):
        return bytes(int(part, 16) for part in token[len("bytes:"):].split("\\x")[1:])
    return token.encode()


def chat(client, **fields):
    return client.chat.completions.create(**{"model": MODEL, "messages": HELLO, "max_tokens": 8, "temperature": 0,
                                             **fields})


def complete(client, **fields):
    return client.completions.create(**{"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                        **fields})


# ----- chat logprobs ------------------------------------------------------------------------------------------
def test_chat_logprobs_in_openais_shape(client):
    reply = chat(client, logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens > 0
    assert b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace") == choice.message.content
    for token in content:
        assert token.logprob <= 0 and token_bytes(token.token) == bytes(token.bytes)
        assert len(token.top_logprobs) == 3
        assert [alt.logprob for alt in token.top_logprobs] == sorted((alt.logprob for alt in token.top_logprobs),
                                                                    reverse=True)
        assert token.top_logprobs[0].token == token.token  # greedy: the chosen token is the most likely
        assert math.isclose(token.top_logprobs[0].logprob, token.logprob)
        assert sum(math.exp(alt.logprob) for alt in token.top_logprobs) <= 1.0 + 1e-4


def test_chat_logprobs_streamed_match_the_whole_reply(client):
    whole = chat(client, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    chunks = list(chat(client, logprobs=True, top_logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 5)) for t in streamed] == [(t.token, round(t.logprob, 5)) for t in whole]
    assert all(len(t.top_logprobs) == 2 for t in streamed)


def test_chat_without_logprobs_has_none(client):
    assert chat(client).choices[0].logprobs is None
    assert all(c.choices[0].logprobs is None for c in chat(client, stream=True) if c.choices)
    assert chat(client, logprobs=True).choices[0].logprobs.content[0].top_logprobs == []


@pytest.mark.parametrize("fields, param", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
])
def test_chat_bad_logprobs_are_refused_by_name(client, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, **fields)
    assert caught.value.body["param"] == param


def test_chat_logprobs_with_a_session_are_refused(app):
    response = httpx.post(f"{app.v1}/chat/completions", headers={"X-Session-Id": "abc"}, timeout=30,
                          json={"model": MODEL, "messages": HELLO, "logprobs": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "logprobs"


# ----- n > 1 ------------------------------------------------------------------------------------------------
def test_several_choices_in_one_reply(app, client):
    one = chat(client, max_tokens=10)
    reply = chat(client, n=3, max_tokens=10, logprobs=True)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) == 1 and reply.choices[0].message.content  # greedy
    assert reply.usage.prompt_tokens == one.usage.prompt_tokens
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices) > 0
    sampled = chat(client, n=3, max_tokens=10, temperature=1.0, seed=11)
    assert len({c.message.content for c in sampled.choices}) > 1  # each choice samples with seed + its index


def test_several_choices_stream_with_their_index(client):
    whole = chat(client, n=2, max_tokens=10)
    chunks = list(chat(client, n=2, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices
    assert sum(1 for chunk in chunks if chunk.usage) == 1


def test_leaving_a_several_choice_stream_stops_every_choice(app):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 400, "temperature": 1.0, "n": 3, "stream": True}
    with httpx.stream("POST", f"{app.v1}/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    wait_until(lambda: app.service.engine.gate.running == 0, timeout=20, what="every choice to stop")


def test_several_choices_limits(app, client):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, n=app.config.max_concurrent_generations + 1)
    assert caught.value.body["param"] == "n"
    bound = httpx.post(f"{app.v1}/chat/completions", headers={"X-Session-Id": "abc"}, timeout=30,
                       json={"model": MODEL, "messages": HELLO, "n": 2})
    assert bound.status_code == 400 and bound.json()["error"]["param"] == "n"
    assert app.service.engine.gate.running == 0


# ----- /v1/completions ----------------------------------------------------------------------------------------
def test_completion_continues_the_raw_prompt(app, client):
    reply = complete(client)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-") and reply.model == MODEL
    choice = reply.choices[0]
    assert choice.index == 0 and choice.text and choice.finish_reason in ("stop", "length")
    assert choice.logprobs is None
    lm_tokens = app.service.manager.use(MODEL)
    with lm_tokens as lm:  # no chat template: the prompt's own tokens (and BOS where the model has one)
        expected_prompt = len(lm.tokenizer(PROMPT)["input_ids"])
    assert reply.usage.prompt_tokens == expected_prompt
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert complete(client, prompt=[PROMPT]).choices[0].text == choice.text  # a list of one prompt


def test_completion_streams_the_same_text(client):
    whole = complete(client, max_tokens=12)
    chunks = list(complete(client, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices


def test_completion_echo_stop_and_seed(client):
    plain = complete(client, max_tokens=12).choices[0].text
    echoed = complete(client, max_tokens=12, echo=True).choices[0].text
    assert echoed == PROMPT + plain
    streamed = "".join(c.choices[0].text for c in complete(client, max_tokens=12, echo=True, stream=True))
    assert streamed == echoed
    cut = plain[len(plain) // 2:][:2]
    stopped = complete(client, max_tokens=12, stop=[cut]).choices[0]
    assert stopped.text == plain[:plain.index(cut)] and stopped.finish_reason == "stop"
    sampled = [complete(client, max_tokens=12, temperature=1.0, seed=7, top_p=0.9).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_a_list_of_prompts_gives_a_choice_each(client):
    prompts = [PROMPT, "Once upon a time", "Hello"]
    alone = [complete(client, prompt=prompt, echo=True) for prompt in prompts]
    together = complete(client, prompt=prompts, echo=True)
    assert [c.index for c in together.choices] == [0, 1, 2]
    assert all(c.text.startswith(prompt) for c, prompt in zip(together.choices, prompts))
    assert together.usage.prompt_tokens == sum(reply.usage.prompt_tokens for reply in alone)
    chunks = list(complete(client, prompt=prompts, stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: "", 2: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert all(texts[i] for i in texts) and chunks[-1].usage.prompt_tokens == together.usage.prompt_tokens
    assert sum(1 for chunk in chunks if chunk.usage) == 1


def test_completion_legacy_logprobs(client):
    reply = complete(client, logprobs=2, max_tokens=10)
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == \
        len(logprobs.text_offset) == reply.usage.completion_tokens
    assert b"".join(token_bytes(t) for t in logprobs.tokens).decode("utf-8", "replace") == choice.text
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    assert all(choice.text[offset:].startswith(token) for token, offset in zip(logprobs.tokens, logprobs.text_offset)
               if not token.startswith("bytes:"))
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(lp)
               for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    streamed = [c.choices[0].logprobs for c in complete(client, logprobs=2, max_tokens=10, stream=True)
                if c.choices and c.choices[0].logprobs]
    assert [t for part in streamed for t in part.tokens] == logprobs.tokens
    assert [o for part in streamed for o in part.text_offset] == logprobs.text_offset


@pytest.mark.parametrize("fields, param", [
    ({"suffix": "the end"}, "suffix"),
    ({"n": 2}, "n"),
    ({"best_of": 3}, "best_of"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
    ({"echo": True, "logprobs": 1}, "echo"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt": ["one", ""]}, "prompt"),
    ({"prompt": ["x"] * 9}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"temperature": 9}, "temperature"),
    ({"max_tokens": 10**6}, "max_tokens"),
])
def test_completion_refusals_name_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, **fields)
    assert caught.value.body["param"] == param


def test_completion_shares_chats_rules(app, client):
    with pytest.raises(openai.NotFoundError):
        complete(client, model="no-such-model")
    bound = httpx.post(f"{app.v1}/completions", headers={"X-Session-Id": "abc"}, timeout=30,
                       json={"model": MODEL, "prompt": PROMPT})
    assert bound.status_code == 400 and "session" in bound.json()["error"]["message"].lower()
    wrong_method = httpx.get(f"{app.v1}/completions", timeout=30)
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    too_long = httpx.post(f"{app.v1}/completions", timeout=30,
                          json={"model": MODEL, "prompt": "x" * (app.config.max_prompt_chars + 1)})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "prompt"


def test_text_offsets_follow_characters_not_bytes():
    from types import SimpleNamespace

    from inference.http.completions import _Reply
    from inference.logprobs import TokenLogprob

    def offsets(pieces, echoed=""):
        reply = _Reply("cmpl-x", 0, MODEL, echoed, 0)
        chunk = SimpleNamespace(logprobs=[TokenLogprob("t", list(piece), -1.0) for piece in pieces])
        return reply.logprobs(chunk)["text_offset"]

    assert offsets([b"a", b"\xf0\x9f", b"\x8e\x89", b"b"]) == [0, 1, 1, 2]  # an emoji split over two tokens
    assert offsets([b"The", b"\xc4", b"F"]) == [0, 3, 4]  # a stray byte shows as one U+FFFD
    assert offsets([b"\xc3\xa9t\xc3\xa9"], echoed="Caf") == [3]
