"""Continuous batching: one decode loop per loaded model runs every active request's next token in a
single forward pass. Requests join between steps and leave when done, each streaming its own chunks
and stoppable alone.

Prompts are prefilled between decode steps, at most `prefill_chunk` tokens of work per step, so a
long prompt never stalls the rows that are already streaming: short new prompts are prefilled
together in one left-padded forward, a long one (or the rest of a prompt after a session's cached
prefix) chunk by chunk on its own cache.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import torch

from . import kv
from .generate import Chunk
from .params import GenerationParams
from .request import Request
from .sampling import greedy_tokens, sample_next


# An idle loop given a request waits this long for another to arrive before prefilling, and again after
# each arrival, up to GATHER_MAX_S in all (`BatchScheduler._gather`); a lone request pays GATHER_S once.
GATHER_S = 0.01
GATHER_MAX_S = 0.05


class PrefixCache:
    """Per-session KV of the last turn, reused when the next prompt starts with the same tokens."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[list[int], list, int]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(entry[2] for entry in self._entries.values())

    def take(self, key: str, prompt_ids: list[int]) -> tuple[int, list | None]:
        """(reused tokens, their KV layers) — at least one prompt token is always left to prefill."""
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is None:
            return 0, None
        ids, layers, _ = entry
        limit = min(len(ids), len(prompt_ids) - 1)
        common = 0
        while common < limit and ids[common] == prompt_ids[common]:
            common += 1
        if common == 0:
            return 0, None
        return common, [(k[:, :, :common], v[:, :, :common]) for k, v in layers]

    def put(self, key: str, ids: list[int], layers: list) -> None:
        size = kv.layers_bytes(layers)
        if size > self.max_bytes:
            return
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = (list(ids), layers, size)
            total = sum(entry[2] for entry in self._entries.values())
            while total > self.max_bytes and self._entries:
                _, (_, _, dropped) = self._entries.popitem(last=False)
                total -= dropped

    def forget(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)


@dataclass
class _Prefill:
    """A request whose prompt is being fed: its first `fed` tokens are in `cache` (None before the first)."""

    request: Request
    cache: object | None = None
    fed: int = 0
    logits: torch.Tensor | None = None  # the last position's, once the whole prompt is in

    @property
    def remaining(self) -> int:
        return len(self.request.prompt_ids) - self.fed


