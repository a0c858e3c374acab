"""Structured output (`response_format`): constrained decoding makes even a random-weight model's reply
parse as JSON and validate against the schema asked for, every time: non-streamed and streamed, alone
and batched with free-text rows, through /v1 (the `openai` client) and the Gradio /chat settings."""

from __future__ import annotations

import json
import threading

import httpx
import jsonschema
import llguidance
import llguidance.hf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import BadRequestError, OpenAI

from app_harness import app_config, gradio_call, running_app
from inference.grammar import GrammarError, build_lltokenizer, check_response_format
from inference.params import GenerationParams, InvalidParams, parse_settings
from models.loader import LoadOptions, load_model
from tokenizer_reference import transformers_tokenizer

MODELS = ("tiny-llama", "tiny-qwen2", "tiny-gemma3")
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
        "scores": {"type": "array", "items": {"type": "number", "minimum": -5, "maximum": 5}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                    "required": ["city"], "additionalProperties": False},
        "verified": {"type": "boolean"},
    },
    "required": ["name", "age", "pet", "scores", "address", "verified"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models, model_cache):
    # batching on (the default) and torch's kernels, so each seed's reply is the same on every CPU
    config = app_config(tmp_path_factory.mktemp("structured"), tiny_models, model_cache, kernels="torch")
    assert config.batching
    with running_app(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(app):
    return OpenAI(base_url=app.v1, api_key="unused", max_retries=0, timeout=120)


def schema_reply(client, model, seed, stream=False, response_format=SCHEMA_FORMAT, max_tokens=200):
    """(content, finish_reason) of one sampled reply."""
    request = dict(model=model, messages=ASK, seed=seed, temperature=1.0, max_tokens=max_tokens,
                   response_format=response_format)
    if not stream:
        choice = client.chat.completions.create(**request).choices[0]
        return choice.message.content, choice.finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **request):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("model", MODELS)
def test_json_schema_replies_validate_every_time(client, model, stream):
    for seed in range(3):
        text, finish = schema_reply(client, model, seed, stream)
        assert finish == "stop", (seed, text)  # the reply ends when the grammar is complete
        jsonschema.validate(json.loads(text), PERSON)


def test_without_the_constraint_a_random_model_writes_no_json(client):
    reply = client.chat.completions.create(model="tiny-llama", messages=ASK, seed=0, max_tokens=40)
    with pytest.raises(ValueError):
        json.loads(reply.choices[0].message.content)


@pytest.mark.parametrize("model", MODELS)
def test_json_object_replies_are_json_objects(client, model):
    """Any JSON object: a random model may write one string until its budget runs out (finish "length",
    as OpenAI's JSON mode does); every reply that ends by itself is an object."""
    finished = 0
    for seed in range(8):
        text, finish = schema_reply(client, model, seed, response_format={"type": "json_object"},
                                    max_tokens=200)
        assert text.startswith("{") and finish in ("stop", "length"), (seed, text)
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
            finished += 1
    assert finished


def test_constrained_and_free_rows_batched_together(app, client):
    results, errors = {}, []

    def run(key, model, seed, stream, constrained):
        try:
            if constrained:
                results[key] = schema_reply(client, model, seed, stream)
            else:
                reply = client.chat.completions.create(model=model, messages=ASK, seed=seed, max_tokens=24)
                results[key] = (reply.choices[0].message.content, reply.choices[0].finish_reason)
        except Exception as error:  # surfaced below
            errors.append(error)

    jobs = [(f"{kind}-{seed}", "tiny-qwen2", seed, seed % 2 == 1, kind == "schema")
            for kind in ("schema", "free") for seed in range(4)]
    steps_before = sum(s.steps for s in list(app.service.engine._schedulers))
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and len(results) == len(jobs)
    for key, (text, finish) in results.items():
        if key.startswith("schema"):
            assert finish == "stop", (key, text)
            jsonschema.validate(json.loads(text), PERSON)
        else:
            assert finish in ("stop", "length") and text
    steps = sum(s.steps for s in list(app.service.engine._schedulers)) - steps_before
    assert steps < sum(len(text) for text, _ in results.values())  # rows shared decode steps


@pytest.mark.parametrize("response_format, field, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {"type": "string"}}}},
     "response_format.json_schema.schema", ["not"]),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "if": {}, "then": {}}}},
     "response_format.json_schema.schema", ["if", "then"]),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/defs/missing"}}},
     "response_format.json_schema.schema", ["/defs/missing"]),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "response_format.json_schema.name",
     ["name"]),
    ({"type": "json_schema"}, "response_format.json_schema", ["json_schema"]),
    ({"type": "xml"}, "response_format.type", ["xml"]),
    ("json", "response_format", ["type"]),
])
def test_what_cannot_be_enforced_is_refused_naming_the_field(client, response_format, field, words):
    with pytest.raises(BadRequestError) as caught:
        client.chat.completions.create(model="tiny-llama", messages=ASK, max_tokens=5,
                                       response_format=response_format)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == field
    assert all(word in error["message"] for word in words), error["message"]


