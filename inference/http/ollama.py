"""Ollama-compatible routes (`/api/chat`, `/api/generate`, `/api/tags`, `/api/ps`, `/api/show`,
`/api/pull`, `/api/version`), as a FastAPI router beside the OpenAI one.

Admission, the worker threads, the connection watch and the session binding are `streams`'s, as for
`/v1`; this module turns Ollama's request into the engine's and the engine's chunks into Ollama's
newline-delimited JSON (or one JSON object with `stream: false`). Errors use Ollama's shape,
`{"error": "..."}`, with the same statuses as `/v1`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from models.download import DownloadError

from ..params import GenerationParams, InvalidParams
from .streams import (ChunkSource, Disconnected, EventStream, bearer_ok, error_status, next_or_disconnect,
                      session_binding, start_generation, worker_pool)

log = logging.getLogger(__name__)

# The Ollama release whose API these routes follow; clients (Open WebUI, Continue) read it to decide
# which fields they may send.
OLLAMA_VERSION = "0.9.0"
NDJSON = "application/x-ndjson"
MAX_ERROR_CHARS = 500
LATEST = ":latest"
FOREVER = "9999-12-31T23:59:59Z"  # /api/ps `expires_at` of a model that is never unloaded when idle

# Ollama's own defaults where a request's `options` leave a setting out (its documented values).
DEFAULT_OPTIONS = {"temperature": 0.8, "top_p": 0.9, "top_k": 40}
# options honoured -> GenerationParams fields; others are Ollama's load or runtime knobs we do not have,
# ignored as Ollama ignores options it does not know (logged).
OPTION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "num_predict": "max_tokens",
                 "stop": "stop", "seed": "seed", "repeat_penalty": "repetition_penalty",
                 "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
PARAM_OPTIONS = {field: option for option, field in OPTION_FIELDS.items()}

ROUTES = {"/api/version": "GET", "/api/tags": "GET", "/api/ps": "GET", "/api/show": "POST",
          "/api/chat": "POST", "/api/generate": "POST", "/api/pull": "POST"}
UNSERVED = {"/api/embed": "embeddings", "/api/embeddings": "embeddings", "/api/create": "creating models",
            "/api/copy": "copying models", "/api/delete": "deleting models", "/api/push": "pushing models",
            "/api/blobs": "uploading blobs"}


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


def create_router(service, api_key: str | None = None) -> APIRouter:
    config = service.config
    workers = worker_pool(config)
    router = APIRouter(on_shutdown=[lambda: workers.shutdown(wait=False, cancel_futures=False)])

    def check_key(request: Request) -> None:
        if not bearer_ok(request, api_key):
            raise OllamaError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'")

    def run(function: Callable, *args):
        return asyncio.get_running_loop().run_in_executor(workers, function, *args)

    @router.get("/api/version")
    def version(request: Request):
        return answer(request, lambda: {"version": OLLAMA_VERSION})

    @router.get("/api/tags")
    def tags(request: Request):
        return answer(request, lambda: {"models": [_model_entry(service.model_details(m["id"]))
                                                   for m in service.list_models()]})

    @router.get("/api/ps")
    def running(request: Request):
        def loaded() -> dict:
            models = [m for m in service.list_models() if m["state"] == "loaded" and m["kind"] == "local"]
            return {"models": [_running_entry(service.model_details(m["id"]), config.idle_unload_s)
                               for m in models]}
        return answer(request, loaded)

    @router.post("/api/show")
    async def show(request: Request):
        try:
            check_key(request)
            body = await _read_json(request)
            name = _model_name(body)
            return _show(await run(service.model_details, _catalog_id(name)))
        except Exception as error:
            return _as_error(error).response()

    def answer(request: Request, build: Callable[[], dict]):
        try:
            check_key(request)
            return build()
        except Exception as error:
            return _as_error(error).response()

    @router.post("/api/chat")
    async def chat(request: Request):
        return await reply(request, "chat")

    @router.post("/api/generate")
    async def generate(request: Request):
        return await reply(request, "generate")

    async def reply(request: Request, kind: str):
        started = time.perf_counter()
        try:
            check_key(request)
            body = await _read_json(request)
            job = (_parse_chat if kind == "chat" else _parse_generate)(body, config.max_tokens_limit)
            _check_length(job.prompt, config.max_prompt_chars)
            record = await run(service.model_record, job.model_id)  # unknown: 404 before anything else
            _check_context(body.get("options"), record)
            if not job.prompt:
                return await load_or_unload(job)
            session_id, owner = session_binding(request, service, api_key)
            if session_id and isinstance(job.prompt, str):
                raise OllamaError(400, "raw: true cannot be bound to a session (X-Session-Id): a session's "
                                       "turns go through the model's chat template")
            chunks, first = await start_generation(request, service, job.model_id, job.prompt, job.params,
                                                   session_id, owner, workers)
        except Disconnected:
            return JSONResponse({"error": "client disconnected"}, status_code=499)
        except Exception as error:
            return _as_error(error).response()
        answer_shape = Answer(job, started)

        def finish() -> None:
            chunks.close_soon()
            keep_alive_after(job)

        if job.stream:
            return EventStream(_ndjson(request, chunks, first, answer_shape), on_close=finish, media_type=NDJSON)
        try:
            return await _collect(request, chunks, first, answer_shape)
        finally:
            finish()

    async def load_or_unload(job: Job) -> dict:
        """An empty request: load the model (or with `keep_alive: 0` unload it), as Ollama does."""
        started = time.perf_counter()
        if job.keep_alive == 0:
            await run(service.unload_model, job.model_id)
            reason = "unload"
        else:
            await run(service.load_model, job.model_id)
            if job.keep_alive is not None and job.keep_alive < 0:
                await run(service.pin_model, job.model_id, True)
            reason = "load"
        body = Answer(job, started).base(done=True)
        body.update(done_reason=reason, total_duration=_ns(time.perf_counter() - started))
        body.update(Answer(job, started).content(""))
        return body

    def keep_alive_after(job: Job) -> None:
        """`keep_alive` after a reply: 0 unloads the model, a negative value keeps it loaded (pinned)."""
        if job.keep_alive is None or job.keep_alive > 0:
            return

        def apply() -> None:
            try:
                if job.keep_alive == 0:
                    service.pin_model(job.model_id, False)
                    service.unload_model(job.model_id)
                else:
                    service.pin_model(job.model_id, True)
            except Exception as error:  # e.g. loading again meanwhile: the reply is already answered
                log.info("keep_alive for %s not applied: %s", job.model_id, error)

        workers.submit(apply)

    @router.post("/api/pull")
    async def pull(request: Request):
        try:
            check_key(request)
            body = await _read_json(request)
            name = _model_name(body)
            stream = _flag(body, "stream", True)
            spec = await run(service.pull_target, _catalog_id(name))
        except Exception as error:
            return _as_error(error).response()
        if stream:
            return EventStream(_pull_lines(service, spec), on_close=lambda: None, media_type=NDJSON)
        try:
            record = await asyncio.get_running_loop().run_in_executor(None, service.pull, spec, None)
        except Exception as error:
            return _as_error(error).response()
        return {"status": "success", "model": record["id"]}

    add_unknown_route_answers(router, check_key)
    return router


# ----- requests -----------------------------------------------------------------------------------------------
async def _read_json(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError) as error:
        raise OllamaError(400, f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise OllamaError(400, "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise OllamaError(400, "the request body must be a JSON object")
    return body


def _model_name(body: dict) -> str:
    name = body.get("model", body.get("name"))  # older clients send "name"
    if not isinstance(name, str) or not name:
        raise OllamaError(400, "'model' is required and must be a string")
    return name


def _catalog_id(name: str) -> str:
    """The catalog id an Ollama model name means: the id itself, or the id with ':latest'."""
    return name[:-len(LATEST)] if name.endswith(LATEST) else name


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise OllamaError(400, f"'{name}' must be true or false")
    return value


def _refuse_unsupported(body: dict) -> None:
    """Fields this server does not carry out yet are refused, never answered as if honoured."""
    if body.get("format") not in (None, ""):
        raise OllamaError(400, "'format' (JSON output) is not supported by this server yet; send the request "
                               "without it")
    if body.get("tools"):
        raise OllamaError(400, "'tools' are not supported by this server yet; send the request without them")
    if body.get("think"):
        raise OllamaError(400, "'think' is not supported: this server's models have no thinking mode")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise OllamaError(400, "'logprobs' are not supported by the Ollama routes yet")
    if body.get("images"):
        raise OllamaError(400, "'images' are not supported: this server's models read text only")


def _parse_chat(body: dict, max_tokens_limit: int) -> Job:
    name = _model_name(body)
    _refuse_unsupported(body)
    messages = body.get("messages") or []
    if not isinstance(messages, list):
        raise OllamaError(400, "'messages' must be a list")
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise OllamaError(400, f"messages[{index}] needs a role of system, user or assistant"
                                   + (" (tool messages need tools, which are not supported yet)"
                                      if isinstance(message, dict) and message.get("role") == "tool" else ""))
        if message.get("images"):
            raise OllamaError(400, f"messages[{index}].images: images are not supported: this server's models "
                                   "read text only")
        if message.get("tool_calls"):
            raise OllamaError(400, f"messages[{index}].tool_calls: tools are not supported by this server yet")
        content = message.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise OllamaError(400, f"messages[{index}].content must be a string")
        clean.append({"role": message["role"], "content": content})
    return Job("chat", name, _catalog_id(name), clean, _params(body.get("options"), max_tokens_limit),
               _flag(body, "stream", True), _keep_alive(body.get("keep_alive")))


def _parse_generate(body: dict, max_tokens_limit: int) -> Job:
    name = _model_name(body)
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
    raw = _flag(body, "raw", False)
    if raw and system:
        raise OllamaError(400, "'system' has no effect with raw: true; put it in the prompt")
    if raw or not prompt:
        rendered: list[dict] | str = prompt
    else:
        rendered = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return Job("generate", name, _catalog_id(name), rendered, _params(body.get("options"), max_tokens_limit),
               _flag(body, "stream", True), _keep_alive(body.get("keep_alive")))


def _params(options, max_tokens_limit: int) -> GenerationParams:
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
    try:
        return GenerationParams.from_dict(values, max_tokens_limit=max_tokens_limit)
    except (InvalidParams, TypeError) as error:
        field, _, why = str(error).partition(":")
        option = PARAM_OPTIONS.get(field.strip())
        raise OllamaError(400, f"options.{option}:{why}" if option else str(error)) from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_context(options, record: dict) -> None:
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


def _check_length(prompt: list[dict] | str, max_chars: int) -> None:
    total = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
    if total > max_chars:
        raise OllamaError(400, f"the prompt is {total:,} characters; the limit is {max_chars:,}")


# ----- answers ------------------------------------------------------------------------------------------------
def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class Answer:
    """The shape of a /api/chat or /api/generate answer: text lines, and the final one with the stats."""

    def __init__(self, job: Job, started: float):
        self.job, self.started = job, started

    def base(self, done: bool) -> dict:
        return {"model": self.job.name, "created_at": _now(), "done": done}

    def content(self, text: str) -> dict:
        if self.job.kind == "chat":
            return {"message": {"role": "assistant", "content": text}}
        return {"response": text}

    def line(self, text: str) -> dict:
        return {**self.base(False), **self.content(text)}

    def final(self, last, text: str = "") -> dict:
        """The last object: done, why, token counts and durations (nanoseconds, as Ollama gives them)."""
        total = time.perf_counter() - self.started
        timings = getattr(last, "timings", None) or {}
        engine_total = timings.get("total_s", 0.0)
        first_token = timings.get("ttft_s", 0.0)
        reason = getattr(last, "finish_reason", None)
        return {**self.base(True), **self.content(text),
                "done_reason": {"length": "length"}.get(reason, "stop"),
                "total_duration": _ns(total),
                "load_duration": _ns(total - engine_total) if engine_total else 0,  # loading, queueing
                "prompt_eval_count": getattr(last, "prompt_tokens", 0) or 0,
                "prompt_eval_duration": _ns(first_token),
                "eval_count": getattr(last, "completion_tokens", 0) or 0,
                "eval_duration": _ns(engine_total - first_token)}


def _line(payload: dict) -> bytes:
    return (json.dumps(payload, ensure_ascii=False) + "\n").encode()


async def _ndjson(request: Request, source: ChunkSource, first, answer: Answer) -> AsyncIterator[bytes]:
    """The reply as newline-delimited JSON; `EventStream` closes `source` however this ends."""
    chunk, last = first, first
    try:
        while chunk is not None:
            last = chunk
            if chunk.text:
                yield _line(answer.line(chunk.text))
            if chunk.finish_reason is not None:
                break
            chunk = await next_or_disconnect(request, source)
        yield _line(answer.final(last))
    except Disconnected:
        log.info("client went away; Ollama %s reply cancelled", answer.job.kind)
    except Exception as error:
        yield _line({"error": _as_error(error).message})


async def _collect(request: Request, source: ChunkSource, first, answer: Answer):
    text, chunk, last = "", first, first
    try:
        while chunk is not None:
            text += chunk.text
            last = chunk
            if chunk.finish_reason is not None:
                break
            chunk = await next_or_disconnect(request, source)
    except Disconnected:
        return JSONResponse({"error": "client disconnected"}, status_code=499)
    except Exception as error:
        return _as_error(error).response()
    return answer.final(last, text)


async def _pull_lines(service, spec) -> AsyncIterator[bytes]:
    """Ollama's pull progress: `{"status", "total", "completed"}` lines, then `{"status": "success"}`.

    The download runs on a thread of its own (it may take minutes); it goes on if the client leaves,
    and the next pull or load finds the file.
    """
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue = asyncio.Queue()
    total = spec.size_bytes or 0
    status = f"pulling {spec.hub_file or spec.id}"

    def progress(fraction: float, message: str) -> None:
        line = {"status": status, "completed": int(fraction * total), "total": total} if total else \
            {"status": message}
        loop.call_soon_threadsafe(updates.put_nowait, ("progress", line))

    def fetch() -> None:
        try:
            record = service.pull(spec, progress)
            loop.call_soon_threadsafe(updates.put_nowait, ("done", record))
        except Exception as error:
            loop.call_soon_threadsafe(updates.put_nowait, ("error", error))

    yield _line({"status": "pulling manifest"})
    threading.Thread(target=fetch, name=f"pull-{spec.id}", daemon=True).start()
    last_completed = -1
    while True:
        kind, value = await updates.get()
        if kind == "progress":
            if value.get("completed") == last_completed:
                continue
            last_completed = value.get("completed", last_completed)
            yield _line(value)
        elif kind == "done":
            if total:
                yield _line({"status": status, "completed": total, "total": total})
            yield _line({"status": "success", "model": value["id"]})
            return
        else:
            yield _line({"error": _as_error(value).message})
            return


def _digest(model_id: str, size: int) -> str:
    """A stable stand-in for Ollama's manifest digest: the same model id and size give the same one."""
    return hashlib.sha256(f"{model_id}\0{size}".encode()).hexdigest()