class BatchScheduler:
    """The decode loop of one loaded model. Its thread runs while there is work and exits when idle."""

    def __init__(self, lm, max_batch: int = 8, prefix_cache_bytes: int = 256 * 2**20, prefill_chunk: int = 512,
                 gather_s: float | None = None, gather_max_s: float = GATHER_MAX_S):
        self.lm = lm
        self.max_batch = max_batch
        self.gather_s = (GATHER_S if gather_s is None else gather_s) if max_batch > 1 else 0.0
        self.gather_max_s = gather_max_s
        self.prefill_chunk = prefill_chunk  # prompt tokens fed between two decode steps, at most
        self.prefix = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self._pending: list[Request] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._running = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # batched decode forwards
        self.prefills = 0  # prefill forwards (a group of prompts, or one chunk of one prompt)

    # ----- the caller's side -----------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether the decode loop runs: an idle scheduler holds no thread, no request and no batch KV
        (only the prefix cache)."""
        return self._running

    def stream(self, prompt_ids: list[int], params: GenerationParams, cancel: threading.Event,
               session_key: str | None = None, on_done=None) -> Iterator[Chunk]:
        """The request's chunks as the decode loop makes them. `on_done()` runs on the loop once the
        request is finished or dropped, even if nobody reads the rest of this stream; a consumer
        that closes it early sets `cancel`, which drops the request before its next token."""
        request = Request.create(self.lm, prompt_ids, params, cancel, session_key, on_done)
        request.report_cache = self.prefix is not None
        with self._lock:
            self._pending.append(request)
            if not self._running:
                self._running = True
                self._thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
                self._thread.start()
            self._wake.notify()
        finished = False
        try:
            while True:
                item = request.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:  # the consumer went away: stop computing for it
                cancel.set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait for the decode loop's thread to exit (it holds the model and the batch's KV while it runs,
        a moment past the last chunk it hands out); False if it still runs after `timeout` seconds."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def forget(self, session_key: str) -> None:
        if self.prefix:
            self.prefix.forget(session_key)

    # ----- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        batch: kv.Batch | None = None
        rows: list[Request] = []
        feeding: list[_Prefill] = []
        try:
            while True:
                with self._lock:
                    if not rows and not feeding:
                        self._gather()
                    room = self.max_batch - len(rows) - len(feeding)
                    taken, self._pending = self._pending[:room], self._pending[room:]
                    if not taken and not rows and not feeding:
                        self._running = False
                        return
                feeding += [self._start_prefill(request) for request in taken if not self._dropped(request)]
                feeding = [item for item in feeding if not self._dropped(item.request)]
                if feeding:
                    batch, rows, feeding = self._prefill_some(batch, rows, feeding)
                if rows:
                    batch, rows = self._step(batch, rows)
        except BaseException as error:  # a failing step must not leave callers waiting forever
            with self._lock:
                orphans = rows + [item.request for item in feeding] + self._pending
                self._pending, self._running = [], False
            for request in orphans:
                if not request.finished:
                    request.fail(error)

    def _gather(self) -> None:
        """With nothing running, wait while requests keep arriving (each within `gather_s` of the last,
        `gather_max_s` in all) before prefilling: clients that start together then share one prefill,
        instead of the first being prefilled alone while the rest wait for it. Holds the lock (waiting
        releases it)."""
        deadline = time.monotonic() + self.gather_max_s
        while 0 < len(self._pending) < self.max_batch and self.gather_s:
            seen = len(self._pending)
            self._wake.wait(min(self.gather_s, deadline - time.monotonic()))
            if len(self._pending) == seen or time.monotonic() >= deadline:
                return

    def _dropped(self, request: Request) -> bool:
        if request.cancel.is_set():
            request.finish("cancelled")
            return True
        return False

    def _start_prefill(self, request: Request) -> _Prefill:
        """Pick up the session's cached prefix when the prompt starts with it."""
        if not (self.prefix and request.session_key):
            return _Prefill(request)
        reused, layers = self.prefix.take(request.session_key, request.prompt_ids)
        request.reused = reused
        return _Prefill(request, kv.cache_from_layers(layers, self.lm.model), reused) if layers else _Prefill(request)

    def _prefill_some(self, batch, rows, feeding: list[_Prefill]):
        """About `prefill_chunk` tokens of prompt work: new short prompts together, else one chunk."""
        group = self._fresh_group(feeding)
        if group:
            batch, rows = self._prefill_together(batch, rows, group)
            return batch, rows, [item for item in feeding if item not in group]
        item = feeding[0]
        if self._prefill_chunk(item):
            batch, rows = self._admit_single(batch, rows, item)
            return batch, rows, feeding[1:]
        return batch, rows, feeding

    def _fresh_group(self, feeding: list[_Prefill]) -> list[_Prefill]:
        """Prompts with nothing cached that fit one left-padded forward of at most `prefill_chunk`
        tokens, shortest first. Padding costs compute, a second forward costs a pass over the
        weights: padding may waste up to half the real tokens, or 64 tokens, whichever is more."""
        fresh = sorted((item for item in feeding if item.fed == 0 and item.remaining <= self.prefill_chunk),
                       key=lambda item: item.remaining)
        group: list[_Prefill] = []
        real = 0
        for item in fresh:
            padded = (len(group) + 1) * item.remaining  # sorted: this one is the longest so far
            waste = padded - real - item.remaining
            if group and (padded > self.prefill_chunk or waste > max((real + item.remaining) / 2, 64)):
                break
            group.append(item)
            real += item.remaining
        return group

    def _prefill_together(self, batch, rows, group: list[_Prefill]):
        device = self.lm.device
        length = max(item.remaining for item in group)
        ids = torch.zeros(len(group), length, dtype=torch.long, device=device)
        mask = torch.zeros(len(group), length, dtype=torch.long, device=device)
        for row, item in enumerate(group):
            prompt = item.request.prompt_ids
            ids[row, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, length - len(prompt):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = kv.new_cache(self.lm.model)
        with torch.inference_mode():
            out = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                                use_cache=True, logits_to_keep=1)
            fed = kv.zero_padding(kv.Batch(cache, mask))
        self.prefills += 1
        keep = []
        for row, item in enumerate(group):
            item.request.fed = list(item.request.prompt_ids)
            if self._emit(item.request, out.logits[row, -1]):
                self._remember(item.request, fed, row)
            else:
                keep.append(row)
        if not keep:
            return batch, rows
        return kv.join(batch, kv.select(fed, keep)), rows + [group[row].request for row in keep]

    def _prefill_chunk(self, item: _Prefill) -> bool:
        """Feed the next chunk of one prompt on its own cache; True once the whole prompt is in."""
        prompt = item.request.prompt_ids
        end = min(len(prompt), item.fed + self.prefill_chunk)
        device = self.lm.device
        ids = torch.tensor([prompt[item.fed:end]], dtype=torch.long, device=device)
        positions = torch.arange(item.fed, end, device=device).unsqueeze(0)
        item.cache = item.cache if item.cache is not None else kv.new_cache(self.lm.model)
        with torch.inference_mode():
            item.logits = self.lm.model(input_ids=ids, cache=item.cache, position_ids=positions, use_cache=True,
                                        logits_to_keep=1).logits[0, -1]
        self.prefills += 1
        item.fed = end
        return end == len(prompt)

    def _admit_single(self, batch, rows, item: _Prefill):
        request = item.request
        request.fed = list(request.prompt_ids)
        single = kv.Batch(item.cache, torch.ones(1, len(request.prompt_ids), dtype=torch.long,
                                                 device=self.lm.device))
        if self._emit(request, item.logits):
            self._remember(request, single, 0)
            return batch, rows
        return kv.join(batch, single), rows + [request]

    def _step(self, batch: kv.Batch, rows: list[Request]):
        """One forward for every row's last token; retire rows that finished."""
        device = self.lm.device
        tokens = torch.tensor([[r.produced[-1]] for r in rows], dtype=torch.long, device=device)
        positions = torch.tensor([[len(r.fed)] for r in rows], dtype=torch.long, device=device)
        mask = torch.cat([batch.mask, torch.ones(len(rows), 1, dtype=batch.mask.dtype, device=device)], dim=1)
        batch = kv.Batch(batch.cache, mask, padded=batch.padded)
        with torch.inference_mode():
            # no padding anywhere: no mask at all (causal masks only, SDPA's fast path)
            logits = self.lm.decode(tokens, positions, batch.cache, mask if batch.padded else None)
        self.steps += 1
        greedy = greedy_tokens(logits) if any(_plain_greedy(r) for r in rows) else None  # one call for all
        keep = []
        for index, request in enumerate(rows):
            request.fed.append(request.produced[-1])
            token = greedy[index] if greedy is not None and _plain_greedy(request) else None
            if not self._emit(request, logits[index], token):
                keep.append(index)
            else:
                self._remember(request, batch, index)
        if len(keep) == len(rows):
            return batch, rows
        return kv.select(batch, keep), [rows[i] for i in keep]

    def _emit(self, request: Request, logits: torch.Tensor, token: int | None = None) -> bool:
        """Sample the row's next token (unless `token` is given) and stream it; True when finished."""
        if request.cancel.is_set():
            request.finish("cancelled")
            return True
        if token is None:
            token = sample_next(logits.to("cpu"), request.params, request.generator, request.history,
                                request.allowed(logits.shape[-1]))
        return request.accept(token, logits)

    def _remember(self, request: Request, batch: kv.Batch, row: int) -> None:
        if self.prefix and request.session_key:
            self.prefix.put(request.session_key, request.fed, kv.row_layers(batch, row))


def _plain_greedy(request: Request) -> bool:
    """Greedy with nothing to adjust or mask first: the batch's argmax is the row's token."""
    return request.params.greedy and not request.params.penalised and request.grammar is None
