"""Tool calling (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`): what a request asks, how the tools
reach the prompt, how the model's tool-call text becomes `tool_calls`, and the grammar that forces a call.

The tools go into the prompt through the model's own chat template when it renders them (Qwen2.5,
Llama 3.1 and SmolLM2 ship such templates in their GGUF files); a template without tools (and the
fallback templates by architecture) gets them in a system message in the Hermes form that Qwen2.5 was
trained on: signatures inside `<tools></tools>`, each call answered as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. Replies are parsed in that form, or as
Llama 3.1's bare `{"name": ..., "parameters": {...}}`. With `tool_choice` "required" or a named
function, the reply is constrained (inference/grammar.py) to such calls, their arguments following
the function's `parameters` schema.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from .grammar import JSON_WHITESPACE

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# The start of a forced call's JSON, as its grammar writes it: the name first, then the arguments
CALL_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_.-]{1,64})"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
MAX_PARALLEL_CALLS = 4  # calls one forced reply may make (a bound keeps a small model from calling forever)


class ToolError(ValueError):
    """A tools request the server cannot carry out; `param` names the field at fault."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class ToolSet:
    """The tools a request offers and how the model may use them.

    `functions`: each `{"name", "description", "parameters"}` (OpenAI's `function` object, checked);
    `choice`: "auto", "required", or the name of the one function to call; `parallel`: several calls in
    one reply allowed."""

    functions: tuple
    choice: str = "auto"
    parallel: bool = True

    @classmethod
    def from_dict(cls, value: dict) -> "ToolSet":
        return cls(tuple(value["functions"]), value.get("choice", "auto"), bool(value.get("parallel", True)))

    @property
    def forced(self) -> bool:
        """Whether the reply must be tool calls (tool_choice "required" or a named function)."""
        return self.choice != "auto"

    @property
    def names(self) -> set[str]:
        return {function["name"] for function in self.functions}

    def openai_tools(self) -> list[dict]:
        """The tools in OpenAI's shape, as chat templates take them."""
        return [{"type": "function", "function": dict(function)} for function in self.functions]

    def grammar(self, style: str = "hermes", tag_ids: dict[str, int] | None = None) -> str:
        """An llguidance (Lark) grammar for a reply of tool calls only, each to an allowed function with
        arguments that follow its schema: `<tool_call>` blocks ("hermes"), or one bare `{"name": ...,
        "parameters": ...}` object ("json", Llama 3.1's form). `tag_ids`: the tokenizer's own tokens for the
        tags, which the model may write instead of spelling the tags out."""
        key = "parameters" if style == "json" else "arguments"
        allowed = [f for f in self.functions if self.choice in ("required", f["name"])]
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", key],
                  "properties": {"name": {"const": f["name"]}, key: f.get("parameters") or {"type": "object"}}}
                 for f in allowed]
        schema = {"anyOf": calls, "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}
        body = f"body: %json {json.dumps(schema)}\n"
        if style == "json":
            return "start: body\n" + body
        repeat = f'("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if self.parallel else ""
        return (f"start: call {repeat}\n"
                f'call: {_tag(OPEN, tag_ids)} "\\n" body "\\n" {_tag(CLOSE, tag_ids)}\n' + body)


def _tag(text: str, tag_ids: dict[str, int] | None) -> str:
    token = (tag_ids or {}).get(text)
    return f'("{text}" | <[{token}]>)' if token is not None else f'"{text}"'


def forced_grammar(toolset: ToolSet, lm) -> str:
    """The forced-call grammar in the form `lm`'s chat template asks for (Hermes tags unless the template
    renders tools without them, as Llama 3.1's does), with the tokenizer's tag tokens where it has them."""
    template = lm.chat_format.template
    style = "json" if _native(template) and OPEN not in template else "hermes"
    return toolset.grammar(style, tag_tokens(lm.tokenizer))


def tag_tokens(hf_tokenizer) -> dict[str, int]:
    """The tokenizer's own `<tool_call>` / `</tool_call>` tokens (Qwen2.5 has them), where they decode to
    their text (not special: the detokenizer drops special tokens' text, and the parser needs it)."""
    return {token.content: token_id for token_id, token in hf_tokenizer.added_tokens_decoder.items()
            if token.content in (OPEN, CLOSE) and not token.special}


def _native(template: str) -> bool:
    """Whether a chat template renders tools itself."""
    return "tools" in template and "tool_calls" in template


def parse_tool_request(body: dict) -> ToolSet | None:
    """The request's tools, or None when the reply is free text (no tools, or tool_choice "none")."""
    tools, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ToolError("parallel_tool_calls", "must be true or false")
    if tools in (None, []):
        if choice not in (None, "none", "auto"):
            raise ToolError("tool_choice", "needs 'tools': the request offers no tool")
        return None
    if not isinstance(tools, list):
        raise ToolError("tools", "must be a list of {\"type\": \"function\", \"function\": {...}}")
    functions = tuple(_check_tool(tool, index) for index, tool in enumerate(tools))
    names = [function["name"] for function in functions]
    if len(set(names)) != len(names):
        raise ToolError("tools", "two tools have the same name")
    if choice in (None, "auto"):
        choice = "auto"
    elif choice == "none":
        return None
    elif choice == "required":
        pass
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        choice = choice["function"].get("name")
        if choice not in names:
            raise ToolError("tool_choice", f"names a function that is not in 'tools': {choice!r}")
    else:
        raise ToolError("tool_choice", "must be none, auto, required or {\"type\": \"function\", \"function\": "
                                       "{\"name\": ...}}")
    toolset = ToolSet(functions, choice, parallel is not False)
    if toolset.forced:
        _check_grammar(toolset)
    return toolset


def _check_tool(tool, index: int) -> dict:
    field = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise ToolError(field, "each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}")
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.match(name):
        raise ToolError(f"{field}.function.name", "required: 1 to 64 letters, digits, '_', '.' or '-'")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise ToolError(f"{field}.function.description", "must be a string")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise ToolError(f"{field}.function.parameters", "must be a JSON Schema object")
    checked = {"name": name, "parameters": parameters}
    if description:
        checked["description"] = description
    return checked


def _check_grammar(toolset: ToolSet) -> None:
    """A forced call's grammar must compile: a function schema it cannot enforce is the caller's 400."""
    import llguidance

    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        llguidance.LLMatcher.grammar_from_lark(toolset.grammar()), None,
        limits=llguidance.LLParserLimits(verbose_errors=False))
    if failed:
        message = messages[0] if messages else "not supported"
        raise ToolError("tools", f"a function's parameters schema cannot be enforced: {message[:300]}")


