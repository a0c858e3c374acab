"""Ollama's request bodies, checked: what /api/chat and /api/generate ask for (`Job`), `options` as
`GenerationParams`, `keep_alive` in seconds, and the error every refusal raises (`OllamaError`)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace

from fastapi import Request
from fastapi.responses import JSONResponse

from ..params import GenerationParams, InvalidParams
from ..tools import ToolError, chat_message, parse_tool_request
from .streams import BadBody, json_object

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 500
LATEST = ":latest"
# Ollama's own defaults where a request's `options` leave a setting out (its documented values).
DEFAULT_OPTIONS = {"temperature": 0.8, "top_p": 0.9, "top_k": 40}
# options honoured -> GenerationParams fields; others are Ollama's load or runtime knobs we do not have,
# ignored as Ollama ignores options it does not know (logged).
OPTION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "num_predict": "max_tokens",
                 "stop": "stop", "seed": "seed", "repeat_penalty": "repetition_penalty",
                 "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
PARAM_OPTIONS = {field: option for option, field in OPTION_FIELDS.items()}


class OllamaError(Exception):
    """A refused request, answered in Ollama's shape: `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        if len(message) > MAX_ERROR_CHARS:  # messages quote what was sent: never echo a huge value back whole
            message = message[:MAX_ERROR_CHARS] + "…"
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status, headers=self.headers)


@dataclass
class Job:
    """One /api/chat or /api/generate request, checked: what to generate and how to answer."""

    kind: str  # "chat" | "generate"
    name: str  # the model name as sent (echoed back in every answer)
    model_id: str  # the catalog id it names
    prompt: list[dict] | str  # chat messages, or a raw prompt; empty: load (or unload) the model only
    params: GenerationParams
    stream: bool
    keep_alive: float | None  # seconds; 0: unload after the reply; < 0: keep loaded; None: the server's default


async def read_json(request: Request) -> dict:
    try:
        return await json_object(request)
    except BadBody as error:
        raise OllamaError(400, str(error)) from None


def model_name(body: dict) -> str:
    name = body.get("model", body.get("name"))  # older clients send "name"
    if not isinstance(name, str) or not name:
        raise OllamaError(400, "'model' is required and must be a string")
    return name


def catalog_id(name: str) -> str:
    """The catalog id an Ollama model name means: the id itself, or the id with ':latest'."""
    return name[:-len(LATEST)] if name.endswith(LATEST) else name


def flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise OllamaError(400, f"'{name}' must be true or false")
    return value


def _refuse_unsupported(body: dict) -> None:
    """Fields this server does not carry out yet are refused, never answered as if honoured."""
    if body.get("think"):
        raise OllamaError(400, "'think' is not supported: this server's models have no thinking mode")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise OllamaError(400, "'logprobs' are not supported by the Ollama routes yet")
    if body.get("images"):
        raise OllamaError(400, "'images' are not supported: this server's models read text only")


def parse_chat(body: dict, max_tokens_limit: int) -> Job:
    name = model_name(body)
    _refuse_unsupported(body)
    messages = body.get("messages") or []
    if not isinstance(messages, list):
        raise OllamaError(400, "'messages' must be a list")
    try:  # Ollama's tools are OpenAI's function tools; the model decides whether to call one ("auto")
        tools = parse_tool_request({"tools": body.get("tools")})
    except ToolError as error:
        raise OllamaError(400, str(error)) from None
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool"):
            raise OllamaError(400, f"messages[{index}] needs a role of system, user, assistant or tool")
        if message.get("images"):
            raise OllamaError(400, f"messages[{index}].images: images are not supported: this server's models "
                                   "read text only")
        if message["role"] == "tool" or message.get("tool_calls"):  # a call made earlier, and its result
            try:
                clean.append(chat_message(message, index))
            except ToolError as error:
                raise OllamaError(400, str(error)) from None
            continue
        content = message.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise OllamaError(400, f"messages[{index}].content must be a string")
        clean.append({"role": message["role"], "content": content})
    params = _params(body.get("options"), max_tokens_limit, _response_format(body.get("format")))
    if tools is not None:
        if params.response_format is not None:
            raise OllamaError(400, "'format' and 'tools' cannot be combined: the reply is either JSON or calls")
        params = replace(params, tools=tools)
    return Job("chat", name, catalog_id(name), clean, params, flag(body, "stream", True),
               _keep_alive(body.get("keep_alive")))


