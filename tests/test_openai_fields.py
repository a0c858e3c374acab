"""/v1 never pretends: an OpenAI field the server does not carry out is refused with a 400 naming it,
while the neutral values clients send by default (LangChain: presence_penalty=0, ...) are accepted."""

from __future__ import annotations

import httpx
import pytest

from app_harness import app_config, running_app

MODEL = "tiny-llama"
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models, model_cache):
    with running_app(app_config(tmp_path_factory.mktemp("v1-fields"), tiny_models, model_cache)) as running:
        yield running


def post(app, **fields):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2, "temperature": 0, **fields}
    return httpx.post(f"{app.v1}/chat/completions", json=body, timeout=60)


@pytest.mark.parametrize("field, value", [
    ("tool_choice", "required"),
    ("logit_bias", {"42": 10}),
])
def test_what_is_not_carried_out_is_refused_by_name(app, field, value):
    response = post(app, **{field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"] and error["type"] == "invalid_request_error"


def test_presence_and_frequency_penalties_are_honoured(app):
    plain = post(app, max_tokens=24)
    penalised = post(app, max_tokens=24, frequency_penalty=2.0, presence_penalty=2.0)
    assert plain.status_code == penalised.status_code == 200, penalised.text
    assert penalised.json()["choices"][0]["message"]["content"] != plain.json()["choices"][0]["message"]["content"]
    out_of_range = post(app, presence_penalty=3)
    assert out_of_range.status_code == 400 and out_of_range.json()["error"]["param"] == "presence_penalty"


def test_neutral_values_are_accepted(app):
    response = post(app, logprobs=False, top_logprobs=0, tools=[], tool_choice="none", presence_penalty=0,
                    frequency_penalty=0.0, logit_bias={}, response_format={"type": "text"}, user="u1",
                    parallel_tool_calls=True, metadata={"a": "b"}, store=False)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


def test_one_model_by_id(app):
    listed = httpx.get(f"{app.v1}/models", timeout=30).json()["data"]
    one = httpx.get(f"{app.v1}/models/{MODEL}", timeout=30)
    assert one.status_code == 200 and one.json() == next(m for m in listed if m["id"] == MODEL)
    missing = httpx.get(f"{app.v1}/models/no-such-model", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("method, path, status", [
    ("DELETE", "/chat/completions", 405),
    ("GET", "/chat/completions", 405),
    ("POST", "/embeddings", 404),
    ("GET", "/no/such/route", 404),
])
def test_unknown_routes_and_methods_answer_in_openais_shape(app, method, path, status):
    response = httpx.request(method, f"{app.v1}{path}", timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error) and path in error["message"]
    if status == 405:
        assert response.headers["allow"] == "POST"