def chat_message(message: dict, index: int) -> dict:
    """A `tool` message, or an assistant message with `tool_calls`, checked, in the shape chat templates take
    (arguments as an object)."""
    if message.get("role") == "tool":
        content = _text(message.get("content"), index)
        tool_call_id = message.get("tool_call_id")
        if tool_call_id is not None and not isinstance(tool_call_id, str):
            raise ToolError(f"messages[{index}].tool_call_id", "must be a string")
        return {"role": "tool", "content": content, "tool_call_id": tool_call_id or ""}
    calls = message.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        raise ToolError(f"messages[{index}].tool_calls", "must be a non-empty list")
    clean = []
    for number, call in enumerate(calls):
        field = f"messages[{index}].tool_calls[{number}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolError(field, "needs {\"function\": {\"name\": ..., \"arguments\": ...}}")
        arguments = function.get("arguments") or "{}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):
                raise ToolError(f"{field}.function.arguments", "must be a JSON object (as a string)") from None
        if not isinstance(arguments, dict):
            raise ToolError(f"{field}.function.arguments", "must be a JSON object (as a string)")
        clean.append({"id": str(call.get("id") or ""), "type": "function",
                      "function": {"name": function["name"], "arguments": arguments}})
    content = message.get("content")
    return {"role": "assistant", "content": _text(content, index) if content is not None else "", "tool_calls": clean}


