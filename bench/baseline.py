"""The baseline: plain transformers `generate()` on the same weights, bfloat16, batch 1, greedy.

It loads our converted checkpoint folder (the GGUF dequantized once, the same weights the app
serves) with `AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)`, and times
`generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)` token by token with a streamer.

`generate()` runs on a worker thread, as transformers' own streaming recipe does
(`Thread(target=model.generate, kwargs=dict(streamer=...))`) and as our engine's decode loop does:
on a busy 2-core machine torch called from the main thread with two OpenMP threads spins and ran
2-8x slower and far less steadily than the same call from a worker thread, which would have
flattered the engine for a reason that has nothing to do with it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from .stats import StreamTiming


class _TokenClock(BaseStreamer):
    """Records when each generated token comes out of `generate()` (the first `put` is the prompt)."""

    def __init__(self, timing: StreamTiming):
        self.timing = timing
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.timing.arrivals.append(time.perf_counter())
        self.timing.tokens += int(value.numel())

    def end(self) -> None:
        self.timing.finish()


class Baseline:
    def __init__(self, checkpoint: Path, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).to(self.device).eval()

    def generate(self, prompt_ids: list[int], tokens: int) -> StreamTiming:
        """Greedy decode of exactly `tokens` new tokens, timed per token."""
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens,
                      min_new_tokens=tokens, do_sample=False)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs, streamer=_TokenClock(timing))
            except BaseException as error:  # reported on the timing, like a failed request
                failure.append(error)

        timing = StreamTiming(started=time.perf_counter())
        worker = threading.Thread(target=run, name="baseline-generate")
        worker.start()
        worker.join()
        if failure:
            timing.error = f"{type(failure[0]).__name__}: {failure[0]}"
            timing.finish()
        return timing

    def close(self) -> None:
        self.model = None
