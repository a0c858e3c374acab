"""The /v1 routes fuzzed over HTTP: hypothesis-built bodies, malformed JSON, huge and deep bodies, odd headers.

Every answer is a status a client can act on (200, 400, 404, 405, 413, 429, 503), errors come in
OpenAI's shape with a readable message and no traceback, and the app keeps serving. The pure
request parser is fuzzed far harder, without a server, in test_fuzz_params.py.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app_harness import app_config, running_app
from sessions import LOCAL_USER

MODEL = "tiny-llama"
MAX_PROMPT = 5_000
UPLOAD_LIMIT = 64 * 1024
UPLOAD_BODY_LIMIT = UPLOAD_LIMIT + 2**20  # the upload route: the largest file and its multipart framing
REQUEST_LIMIT = 4 * 2**20  # every other route: a few MiB (AppConfig.max_body_bytes for MAX_PROMPT)
ACCEPTABLE = {200, 400, 404, 405, 413, 429, 503}
TRACEBACK = re.compile(r'Traceback|File "|line \d+, in |\w+Error\(')


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models, model_cache, bundled_model):
    config = app_config(tmp_path_factory.mktemp("fuzz-v1"), {"llama": tiny_models["llama"]}, model_cache,
                        bundled_model, max_prompt_chars=MAX_PROMPT, max_tokens_limit=32,
                        max_upload_bytes=UPLOAD_LIMIT)
    with running_app(config) as running:
        running.service.load_model(MODEL)
        yield running


@pytest.fixture(scope="module")
def http(app):
    with httpx.Client(base_url=app.url, timeout=60) as client:
        yield client


def check(response: httpx.Response) -> dict | None:
    """A status from ACCEPTABLE; an error body in OpenAI's shape without a traceback."""
    assert response.status_code in ACCEPTABLE, (response.status_code, response.text[:300])
    assert not TRACEBACK.search(response.text), response.text[:300]
    if response.status_code == 200:
        return None
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"].strip() and len(error["message"]) < 1000
    return error


def assert_still_serving(http) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert http.post("/v1/chat/completions", json=body).status_code == 200


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=10)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", 3])},
    optional={"content": st.one_of(st.text(max_size=30), json_values)}), max_size=3)
bodies = st.fixed_dictionaries(
    {"model": st.sampled_from([MODEL, MODEL, "no-such-model", "", "../" + MODEL])},
    optional={"messages": st.one_of(messages, messages, json_values),
              "max_tokens": st.one_of(st.integers(-2, 12), json_values), "temperature": json_values,
              "top_p": json_values, "stop": json_values, "seed": json_values, "stream": st.one_of(st.booleans(),
                                                                                              json_values),
              "n": st.sampled_from([1, 2, None, "1"]), "stream_options": json_values})


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(body=bodies)
def test_hypothesis_bodies_get_a_clean_answer(http, body):
    # Serialised here rather than by httpx, which refuses NaN and Infinity: a client that sends them
    # must get a clean 400, so they belong in the fuzzed bodies.
    response = http.post("/v1/chat/completions", content=json.dumps(body),
                         headers={"content-type": "application/json"})
    check(response)
    if response.status_code == 200 and body.get("stream") is True:
        assert response.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("content, status", [
    (b"", 400), (b"null", 400), (b"{", 400), (b"[1, 2]", 400), (b'"text"', 400), (b"\xff\xfe\x00\x01", 400),
    (b"[" * 100_000 + b"]" * 100_000, 400), (b'{"model": ' * 50_000, 400), (b'{"model": NaN}', 400),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": float("inf")}).encode(),
     400),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (MAX_PROMPT + 1)}]}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "\x00\x1b[2J\u202e"}],
                 "max_tokens": 2}).encode(), 200),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}).encode(),
     400),
    (b"x" * (REQUEST_LIMIT + 1), 413),
])
def test_malformed_bodies(http, content, status):
    response = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text[:300]
    check(response)


def test_a_chunked_body_over_the_limit_is_cut_off(http):
    def chunks():
        for _ in range(REQUEST_LIMIT // 65536 + 2):
            yield b" " * 65536

    response = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert_still_serving(http)


@pytest.mark.parametrize("path, limit", [("/gradio_api/call/history", REQUEST_LIMIT),
                                         ("/gradio_api/queue/join", REQUEST_LIMIT),
                                         ("/v1/chat/completions", REQUEST_LIMIT),
                                         ("/gradio_api/upload", UPLOAD_BODY_LIMIT)])
def test_every_route_refuses_a_body_over_the_limit(app, http, path, limit):
    assert (app.config.max_body_bytes, app.config.max_upload_body_bytes) == (REQUEST_LIMIT, UPLOAD_BODY_LIMIT)
    response = http.post(path, content=b"x" * (limit + 1), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert f"{limit:,} bytes" in response.json()["error"]["message"]


@pytest.mark.parametrize("session_id", ["0" * 32, "../../etc/passwd", "x" * 5000, "%00", "é", "-"])
def test_odd_session_headers_are_refused(http, session_id):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = http.post("/v1/chat/completions", json=body, headers={"X-Session-Id": session_id.encode("utf-8")})
    error = check(response)
    assert response.status_code in (400, 404), response.text[:300]
    assert "session" in error["message"].lower()


def test_wrong_methods_and_unknown_routes(http):
    requests = [("GET", "/v1/chat/completions"), ("POST", "/v1/models"), ("GET", "/v1/completions"),
                ("POST", "/v1/embeddings"), ("DELETE", "/v1/chat/completions"), ("GET", "/v1/models/no/such/model"),
                ("GET", "/v1/../etc/passwd")]
    for method, path in requests:  # routes the Gradio mount does not know either answer 404
        response = http.request(method, path)
        assert response.status_code in (404, 405), (path, response.status_code)
        assert not TRACEBACK.search(response.text) and "root:" not in response.text


def test_the_app_carries_on_and_stores_nothing_stray(app, http):
    assert_still_serving(http)
    assert app.service.list_sessions(LOCAL_USER) == []  # no fuzzed request created or touched a session
    assert app.service.engine.gate.running == 0
