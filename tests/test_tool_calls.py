"""Tool calling through /v1 with the `openai` client: tools go into the prompt (the model's own template,
or Hermes tags in a system message), the model's `<tool_call>` text comes back as `tool_calls` (whole or
streamed as argument deltas) with finish_reason "tool_calls", tool results are accepted back, and with
tool_choice "required" or a named function even a random-weight model returns calls whose arguments
validate against the function's schema."""

from __future__ import annotations

import json

import httpx
import jsonschema
import llguidance
import pytest
from openai import BadRequestError, OpenAI

from app_harness import app_config, running_app
from gguf_factory import write_tiny_gguf
from inference.generate import stream_generate
from inference.grammar import _lltokenizer
from inference.params import GenerationParams
from inference.tools import (ToolCallStream, ToolSet, forced_grammar, parse_tool_calls, parse_tool_request,
                             render_prompt, tag_tokens)
from models.loader import LoadOptions, load_model

WEATHER = {"name": "get_weather", "description": "The weather in a city now",
           "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                          "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}}}}
ADD = {"name": "add", "description": "Add two numbers",
       "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                      "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                     "b": {"type": "integer", "minimum": -99, "maximum": 99}}}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": ADD}]
SCHEMAS = {"get_weather": WEATHER["parameters"], "add": ADD["parameters"]}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
MODELS = ("tiny-llama", "tiny-qwen2", "tiny-gemma3")


@pytest.fixture(scope="module")
def long_models(tmp_path_factory):
    """Tiny models with room for the tool descriptions (their tokenizers spend about a token a character)."""
    folder = tmp_path_factory.mktemp("long-models")
    return {arch: write_tiny_gguf(folder / f"tiny-{arch}.gguf", arch, context_length=2048)
            for arch in ("llama", "qwen2", "gemma3")}


@pytest.fixture(scope="module")
def app(tmp_path_factory, long_models):
    config = app_config(tmp_path_factory.mktemp("tools"), long_models, tmp_path_factory.mktemp("tools-cache"),
                        kernels="torch", max_context=2048)
    with running_app(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(app):
    return OpenAI(base_url=app.v1, api_key="unused", max_retries=0, timeout=180)


def check_calls(calls, names=SCHEMAS):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("model", MODELS)
def test_required_makes_even_a_random_model_call_a_tool(client, model):
    for seed in range(2):
        reply = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                               parallel_tool_calls=False, seed=seed, max_tokens=150)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        check_calls(choice.message.tool_calls)


def test_a_named_function_is_the_one_called_streamed(client):
    for seed in range(2):
        stream = client.chat.completions.create(
            model="tiny-gemma3", messages=ASK, tools=TOOLS, seed=seed, max_tokens=150, stream=True,
            parallel_tool_calls=False, tool_choice={"type": "function", "function": {"name": "add"}})
        calls, finish, content = {}, None, ""
        for chunk in stream:
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for part in delta.tool_calls or []:  # OpenAI's stream: id and name first, then argument deltas
                call = calls.setdefault(part.index, {"id": part.id, "name": part.function.name, "arguments": ""})
                call["arguments"] += part.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls" and content == "" and list(calls) == [0]
        assert calls[0]["name"] == "add" and calls[0]["id"].startswith("call_")
        jsonschema.validate(json.loads(calls[0]["arguments"]), ADD["parameters"])


def test_parallel_calls_each_validate(client):
    reply = client.chat.completions.create(model="tiny-qwen2", messages=ASK, tools=TOOLS, tool_choice="required",
                                           seed=4, max_tokens=600)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and 1 <= len(choice.message.tool_calls) <= 4
    check_calls(choice.message.tool_calls)


def test_auto_and_none_leave_a_random_model_to_write_text(client):
    for choice in ("auto", "none"):
        reply = client.chat.completions.create(model="tiny-llama", messages=ASK, tools=TOOLS, tool_choice=choice,
                                               seed=0, max_tokens=20)
        assert reply.choices[0].finish_reason in ("stop", "length") and not reply.choices[0].message.tool_calls


