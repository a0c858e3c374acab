"""The engine: turns chat messages into a token stream for a local or remote model.

It owns the admission gate (how many generations run at once, how many may wait, in what order),
which is what keeps a burst of requests from taking the machine down: past the queue limit callers
get `Busy`. A place in the queue is an `Admission`: a caller on a thread waits for it with
`wait()`; the /v1 routes wait for it on the event loop (`on_grant`), so a queued request holds no
thread. The slot goes back when the decode loop finishes the request (cancelled ones at the next
token), not when its consumer gets round to closing the stream.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from typing import Callable, Iterator

from .batcher import BatchScheduler
from .generate import Chunk
from .params import GenerationParams
from .peers import Peer, peer_for


class Busy(RuntimeError):
    """Too many requests are running or waiting; try again shortly."""

    retry_after_s = 2

    @classmethod
    def waited_too_long(cls) -> "Busy":
        return cls("the server stayed busy too long; try again in a moment")


class Cancelled(Exception):
    """The request was cancelled (stopped, or its client left) while it waited for a generation slot."""


class Admission:
    """One request's place at the gate: queued, then holding a slot, until `release()` (idempotent).

    Releasing a queued admission takes it out of the queue; releasing a running one frees its slot
    for the next in line.
    """

    CANCEL_POLL_S = 0.1  # a thread waiting for its slot notices its cancel event this often

    def __init__(self, gate: "AdmissionGate"):
        self._gate = gate
        self.state = "queued"  # "queued" | "running" | "released"; changed under the gate's lock
        self.granted = threading.Event()
        self._on_grant: list[Callable[[], None]] = []

    def on_grant(self, callback: Callable[[], None]) -> None:
        """Call `callback()` (from whichever thread frees the slot) once this admission runs; at once
        if it already does. It must not block."""
        with self._gate._lock:
            if self.state == "queued":
                self._on_grant.append(callback)
                return
        callback()

    def wait(self, cancel: threading.Event | None = None, timeout_s: float | None = None) -> None:
        """Block until the slot is ours. `Cancelled` once `cancel` is set, `Busy` after `timeout_s`
        (the gate's wait limit by default); either way the place in the queue is given up."""
        deadline = time.monotonic() + (self._gate.wait_timeout_s if timeout_s is None else timeout_s)
        while not self.granted.wait(min(self.CANCEL_POLL_S, max(0.0, deadline - time.monotonic()))):
            if cancel is not None and cancel.is_set():
                self.release()
                raise Cancelled()
            if time.monotonic() >= deadline and self.withdraw():
                raise Busy.waited_too_long()

    def withdraw(self) -> bool:
        """Leave the queue; False (and nothing changed) if the admission already runs."""
        return self._gate._withdraw(self)

    def release(self) -> None:
        self._gate._release(self)

    def __enter__(self) -> "Admission":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class AdmissionGate:
    """At most `max_running` generations at once and `max_waiting` queued, served first come, first
    served; the rest are refused with `Busy`."""

    def __init__(self, max_running: int, max_waiting: int, wait_timeout_s: float = 300.0):
        self.max_running, self.max_waiting, self.wait_timeout_s = max_running, max_waiting, wait_timeout_s
        self._lock = threading.Lock()
        self._queue: deque[Admission] = deque()
        self.running = 0

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def reserve(self) -> Admission:
        """A place: running at once if a slot is free and nobody is queued, else queued; `Busy` when the
        queue is full."""
        admission = Admission(self)
        with self._lock:
            if self.running < self.max_running and not self._queue:
                self._grant(admission)
            elif len(self._queue) >= self.max_waiting:
                raise Busy(f"the server is busy ({self.running} generations running, {len(self._queue)} "
                           "waiting); try again in a moment")
            else:
                self._queue.append(admission)
        return admission

    def admit(self, cancel: threading.Event | None = None) -> Admission:
        """A running admission for a caller on a thread: reserve, then wait (see `Admission.wait`)."""
        admission = self.reserve()
        admission.wait(cancel)
        return admission

    def _grant(self, admission: Admission) -> None:  # under the lock
        self.running += 1
        admission.state = "running"
        admission.granted.set()

    def _withdraw(self, admission: Admission) -> bool:
        """Take a still queued admission out of the queue; False if it already runs."""
        with self._lock:
            if admission.state != "queued":
                return False
            self._queue.remove(admission)
            admission.state = "released"
            admission._on_grant.clear()
            return True

    def _release(self, admission: Admission) -> None:
        granted: list[Admission] = []
        with self._lock:
            if admission.state == "queued":
                self._queue.remove(admission)
            elif admission.state == "running":
                self.running -= 1
                while self._queue and self.running < self.max_running:
                    granted.append(self._queue.popleft())
                    self._grant(granted[-1])
            admission.state = "released"
            admission._on_grant.clear()
            callbacks = [callback for waiter in granted for callback in waiter._on_grant]
            for waiter in granted:
                waiter._on_grant = []
        for callback in callbacks:
            callback()


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

    @property
    def idle(self) -> bool:
        """No generation running or queued, and every decode loop stopped (so no thread and no batch KV
        cache held; session prefix caches stay)."""
        return self.gate.running == 0 and self.gate.waiting == 0 and not any(
            scheduler.active for scheduler in list(self._schedulers))

    def peer(self, model) -> Peer:
        """What the manager handed out (a loaded model, or a remote engine's spec) as a `Peer`."""
        return peer_for(model, (lambda: self.scheduler(model)) if self.batching else None)

    def stream_chat(self, model, messages: list[dict], params: GenerationParams, cancel: threading.Event,
                    session_id: str | None = None, admission: Admission | None = None) -> Iterator[Chunk]:
        """Stream a reply to chat `messages` from a loaded model or a remote engine.

        The prompt is checked before a generation slot is taken; without batching each request
        runs as a batch of one. `admission`: a slot the caller already holds (the /v1 routes wait
        for theirs without a thread); else this waits for one, and a stop while waiting ends the
        stream with finish reason "cancelled". The slot goes back when the decode loop is done
        with the request, or when this stream is closed, whichever comes first.
        """
        try:
            peer = self.peer(model)
            prepared = peer.prepare(messages, params.tools)
            if admission is None:
                try:
                    admission = self.gate.admit(cancel)
                except Cancelled:
                    yield Chunk(finish_reason="cancelled")
                    return
            yield from peer.stream(prepared, params, cancel, session_id, on_done=admission.release)
        finally:
            if admission is not None:
                admission.release()

    def context_limit(self, model) -> int:
        """The longest prompt plus reply `model` takes, in tokens."""
        return self.peer(model).context_length

    def token_counter(self, model):
        return self.peer(model).count_tokens

    def forget_session(self, session_id: str) -> None:
        """Drop whatever the engine caches for a deleted session (its KV prefix in every model)."""
        for scheduler in list(self._schedulers):
            scheduler.forget(session_id)
