"""The engine: turns chat messages into a token stream for a local or remote model.

It owns the admission gate (how many generations run at once, how many may wait), which is what
keeps a burst of requests from taking the machine down: past the queue limit callers get `Busy`.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Iterator

from .batcher import BatchScheduler
from .generate import Chunk
from .params import GenerationParams
from .peers import Peer, peer_for


class Busy(RuntimeError):
    """Too many requests are running or waiting; try again shortly."""

    retry_after_s = 2


class AdmissionGate:
    """At most `max_running` holders at once, at most `max_waiting` waiting; the rest are refused."""

    def __init__(self, max_running: int, max_waiting: int, wait_timeout_s: float = 300.0):
        self.max_running, self.max_waiting, self.wait_timeout_s = max_running, max_waiting, wait_timeout_s
        self._cond = threading.Condition()
        self.running = 0
        self.waiting = 0

    def __enter__(self) -> "AdmissionGate":
        with self._cond:
            if self.running >= self.max_running:
                if self.waiting >= self.max_waiting:
                    raise Busy(f"the server is busy ({self.running} generations running, {self.waiting} waiting); "
                               "try again in a moment")
                self.waiting += 1
                try:
                    deadline = time.monotonic() + self.wait_timeout_s
                    while self.running >= self.max_running:
                        left = deadline - time.monotonic()
                        if left <= 0 or not self._cond.wait(left):
                            if self.running >= self.max_running:
                                raise Busy("the server stayed busy too long; try again in a moment")
                finally:
                    self.waiting -= 1
            self.running += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self.running -= 1
            self._cond.notify()


class Engine:
    """Runs generations: continuously batched per model (default), or each request as a batch of one."""

    def __init__(self, max_concurrent: int = 8, max_queue: int = 64, *, batching: bool = True,
                 prefix_cache_bytes: int = 256 * 2**20):
        self.gate = AdmissionGate(max_concurrent, max_queue)
        self.batching = batching
        self.max_batch = max_concurrent
        self.prefix_cache_bytes = prefix_cache_bytes
        self._schedulers: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()

    def scheduler(self, model) -> BatchScheduler:
        """The model's decode loop, created on first use and dropped with the model."""
        with self._lock:
            scheduler = model.runtime.get("scheduler")
            if scheduler is None:
                scheduler = BatchScheduler(model, max_batch=self.max_batch,
                                           prefix_cache_bytes=self.prefix_cache_bytes)
                model.runtime["scheduler"] = scheduler
                self._schedulers.add(scheduler)
            return scheduler

    def peer(self, model) -> Peer:
        """What the manager handed out (a loaded model, or a remote engine's spec) as a `Peer`."""
        return peer_for(model, (lambda: self.scheduler(model)) if self.batching else None)

    def stream_chat(self, model, messages: list[dict], params: GenerationParams,
                    cancel: threading.Event, session_id: str | None = None) -> Iterator[Chunk]:
        """Stream a reply to chat `messages` from a loaded model or a remote engine.

        The prompt is checked before a generation slot is taken; without batching each request
        runs as a batch of one.
        """
        peer = self.peer(model)
        prepared = peer.prepare(messages)
        with self.gate:
            yield from peer.stream(prepared, params, cancel, session_id)

    def context_limit(self, model) -> int:
        """The longest prompt plus reply `model` takes, in tokens."""
        return self.peer(model).context_length

    def token_counter(self, model):
        return self.peer(model).count_tokens

    def forget_session(self, session_id: str) -> None:
        """Drop whatever the engine caches for a deleted session (its KV prefix in every model)."""
        for scheduler in list(self._schedulers):
            scheduler.forget(session_id)
