"""Parse files off the caller's thread, in worker processes that can be killed.

Each job runs in its own short-lived process (``python -m parsers.worker``):
pymupdf is not thread-safe, so it never runs in two threads of one process,
and a parse that runs past its timeout, or crashes, takes only its own
process down. At most ``max_workers`` jobs run at once; the rest queue.

Plain subprocesses are used rather than multiprocessing's spawn or
forkserver, which re-run the host's ``__main__`` (app.py, so Gradio) in
every worker; and rather than fork, which is unsafe in a threaded app.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Sequence

from .base import Document, ParseError, ParseLimits

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
_STOP = object()


class ParsePool:
    """Parses files off the caller's thread in worker processes; each job has a
    timeout after which its worker is killed (no leak)."""

    def __init__(self, max_workers: int = 2, limits: ParseLimits | None = None,
                 *, worker_command: Sequence[str] | None = None):
        """``worker_command`` replaces ``python -m parsers.worker`` (tests use it
        to stand in a worker that hangs or crashes)."""
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self.limits = limits or ParseLimits()
        self._command = list(worker_command or [sys.executable, "-m", "parsers.worker"])
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._serve, name=f"parse-pool-{i}", daemon=True)
            for i in range(max_workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, path, *, name: str | None = None) -> Future:
        """Queue a parse; returns at once. ``future.result()`` is a Document or
        raises ParseError (refusals, timeouts and crashed workers alike)."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the ParsePool has been shut down")
            self._jobs.put((future, str(Path(path).resolve()), name or Path(path).name))
        return future

    def shutdown(self) -> None:
        """Cancel queued jobs, kill running workers, and wait for the threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for process in self._running:
                process.kill()
        for _ in self._threads:
            self._jobs.put(_STOP)
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> "ParsePool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def _serve(self) -> None:
        """One dispatcher thread: take jobs until told to stop."""
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            future, path, name = job
            if self._closed:
                future.cancel()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._run(path, name))
            except ParseError as exc:
                future.set_exception(exc)
            except Exception as exc:  # never leave a future pending
                future.set_exception(ParseError(f"'{name}' could not be parsed: {exc}"))

    def _run(self, path: str, name: str) -> Document:
        """Run one job in a fresh worker process and turn its reply into a Document."""
        request = json.dumps({"path": path, "name": name, "limits": self.limits.to_dict()})
        process = self._start_worker()
        try:
            stdout, stderr = process.communicate(request.encode(), timeout=self.limits.timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()  # reap it: no zombie, no open pipes
            raise ParseError(
                f"'{name}' took too long to parse (over {self.limits.timeout_s:g} s) "
                "and was abandoned.") from None
        finally:
            with self._lock:
                self._running.discard(process)
        return self._read_reply(process.returncode, stdout, stderr, name)

    def _start_worker(self) -> subprocess.Popen:
        """Start a worker process and track it, so that shutdown can kill it."""
        with self._lock:
            if self._closed:
                raise ParseError("parsing was cancelled: the parser pool has shut down.")
            process = subprocess.Popen(
                self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, cwd=_PACKAGE_ROOT)  # cwd: `-m parsers.worker` finds us
            self._running.add(process)
        return process

    def _read_reply(self, returncode: int, stdout: bytes, stderr: bytes, name: str) -> Document:
        """Decode a worker's reply; a missing or garbled one means the worker crashed."""
        if self._closed:
            raise ParseError("parsing was cancelled: the parser pool has shut down.")
        try:
            reply = json.loads(stdout)
            ok = reply["ok"]
        except (ValueError, TypeError, KeyError):
            detail = stderr.decode("utf-8", errors="replace").strip().splitlines()
            last = f": {detail[-1][:200]}" if detail else ""
            raise ParseError(
                f"The parser crashed while reading '{name}' (exit status {returncode}{last}). "
                "The file may be damaged.") from None
        if not ok:
            raise ParseError(reply["error"])
        return Document(reply["text"], reply["metadata"])