def test_tool_results_are_accepted_back(client):
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "c"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 C and sunny"}]
    for tools in (TOOLS, None):
        extra = {"tools": tools} if tools else {}
        reply = client.chat.completions.create(model="tiny-qwen2", messages=messages, max_tokens=8, seed=0, **extra)
        assert reply.choices[0].message.role == "assistant"


@pytest.mark.parametrize("fields, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "[1]"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
])
def test_bad_tool_requests_are_refused_naming_the_field(client, fields, param):
    request = {"model": "tiny-llama", "messages": ASK, "max_tokens": 4, **fields}
    with pytest.raises(BadRequestError) as caught:
        client.chat.completions.create(**request)
    assert caught.value.body["param"] == param, caught.value.body


def test_tools_are_refused_on_a_session_bound_request(app):
    response = httpx.post(f"{app.v1}/chat/completions", headers={"X-Session-Id": "abc"}, timeout=60,
                          json={"model": "tiny-llama", "messages": ASK, "tools": TOOLS, "max_tokens": 4})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"


# ----- the prompt and the parser, on their own ---------------------------------------------------------
NATIVE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS {% for t in tools %}{{ t.function.name }};{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>{{ c.function.arguments | tojson }}</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PARIS = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}
CONVERSATION = [*ASK, {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                                                                          "function": PARIS}]},
                {"role": "tool", "content": "21 C", "tool_call_id": "c1"}]


def test_tools_reach_the_prompt_through_the_models_own_template(tmp_path, model_cache):
    path = write_tiny_gguf(tmp_path / "native.gguf", "qwen2", chat_template=NATIVE_TEMPLATE)
    lm = load_model(path, model_cache, LoadOptions(dtype="float32", kernels="torch"))
    prompt = render_prompt(lm, CONVERSATION, parse_tool_request({"tools": TOOLS}))
    assert "TOOLS get_weather;add;" in prompt and '<tool_call>{"city": "Paris", "unit": "c"}</tool_call>' in prompt


def test_a_template_without_tools_gets_them_in_hermes_tags(tiny_models, model_cache):
    lm = load_model(tiny_models["qwen2"], model_cache, LoadOptions(dtype="float32", kernels="torch"))
    prompt = render_prompt(lm, CONVERSATION, parse_tool_request({"tools": TOOLS}))
    assert prompt.index("<tools>\n") < prompt.index('"name": "get_weather"') < prompt.index("\n</tools>")
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>' in prompt
    assert "<tool_response>\n21 C\n</tool_response>" in prompt


TOOLSET = ToolSet((WEATHER, ADD))


@pytest.mark.parametrize("text, content, calls", [
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', None, [("add", {"a": 1, "b": 2})]),
    ('Let me look.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}</tool_call>\n'
     '<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>', "Let me look.",
     [("get_weather", {"city": "Oslo", "unit": "c"}), ("add", {"a": 3, "b": 4})]),
    ('{"name": "add", "parameters": {"a": 5, "b": 6}}', None, [("add", {"a": 5, "b": 6})]),  # Llama 3.1
    ('\n\n<tool_call>{"name": "add", "arguments": {"a": 0, "b": 0}}</tool_call>\n', None, [("add", {"a": 0, "b": 0})]),
    ('<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', '<tool_call>{"name": "unknown", "arguments": {}}'
     '</tool_call>', []),
    ('<tool_call>not json</tool_call> and text', "<tool_call>not json</tool_call> and text", []),
    ('{"a": 1} is JSON, not a call', '{"a": 1} is JSON, not a call', []),
    ("The sky is <b>blue</b>", "The sky is <b>blue</b>", []),
])
def test_tool_call_text_is_parsed_whole_and_in_any_pieces(text, content, calls):
    got_content, got_calls = parse_tool_calls(text, TOOLSET)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == calls
    for cut in range(1, len(text)):  # a stream split anywhere gives the same content and calls
        stream = ToolCallStream(TOOLSET)
        events = [*stream.feed(text[:cut]), *stream.feed(text[cut:]), *stream.finish()]
        streamed = "".join(value for kind, value in events if kind == "content")
        assert (streamed.strip() or None if calls else streamed) == content
        assert [value["function"]["name"] for kind, value in events if kind == "call"] == [name for name, _ in calls]


