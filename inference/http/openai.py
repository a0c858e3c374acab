"""OpenAI-compatible routes (`/v1/models`, `/v1/models/{id}`, `/v1/chat/completions`, and `/v1/completions`
from `completions`) and `/health`, as a FastAPI router.

Admission, the worker threads and the connection watch are `streams`'s; this module turns OpenAI's
request into the engine's and the engine's chunks into server-sent events (or one JSON body).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sessions import LOCAL_USER, SessionNotFound

from ..params import GenerationParams, InvalidParams
from ..tools import ToolCallStream, ToolError, chat_message, parse_tool_calls, parse_tool_request
from .choices import merge_events, merge_replies, start_together
from .streams import (BadBody, ChunkSource, Disconnected, EventStream, bearer_ok, error_status, json_object,
                      next_or_disconnect, session_binding, start_generation)

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 500

_SAMPLING_FIELDS = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "temperature": "temperature",
                    "top_p": "top_p", "top_k": "top_k", "stop": "stop", "seed": "seed",
                    "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                    "frequency_penalty": "frequency_penalty", "response_format": "response_format"}
_IGNORED_FIELDS = {"n", "user", "stream_options", "logit_bias", "model",
                   "messages", "stream", "response_format", "tools", "tool_choice", "logprobs", "top_logprobs",
                   "parallel_tool_calls", "metadata", "store", "service_tier"}
# OpenAI fields this server does not carry out yet: a request that asks for one (anything but its
# neutral value, which clients such as LangChain send by default) is refused with a 400 naming it,
# never answered as if it had been honoured.
_UNSUPPORTED_FIELDS = {
    "logit_bias": lambda value: value not in (None, {}),
}


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        if len(message) > MAX_ERROR_CHARS:  # messages quote what was sent: never echo a huge value back whole
            message = message[:MAX_ERROR_CHARS] + "…"
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def create_router(service, workers: ThreadPoolExecutor, api_key: str | None = None,
                  health_extra: Callable[[], dict] | None = None) -> APIRouter:
    """The /v1 routes and /health; `workers` run admitted generations (streams.worker_pool);
    `health_extra` adds the server's own fields to /health."""
    config = service.config
    router = APIRouter()

    def check_key(request: Request) -> None:
        if not bearer_ok(request, api_key):
            raise APIError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'",
                           "invalid_api_key", code="invalid_api_key")

    @router.get("/health")
    def health() -> dict:
        return {"status": "ok", **service.health(), **(health_extra() if health_extra else {})}

    @router.get("/v1/models")
    def list_models(request: Request):
        try:
            check_key(request)
        except APIError as error:
            return error.response()
        return {"object": "list", "data": [_model_object(m) for m in service.list_models()]}

    @router.get("/v1/models/{model_id:path}")
    def get_model(request: Request, model_id: str):
        try:
            check_key(request)
            return _model_object(service.model_record(model_id))
        except Exception as error:
            return _as_api_error(error).response()

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            check_key(request)
            body = await _read_json(request)
            model_id, messages, params, stream = _parse_request(body, config.max_tokens_limit)
            _check_length(messages, config.max_prompt_chars)
            include_usage = _include_usage(body)
            session_id, owner = session_binding(request, service, api_key)
            if session_id and params.logprobs is not None:
                raise APIError(400, "'logprobs' is not available for a request bound to a session "
                                    "(X-Session-Id)", param="logprobs")
            choices = _choice_count(body, config.max_concurrent_generations)
            if choices > 1:
                if session_id:
                    raise APIError(400, "'n' above 1 is not available for a request bound to a session "
                                        "(X-Session-Id): a session stores one reply", param="n")
                if params.tools is not None:
                    raise APIError(400, "'n' above 1 is not available with tools", param="n")
                return await _several_choices(request, service, model_id, messages, params, choices, workers,
                                              stream, include_usage)
            if session_id and (params.tools is not None or any(m["role"] == "tool" or "tool_calls" in m
                                                               for m in messages)):
                raise APIError(400, "tools: a request bound to a session (X-Session-Id) cannot use tools",
                               param="tools")
            chunks, first = await start_generation(request, service, model_id, messages, params, session_id,
                                                   owner, workers)
        except Disconnected:
            return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)
        except Exception as error:  # a bug still answers in OpenAI's shape; details go to the log
            return _as_api_error(error).response()
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if stream:
            events = _sse_events(request, chunks, first, completion_id, created, model_id, include_usage,
                                 params.tools)
            return EventStream(events, on_close=chunks.close_soon)
        return await _collect(request, chunks, first, completion_id, created, model_id, params.tools)

    from .completions import add_completions_route  # it builds on this module's helpers

    add_completions_route(router, service, workers, check_key)
    add_unknown_route_answers(router)
    return router


