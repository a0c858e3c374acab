"""The one streaming generator. Everything else (UI, /v1 API, non-streaming helpers) consumes it.

`stream_generate` runs the decode loop itself (no `model.generate`), so it can check its
request's cancel event between tokens, detokenize incrementally and stop on strings.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from . import kv
from .detok import IncrementalDetokenizer
from .params import GenerationParams
from .sampling import sample_next


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


def stream_generate(lm, prompt_ids: list[int], params: GenerationParams,
                    cancel: threading.Event | None = None) -> Iterator[Chunk]:
    """Generate a reply to `prompt_ids` with the loaded model `lm`, one `Chunk` per new text.

    The forward loop itself checks `cancel` before every token, so a stop costs at most one step.
    """
    check_prompt(len(prompt_ids), lm.context_length)
    budget = min(params.max_tokens, lm.context_length - len(prompt_ids))
    generator = None
    if not params.greedy:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little"))
    detok = IncrementalDetokenizer(lm.tokenizer)
    stops = StopMatcher(params.stop)
    started = time.perf_counter()
    first_token_at = None
    produced: list[int] = []
    reason, hit = "length", False
    model = lm.model
    with torch.inference_mode():
        cache = kv.new_cache()
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=lm.device)
        for _ in range(budget):
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
            out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
            history = torch.tensor(produced, dtype=torch.long) if params.repetition_penalty != 1.0 else None
            token = sample_next(out.logits[0, -1].to("cpu"), params, generator, history)
            if first_token_at is None:
                first_token_at = time.perf_counter()
            if token in lm.stop_token_ids:
                reason = "stop"
                break
            produced.append(token)
            text, hit = stops.feed(detok.add(token))
            if text:
                yield Chunk(text=text, completion_tokens=len(produced), prompt_tokens=len(prompt_ids))
            if hit:
                reason = "stop"
                break
            input_ids = torch.tensor([[token]], dtype=torch.long, device=lm.device)
    tail = ""
    if not hit:  # a stop string ends the text where it matched; otherwise emit what is held back
        tail, hit = stops.feed(detok.flush())
        tail += "" if hit else stops.flush()
    finished = time.perf_counter()
    decode_time = finished - (first_token_at or finished)
    yield Chunk(
        text=tail, completion_tokens=len(produced), prompt_tokens=len(prompt_ids), finish_reason=reason,
        timings={
            "ttft_s": (first_token_at or finished) - started,
            "total_s": finished - started,
            "tokens_per_second": (len(produced) - 1) / decode_time if len(produced) > 1 and decode_time > 0 else 0.0,
        },
    )
