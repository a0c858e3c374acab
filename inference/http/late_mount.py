"""An ASGI app mounted at the root of a FastAPI app, possibly after its server has started.

`python app.py` serves the HTTP API as soon as it can and mounts the web UI when it has been built
(README, "Starting up"). `LateMount` is that slot: until something is mounted, every path the API does
not serve answers 503 with a page that reloads itself (500 saying why, once `fail` is called); `mount`
starts the mounted app's lifespan, on the server's event loop if it runs or with the server's start-up
if not, in a task of its own that lasts until the server stops (a lifespan is entered and left in one
task), and again with each later start of the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import threading
from typing import AsyncContextManager, Callable

from starlette.responses import HTMLResponse, Response

STARTING_PAGE = ("<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='2'>"
                 "<title>Starting</title></head><body style='font-family:system-ui,sans-serif;"
                 "text-align:center;margin-top:20vh'><p>{what} is starting&hellip; this page reloads itself."
                 "</p><p style='opacity:.7'>The HTTP API (/v1, /api, /health) already answers.</p></body></html>")


class LateMount:
    """The root of `parent` for an app mounted later. `status`: "starting", "ready" or "failed"."""

    def __init__(self, parent, what: str):
        self.parent, self.what = parent, what
        self.status, self.error = "starting", ""
        self.mounted = None  # the ASGI app, once mounted
        self._start: Callable[[], AsyncContextManager] | None = None
        self._lock = threading.Lock()  # the three below, against `mount` from another thread
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's event loop, while it runs
        self._stop: asyncio.Event | None = None  # set when the server shuts down: the lifespan ends
        self._tasks: list[asyncio.Task] = []
        parent.router.default = self._placeholder
        self._wrap_lifespan()

    def mount(self, app, start: Callable[[], AsyncContextManager], timeout_s: float = 60.0) -> None:
        """Mount `app` at the root; `start()` is its lifespan (entered until the server stops)."""
        with self._lock:
            self.mounted, self._start, loop = app, start, self._loop
        if loop is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._run_started(), loop).result(timeout=timeout_s)
            except BaseException:
                with self._lock:  # not mounted: nothing to start again with the server
                    self.mounted = self._start = None
                raise
        self.parent.mount("", app)
        self.status = "ready"

    def fail(self, error: str) -> None:
        self.status, self.error = "failed", error

    async def _run_started(self) -> None:
        """Start the lifespan in a task of its own; return once it is up (or raise why not)."""
        started = asyncio.get_running_loop().create_future()
        self._tasks.append(asyncio.create_task(self._run(self._start, started, self._stop)))
        await started

    @staticmethod
    async def _run(start, started: asyncio.Future, stop: asyncio.Event) -> None:
        try:
            async with start():
                started.set_result(None)
                await stop.wait()
        except BaseException as error:
            if not started.done():
                started.set_exception(error)
            raise

    def _wrap_lifespan(self) -> None:
        """Around the parent's lifespan, each time its server starts: note the event loop (for a mount to
        come), start what was mounted before, and end it when the server shuts down."""
        previous = self.parent.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(asgi_app):
            async with previous(asgi_app) as inner:
                with self._lock:  # mounted from now on: started on this loop; mounted before: here
                    self._loop, self._stop, start = asyncio.get_running_loop(), asyncio.Event(), self._start
                if start is not None:
                    await self._run_started()
                try:
                    yield inner
                finally:
                    with self._lock:
                        self._loop = None
                    self._stop.set()
                    await asyncio.gather(*self._tasks, return_exceptions=True)
                    self._tasks.clear()

        self.parent.router.lifespan_context = lifespan

    async def _placeholder(self, scope, receive, send) -> None:
        """Any path outside the API before the mount (after, the mount takes them all)."""
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1013})  # try again later
            return
        if self.status == "failed":
            text, status, headers = f"{self.what} could not start ({self.error}); the HTTP API still serves.", 500, {}
            page = f"<!doctype html><p>{html.escape(text)}</p>"
        else:
            text, status, headers = f"{self.what} is starting; the HTTP API already answers.", 503, {"Retry-After": "2"}
            page = STARTING_PAGE.format(what=self.what)
        wants_html = "text/html" in dict(scope.get("headers", [])).get(b"accept", b"").decode("latin-1")
        response = HTMLResponse(page, status, headers) if wants_html else Response(text, status, headers,
                                                                                  media_type="text/plain")
        await response(scope, receive, send)
