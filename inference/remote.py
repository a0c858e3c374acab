"""Remote engines: stream a chat from another OpenAI-compatible server (vLLM, TGI, llama.cpp, Ollama,
or another instance of this app) through the same Chunk stream as a local model."""

from __future__ import annotations

import json
import threading
import time
from typing import Iterator

import httpx

from models.catalog import RemoteEngine
from models.manager import ModelError

from .generate import Chunk
from .logprobs import TokenLogprob
from .params import GenerationParams

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 300.0


class RemoteError(ModelError):
    """The remote engine is down or answered with an error."""


def _request_body(engine: RemoteEngine, messages: list[dict], params: GenerationParams) -> dict:
    """The chat request for the remote. Usage is asked for, so stats carry its prompt tokens; top-k and
    the repetition penalty go as the extra fields vLLM (`repetition_penalty`) and llama.cpp's server
    (`repeat_penalty`) read, each when it is not neutral."""
    body = {"model": engine.model, "messages": messages, "stream": True, "max_tokens": params.max_tokens,
            "temperature": params.temperature, "top_p": params.top_p,
            "stream_options": {"include_usage": True}}
    if params.top_k:
        body["top_k"] = params.top_k
    if params.repetition_penalty != 1.0:
        body["repetition_penalty"] = body["repeat_penalty"] = params.repetition_penalty
    if params.logprobs is not None:
        body["logprobs"], body["top_logprobs"] = True, params.logprobs
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if params.response_format:  # OpenAI's field, as vLLM, llama.cpp's server and Ollama take it
        body["response_format"] = params.response_format
    for name in ("presence_penalty", "frequency_penalty"):  # OpenAI's own fields: every such server knows them
        if getattr(params, name):
            body[name] = getattr(params, name)
    return body


def stream_remote(engine: RemoteEngine, messages: list[dict], params: GenerationParams,
                  cancel: threading.Event, name: str | None = None) -> Iterator[Chunk]:
    """Stream from `engine`; closing the connection on cancel stops the remote generation too.

    `name` is the engine's id in the catalog: errors name it, so a person knows which entry failed.
    """
    label = f"remote engine {name!r} ({engine.base_url})" if name else f"remote engine {engine.base_url}"
    headers = {"Authorization": f"Bearer {engine.api_key}"} if engine.api_key else {}
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    started = time.perf_counter()
    first_at, produced, usage, reason, events = None, 0, {}, None, 0
    try:
        with httpx.Client(timeout=timeout) as client, client.stream(
                "POST", f"{engine.base_url}/chat/completions", json=_request_body(engine, messages, params),
                headers=headers) as response:
            if response.status_code >= 400:
                raise RemoteError(f"{label} answered {response.status_code}: {_error_text(response)}")
            for line in response.iter_lines():
                if cancel.is_set():
                    reason = "cancelled"
                    break
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = _parse_event(data, label)
                events += 1
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or ""
                    reason = choice.get("finish_reason") or reason
                    logprobs = _logprobs(choice, label) if params.logprobs is not None else None
                    if text and logprobs == []:  # asked for, and the remote ignored it: never pass that off
                        raise RemoteError(f"{label} does not return logprobs; ask without 'logprobs'")
                    if text or logprobs:
                        produced += 1
                        first_at = first_at or time.perf_counter()
                        yield Chunk(text=text, completion_tokens=produced, logprobs=logprobs)
            if not events and reason != "cancelled":  # e.g. a web page, or a server that ignored "stream"
                kind = response.headers.get("content-type", "no content type")
                raise RemoteError(f"{label} did not answer with an OpenAI event stream (it sent {kind})")
    except httpx.HTTPError as error:
        raise RemoteError(f"{label} is unreachable ({type(error).__name__}: {error})") from None
    finished = time.perf_counter()
    completion = usage.get("completion_tokens", produced)
    decode = finished - (first_at or finished)
    yield Chunk(completion_tokens=completion, prompt_tokens=usage.get("prompt_tokens", 0),
                finish_reason=reason or "stop",
                timings={"ttft_s": (first_at or finished) - started, "total_s": finished - started,
                         "tokens_per_second": (completion - 1) / decode if completion > 1 and decode > 0 else 0.0})


def _logprobs(choice: dict, label: str) -> list[TokenLogprob]:
    """A streamed choice's `logprobs.content` (OpenAI's shape) as the engine's token logprobs."""
    content = (choice.get("logprobs") or {}).get("content") or []
    try:
        return [TokenLogprob(entry["token"], list(entry.get("bytes") or entry["token"].encode()),
                             float(entry["logprob"]),
                             [TokenLogprob(alt["token"], list(alt.get("bytes") or alt["token"].encode()),
                                           float(alt["logprob"])) for alt in entry.get("top_logprobs") or []])
                for entry in content]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise RemoteError(f"{label} sent logprobs this server cannot read: {str(content)[:100]}") from None


def _parse_event(data: str, label: str) -> dict:
    """One server-sent event's JSON; a malformed one or an error event is the remote's failure."""
    try:
        event = json.loads(data)
    except ValueError:
        raise RemoteError(f"{label} sent an event that is not JSON: {data[:100]!r}") from None
    if not isinstance(event, dict):
        raise RemoteError(f"{label} sent an event that is not a JSON object: {data[:100]!r}")
    if "error" in event:
        error = event["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        raise RemoteError(f"{label} failed: {message}")
    return event


def _error_text(response: httpx.Response) -> str:
    try:
        body = json.loads(response.read())
        return str(body.get("error", {}).get("message") or body)
    except (ValueError, AttributeError):
        return response.text[:200] if hasattr(response, "text") else "error"