def _text(content, index: int) -> str:
    if isinstance(content, list):  # content parts: the text ones
        texts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if not all(isinstance(text, str) for text in texts):
            raise ToolError(f"messages[{index}].content", "each text part needs a string 'text'")
        content = "".join(texts)
    if not isinstance(content, str):
        raise ToolError(f"messages[{index}].content", "must be a string")
    return content


# ----- the prompt ------------------------------------------------------------------------------------
def render_prompt(lm, messages: list[dict], toolset: ToolSet | None) -> str:
    """The prompt text of `messages` for the loaded model `lm`, with the tools when there are any.

    Conversations with tool calls or results but no tools offered now still need them as text."""
    template = lm.chat_format.template
    native = _native(template)
    if toolset is not None and native:
        return lm.tokenizer.apply_chat_template(messages, tools=toolset.openai_tools(), chat_template=template,
                                                add_generation_prompt=True, tokenize=False)
    if not native:
        messages = hermes_messages(messages, toolset)
    return lm.tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                            tokenize=False)


def hermes_messages(messages: list[dict], toolset: ToolSet | None) -> list[dict]:
    """Plain system/user/assistant messages for a template that knows no tools: the tools described in the
    system message, calls and results written out in Hermes tags."""
    out = []
    for message in messages:
        if message["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        elif message.get("tool_calls"):
            calls = "\n".join(call_text(call["function"]["name"], call["function"]["arguments"])
                              for call in message["tool_calls"])
            out.append({"role": "assistant", "content": (message["content"] + "\n" if message["content"] else "")
                        + calls})
        else:
            out.append(message)
    if toolset is None:
        return out
    signatures = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in toolset.openai_tools())
    described = ("You can call functions. Their signatures, as JSON Schema, are inside <tools></tools>:\n"
                 f"<tools>\n{signatures}\n</tools>\n\n"
                 "To call one, answer with a JSON object of its name and arguments inside <tool_call></tool_call>:\n"
                 f"{OPEN}\n{{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}}\n{CLOSE}")
    if out and out[0]["role"] == "system":
        return [{"role": "system", "content": f"{out[0]['content']}\n\n{described}"}, *out[1:]]
    return [{"role": "system", "content": described}, *out]


def call_text(name: str, arguments) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


# ----- the reply -------------------------------------------------------------------------------------
def parse_tool_calls(text: str, toolset: ToolSet) -> tuple[str | None, list[dict]]:
    """(content, tool_calls in OpenAI's shape) of a whole reply. Text that is not a well-formed call to an
    offered function stays content."""
    stream = ToolCallStream(toolset)
    events = [*stream.feed(text), *stream.finish()]
    content = "".join(value for kind, value in events if kind == "content")
    calls = [value for kind, value in events if kind in ("call", "call_start")]  # a started call is whole by now
    return (content.strip() or None) if calls else content, calls