def test_without_parallel_calls_only_the_first_is_kept():
    text = ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>')
    _, calls = parse_tool_calls(text, ToolSet((ADD,), parallel=False))
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"a": 1, "b": 2}]


LLAMA_STYLE_TEMPLATE = (  # renders tools itself and asks for Llama 3.1's bare {"name", "parameters"} JSON
    "{% if tools %}<|start_header_id|>system<|end_header_id|>\n\nCall one as {\"name\": ..., \"parameters\": ...}: "
    "{{ tools | tojson }}<|eot_id|>{% endif %}{% for m in messages %}<|start_header_id|>{{ m.role }}"
    "<|end_header_id|>\n\n{% if m.tool_calls %}{{ m.tool_calls[0].function | tojson }}{% else %}{{ m.content }}"
    "{% endif %}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
    "\n\n{% endif %}")


def test_a_forced_call_takes_the_form_the_template_asks_for(tmp_path, model_cache):
    """A Llama 3.1-style template: the forced reply is one bare JSON call, parsed like Llama's own."""
    path = write_tiny_gguf(tmp_path / "llama-tools.gguf", "llama", context_length=2048,
                           chat_template=LLAMA_STYLE_TEMPLATE)
    lm = load_model(path, model_cache, LoadOptions(dtype="float32", kernels="torch"))
    toolset = parse_tool_request({"tools": TOOLS, "tool_choice": "required"})
    assert forced_grammar(toolset, lm).startswith("start: body")
    prompt_ids = lm.encode(render_prompt(lm, ASK, toolset))
    for seed in range(2):
        params = GenerationParams(max_tokens=150, temperature=1.0, top_k=0, top_p=1.0, seed=seed, tools=toolset)
        chunks = list(stream_generate(lm, prompt_ids, params))
        text = "".join(chunk.text for chunk in chunks)
        assert chunks[-1].finish_reason == "stop" and text.lstrip().startswith("{"), text
        content, calls = parse_tool_calls(text, toolset)
        assert content is None and len(calls) == 1
        call = calls[0]["function"]
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_hermes_tags_may_be_the_tokenizers_own_tokens(tiny_models, model_cache):
    """Qwen2.5 has `<tool_call>` tokens: the grammar lets the model write them rather than spell the tag."""
    lm = load_model(tiny_models["qwen2"], model_cache, LoadOptions(dtype="float32", kernels="torch"))
    toolset = parse_tool_request({"tools": TOOLS, "tool_choice": "required"})
    assert tag_tokens(lm.tokenizer) == {}  # the tiny vocabulary has none
    tokens = {"<tool_call>": 5, "</tool_call>": 6}
    grammar = toolset.grammar("hermes", tokens)
    assert '("<tool_call>" | <[5]>)' in grammar and '("</tool_call>" | <[6]>)' in grammar
    tokenizer, _ = _lltokenizer(lm)
    matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar))
    assert not matcher.is_error() and matcher.consume_token(5), matcher.get_error()


FORCED = ToolSet((WEATHER, ADD), choice="required")


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": -2}}\n</tool_call>',
    '<tool_call>\n{"name":"get_weather","arguments":{"city":"Rome } {","unit":"c"} }\n</tool_call>\n'
    '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>',
    '{"name": "add", "parameters": {"a": 5, "b": 6}}',
])
def test_a_forced_call_streams_its_arguments_as_they_come(text):
    _, whole = parse_tool_calls(text, FORCED)
    expected = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole]
    assert expected

    def streamed(pieces):
        stream, calls = ToolCallStream(FORCED), []
        events = [event for piece in pieces for event in stream.feed(piece)] + stream.finish()
        for kind, value in events:
            assert kind != "content"
            if kind == "call_start":
                calls.append([value["function"]["name"], ""])
            elif kind == "arguments":
                calls[-1][1] += value
        return [(name, json.loads(arguments)) for name, arguments in calls], events

    for cut in range(1, len(text)):
        assert streamed([text[:cut], text[cut:]])[0] == expected
    calls, events = streamed(list(text))  # a character at a time: the arguments come in many pieces
    assert calls == expected and sum(kind == "arguments" for kind, _ in events) > len(expected)
