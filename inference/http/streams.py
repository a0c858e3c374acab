"""What every generating HTTP route shares (`/v1` and the Ollama routes): admission without a thread,
the engine's blocking generator run one chunk at a time on the routes' own worker threads, and a
watch on the connection so that a client who leaves gives its place or its slot back at once.

A request first takes its place in the engine's admission queue and waits for a generation slot on
the event loop, holding no thread (a full queue is a 429). Once admitted, the engine's generator
runs on the worker threads, one chunk at a time. The event loop watches the connection throughout:
a client that leaves the queue gives its place up at once; one that leaves mid-reply sets the
request's cancel event, and the decode loop drops it (and frees its slot) before the next token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, Iterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from models.manager import ModelError, UnknownModel
from sessions import LOCAL_USER, SessionNotFound

from ..engine import Admission, Busy
from ..generate import PromptTooLong
from ..params import InvalidParams

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.05  # how often a generating request checks that its client is still there
LAST_CHECK = "inference.last_disconnect_check"  # the request scope's key for when it was last checked
QUEUE_POLL_S = 0.1  # how often a request queued for a slot checks that its client is still there


def worker_pool(config) -> ThreadPoolExecutor:
    """The threads that run admitted generations' blocking side (each next chunk, then closing the
    stream), apart from asyncio's default pool (6 threads on 2 cores) that the rest of the server
    shares. Requests waiting for a slot hold no thread, so room for each running generation's chunk
    and close (a finished one's close can still be on its way when the next one starts), and a few more."""
    return ThreadPoolExecutor(max_workers=2 * config.max_concurrent_generations + 8, thread_name_prefix="gen-stream")


def session_binding(request: Request, service, api_key: str | None) -> tuple[str | None, str]:
    """`(session_id, owner)` of a request's `X-Session-Id` header (`(None, LOCAL_USER)` without one).

    The HTTP APIs act for the local (no-login) user; behind an API key, the key holder may bind any
    session by its id (the key is an operator's credential, SECURITY.md).
    """
    session_id = request.headers.get("x-session-id")
    owner = (service.session_owner(session_id) or LOCAL_USER) if session_id and api_key else LOCAL_USER
    return session_id, owner


def error_status(error: BaseException) -> tuple[int, dict[str, str]] | None:
    """The HTTP status (and headers) of what `start_generation` and a generation stream raise, the same
    for every API: unknown model or session 404, busy 429 with Retry-After, model unavailable 503,
    a bad prompt or setting 400. None for anything else (a bug: the caller answers 500 and logs it)."""
    if isinstance(error, (UnknownModel, SessionNotFound)):
        return 404, {}
    if isinstance(error, Busy):
        return 429, {"Retry-After": str(error.retry_after_s)}
    if isinstance(error, ModelError):
        return 503, {"Retry-After": "5"}
    if isinstance(error, (PromptTooLong, InvalidParams, ValueError)):
        return 400, {}
    return None


class BadBody(ValueError):
    """A request body that is not a JSON object; each API answers it with a 400 in its own shape."""


async def json_object(request: Request) -> dict:
    """The request's body as a JSON object (an empty body reads as null, which is refused)."""
    try:
        body = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError) as error:
        raise BadBody(f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise BadBody("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadBody("the request body must be a JSON object")
    return body


def bearer_ok(request: Request, api_key: str | None) -> bool:
    """Whether `request` carries `Authorization: Bearer <api_key>` (always true without a key)."""
    if not api_key:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


async def start_generation(request: Request, service, model_id: str, messages: list[dict], params,
                           session_id: str | None, owner: str, workers: ThreadPoolExecutor):
    """Queue for a slot (holding no thread), open the engine's stream and wait for its first chunk.

    Returns `(chunks, first)`; raises what went wrong (Busy, a model error, `Disconnected`...) after
    giving up the queue place or the stream.
    """
    admission, chunks = None, None
    try:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(workers, service.model_record, model_id)  # unknown: 404 before queueing
        admission = service.engine.gate.reserve()  # a full queue: Busy, a 429
        await admitted(request, admission, service.engine.gate.wait_timeout_s)
        chunks = open_stream(service, model_id, messages, params, session_id, owner, admission, workers)
        first = await next_or_disconnect(request, chunks, chunks.first)  # load errors surface here
        return chunks, first
    except BaseException:
        abandon(chunks, admission)
        raise


class ChunkSource:
    """Runs the engine's (blocking) generator on the router's worker threads, one chunk at a time."""

    def __init__(self, iterator: Iterator, cancel: threading.Event, admission: Admission,
                 workers: ThreadPoolExecutor):
        self.iterator, self.cancel, self.admission, self.workers = iterator, cancel, admission, workers
        self.lock = threading.Lock()
        self._closing = False

    def run(self, function: Callable):
        """`function()` on a worker thread, awaitable."""
        return asyncio.get_running_loop().run_in_executor(self.workers, function)

    def first(self):
        try:
            return self.next()
        except StopIteration:
            return None

    def next(self):
        with self.lock:
            return next(self.iterator)

    def close_soon(self) -> None:
        """Stop the generation (if it still runs) and close the stream on a worker thread.

        Never awaited: a response that is being cancelled (its client left) cannot skip it. The slot
        itself goes back when the decode loop drops the cancelled request, before its next token.
        """
        if self._closing:
            return
        self._closing = True
        self.cancel.set()
        self.workers.submit(self._close)

    def _close(self) -> None:
        try:
            with self.lock:  # after the chunk in flight, if any: the decode loop ends it at the next token
                close = getattr(self.iterator, "close", None)
                if close:
                    close()
        except Exception:
            log.exception("closing a generation stream failed")
        finally:
            self.admission.release()  # a stream that never reached the engine never took over its slot


def abandon(chunks: ChunkSource | None, admission: Admission | None) -> None:
    """Give up a request that gets no response body: stop and close its stream, or leave the queue."""
    if chunks is not None:
        chunks.close_soon()
    elif admission is not None:
        admission.release()


def open_stream(service, model_id, messages, params, session_id, owner, admission, workers) -> ChunkSource:
    """`messages`: chat messages, or a string (a raw prompt, sent without the chat template)."""
    cancel = threading.Event()
    if session_id:
        iterator = session_stream(service, owner, session_id, model_id, messages, params, cancel, admission)
    else:
        iterator = service.complete(model_id, messages, params, cancel, admission=admission)
    return ChunkSource(iterator, cancel, admission, workers)


async def admitted(request: Request, admission: Admission, timeout_s: float) -> None:
    """Wait on the event loop, holding no thread, until `admission` has its slot.

    Raises `Disconnected` if the client leaves meanwhile and `Busy` past `timeout_s`; either way the
    place in the queue is given up at once.
    """
    loop = asyncio.get_running_loop()
    granted = loop.create_future()
    admission.on_grant(lambda: loop.call_soon_threadsafe(_resolve, granted))
    deadline = loop.time() + timeout_s
    while not granted.done():
        await asyncio.wait({granted}, timeout=QUEUE_POLL_S)
        if granted.done():
            return
        if await request.is_disconnected():
            admission.release()
            raise Disconnected()
        if loop.time() > deadline and admission.withdraw():
            raise Busy.waited_too_long()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class EventStream(StreamingResponse):
    """Server-sent events whose stream is closed however the response ends: finished, failed, or
    cancelled because the client left (Starlette then cancels the response where it stands, which
    may be before the events generator ever ran, so its own `finally` cannot be relied on)."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None],
                 media_type: str = "text/event-stream"):
        super().__init__(events, media_type=media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def session_stream(service, owner, session_id, model_id, messages, params, cancel, admission):
    """Bind an HTTP request to a session: its last user message goes through the session's chat."""
    from ..generate import Chunk

    question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    settings = {k: v for k, v in params.to_dict().items() if v not in (None, [], ())}
    updates = service.chat(owner, session_id, question, model_id, settings, cancel_event=cancel,
                           admission=admission)
    try:
        for update in updates:
            if update.done:
                stats = update.stats
                timings = {k: stats[k] for k in ("ttft_s", "total_s", "tokens_per_second") if k in stats}
                yield Chunk(text=update.delta, completion_tokens=stats.get("completion_tokens", 0),
                            prompt_tokens=stats.get("prompt_tokens", 0), finish_reason=update.finish_reason,
                            timings=timings)
            elif update.delta:
                yield Chunk(text=update.delta)
    finally:
        updates.close()  # closed early (the client left): the session keeps the partial reply


class Disconnected(Exception):
    pass


async def next_or_disconnect(request: Request, source: ChunkSource, step: Callable | None = None):
    """The next chunk (or `step()`'s result); if the client disconnects meanwhile, cancel the
    generation and raise.

    The connection is checked every 50 ms while waiting, and after a chunk once 50 ms have passed since
    the last check: a non-streaming request has no failed write to notice, and a check costs the event
    loop ~0.1 ms (Starlette's `is_disconnected`), which a fast model's every token need not pay.
    """
    task = asyncio.ensure_future(source.run(step or (lambda: next_or_none(source))))
    while True:
        finished, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if _check_due(request) and await request.is_disconnected():
            source.cancel.set()
            raise Disconnected()
        if finished:
            return task.result()


def _check_due(request: Request, now: float | None = None) -> bool:
    """Whether DISCONNECT_POLL_S has passed since this request's last disconnect check (then one is due now)."""
    now = time.monotonic() if now is None else now
    if now - request.scope.get(LAST_CHECK, float("-inf")) < DISCONNECT_POLL_S:
        return False
    request.scope[LAST_CHECK] = now
    return True


def next_or_none(source: ChunkSource):
    try:
        return source.next()
    except StopIteration:
        return None


