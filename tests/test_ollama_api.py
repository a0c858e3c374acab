"""The Ollama-compatible /api routes, end to end, with the official `ollama` client (and raw httpx for what
it cannot send).

`app` is open; `locked_app` has an API key and room for one generation with no queue, to check 401 and 429.
The tests run offline (conftest sets HF_HUB_OFFLINE=1): /api/pull is checked on a model already on disk
and on the offline and unknown-model errors, and never downloads.
"""

from __future__ import annotations

import inspect
import json
import re
import time

import httpx
import ollama
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app_harness import app_config, counted_forwards, running_app, wait_until
from sessions import LOCAL_USER

MODEL = "tiny-llama"
API_KEY = "sk-ollama-7c2e9a41b5"
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]
GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models, model_cache):
    config = app_config(tmp_path_factory.mktemp("ollama-open"), tiny_models, model_cache)
    with running_app(config) as running:
        yield running


@pytest.fixture(scope="module")
def locked_app(tmp_path_factory, tiny_models, model_cache):
    config = app_config(tmp_path_factory.mktemp("ollama-locked"), {"llama": tiny_models["llama"]}, model_cache,
                        api_key=API_KEY, max_concurrent_generations=1, max_queue=0)
    with running_app(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(app):
    return ollama.Client(host=app.url, timeout=60)


def assert_ollama_error(response: httpx.Response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert isinstance(message, str) and message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    return message


def refused(call, status: int, *fragments: str) -> ollama.ResponseError:
    with pytest.raises(ollama.ResponseError) as caught:
        result = call()
        if inspect.isgenerator(result):
            list(result)  # a stream: the error comes with its first line
    assert caught.value.status_code == status, caught.value
    for fragment in fragments:
        assert fragment.lower() in caught.value.error.lower(), caught.value.error
    return caught.value


# ----- listing routes -----------------------------------------------------------------------------------------
def test_version(client):
    assert client._request_raw("GET", "/api/version").json()["version"].count(".") == 2


def test_tags_lists_every_catalog_model_with_details(app, client):
    models = client.list().models
    names = {m.model for m in models}
    assert {f"{r['id']}:latest" for r in app.service.list_models()} == names
    tiny = next(m for m in models if m.model == f"{MODEL}:latest")
    assert tiny.size == app.service.model_record(MODEL)["file_size_bytes"] > 0
    assert tiny.details.format == "gguf" and tiny.details.family == "llama"
    assert tiny.details.quantization_level and tiny.details.parameter_size
    assert tiny.modified_at.year >= 2024 and len(tiny.digest) == 64
    assert client.list().models[[m.model for m in models].index(tiny.model)].digest == tiny.digest  # stable


def test_ps_lists_loaded_models_and_show_describes_one(app, client):
    app.service.load_model(MODEL)
    loaded = {m.model: m for m in client.ps().models}
    assert f"{MODEL}:latest" in loaded
    assert all(app.service.model_record(name.removesuffix(":latest"))["state"] == "loaded" for name in loaded)
    entry = loaded[f"{MODEL}:latest"]
    assert entry.size == app.service.model_record(MODEL)["memory_bytes"] > 0
    assert entry.expires_at is not None and entry.context_length == app.service.model_record(MODEL)["context_length"]
    for name in (MODEL, f"{MODEL}:latest"):
        shown = client.show(name)
        assert shown.details.family == "llama" and "completion" in shown.capabilities
        assert shown.modelinfo["general.architecture"] == "llama"
        assert shown.modelinfo["llama.context_length"] == entry.context_length
        assert shown.modelinfo["general.parameter_count"] > 0
    refused(lambda: client.show("no-such-model"), 404, "no-such-model")


# ----- chat and generate --------------------------------------------------------------------------------------
def test_chat_answers_with_the_stats(client):
    reply = client.chat(model=MODEL, messages=HELLO, options=GREEDY)
    assert reply.message.role == "assistant" and reply.message.content
    assert reply.done and reply.done_reason in ("stop", "length") and reply.model == MODEL
    assert reply.prompt_eval_count > 0 and 0 < reply.eval_count <= 12
    assert reply.total_duration >= reply.eval_duration >= 0 and reply.prompt_eval_duration > 0
    assert reply.load_duration >= 0 and reply.total_duration < 60e9
    again = client.chat(model=f"{MODEL}:latest", messages=HELLO, options=GREEDY)  # the :latest tag names it too
    assert again.message.content == reply.message.content and again.model == f"{MODEL}:latest"


def test_chat_streams_the_same_reply_as_ndjson(app, client):
    whole = client.chat(model=MODEL, messages=HELLO, options=GREEDY)
    parts = list(client.chat(model=MODEL, messages=HELLO, options=GREEDY, stream=True))
    assert len([p for p in parts if p.message.content]) >= 3, "expected the reply in several lines"
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert parts[-1].eval_count == whole.eval_count and parts[-1].prompt_eval_count == whole.prompt_eval_count
    body = {"model": MODEL, "messages": HELLO, "options": {**GREEDY, "num_predict": 3}}  # greedy: no early EOS
    with httpx.stream("POST", f"{app.url}/api/chat", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "length" and lines[-1]["eval_count"] == 3


@pytest.mark.parametrize("stream", [False, True])
def test_generate_with_a_system_prompt_and_raw(client, stream):
    def text(**request):
        result = client.generate(model=MODEL, options=GREEDY, stream=stream, **request)
        if not stream:
            return result.response, result
        parts = list(result)
        assert parts[-1].done and not any(p.done for p in parts[:-1])
        return "".join(p.response for p in parts), parts[-1]

    templated, final = text(prompt="Once upon a time", system="Tell stories.")
    assert templated and final.eval_count > 0 and final.done_reason in ("stop", "length")
    raw, raw_final = text(prompt="Once upon a time", raw=True)
    assert raw_final.prompt_eval_count < final.prompt_eval_count  # no chat template, no system turn
    assert raw_final.eval_count > 0


def test_generate_matches_chat_for_the_same_turn(client):
    chat = client.chat(model=MODEL, messages=HELLO, options=GREEDY).message.content
    assert client.generate(model=MODEL, prompt=HELLO[0]["content"], options=GREEDY).response == chat


def test_options_are_honoured(client):
    short = client.chat(model=MODEL, messages=HELLO, options={"temperature": 0, "num_predict": 3})
    assert short.eval_count == 3 and short.done_reason == "length"
    full = client.chat(model=MODEL, messages=HELLO, options={"temperature": 0, "num_predict": 24}).message.content
    cut = next((i for i in range(4, len(full) - 3) if "\ufffd" not in full[i:i + 3] and full[i:i + 3].strip()), None)
    assert cut is not None, f"reply too short to pick a stop string from: {full!r}"
    stop = full[cut:cut + 3]
    stopped = client.chat(model=MODEL, messages=HELLO, options={"temperature": 0, "num_predict": 24, "stop": [stop]})
    assert stopped.message.content == full[:full.index(stop)] and stopped.done_reason == "stop"

    def sample(seed, **more):
        options = {"temperature": 1.0, "num_predict": 12, "seed": seed, **more}
        return client.chat(model=MODEL, messages=HELLO, options=options).message.content

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3)), "other seeds should give other samples"
    assert sample(7, top_k=1) == sample(8, top_k=1)  # top_k 1 is greedy whatever the seed
    assert sample(5, top_p=0.5, repeat_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5)
    # unknown and unsupported-but-harmless options are ignored, as Ollama does; num_ctx above the window is clamped
    assert client.chat(model=MODEL, messages=HELLO, options={**GREEDY, "mirostat": 0, "num_thread": 2,
                                                             "num_ctx": 1_000_000, "no_such": 1}).message.content
    assert client.chat(model=MODEL, messages=HELLO, options={"temperature": 0, "num_predict": -1,
                                                             "seed": -1}).done


@pytest.mark.parametrize("options, fragment", [
    ({"temperature": -1}, "options.temperature"), ({"top_p": 0}, "options.top_p"), ({"top_k": "x"}, "options.top_k"),
    ({"num_predict": 0}, "options.num_predict"), ({"stop": 5}, "options.stop"),
    ({"repeat_penalty": 0}, "options.repeat_penalty"), ({"num_ctx": 0}, "num_ctx"), ({"num_ctx": "big"}, "num_ctx"),
])
def test_bad_options_are_400(client, options, fragment):
    refused(lambda: client.chat(model=MODEL, messages=HELLO, options=options), 400, fragment)


# ----- errors -------------------------------------------------------------------------------------------------
def test_unknown_model_is_404(client):
    refused(lambda: client.chat(model="no-such-model", messages=HELLO), 404, "no-such-model")
    refused(lambda: client.chat(model="no-such-model", messages=HELLO, stream=True), 404)
    refused(lambda: client.generate(model=f"{MODEL}:7b", prompt="Hi"), 404)


@pytest.mark.parametrize("route, body, fragment", [
    ("chat", {"messages": [{"role": "user", "content": "What is this?", "images": ["aGVsbG8="]}]}, "images"),
    ("generate", {"prompt": "What is this?", "images": ["aGVsbG8="]}, "images"),
    ("chat", {"messages": HELLO, "format": "yaml"}, "format"),
    ("generate", {"prompt": "Hi", "format": {"type": "object", "not": {}}}, "format"),
    ("chat", {"messages": HELLO, "tools": [{"type": "function", "function": {"name": 5}}]}, "tools"),
    ("chat", {"messages": HELLO, "tools": {"name": "f"}}, "tools"),
    ("chat", {"messages": HELLO, "format": "json", "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools"),
    ("chat", {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 5}}]}]},
     "arguments"),
    ("chat", {"messages": HELLO, "think": True}, "think"),
    ("generate", {"prompt": "Hi", "template": "{{ .Prompt }}"}, "template"),
    ("generate", {"prompt": "Hi", "suffix": "end"}, "suffix"),
    ("generate", {"prompt": "Hi", "context": [1, 2, 3]}, "context"),
    ("generate", {"prompt": "Hi", "raw": True, "system": "Be brief."}, "system"),
    ("chat", {"messages": "Hi"}, "messages"),
    ("chat", {"messages": [{"role": "wizard", "content": "Hi"}]}, "role"),
    ("chat", {"messages": HELLO, "stream": "yes"}, "stream"),
    ("chat", {"messages": HELLO, "options": [1]}, "options"),
    ("chat", {"messages": HELLO, "keep_alive": "soon"}, "keep_alive"),
    ("generate", {"prompt": 5}, "prompt"),
    ("chat", {"messages": HELLO, "model": None}, "model"),
])
def test_unsupported_and_malformed_fields_are_400(app, route, body, fragment):
    response = httpx.post(f"{app.url}/api/{route}", json={"model": MODEL, **body}, timeout=30)
    assert_ollama_error(response, 400, fragment)