def parse_generate(body: dict, max_tokens_limit: int) -> Job:
    name = model_name(body)
    _refuse_unsupported(body)
    for field, why in (("template", "the model's own chat template is used; send raw: true with a prompt "
                                    "formatted yourself instead"),
                       ("suffix", "fill-in-the-middle is not supported by the Ollama routes"),
                       ("context", "send the conversation to /api/chat instead")):
        if body.get(field):
            raise OllamaError(400, f"'{field}' is not supported: {why}")
    prompt, system = body.get("prompt") or "", body.get("system") or ""
    for field, value in (("prompt", prompt), ("system", system)):
        if not isinstance(value, str):
            raise OllamaError(400, f"'{field}' must be a string")
    raw = flag(body, "raw", False)
    if raw and system:
        raise OllamaError(400, "'system' has no effect with raw: true; put it in the prompt")
    if raw or not prompt:
        rendered: list[dict] | str = prompt
    else:
        rendered = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return Job("generate", name, catalog_id(name), rendered,
               _params(body.get("options"), max_tokens_limit, _response_format(body.get("format"))),
               flag(body, "stream", True), _keep_alive(body.get("keep_alive")))


def _response_format(value) -> dict | None:
    """Ollama's `format` as the engine's `response_format` (constrained decoding, inference/grammar.py):
    "json" is any JSON object, an object is a JSON schema the reply must follow."""
    if value in (None, ""):
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value, "strict": True}}
    raise OllamaError(400, "'format' must be \"json\" or a JSON schema (an object)")


def _params(options, max_tokens_limit: int, response_format: dict | None = None) -> GenerationParams:
    """GenerationParams from Ollama's `options`: the honoured ones mapped, Ollama's defaults for the
    rest; `num_predict` -1 or -2 (no limit) or above the server's limit is capped at it."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise OllamaError(400, "'options' must be an object, e.g. {\"temperature\": 0.2}")
    ignored = sorted(set(options) - set(OPTION_FIELDS) - {"num_ctx"})
    if ignored:
        log.info("ignoring options this server does not have: %s", ", ".join(ignored))
    values = {**DEFAULT_OPTIONS, **{field: options[option] for option, field in OPTION_FIELDS.items()
                                    if options.get(option) is not None}}
    predict = values.get("max_tokens")
    if predict is None or predict in (-1, -2) or (_is_number(predict) and predict > max_tokens_limit):
        values["max_tokens"] = max_tokens_limit
    if _is_number(values.get("seed")) and values["seed"] < 0:  # Ollama's "random seed"
        del values["seed"]
    if response_format is not None:
        values["response_format"] = response_format
    try:
        return GenerationParams.from_dict(values, max_tokens_limit=max_tokens_limit)
    except (InvalidParams, TypeError) as error:
        if str(error).startswith("response_format"):
            raise OllamaError(400, f"format: {str(error).partition(':')[2].strip() or error}") from None
        field, _, why = str(error).partition(":")
        option = PARAM_OPTIONS.get(field.strip())
        raise OllamaError(400, f"options.{option}:{why}" if option else str(error)) from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_context(options, record: dict) -> None:
    """`num_ctx` must be a whole number of tokens; the window served is the model's own (capped by
    --max-context): a larger `num_ctx` is clamped to it."""
    num_ctx = (options or {}).get("num_ctx") if isinstance(options, dict) else None
    if num_ctx is None:
        return
    if not _is_number(num_ctx) or not float(num_ctx).is_integer() or num_ctx < 1:
        raise OllamaError(400, f"options.num_ctx: must be a whole number of tokens, at least 1, got {num_ctx!r}")
    if record.get("context_length") and num_ctx > record["context_length"]:
        log.info("num_ctx %s clamped to %s's context window of %s tokens", num_ctx, record["id"],
                 record["context_length"])


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _keep_alive(value) -> float | None:
    """Seconds from Ollama's `keep_alive`: a number of seconds, or a duration such as "5m", "1h30m", "-1"."""
    if value is None or value == "":
        return None
    if _is_number(value):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        sign, text = (-1.0, text[1:]) if text.startswith("-") else (1.0, text)
        if text and _DURATION.sub("", text) == "":
            return sign * sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION.findall(text))
    raise OllamaError(400, f"'keep_alive' must be a number of seconds or a duration such as \"5m\", got {value!r}")


def check_length(prompt: list[dict] | str, max_chars: int) -> None:
    total = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
    if total > max_chars:
        raise OllamaError(400, f"the prompt is {total:,} characters; the limit is {max_chars:,}")
