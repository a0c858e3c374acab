"""What a stream of generated text is made of (`Chunk`), stop strings, and `stream_generate`.

The decode loop itself is inference/batcher.py (`BatchScheduler`), the only one: concurrent
requests share it, and `stream_generate` runs a request alone as a batch of one. The per-request
state (sampling, detokenizing, stop strings, budget, timings) is inference/request.py.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator

from .params import GenerationParams


class PromptTooLong(ValueError):
    """The prompt leaves no room for a reply in the model's context window."""


@dataclass
class Chunk:
    """One step of a reply: a text delta, and on the last chunk the finish reason and timings."""

    text: str = ""
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    timings: dict = field(default_factory=dict)
    logprobs: list | None = None  # the TokenLogprobs of the tokens since the last chunk, when asked for


class StopMatcher:
    """Finds stop strings across deltas, holding back text that could begin one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = 0
        for size in range(min(self.longest - 1, len(self.pending)), 0, -1):
            tail = self.pending[-size:]
            if any(s.startswith(tail) for s in self.stops):
                keep = size
                break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def check_prompt(prompt_len: int, context_length: int) -> None:
    if prompt_len == 0:
        raise PromptTooLong("the prompt is empty")
    if prompt_len >= context_length:
        raise PromptTooLong(f"the prompt is {prompt_len} tokens; this model's context window is "
                            f"{context_length} tokens, which leaves no room for a reply")


LOOP_EXIT_S = 5.0  # how long the end of a stream waits for its decode loop to let go of the model


def stream_generate(lm, prompt_ids: list[int], params: GenerationParams,
                    cancel: threading.Event | None = None, on_done=None) -> Iterator[Chunk]:
    """Generate a reply to `prompt_ids` with the loaded model `lm`, one `Chunk` per new text.

    A batch of one: its own decode loop (inference/batcher.py, no prefix cache), so a request
    generated alone goes through exactly the code of a batched one. The loop checks `cancel` before
    every token, so a stop costs at most one step.
    """
    from .batcher import BatchScheduler

    scheduler = BatchScheduler(lm, max_batch=1, prefix_cache_bytes=0)
    try:
        yield from scheduler.stream(prompt_ids, params, cancel if cancel is not None else threading.Event(),
                                    on_done=on_done)
    finally:  # its loop holds the model: once the caller has the reply, unloading it must free it
        scheduler.wait_idle(timeout=LOOP_EXIT_S)
