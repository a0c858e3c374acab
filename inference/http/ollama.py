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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from models.download import DownloadError

from ..tools import ToolCallStream, parse_tool_calls
from .ollama_requests import (LATEST, Job, OllamaError, catalog_id, check_context, check_length, flag, model_name,
                              parse_chat, parse_generate, read_json)
from .streams import (ChunkSource, Disconnected, EventStream, bearer_ok, error_status, next_or_disconnect,
                      session_binding, start_generation)

log = logging.getLogger(__name__)

# The Ollama release whose API these routes follow; clients (Open WebUI, Continue) read it to decide
# which fields they may send.
OLLAMA_VERSION = "0.9.0"
NDJSON = "application/x-ndjson"
FOREVER = "9999-12-31T23:59:59Z"  # /api/ps `expires_at` of a model that is never unloaded when idle

ROUTES = {"/api/version": "GET", "/api/tags": "GET", "/api/ps": "GET", "/api/show": "POST",
          "/api/chat": "POST", "/api/generate": "POST", "/api/pull": "POST"}
UNSERVED = {"/api/embed": "embeddings", "/api/embeddings": "embeddings", "/api/create": "creating models",
            "/api/copy": "copying models", "/api/delete": "deleting models", "/api/push": "pushing models",
            "/api/blobs": "uploading blobs"}


def create_router(service, workers: ThreadPoolExecutor, api_key: str | None = None) -> APIRouter:
    """The /api routes; `workers` run admitted generations and blocking calls (streams.worker_pool)."""
    config = service.config
    router = APIRouter()

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
            body = await read_json(request)
            name = model_name(body)
            return _show(await run(service.model_details, catalog_id(name)))
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
            body = await read_json(request)
            job = (parse_chat if kind == "chat" else parse_generate)(body, config.max_tokens_limit)
            check_length(job.prompt, config.max_prompt_chars)
            record = await run(service.model_record, job.model_id)  # unknown: 404 before anything else
            check_context(body.get("options"), record)
            if not job.prompt:
                return await load_or_unload(job)
            session_id, owner = session_binding(request, service, api_key)
            if session_id and (job.params.tools is not None or
                               any(m.get("role") == "tool" or m.get("tool_calls") for m in job.prompt
                                   if isinstance(m, dict))):
                raise OllamaError(400, "tools: a request bound to a session (X-Session-Id) cannot use tools")
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
        answer_shape = Answer(job, started)
        return {**answer_shape.base(done=True), **answer_shape.content(""), "done_reason": reason,
                "total_duration": _ns(time.perf_counter() - started)}

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
            body = await read_json(request)
            name = model_name(body)
            stream = flag(body, "stream", True)
            spec = await run(service.pull_target, catalog_id(name))
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

    def content(self, text: str, calls: list[dict] | None = None) -> dict:
        if self.job.kind == "chat":
            message = {"role": "assistant", "content": text}
            if calls:
                message["tool_calls"] = ollama_tool_calls(calls)
            return {"message": message}
        return {"response": text}

    def line(self, text: str, calls: list[dict] | None = None) -> dict:
        return {**self.base(False), **self.content(text, calls)}

    def final(self, last, text: str = "", calls: list[dict] | None = None) -> dict:
        """The last object: done, why, token counts and durations (nanoseconds, as Ollama gives them)."""
        total = time.perf_counter() - self.started
        timings = getattr(last, "timings", None) or {}
        engine_total = timings.get("total_s", 0.0)
        first_token = timings.get("ttft_s", 0.0)
        reason = getattr(last, "finish_reason", None)
        return {**self.base(True), **self.content(text, calls),
                "done_reason": {"length": "length"}.get(reason, "stop"),
                "total_duration": _ns(total),
                "load_duration": _ns(total - engine_total) if engine_total else 0,  # loading, queueing
                "prompt_eval_count": getattr(last, "prompt_tokens", 0) or 0,
                "prompt_eval_duration": _ns(first_token),
                "eval_count": getattr(last, "completion_tokens", 0) or 0,
                "eval_duration": _ns(engine_total - first_token)}


def _line(payload: dict) -> bytes:
    return (json.dumps(payload, ensure_ascii=False) + "\n").encode()


def ollama_tool_calls(calls: list[dict]) -> list[dict]:
    """Tool calls in OpenAI's shape (inference/tools.py) as Ollama gives them: arguments as an object."""
    return [{"function": {"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])}}
            for call in calls]


def _tool_lines(answer: Answer, events: list) -> list[bytes]:
    """A tools reply's stream events as lines: text as it comes, each call once it is complete."""
    lines = []
    for kind, value in events:
        if kind == "content" and value:
            lines.append(_line(answer.line(value)))
        elif kind in ("call", "call_start"):  # "call_start" (a forced call) does not occur: Ollama has no tool_choice
            lines.append(_line(answer.line("", [value])))
    return lines


async def _ndjson(request: Request, source: ChunkSource, first, answer: Answer) -> AsyncIterator[bytes]:
    """The reply as newline-delimited JSON; `EventStream` closes `source` however this ends."""
    chunk, last = first, first
    tools = answer.job.params.tools
    splitter = ToolCallStream(tools) if tools is not None else None
    try:
        while chunk is not None:
            last = chunk
            if splitter is not None:
                events = splitter.feed(chunk.text) + (splitter.finish() if chunk.finish_reason is not None else [])
                for line in _tool_lines(answer, events):
                    yield line
            elif chunk.text:
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
    tools = answer.job.params.tools
    if tools is not None:
        content, calls = parse_tool_calls(text, tools)
        return answer.final(last, content or "", calls)
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