def _parameter_size(count: int | None) -> str:
    if not count:
        return ""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return str(count)


def _details(model: dict) -> dict:
    family = model["architecture"] or ""
    return {"parent_model": "", "format": "gguf" if model["kind"] == "local" else "remote", "family": family,
            "families": [family] if family else None,
            "parameter_size": _parameter_size(model["parameter_count"]),
            "quantization_level": model["quantization"] or ""}


def _iso(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp or 0, timezone.utc).isoformat().replace("+00:00", "Z")


def _model_entry(model: dict) -> dict:
    """A model as /api/tags lists it (every catalog model, on disk or downloaded on first use)."""
    size = model["file_size_bytes"] or model.get("download_bytes") or 0
    name = model["id"] + LATEST
    return {"name": name, "model": name, "modified_at": _iso(model["modified_at"]), "size": size,
            "digest": _digest(model["id"], size), "details": _details(model)}


def _running_entry(model: dict, idle_unload_s: float | None) -> dict:
    """A loaded model as /api/ps lists it; it stays loaded until unloaded, evicted, or idle past --idle-unload."""
    stays = model["pinned"] or not idle_unload_s
    expires = FOREVER if stays else _iso(time.time() + idle_unload_s)
    entry = _model_entry(model)
    entry.pop("modified_at")
    return {**entry, "size": model["memory_bytes"], "expires_at": expires,
            "context_length": model["context_length"]}


