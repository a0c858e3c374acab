"""Property tests (hypothesis) for parameter validation: the `settings` of /chat and the body of /v1.

Whatever a client sends, validation either returns parameters that are in range and of the right
type, or refuses with its own error type and a message naming the problem; nothing else escapes.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from inference.http.openai import APIError, _include_usage, _parse_request
from inference.params import SETTINGS_KEYS, GenerationParams, InvalidParams, parse_settings, split_settings

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMIT = 256

KEYS = [*SETTINGS_KEYS, "temprature", "", "max_tokens ", "\x00", "n"]
numbers = st.one_of(
    st.integers(), st.integers(-3, 3), st.integers(min_value=10**20, max_value=10**500),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 2), st.floats(0, 1),
    st.sampled_from([0, 1, -1, 0.5, 1e-300, 2**63, 2**63 - 1, 4096, 4097, True, False]),
)
scalars = st.one_of(numbers, st.none(), st.text(max_size=30), st.sampled_from(["", "\x00\x07", "0.5", "NaN"]))
values = st.one_of(scalars, st.lists(scalars, max_size=12), st.dictionaries(st.text(max_size=5), scalars, max_size=3),
                   st.lists(st.text(min_size=0, max_size=250), max_size=10))
setting_dicts = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)


def assert_valid(params: GenerationParams, limit: int | None = None) -> None:
    """Accepted parameters are the types and ranges the decode loop relies on."""
    assert type(params.max_tokens) is int and 1 <= params.max_tokens <= (limit or 1_000_000)
    assert type(params.top_k) is int and 0 <= params.top_k
    assert params.seed is None or (type(params.seed) is int and 0 <= params.seed < 2**63)
    assert math.isfinite(params.temperature) and 0 <= params.temperature <= 5
    assert math.isfinite(params.top_p) and 0 < params.top_p <= 1
    assert math.isfinite(params.repetition_penalty) and 0.1 <= params.repetition_penalty <= 10
    assert isinstance(params.stop, tuple) and all(isinstance(s, str) and 0 < len(s) <= 200 for s in params.stop)


def assert_clear(error: Exception) -> None:
    message = str(error)
    assert message.strip() and "Traceback" not in message and len(message) < 2000, message


@FAST
@given(setting_dicts)
def test_from_dict_accepts_only_valid_parameters(values):
    try:
        params = GenerationParams.from_dict(values, max_tokens_limit=LIMIT)
    except InvalidParams as error:
        assert_clear(error)
        return
    assert_valid(params, LIMIT)
    assert GenerationParams.from_dict(params.to_dict()) == params  # what is accepted round-trips


@FAST
@given(st.one_of(st.text(max_size=200), setting_dicts.map(json.dumps), scalars.map(json.dumps),
                 st.lists(scalars, max_size=3).map(json.dumps), st.none(), setting_dicts, st.lists(scalars)))
def test_settings_are_a_json_object_of_known_keys_or_refused(raw):
    try:
        parsed = parse_settings(raw)
    except InvalidParams as error:
        assert_clear(error)
        return
    assert isinstance(parsed, dict) and set(parsed) <= set(SETTINGS_KEYS)
    try:
        params, system_prompt = split_settings(parsed, max_tokens_limit=LIMIT)
    except InvalidParams as error:  # only the server's own max_tokens limit may refuse it now
        assert "max_tokens" in str(error)
        return
    assert_valid(params, LIMIT)
    assert system_prompt is None or isinstance(system_prompt, str)


@pytest.mark.parametrize("text", ["9" * 400, "-" + "9" * 400, "1e400", "-1e400", "NaN", "Infinity"])
@pytest.mark.parametrize("key", ["max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty"])
def test_huge_and_non_finite_numbers_are_refused_by_name(key, text):
    with pytest.raises(InvalidParams, match=key):
        parse_settings(f'{{"{key}": {text}}}')


json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
content_parts = st.lists(st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "text", "image_url", None])},
                          optional={"text": st.one_of(st.text(max_size=20), st.integers(), st.none(), json_values)}),
    json_values), max_size=3)
messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", "", None])},
                          optional={"content": st.one_of(st.text(max_size=40), content_parts, json_values)}),
    json_values), max_size=4)
schemas = st.recursive(
    st.fixed_dictionaries({}, optional={"type": st.sampled_from(["object", "string", "integer", "array", "nope", 3]),
                                        "maxLength": st.integers(-1, 5), "enum": st.lists(scalars, max_size=3),
                                        "not": st.just({}), "$ref": st.text(max_size=8)}),
    lambda inner: st.fixed_dictionaries({"type": st.just("object")},
                                        optional={"properties": st.dictionaries(st.text(max_size=4), inner, max_size=3),
                                                  "required": st.lists(st.text(max_size=4), max_size=2),
                                                  "items": inner, "additionalProperties": st.one_of(st.booleans(), inner)}),
    max_leaves=6)
response_formats = st.one_of(json_values, st.fixed_dictionaries(
    {"type": st.sampled_from(["json_schema", "json_object", "text", "xml", None])},
    optional={"json_schema": st.one_of(json_values, st.fixed_dictionaries(
        {}, optional={"name": st.one_of(st.just("answer"), st.text(max_size=70), json_values),
                      "schema": st.one_of(schemas, json_values), "strict": st.one_of(st.booleans(), json_values)}))}))
bodies = st.fixed_dictionaries(
    {}, optional={"model": st.one_of(st.text(max_size=20), json_values), "messages": st.one_of(messages, json_values),
                  "max_tokens": values, "max_completion_tokens": values, "temperature": values, "top_p": values,
                  "top_k": values, "stop": values, "seed": values, "stream": st.one_of(st.booleans(), json_values),
                  "n": st.one_of(st.integers(-2, 3), json_values), "stream_options": json_values,
                  "logit_bias": json_values, "response_format": response_formats,
                  "unknown_field": json_values})


@FAST
@given(bodies)
@example({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]})
@example({"model": "m", "messages": [{"role": "tool", "content": [{"type": "text", "text": 5}]}]})
@example({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": 1}}]}]})
def test_v1_request_parsing_returns_or_answers_400(body):
    try:
        model_id, clean, params, stream = _parse_request(body, LIMIT)
        _include_usage(body)
    except APIError as error:
        assert error.status == 400 and error.kind == "invalid_request_error"
        assert_clear(error)
        return
    assert isinstance(model_id, str) and model_id
    assert clean and all(m["role"] in ("system", "user", "assistant", "tool") and isinstance(m["content"], str)
                         for m in clean)
    assert isinstance(stream, bool)
    assert_valid(params, LIMIT)
    assert params.response_format is None or params.response_format["type"] in ("json_object", "json_schema")