async def _read_json(request: Request) -> dict:
    try:
        return await json_object(request)
    except BadBody as error:
        message = str(error)
        raise APIError(400, message[:1].upper() + message[1:]) from None


def _parse_request(body: dict, max_tokens_limit: int) -> tuple[str, list[dict], GenerationParams, bool]:
    model_id = body.get("model")
    if not isinstance(model_id, str) or not model_id:
        raise APIError(400, "'model' is required and must be a string", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    clean = []
    for index, message in enumerate(messages):
        if isinstance(message, dict) and (message.get("role") == "tool" or
                                          (message.get("role") == "assistant" and message.get("tool_calls"))):
            try:
                clean.append(chat_message(message, index))
            except ToolError as error:
                raise APIError(400, str(error), param=error.param) from None
            continue
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "developer"):
            raise APIError(400, f"messages[{index}] needs a role of system, user, assistant or tool",
                           param=f"messages[{index}].role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            texts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
            if not all(isinstance(text, str) for text in texts):
                raise APIError(400, f"messages[{index}].content: each text part needs a string 'text'",
                               param=f"messages[{index}].content")
            content = "".join(texts)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{index}].content must be a string", param=f"messages[{index}].content")
        role = "system" if message["role"] == "developer" else message["role"]
        clean.append({"role": role, "content": content})
    unknown = sorted(set(body) - set(_SAMPLING_FIELDS) - _IGNORED_FIELDS)
    if unknown:
        log.info("ignoring unsupported fields: %s", ", ".join(unknown))
    for field, asks_for_it in _UNSUPPORTED_FIELDS.items():
        if asks_for_it(body.get(field)):
            raise APIError(400, f"'{field}' is not supported by this server yet; send it without this field "
                                f"(README lists the fields /v1 honours)", param=field)
    sampling = {target: body[source] for source, target in _SAMPLING_FIELDS.items() if body.get(source) is not None}
    sampling["logprobs"] = _chat_logprobs(body)
    sampling.setdefault("temperature", 1.0)
    sampling.setdefault("top_p", 1.0)
    sampling.setdefault("top_k", 0)
    try:
        sampling["tools"] = parse_tool_request(body)
    except ToolError as error:
        raise APIError(400, str(error), param=error.param) from None
    try:
        params = GenerationParams.from_dict(sampling, max_tokens_limit=max_tokens_limit)
    except (InvalidParams, TypeError) as error:
        raise APIError(400, str(error), param=str(error).split(":")[0]) from None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param="stream")
    return model_id, clean, params, stream


def _choice_count(body: dict, limit: int) -> int:
    """OpenAI's `n`: how many choices to generate, at most one per generation slot (they run together)."""
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
        raise APIError(400, f"'n' must be a whole number from 1 to {limit} on this server "
                            f"(one choice per generation slot, --max-concurrent)", param="n")
    return n


