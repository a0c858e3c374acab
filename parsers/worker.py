"""The worker process of ``parsers.pool``: parse one file, report, exit.

Run as ``python -m parsers.worker``. The request is one JSON object on stdin
(``path``, ``name``, ``limits``); the reply is one JSON object on stdout:
``{"ok": true, "text": ..., "metadata": ...}`` or ``{"ok": false, "error": ...}``.
Anything a library prints is sent to stderr so it cannot corrupt the reply.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    """Handle one request from stdin; the exit status is 0 whenever a reply was written."""
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints from C libraries go to stderr, not into the reply
    request = json.loads(sys.stdin.buffer.read())
    reply = run(request)
    with os.fdopen(reply_fd, "wb") as out:
        out.write(encode_reply(reply))
    return 0


def run(request: dict) -> dict:
    """Parse the requested file; a dict reply, never an exception."""
    from . import ParseError, ParseLimits, parse

    try:
        limits = ParseLimits.from_dict(request.get("limits") or {})
        document = parse(request["path"], limits, name=request.get("name"))
    except ParseError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True, "text": document.text, "metadata": document.metadata}


def encode_reply(reply: dict) -> bytes:
    """The wire form of a reply: ASCII JSON, so even a lone surrogate travels safely."""
    return json.dumps(reply).encode("ascii")


# pymupdf >= 2 imports two optional add-ons on import when they are installed:
# pymupdf.layout (an ONNX layout model) and pymupdf4llm. Together they cost
# about 0.9 s and 110 MB per worker, and plain text extraction uses neither;
# pymupdf catches their ImportError, so a worker blocks them.
_UNUSED_ADDONS = ("pymupdf.layout", "pymupdf4llm")


if __name__ == "__main__":
    for _module in _UNUSED_ADDONS:
        sys.modules.setdefault(_module, None)
    sys.exit(main())