def test_the_client_gets_image_refusals_as_errors(client, tmp_path):
    image = tmp_path / "pixel.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    refused(lambda: client.chat(model=MODEL, messages=[{"role": "user", "content": "?", "images": [image]}]), 400,
            "images")
    refused(lambda: client.generate(model=MODEL, prompt="?", images=[image]), 400, "images")


def test_malformed_json_is_400(app):
    response = httpx.post(f"{app.url}/api/chat", content=b'{"model": "tiny-llama", "messages": [',
                          headers={"content-type": "application/json"}, timeout=30)
    assert_ollama_error(response, 400, "json")
    assert_ollama_error(httpx.post(f"{app.url}/api/generate", json=[1, 2], timeout=30), 400, "object")


@pytest.mark.parametrize("method, path, status, fragment", [
    ("POST", "/api/embed", 404, "not supported"), ("POST", "/api/embeddings", 404, "not supported"),
    ("POST", "/api/create", 404, "not supported"), ("POST", "/api/copy", 404, "not supported"),
    ("DELETE", "/api/delete", 404, "not supported"), ("POST", "/api/push", 404, "not supported"),
    ("HEAD", "/api/blobs/sha256:00", 404, None), ("GET", "/api/no-such-route", 404, "unknown"),
    ("GET", "/api/chat", 405, "POST"), ("POST", "/api/tags", 405, "GET"),
])
def test_routes_we_do_not_serve_answer_in_ollamas_shape(app, method, path, status, fragment):
    response = httpx.request(method, app.url + path, json={"model": MODEL}, timeout=30)
    assert response.status_code == status
    if method != "HEAD":
        assert_ollama_error(response, status, *([fragment] if fragment else []))


