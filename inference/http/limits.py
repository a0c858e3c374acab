"""An ASGI middleware that bounds every request body, so a huge POST is refused, not read into memory.

FastAPI and Gradio read a JSON body whole before they look at it (and before Gradio checks a login),
so without a bound one request can take as much memory as it likes. The bound is small for every
route (a JSON call) but the few named ones that take files. Bodies that declare a larger
Content-Length are refused at once, before any of the body is read and before any login check;
chunked bodies are counted as they arrive and cut off.
"""

from __future__ import annotations

import json


class BodySizeLimit:
    """Answer 413 to any HTTP request whose body is over `max_bytes`, or over `larger[path]` on the
    paths named there (file uploads)."""

    def __init__(self, app, max_bytes: int, larger: dict[str, int] | None = None):
        self.app, self.max_bytes = app, int(max_bytes)
        self.larger = {path.rstrip("/"): int(limit) for path, limit in (larger or {}).items()}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.larger.get(scope.get("path", "").rstrip("/"), self.max_bytes)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._refuse(send, limit)
            return
        received, over, started = 0, False, False

        async def counted_receive():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    return {"type": "http.disconnect"}  # the app stops reading; we answer for it
            return message

        async def guarded_send(message) -> None:
            nonlocal started
            if over:
                return  # the app's answer to a body it never got whole
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._refuse(send, limit)

    @staticmethod
    async def _refuse(send, limit: int) -> None:
        body = json.dumps({"error": {"message": f"The request body is larger than {limit:,} bytes",
                                     "type": "invalid_request_error", "param": None,
                                     "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