def _chat_logprobs(body: dict) -> int | None:
    """Chat's `logprobs` (true/false) and `top_logprobs` (0-20, only with logprobs) as the engine's
    setting: None for none, else how many alternatives each token reports."""
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise APIError(400, "'logprobs' must be true or false", param="logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
        raise APIError(400, "'top_logprobs' must be a whole number from 0 to 20", param="top_logprobs")
    if not wanted:
        if top:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return None
    return top or 0


def _openai_logprobs(chunk) -> dict | None:
    """A chunk's token logprobs as a chat choice's `logprobs` (None when the request did not ask)."""
    if chunk is None or chunk.logprobs is None:
        return None
    return {"content": [entry.to_openai() for entry in chunk.logprobs], "refusal": None}


def _check_length(messages: list[dict], max_chars: int) -> None:
    """The same limit on prompt length as the chat UI's: refused before any tokenizing."""
    total = sum(len(m["content"]) for m in messages)
    if total > max_chars:
        raise APIError(400, f"the messages are {total:,} characters; the limit is {max_chars:,}", param="messages")


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object, e.g. {\"include_usage\": true}",
                       param="stream_options")
    return bool(options.get("include_usage"))


def _model_object(record: dict) -> dict:
    """A model record in OpenAI's model shape, with this server's fields beside it."""
    return {"id": record["id"], "object": "model", "created": 0,
            "owned_by": "local" if record["kind"] == "local" else "remote", "name": record["name"],
            "state": record["state"], "architecture": record["architecture"], "quantization": record["quantization"],
            "context_length": record["context_length"], "instruct": record["instruct"]}


V1_ROUTES = {"/v1/models": "GET", "/v1/chat/completions": "POST", "/v1/completions": "POST"}


def add_unknown_route_answers(router: APIRouter) -> None:
    """Any other /v1 path or method answers in OpenAI's error shape (404 / 405), as OpenAI does, instead
    of the web framework's own `{"detail": ...}`. Added last: the real routes match first."""

    @router.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                      include_in_schema=False)
    def unknown(request: Request, rest: str):
        path = request.url.path
        if path in V1_ROUTES:
            allowed = V1_ROUTES[path]
            return APIError(405, f"{request.method} is not allowed on {path}; use {allowed}",
                            headers={"Allow": allowed}).response()
        return APIError(404, f"Unknown request URL: {request.method} {path}", code="unknown_url").response()


# OpenAI's error type and code for each status `error_status` gives (the status and headers are shared
# with the Ollama routes).
_ERROR_KINDS = {404: "not_found_error", 429: "rate_limit_error", 503: "model_unavailable", 400: "invalid_request_error"}


def _as_api_error(error: Exception) -> APIError:
    if isinstance(error, APIError):
        return error
    known = error_status(error)
    if known is None:
        log.exception("chat completion failed")
        return APIError(500, "internal error while generating; see the server log", "server_error")
    status, headers = known
    code = {404: "session_not_found" if isinstance(error, SessionNotFound) else "model_not_found", 429: "busy",
            503: "model_unavailable"}.get(status)
    return APIError(status, str(error), _ERROR_KINDS[status], param=getattr(error, "param", None), code=code,
                    headers=headers)


def _finish(chunk) -> str:
    return {"cancelled": "stop"}.get(chunk.finish_reason, chunk.finish_reason or "stop")


async def _sse_events(request: Request, source: ChunkSource, first, completion_id, created, model_id,
                      include_usage, tools=None) -> AsyncIterator[bytes]:
    """The reply as server-sent events; `EventStream` closes `source` however this ends."""
    def event(delta: dict, finish: str | None = None, usage: dict | None = None, logprobs: dict | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                   "choices": [choice] if usage is None else []}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

    chunk = first
    splitter = ToolCallStream(tools) if tools is not None else None
    try:
        yield event({"role": "assistant", "content": ""})
        while chunk is not None:
            logprobs = _openai_logprobs(chunk)
            if splitter is not None:
                for delta in _tool_deltas(splitter, chunk):
                    yield event(delta)
            elif chunk.text or (logprobs and logprobs["content"]):
                yield event({"content": chunk.text}, logprobs=logprobs)
            if chunk.finish_reason is not None:
                called = splitter is not None and splitter.calls and chunk.finish_reason == "stop"
                yield event({}, "tool_calls" if called else _finish(chunk))
                if include_usage:
                    yield event({}, usage={"prompt_tokens": chunk.prompt_tokens,
                                           "completion_tokens": chunk.completion_tokens,
                                           "total_tokens": chunk.prompt_tokens + chunk.completion_tokens})
                break
            chunk = await next_or_disconnect(request, source)
        yield b"data: [DONE]\n\n"
    except Disconnected:
        log.info("client went away; generation %s cancelled", completion_id)
    except Exception as error:
        api_error = _as_api_error(error)
        body = {"error": {"message": api_error.message, "type": api_error.kind, "code": api_error.code}}
        yield f"data: {json.dumps(body)}\n\n".encode()
        yield b"data: [DONE]\n\n"