def test_the_client_sees_unserved_routes_as_errors(client):
    refused(lambda: client.embed(model=MODEL, input="hello"), 404, "not supported")
    refused(lambda: client.copy(MODEL, "copy-of-it"), 404, "not supported")
    refused(lambda: client.delete(MODEL), 404, "not supported")


# ----- keep_alive ---------------------------------------------------------------------------------------------
def test_keep_alive_loads_and_unloads(app, client):
    state = lambda: app.service.model_record(MODEL)["state"]  # noqa: E731
    client.chat(model=MODEL, messages=HELLO, options=GREEDY, keep_alive=0)
    wait_until(lambda: state() == "unloaded", timeout=10, what="keep_alive=0 to unload the model")

    loaded = client.generate(model=MODEL)  # an empty prompt loads the model
    assert loaded.done and loaded.done_reason == "load" and loaded.response == "" and state() == "loaded"
    unloaded = client.chat(model=MODEL, messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload" and unloaded.message.content == "" and state() == "unloaded"

    parts = list(client.chat(model=MODEL, messages=HELLO, options=GREEDY, stream=True, keep_alive=-1))
    assert parts[-1].done
    wait_until(lambda: app.service.model_record(MODEL)["pinned"], timeout=10, what="keep_alive=-1 to pin it")
    assert next(m for m in client.ps().models if m.model == f"{MODEL}:latest").expires_at.year == 9999
    list(client.generate(model=MODEL, prompt="Hi", options=GREEDY, stream=True, keep_alive="0s"))
    wait_until(lambda: state() == "unloaded", timeout=10, what="keep_alive='0s' to unload the model")
    assert not app.service.model_record(MODEL)["pinned"]
    assert client.chat(model=MODEL, messages=HELLO, options=GREEDY, keep_alive="5m").done  # loads it again
    assert state() == "loaded"


# ----- sessions and disconnects -------------------------------------------------------------------------------
def test_session_header_binds_the_request_to_a_session(app):
    session = app.service.new_session(LOCAL_USER, "via ollama")
    bound = ollama.Client(host=app.url, timeout=60, headers={"X-Session-Id": session["id"]})
    text = bound.chat(model=MODEL, messages=HELLO, options=GREEDY).message.content
    assert app.service.history(LOCAL_USER, session["id"]) == [
        {"role": "user", "content": HELLO[-1]["content"]}, {"role": "assistant", "content": text}]
    streamed = "".join(p.response for p in bound.generate(model=MODEL, prompt="More?", options=GREEDY, stream=True))
    assert app.service.history(LOCAL_USER, session["id"])[-2:] == [
        {"role": "user", "content": "More?"}, {"role": "assistant", "content": streamed}]
    refused(lambda: bound.generate(model=MODEL, prompt="More?", raw=True), 400, "session")
    stranger = ollama.Client(host=app.url, timeout=60, headers={"X-Session-Id": "0123456789abcdef0123456789abcdef"})
    refused(lambda: stranger.chat(model=MODEL, messages=HELLO), 404, "session")


@pytest.mark.parametrize("route", ["chat", "generate"])
def test_client_disconnect_frees_the_slot(app, client, route):
    body = {"model": MODEL, "options": {"temperature": 0, "num_predict": 4000},
            **({"messages": HELLO} if route == "chat" else {"prompt": "Hello"})}
    with counted_forwards(app.service, MODEL, delay_s=0.05) as forwards:
        with httpx.stream("POST", f"{app.url}/api/{route}", json=body, timeout=60) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for _ in range(3):
                assert not json.loads(next(lines))["done"]
            closed_at = time.monotonic()
        wait_until(lambda: app.service.engine.gate.running == 0, timeout=5, what="the generation to end")
        assert time.monotonic() - closed_at < 3
        assert forwards.calls_after(closed_at) <= 3
    assert client.chat(model=MODEL, messages=HELLO, options={"num_predict": 2}).done  # still serving


# ----- pull ---------------------------------------------------------------------------------------------------
def test_pull_of_a_model_on_disk_succeeds_at_once(client):
    assert client.pull(MODEL).status == "success"
    statuses = [p.status for p in client.pull(f"{MODEL}:latest", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    # a hub file already in models/ is found there, without asking the hub (the tests run offline)
    hub_file = client._request_raw("POST", "/api/pull", json={"model": f"hf.co/someone/Repo-GGUF/{MODEL}.gguf",
                                                              "stream": False}).json()
    assert hub_file == {"status": "success", "model": MODEL}


def test_pull_offline_or_unknown_fails_clearly(app, client):
    hub_model = next(m["id"] for m in app.service.list_models() if m.get("download_bytes") and not m["on_disk"])
    for stream in (False, True):
        error = refused(lambda: client.pull(hub_model, stream=stream), 503, "offline", "HF_HUB_OFFLINE")
        assert hub_model in error.error or "not on disk" in error.error
        refused(lambda: client.pull("hf.co/someone/Some-Model-GGUF:Q4_K_M", stream=stream), 503, "offline")
        refused(lambda: client.pull("no-such-model", stream=stream), 404, "no-such-model")
        refused(lambda: client.pull("hf.co/only-an-owner", stream=stream), 400, "hf.co/OWNER/REPO")
    assert not app.service.model_record(hub_model)["on_disk"]


# ----- API key and busy ---------------------------------------------------------------------------------------
def test_api_key_is_required_on_every_api_route(locked_app):
    routes = [("GET", "/api/version"), ("GET", "/api/tags"), ("GET", "/api/ps"), ("POST", "/api/show"),
              ("POST", "/api/chat"), ("POST", "/api/generate"), ("POST", "/api/pull"), ("POST", "/api/embed")]
    body = {"model": MODEL, "messages": HELLO, "prompt": "Hi"}
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            response = httpx.request(method, locked_app.url + path, json=body, headers=headers, timeout=30)
            assert_ollama_error(response, 401, "api key")
            assert API_KEY not in response.text
    wrong = ollama.Client(host=locked_app.url, headers={"Authorization": "Bearer wrong"})
    refused(lambda: wrong.chat(model=MODEL, messages=HELLO), 401)
    refused(lambda: wrong.list(), 401)
    right = ollama.Client(host=locked_app.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"})
    assert f"{MODEL}:latest" in {m.model for m in right.list().models}
    assert right.chat(model=MODEL, messages=HELLO, options={"num_predict": 2}).done


def test_busy_server_answers_429_with_retry_after(locked_app):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    long_body = {"model": MODEL, "messages": HELLO, "options": {"temperature": 0, "num_predict": 4000}}
    gate = locked_app.service.engine.gate
    with counted_forwards(locked_app.service, MODEL, delay_s=0.05) as forwards:
        with httpx.stream("POST", f"{locked_app.url}/api/chat", json=long_body, headers=headers,
                          timeout=60) as holding:
            assert holding.status_code == 200
            wait_until(lambda: forwards.calls >= 2, what="the long generation to start")
            for route, body in (("chat", {"messages": HELLO}), ("generate", {"prompt": "Hi", "stream": False})):
                busy = httpx.post(f"{locked_app.url}/api/{route}", json={"model": MODEL, **body}, headers=headers,
                                  timeout=30)
                assert_ollama_error(busy, 429, "busy")
                assert int(busy.headers["retry-after"]) > 0
            right = ollama.Client(host=locked_app.url, timeout=30, headers=headers)
            refused(lambda: right.chat(model=MODEL, messages=HELLO), 429, "busy")
        wait_until(lambda: gate.running == 0, timeout=5, what="the held generation to end")


# ----- fuzzed bodies ------------------------------------------------------------------------------------------
ACCEPTABLE = {200, 400, 404, 429, 503}
TRACEBACK = re.compile(r'Traceback|File "|line \d+, in |\w+Error\(')
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)
OPTION_NAMES = ["temperature", "top_p", "top_k", "num_predict", "stop", "seed", "repeat_penalty", "presence_penalty",
                "frequency_penalty", "num_ctx", "mirostat", "num_thread"]
MESSAGES = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "wizard"]) | JSON_VALUES,
     "content": st.text(max_size=40) | JSON_VALUES},
    optional={"images": JSON_VALUES, "tool_calls": JSON_VALUES}), max_size=3)