def test_text_format_is_plain_text(client):
    reply = client.chat.completions.create(model="tiny-llama", messages=ASK, seed=0, max_tokens=40,
                                           response_format={"type": "text"})
    assert reply.choices[0].finish_reason == "length"


def test_gradio_chat_settings_take_a_response_format(app):
    with httpx.Client(base_url=app.url, timeout=120) as http:
        status, session = gradio_call(http, "new_session", "json")
        assert status == "complete", session
        settings = json.dumps({"response_format": SCHEMA_FORMAT, "temperature": 1.0, "seed": 3, "max_tokens": 200})
        status, reply = gradio_call(http, "chat", session["id"], "Describe a person.", "tiny-gemma3", settings)
        assert status == "complete", reply
        jsonschema.validate(json.loads(reply), PERSON)
        bad = json.dumps({"response_format": {"type": "json_schema",
                                               "json_schema": {"name": "x", "schema": {"not": {}}}}})
        status, message = gradio_call(http, "chat", session["id"], "Again.", "tiny-gemma3", bad)
        assert status == "error" and "response_format.json_schema.schema" in str(message), message


def test_a_session_bound_request_keeps_its_response_format(app):
    with httpx.Client(base_url=app.url, timeout=120) as http:
        status, session = gradio_call(http, "new_session", "bound")
        assert status == "complete", session
        response = http.post("/v1/chat/completions", headers={"X-Session-Id": session["id"]},
                             json={"model": "tiny-llama", "messages": ASK, "seed": 1, "max_tokens": 200,
                                   "response_format": SCHEMA_FORMAT})
    assert response.status_code == 200, response.text
    jsonschema.validate(json.loads(response.json()["choices"][0]["message"]["content"]), PERSON)


def test_response_format_reaches_a_remote_engine():
    from inference.remote import _request_body
    from models.catalog import RemoteEngine

    engine = RemoteEngine("http://x/v1", "m")
    assert "response_format" not in _request_body(engine, [], GenerationParams())
    body = _request_body(engine, [], GenerationParams(response_format=SCHEMA_FORMAT))
    assert body["response_format"] == SCHEMA_FORMAT


def test_settings_round_trip_and_normalise():
    assert parse_settings(json.dumps({"response_format": {"type": "json_object"}})) == {
        "response_format": {"type": "json_object"}}
    params = GenerationParams.from_dict({"response_format": {"type": "json_schema",
                                                              "json_schema": {"name": "n", "schema": PERSON}}})
    assert params.response_format["json_schema"]["strict"] is False
    assert GenerationParams.from_dict(params.to_dict()) == params
    assert GenerationParams(response_format={"type": "text"}).response_format is None
    with pytest.raises(InvalidParams, match="response_format"):
        GenerationParams(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {"not": {}}}})


schemas = st.recursive(
    st.fixed_dictionaries({}, optional={"type": st.sampled_from(["object", "string", "integer", "array", "bad", 1]),
                                        "maxLength": st.integers(-1, 4), "enum": st.lists(st.integers(), max_size=2),
                                        "not": st.just({}), "$ref": st.text(max_size=6),
                                        "format": st.text(max_size=6)}),
    lambda inner: st.fixed_dictionaries({"type": st.just("object")},
                                        optional={"properties": st.dictionaries(st.text(max_size=3), inner, max_size=3),
                                                  "required": st.lists(st.text(max_size=3), max_size=2),
                                                  "additionalProperties": st.one_of(st.booleans(), inner)}),
    max_leaves=6)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.none(), st.text(max_size=5), st.fixed_dictionaries(
    {"type": st.sampled_from(["json_schema", "json_object", "text", "yaml"])},
    optional={"json_schema": st.fixed_dictionaries({}, optional={
        "name": st.one_of(st.just("answer"), st.text(max_size=70), st.integers()),
        "schema": st.one_of(schemas, st.integers()), "strict": st.one_of(st.booleans(), st.text(max_size=2))})})))
def test_any_response_format_is_normalised_or_refused_by_name(value):
    try:
        normalised = check_response_format(value)
    except GrammarError as error:
        assert str(error).startswith("response_format") and len(str(error)) < 600
        return
    assert normalised is None or normalised["type"] in ("json_object", "json_schema")
    assert check_response_format(normalised) == normalised


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_token_bytes_agree_with_llguidance_own_reading(tiny_models, model_cache, arch):
    """Our quick reading of a tokenizer's bytes gives what llguidance's own (slower) one gives."""
    lm = load_model(tiny_models[arch], model_cache, LoadOptions(dtype="float32", kernels="torch"))
    size = len(lm.tokenizer)
    ours, _ = build_lltokenizer(lm.tokenizer, sorted(lm.stop_token_ids), size)
    # Gemma's tokenizer is ours (models/spm_tokenizer.py): llguidance reads transformers' build of it
    reference = lm.tokenizer if hasattr(lm.tokenizer, "backend_tokenizer") else transformers_tokenizer(tiny_models[arch])
    theirs = llguidance.hf.from_tokenizer(reference, n_vocab=size)
    for token in range(size):
        assert ours.decode_bytes([token]) == theirs.decode_bytes([token]), token
        assert ours.is_special_token(token) == theirs.is_special_token(token), token
