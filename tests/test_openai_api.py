"""The /v1 routes, end to end, with the official `openai` client (and raw httpx for what it cannot send).

`app` is open; `locked_app` has an API key and room for one generation with no queue, to check 401
and 429.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from gradio_client import Client
from openai import OpenAI

from inference.generate import Chunk
from app_harness import app_config, captured_log, counted_forwards, running_app, wait_until
from sessions import LOCAL_USER

MODEL = "tiny-llama"
API_KEY = "sk-test-5f1d2c9a7b3e"
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models, model_cache):
    config = app_config(tmp_path_factory.mktemp("v1-open"), tiny_models, model_cache)
    with running_app(config) as running:
        yield running


@pytest.fixture(scope="module")
def locked_app(tmp_path_factory, tiny_models, model_cache):
    config = app_config(tmp_path_factory.mktemp("v1-locked"), tiny_models, model_cache, api_key=API_KEY,
                        max_concurrent_generations=1, max_queue=0)
    with running_app(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(app):
    with OpenAI(base_url=app.v1, api_key="not-needed", max_retries=0, timeout=60) as client:
        yield client


def greedy(client, **overrides):
    request = {"model": MODEL, "messages": HELLO, "max_tokens": 16, "temperature": 0, **overrides}
    return client.chat.completions.create(**request)


def assert_openai_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert {"message", "type", "param", "code"} <= set(error)
    for fragment in fragments:
        assert fragment.lower() in error["message"].lower(), error
    return error


# ----- models -------------------------------------------------------------------------------------------------
def test_models_lists_every_catalog_model(app, client):
    listed = client.models.list()
    ids = [m.id for m in listed.data]
    assert sorted(ids) == sorted(r["id"] for r in app.service.list_models())
    assert {"tiny-llama", "tiny-qwen2", "tiny-gemma3"} <= set(ids)
    assert all(m.object == "model" for m in listed.data)


# ----- completions --------------------------------------------------------------------------------------------
def test_completion_returns_text_and_usage(client):
    reply = greedy(client)
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streaming_sends_chunks_a_finish_reason_and_usage(client):
    expected = greedy(client)
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    with_choices = [c for c in chunks if c.choices]
    deltas = [c.choices[0].delta.content or "" for c in with_choices]
    assert len([d for d in deltas if d]) >= 3, "expected the reply in several chunks"
    assert "".join(deltas) == expected.choices[0].message.content
    assert with_choices[-1].choices[0].finish_reason == expected.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].usage is not None and not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == expected.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == expected.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_streaming_without_include_usage_sends_no_usage(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0,
                                                 stream=True))
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason is not None


def test_raw_stream_is_server_sent_events_ending_in_done(app):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{app.v1}/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert json.loads(line[6:])["object"] == "chat.completion.chunk"


def test_stop_sequence_cuts_the_reply(client):
    full = greedy(client, max_tokens=24).choices[0].message.content
    cut = next((i for i in range(4, len(full) - 3) if "\ufffd" not in full[i:i + 3] and full[i:i + 3].strip()), None)
    assert cut is not None, f"reply too short to pick a stop string from: {full!r}"
    stop = full[cut:cut + 3]
    reply = greedy(client, max_tokens=24, stop=[stop, "never-appears"])
    assert reply.choices[0].message.content == full[:full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    single = greedy(client, max_tokens=24, stop=stop)  # a plain string works too
    assert single.choices[0].message.content == full[:full.index(stop)]


def test_max_tokens_ends_with_length(client):
    reply = greedy(client, max_tokens=3)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


def test_max_completion_tokens_is_honoured(client):
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=2, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2


def test_seed_makes_sampling_repeatable(client):
    def sample(seed):
        return client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=1.0,
                                              seed=seed).choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3)), "other seeds should give other samples"


def test_system_and_multi_turn_messages_are_accepted(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": [{"type": "text", "text": "And again?"}]}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert reply.choices[0].message.content is not None


# ----- bad requests -------------------------------------------------------------------------------------------
def test_malformed_json_is_400(app):
    response = httpx.post(f"{app.v1}/chat/completions", content=b'{"model": "tiny-llama", "messages": [',
                          headers={"content-type": "application/json"}, timeout=30)
    assert_openai_error(response, 400, "json")
    response = httpx.post(f"{app.v1}/chat/completions", json=["not", "an", "object"], timeout=30)
    assert_openai_error(response, 400, "object")


@pytest.mark.parametrize("change, param", [
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**6}, "max_tokens"),
    ({"top_p": 0}, "top_p"),
    ({"stop": 5}, "stop"),
    ({"messages": None}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": None}, "model"),
    ({"stream": "yes"}, "stream"),
    ({"n": 0}, "n"),
    ({"n": 99}, "n"),
    ({"stream": True, "stream_options": 5}, "stream_options"),
])
def test_bad_parameters_are_400_in_openai_shape(app, change, param):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4}
    body.update(change)
    body = {k: v for k, v in body.items() if v is not None}
    error = assert_openai_error(httpx.post(f"{app.v1}/chat/completions", json=body, timeout=30), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_bad_parameters_raise_bad_request_in_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as caught:
        greedy(client, temperature=-1)
    assert "temperature" in str(caught.value)
    assert greedy(client, max_tokens=2).choices[0].message.content is not None  # still serving


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert "no-such-model" in str(caught.value)
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HELLO, stream=True)


# ----- sessions -----------------------------------------------------------------------------------------------
def test_session_header_binds_the_request_to_a_session(app, client):
    session = app.service.new_session(LOCAL_USER, "via v1")
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0,
                                           extra_headers={"X-Session-Id": session["id"]})
    text = reply.choices[0].message.content
    assert app.service.history(LOCAL_USER, session["id"]) == [
        {"role": "user", "content": HELLO[-1]["content"]}, {"role": "assistant", "content": text}]
    assert reply.usage.completion_tokens > 0

    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "More?"}],
                                            max_tokens=8, temperature=0, stream=True,
                                            extra_headers={"X-Session-Id": session["id"]})
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    history = app.service.history(LOCAL_USER, session["id"])
    assert history[-2:] == [{"role": "user", "content": "More?"}, {"role": "assistant", "content": streamed}]


def test_unknown_session_header_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2,
                                       extra_headers={"X-Session-Id": "0123456789abcdef0123456789abcdef"})
    assert "session" in str(caught.value).lower()


# ----- disconnects --------------------------------------------------------------------------------------------
def test_client_disconnect_stops_the_generation(app):
    session = app.service.new_session(LOCAL_USER, "disconnect")
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4000, "temperature": 0, "stream": True}
    gate = app.service.engine.gate
    with counted_forwards(app.service, MODEL, delay_s=0.05) as forwards:
        with httpx.stream("POST", f"{app.v1}/chat/completions", json=body, timeout=60,
                          headers={"X-Session-Id": session["id"]}) as response:
            assert response.status_code == 200
            received = 0
            for line in response.iter_lines():
                if '"content"' in line and '"content": ""' not in line:
                    received += 1
                if received >= 3:
                    break
            closed_at = time.monotonic()
        wait_until(lambda: gate.running == 0, timeout=5, what="the generation to end")
        ended_after = time.monotonic() - closed_at
        extra = forwards.calls_after(closed_at)
    assert ended_after < 3, f"the generation ran on {ended_after:.1f} s after the client left"
    assert extra <= 3, f"{extra} tokens were generated after the client left"
    stored = wait_until(lambda: [m for m in app.service.messages(LOCAL_USER, session["id"])
                                 if m["role"] == "assistant"], timeout=5, what="the partial reply")
    assert stored[-1]["stats"]["finish_reason"] == "cancelled"
    assert stored[-1]["stats"]["completion_tokens"] < 50


def test_client_disconnect_without_session_frees_the_engine(app, client):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4000, "temperature": 0, "stream": True}
    with counted_forwards(app.service, MODEL, delay_s=0.05) as forwards:
        with httpx.stream("POST", f"{app.v1}/chat/completions", json=body, timeout=60) as response:
            next(line for line in response.iter_lines() if '"content": "' in line and '"content": ""' not in line)
            closed_at = time.monotonic()
        wait_until(lambda: app.service.engine.gate.running == 0, timeout=5, what="the generation to end")
        assert forwards.calls_after(closed_at) <= 3
    assert greedy(client, max_tokens=2).choices[0].message.content is not None


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_is_noticed_between_fast_tokens(app, monkeypatch, stream):
    """A fast engine (a token every 5 ms, as a real model on a GPU gives) still stops when the client leaves."""
    produced, ended = [], []

    def fast_engine(model_id, messages, params, cancel=None, admission=None):
        try:
            for count in range(1, 2001):
                if cancel.is_set():
                    yield Chunk(finish_reason="cancelled", completion_tokens=count - 1, prompt_tokens=1)
                    return
                time.sleep(0.005)
                produced.append(time.monotonic())
                yield Chunk(text="x", completion_tokens=count, prompt_tokens=1)
            yield Chunk(finish_reason="length", completion_tokens=2000, prompt_tokens=1)
        finally:
            ended.append(time.monotonic())

    monkeypatch.setattr(app.service, "complete", fast_engine)
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2000, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{app.v1}/chat/completions", json=body, timeout=30) as response:
            next(line for line in response.iter_lines() if '"content": "x"' in line)
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{app.v1}/chat/completions", json=body, timeout=httpx.Timeout(0.5, connect=10))
    left_at = time.monotonic()
    wait_until(lambda: ended, timeout=5, what="the generation to end")
    assert ended[0] - left_at < 1.0, f"it ran on for {ended[0] - left_at:.1f} s after the client left"
    assert len(produced) < 1000


# ----- API key ------------------------------------------------------------------------------------------------
def test_api_key_is_required_on_every_v1_route(locked_app):
    chat = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
    requests = [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", chat),
                ("POST", "/v1/chat/completions", {**chat, "stream": True}),
                ("POST", "/v1/chat/completions", {"not": "valid"})]
    with captured_log() as captured:
        for method, path, body in requests:
            for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": API_KEY},
                            {"Authorization": f"Basic {API_KEY}"}, {"Authorization": f"Bearer {API_KEY}x"}):
                response = httpx.request(method, locked_app.url + path, json=body, headers=headers, timeout=30)
                error = assert_openai_error(response, 401, "api key")
                assert API_KEY not in response.text
                assert error["code"] == "invalid_api_key"
        with OpenAI(base_url=locked_app.v1, api_key="wrong", max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError):
                wrong.models.list()
            with pytest.raises(openai.AuthenticationError):
                wrong.chat.completions.create(model=MODEL, messages=HELLO)
        with OpenAI(base_url=locked_app.v1, api_key=API_KEY, max_retries=0, timeout=60) as right:
            assert MODEL in {m.id for m in right.models.list().data}
            reply = right.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, temperature=0,
                                                  extra_body={"some_new_field": 1})  # logged as ignored
            assert reply.usage.completion_tokens > 0
            chunks = list(right.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, stream=True))
            assert chunks[-1].choices[0].finish_reason is not None
            with pytest.raises(openai.BadRequestError):  # a right key with a bad body gets 400, not 401
                right.chat.completions.create(model=MODEL, messages=HELLO, temperature=-1)
    server_lines = [line for line in captured.lines if not line.startswith(("openai", "httpx", "httpcore"))]
    assert any("some_new_field" in line for line in server_lines), "the server's log was not captured"
    assert API_KEY not in "\n".join(server_lines)
    assert httpx.get(f"{locked_app.url}/health", timeout=10).status_code == 200  # health stays open


# ----- busy ---------------------------------------------------------------------------------------------------
def test_busy_server_answers_429_with_retry_after(locked_app):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    long_body = {"model": MODEL, "messages": HELLO, "max_tokens": 4000, "temperature": 0, "stream": True}
    short_body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
    gate = locked_app.service.engine.gate
    with counted_forwards(locked_app.service, MODEL, delay_s=0.05) as forwards:
        with httpx.stream("POST", f"{locked_app.v1}/chat/completions", json=long_body, headers=headers,
                          timeout=60) as holding:
            assert holding.status_code == 200
            wait_until(lambda: forwards.calls >= 2, what="the long generation to start")
            busy = httpx.post(f"{locked_app.v1}/chat/completions", json=short_body, headers=headers, timeout=30)
            error = assert_openai_error(busy, 429, "busy")
            assert error["type"] == "rate_limit_error"
            assert int(busy.headers["retry-after"]) > 0
            streamed_busy = httpx.post(f"{locked_app.v1}/chat/completions", json={**short_body, "stream": True},
                                       headers=headers, timeout=30)
            assert_openai_error(streamed_busy, 429)
            with OpenAI(base_url=locked_app.v1, api_key=API_KEY, max_retries=0) as client:
                with pytest.raises(openai.RateLimitError):
                    client.chat.completions.create(**short_body)
            # the Gradio API shares the engine: its chat is refused the same way, its other calls still work
            gradio = Client(locked_app.url, verbose=False, download_files=False)
            session = gradio.predict("", api_name="/new_session")
            with pytest.raises(Exception) as caught:
                gradio.predict(session["id"], "Hello", "", "", api_name="/chat")
            assert "busy" in str(caught.value)
            assert session["id"] in {s["id"] for s in gradio.predict(api_name="/list_sessions")}
        wait_until(lambda: gate.running == 0, timeout=5, what="the held generation to end")
    done = httpx.post(f"{locked_app.v1}/chat/completions", json=short_body, headers=headers, timeout=60)
    assert done.status_code == 200, done.text


def test_concurrent_requests_never_crash_the_server(locked_app):
    """Several at once on a server with room for one: each gets 200 or 429, nothing else."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 8, "temperature": 0}
    statuses = []

    def send():
        statuses.append(httpx.post(f"{locked_app.v1}/chat/completions", json=body, headers=headers,
                                   timeout=60).status_code)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(statuses) == 4 and set(statuses) <= {200, 429} and 200 in statuses
    wait_until(lambda: locked_app.service.engine.gate.running == 0, timeout=5, what="the engine to be idle")


def test_a_stream_checks_its_client_at_most_every_poll_interval():
    """Each check costs the event loop; a token every few ms need not pay for one each (50 ms at most apart)."""
    from types import SimpleNamespace

    from inference.http import streams

    poll, request = streams.DISCONNECT_POLL_S, SimpleNamespace(scope={})
    assert streams._check_due(request, 100.0)  # the first chunk: checked
    assert not streams._check_due(request, 100.0 + poll / 2)  # the next, soon after: not
    assert streams._check_due(request, 100.0 + poll * 1.5) and not streams._check_due(request, 100.0 + poll * 1.5)