def _show(model: dict) -> dict:
    architecture = model["architecture"] or ""
    info = {"general.architecture": architecture, "general.parameter_count": model["parameter_count"],
            f"{architecture}.context_length": model["context_length"]} if model["kind"] == "local" else {}
    return {"modelfile": f"# {model['name']}\n", "parameters": "", "template": model["chat_template"] or "",
            "license": "", "details": _details(model), "model_info": info, "capabilities": ["completion"],
            "modified_at": _iso(model["modified_at"])}


# ----- errors -------------------------------------------------------------------------------------------------
def _as_error(error: BaseException) -> OllamaError:
    if isinstance(error, OllamaError):
        return error
    if isinstance(error, DownloadError):
        return OllamaError(503, str(error))
    known = error_status(error)
    if known is not None:
        status, headers = known
        return OllamaError(status, str(error), headers)
    log.exception("Ollama route failed")
    return OllamaError(500, "internal error; see the server log")


def add_unknown_route_answers(router: APIRouter, check_key: Callable[[Request], None]) -> None:
    """Any other /api path or method answers in Ollama's error shape (404 / 405), saying so for the
    routes Ollama has and this server does not serve. Added last: the real routes match first."""

    @router.api_route("/api/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                      include_in_schema=False)
    def unknown(request: Request, rest: str):
        try:
            check_key(request)
        except OllamaError as error:
            return error.response()
        path = request.url.path.rstrip("/")
        if path in ROUTES:
            allowed = ROUTES[path]
            return OllamaError(405, f"{request.method} is not allowed on {path}; use {allowed}",
                               {"Allow": allowed}).response()
        unserved = next((what for prefix, what in UNSERVED.items() if path == prefix or
                         path.startswith(prefix + "/")), None)
        if unserved:
            return OllamaError(404, f"{path}: {unserved} is not supported by this server").response()
        return OllamaError(404, f"unknown route: {request.method} {path}").response()