BODIES = st.fixed_dictionaries(
    {"model": st.sampled_from([MODEL, f"{MODEL}:latest", "no-such-model", ""]) | JSON_VALUES},
    optional={"messages": MESSAGES | JSON_VALUES, "prompt": st.text(max_size=40) | JSON_VALUES,
              "system": st.text(max_size=20) | JSON_VALUES, "raw": st.booleans() | JSON_VALUES,
              "options": st.dictionaries(st.sampled_from(OPTION_NAMES), JSON_VALUES, max_size=4) | JSON_VALUES,
              "format": JSON_VALUES, "tools": JSON_VALUES, "images": JSON_VALUES, "template": JSON_VALUES,
              "think": JSON_VALUES, "stream": st.booleans() | JSON_VALUES, "suffix": JSON_VALUES})


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory, tiny_models, model_cache):
    config = app_config(tmp_path_factory.mktemp("ollama-fuzz"), {"llama": tiny_models["llama"]}, model_cache,
                        max_tokens_limit=8, max_prompt_chars=2000)
    with running_app(config) as running:
        running.service.load_model(MODEL)
        yield running


@pytest.mark.parametrize("route", ["chat", "generate", "show", "pull"])
def test_fuzzed_bodies_get_a_clean_answer(fuzz_app, route):
    """Hypothesis-built bodies: every answer is a status a client can act on, errors in Ollama's shape
    without a traceback, and the app keeps serving."""
    with httpx.Client(base_url=fuzz_app.url, timeout=60) as http:
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        @given(body=BODIES)
        def send(body):
            response = http.post(f"/api/{route}", content=json.dumps(body).encode(),  # NaN and Infinity too
                                 headers={"content-type": "application/json"})
            assert response.status_code in ACCEPTABLE, (response.status_code, response.text[:300])
            assert not TRACEBACK.search(response.text), response.text[:300]
            lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
            assert lines, response.text[:300]
            if response.status_code != 200:
                assert isinstance(lines[0]["error"], str) and 0 < len(lines[0]["error"]) < 1000

        send()
        assert http.post("/api/chat", json={"model": MODEL, "messages": HELLO, "stream": False}).status_code == 200
    assert fuzz_app.service.engine.gate.running == 0


CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                         "rain": {"type": "boolean"}},
        "required": ["city", "rain"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True])
def test_format_schema_constrains_the_reply(client, stream):
    """Ollama's `format` is the engine's structured output: even the random tiny model's reply is JSON
    that follows the schema, on /api/chat and /api/generate, streamed and not."""
    for seed in range(3):
        options = {"temperature": 1.0, "seed": seed, "num_predict": 120}
        chat = client.chat(model=MODEL, messages=HELLO, format=CITY, options=options, stream=stream)
        generated = client.generate(model=MODEL, prompt="Weather:", format=CITY, options=options, stream=stream)
        texts = ("".join(part.message.content for part in chat) if stream else chat.message.content,
                 "".join(part.response for part in generated) if stream else generated.response)
        for text in texts:
            reply = json.loads(text)
            assert set(reply) == {"city", "rain"} and isinstance(reply["rain"], bool) and len(reply["city"]) <= 8


def test_format_json_gives_an_object(client):
    reply = client.generate(model=MODEL, prompt="Data:", format="json",
                            options={"temperature": 0, "num_predict": 200})
    if reply.done_reason == "stop":  # as with OpenAI's json_object, a reply cut by the budget is not whole
        assert isinstance(json.loads(reply.response), dict)
    else:
        assert reply.response.lstrip().startswith("{")


WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Today's weather in a city",
                                             "parameters": {"type": "object", "required": ["city"],
                                                            "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tools_client(tmp_path_factory, model_cache):
    """A tiny model with room for a prompt that lists tools (the test models' 256-token window has none)."""
    from gguf_factory import write_tiny_gguf

    path = write_tiny_gguf(tmp_path_factory.mktemp("ollama-tools") / "tiny-llama.gguf", "llama", context_length=2048)
    config = app_config(tmp_path_factory.mktemp("ollama-tools-app"), {"llama": path}, model_cache, max_context=2048)
    with running_app(config) as app:
        yield ollama.Client(host=app.url, timeout=60)


@pytest.mark.parametrize("stream", [False, True])
def test_tools_are_offered_and_results_taken_back(tools_client, stream):
    """/api/chat with tools (the model decides, as Ollama's tools do), and a conversation that holds an
    earlier call and its result: the random tiny model answers in text, streamed and not."""
    history = [*HELLO, {"role": "assistant", "content": "",
                        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
               {"role": "tool", "content": "Sunny, 21 C", "tool_name": "get_weather"}]
    for messages in (HELLO, history):
        reply = tools_client.chat(model=MODEL, messages=messages, tools=WEATHER, stream=stream,
                                  options={"temperature": 0, "num_predict": 8})
        parts = list(reply) if stream else [reply]
        assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
        assert all(part.message.role == "assistant" for part in parts)


def test_a_reply_that_calls_a_tool_is_given_as_ollama_tool_calls():
    """The reply's `<tool_call>` text (the Hermes form the prompt asks for) becomes Ollama's `tool_calls`
    (arguments as an object), whole and streamed."""
    from inference.http.ollama import Answer, _tool_lines
    from inference.http.ollama_requests import parse_chat
    from inference.tools import ToolCallStream

    job = parse_chat({"model": MODEL, "messages": HELLO, "tools": WEATHER}, 64)
    answer = Answer(job, time.perf_counter())
    text = 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    splitter = ToolCallStream(job.params.tools)
    events = [event for piece in (text[:20], text[20:50], text[50:]) for event in splitter.feed(piece)]
    lines = [json.loads(line) for line in _tool_lines(answer, events + splitter.finish())]
    calls = [line["message"]["tool_calls"] for line in lines if "tool_calls" in line["message"]]
    assert calls == [[{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]]
    assert "".join(line["message"]["content"] for line in lines).strip() == "Let me look."