def _tool_deltas(splitter: ToolCallStream, chunk) -> list[dict]:
    """The deltas of one chunk of a reply that may call tools, as OpenAI streams them: content, and each
    call's id and name, then its arguments (in pieces as they are written, for a forced call)."""
    events = splitter.feed(chunk.text)
    if chunk.finish_reason is not None:
        events += splitter.finish()
    index = splitter.calls - sum(kind in ("call", "call_start") for kind, _ in events)  # the first new call's
    deltas, current = [], index - 1  # current: the call whose arguments are streaming
    for kind, value in events:
        if kind == "content":
            deltas.append({"content": value})
        elif kind in ("call", "call_start"):
            deltas.append({"tool_calls": [{"index": index, "id": value["id"], "type": "function",
                                           "function": {"name": value["function"]["name"], "arguments": ""}}]})
            if kind == "call":
                deltas.append({"tool_calls": [{"index": index,
                                               "function": {"arguments": value["function"]["arguments"]}}]})
            current, index = index, index + 1
        elif kind == "arguments":
            deltas.append({"tool_calls": [{"index": current, "function": {"arguments": value}}]})
    return deltas


async def _read_reply(request, source: ChunkSource, first, take) -> JSONResponse | None:
    """Read a reply that is not streamed to its end, handing `take` each chunk (the last one carries the
    finish reason and the counts). None once read; else the response to send instead: 499 when the client
    went away, the API error when the generation failed. Chat and text completions both read through it."""
    chunk = first
    try:
        while chunk is not None:
            take(chunk)
            if chunk.finish_reason is not None:
                break
            chunk = await next_or_disconnect(request, source)
    except Disconnected:
        return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)
    except Exception as error:
        return _as_api_error(error).response()
    finally:
        source.close_soon()
    return None


async def _collect(request, source: ChunkSource, first, completion_id, created, model_id, tools=None):
    chunks: list = []
    failed = await _read_reply(request, source, first, chunks.append)
    if failed is not None:
        return failed
    text, last = "".join(chunk.text for chunk in chunks), chunks[-1] if chunks else None
    logprobs = None
    for chunk in chunks:
        if chunk.logprobs is not None:
            logprobs = logprobs or {"content": [], "refusal": None}
            logprobs["content"] += _openai_logprobs(chunk)["content"]
    prompt_tokens = getattr(last, "prompt_tokens", 0) if last else 0
    completion_tokens = getattr(last, "completion_tokens", 0) if last else 0
    message, finish = {"role": "assistant", "content": text}, _finish(last) if last else "stop"
    if tools is not None:
        content, calls = parse_tool_calls(text, tools)
        if calls:
            message = {"role": "assistant", "content": content, "tool_calls": calls}
            finish = "tool_calls" if finish == "stop" else finish
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model_id,
        "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


# ----- n > 1: several choices, each its own row of the batch ------------------------------------------------
async def _several_choices(request: Request, service, model_id, messages, params, n: int, workers, stream: bool,
                           include_usage: bool):
    """Generate `n` choices as `n` generations of the same prompt (the batch scheduler runs them as rows of
    one batch), then answer as one reply whose choices are indexed 0..n-1. Each choice goes through the
    one-choice code (`_collect`, `_sse_events`); `choices` starts them together and merges what they give.
    A seed gives each choice its own (seed + index), so that sampled choices differ."""
    def choice_params(index: int) -> GenerationParams:
        return params if params.seed is None else dataclasses.replace(params, seed=(params.seed + index) % 2**63)

    try:
        started = await start_together([start_generation(request, service, model_id, messages, choice_params(index),
                                                          None, LOCAL_USER, workers) for index in range(n)])
    except Disconnected:
        return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)
    except Exception as error:
        return _as_api_error(error).response()
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if stream:
        streams = [_sse_events(request, chunks, first, completion_id, created, model_id, True)
                   for chunks, first in started]
        return EventStream(merge_events(streams, include_usage),
                           on_close=lambda: [chunks.close_soon() for chunks, _ in started])
    return merge_replies(await asyncio.gather(*(_collect(request, chunks, first, completion_id, created, model_id)
                                                for chunks, first in started)))