class ToolCallStream:
    """Splits a reply, delta by delta, into content and complete tool calls.

    `feed(text)` and, at the end, `finish()` return events: ("content", text) or ("call", {"id", "type",
    "function": {"name", "arguments"}}). Text that may begin a `<tool_call>` is held back until it is
    known; a reply that starts with "{" (Llama 3.1's bare JSON call) is held back whole.

    A forced reply (whose grammar guarantees the calls' shape) streams each call as it is written
    instead: ("call_start", call) once its name is known, ("arguments", text) deltas, then ("call_end",
    call) with `call`'s arguments complete (the same dict as call_start's)."""

    def __init__(self, toolset: ToolSet):
        self.toolset = toolset
        self.pending = ""
        self.in_call = False
        self.started = False  # some content has been let through
        self.calls = 0
        self.live: dict | None = None  # a forced call being streamed: the call, and where its arguments are

    def feed(self, text: str) -> list[tuple[str, object]]:
        self.pending += text
        events: list[tuple[str, object]] = []
        while True:
            if self.in_call:
                self._stream_arguments(events)
                end = self.pending.find(CLOSE)
                if end < 0:
                    return events
                if self.live is not None:
                    self._end_live(self.pending[:end], events)
                else:
                    self._call(self.pending[:end], events)
                self.pending, self.in_call = self.pending[end + len(CLOSE):].lstrip("\n"), False
                continue
            stripped = self.pending.lstrip()
            if not self.started and stripped.startswith("{"):
                self._stream_arguments(events)
                return events  # perhaps a bare JSON call: decided at the end
            if not self.started and not stripped:
                return events
            start = self.pending.find(OPEN)
            if start >= 0:
                self._content(self.pending[:start], events)
                self.pending, self.in_call = self.pending[start + len(OPEN):], True
                continue
            keep = next((size for size in range(min(len(OPEN) - 1, len(self.pending)), 0, -1)
                         if OPEN.startswith(self.pending[-size:])), 0)
            self._content(self.pending[:len(self.pending) - keep], events)
            self.pending = self.pending[len(self.pending) - keep:]
            return events

    def finish(self) -> list[tuple[str, object]]:
        events: list[tuple[str, object]] = []
        rest, self.pending = self.pending, ""
        if self.live is not None:
            self._end_live(rest, events)
        elif self.in_call:  # cut short: a call only if what came is whole; a forced reply has no content
            if not self._call(rest, events, quiet=True) and not self.toolset.forced:
                self._content(OPEN + rest, events)
        elif not self.started and rest.strip().startswith("{"):
            if not self._call(rest, events, quiet=True):
                self._content(rest, events)
        else:
            self._content(rest, events)
        return events

    def _stream_arguments(self, events: list) -> None:
        """In a forced call: start it once its name is in, then pass its arguments on as they come, all but
        from the last "}" on (which may close the call's object)."""
        if not self.toolset.forced:
            return
        if self.live is None:
            header = CALL_HEADER.match(self.pending)
            if header is None or header.group(1) not in self.toolset.names:
                return
            call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                    "function": {"name": header.group(1), "arguments": ""}}
            self.live, self.calls = {"call": call, "start": header.end(), "sent": header.end()}, self.calls + 1
            events.append(("call_start", call))
        close = self.pending.find(CLOSE)
        held = self.pending.rfind("}", 0, close if close >= 0 else len(self.pending))
        if held > self.live["sent"]:
            events.append(("arguments", self.pending[self.live["sent"]:held]))
            self.live["sent"] = held

    def _end_live(self, body: str, events: list) -> None:
        """The streamed call is complete: the rest of its arguments, then its end."""
        live, self.live = self.live, None
        parsed = _parse_call(body, self.toolset.names)
        arguments = body.rstrip()
        if parsed is not None:  # whole: without the "}" that closes the call's object (cut short: all of it)
            arguments = arguments[:-1]
        if len(arguments) > live["sent"]:
            events.append(("arguments", arguments[live["sent"]:]))
        call = live["call"]
        call["function"]["arguments"] = parsed["function"]["arguments"] if parsed else arguments[live["start"]:]
        events.append(("call_end", call))

    def _content(self, text: str, events: list) -> None:
        if text.strip() or (text and self.started):  # blank lines before a first call are not content
            self.started = True
            events.append(("content", text))

    def _call(self, body: str, events: list, quiet: bool = False) -> bool:
        """A call event from a call's JSON; else, unless `quiet`, the text back as content. True if a call."""
        call = _parse_call(body, self.toolset.names)
        if call is None:
            if not quiet:
                self._content(OPEN + body + CLOSE, events)
            return False
        if self.calls == 0 or self.toolset.parallel:
            events.append(("call", call))
            self.calls += 1
        return True


def _parse_call(body: str, names: set[str]) -> dict | None:
    try:
        value = json.loads(body.strip())
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}

