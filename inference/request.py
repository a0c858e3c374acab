"""One generation request as the decode loop sees it: everything that is per request, in one object.

Parameters, the random generator, the token budget, the incremental detokenizer, the stop-string
matcher, what has been produced and fed, and the timings. The decode loop (inference/batcher.py)
hands it each sampled token (`accept`) and ends it once (`finish`); the request turns those into
the `Chunk`s its caller streams.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .detok import IncrementalDetokenizer
from .generate import Chunk, StopMatcher, check_prompt
from .grammar import Constraint, GrammarError, constraint_for, request_grammar
from .logprobs import TokenLogprob, TokenTexts
from .params import GenerationParams
from .sampling import token_logprobs


@dataclass
class Request:
    prompt_ids: list[int]
    params: GenerationParams
    cancel: threading.Event
    session_key: str | None
    budget: int  # tokens it may produce: max_tokens, or what the context window leaves
    detok: IncrementalDetokenizer
    stops: StopMatcher
    stop_token_ids: frozenset[int]
    generator: torch.Generator | None = None  # None for greedy decoding
    out: queue.Queue = field(default_factory=queue.Queue)  # Chunks, or the exception that ended the loop
    produced: list[int] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)  # tokens whose KV is in the cache
    started: float = field(default_factory=time.perf_counter)
    first_at: float | None = None
    reused: int = 0  # prompt tokens whose KV came from the session's prefix cache
    report_cache: bool = False  # whether the last chunk's timings say `cached_prompt_tokens`
    finished: bool = False
    on_done: Callable[[], None] | None = None  # called once, on the decode loop, when the request ends
    token_texts: TokenTexts | None = None  # set when the request asks for logprobs
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet sent with a chunk
    grammar: Constraint | None = None  # constrained decoding (response_format, forced tool calls)

    @classmethod
    def create(cls, lm, prompt_ids: list[int], params: GenerationParams, cancel: threading.Event,
               session_key: str | None = None, on_done: Callable[[], None] | None = None) -> "Request":
        """A request for the loaded model `lm`; raises `PromptTooLong` if no reply fits its context."""
        check_prompt(len(prompt_ids), lm.context_length)
        generator = None
        if not params.greedy:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little"))
        token_texts = None
        if params.logprobs is not None:  # one table per model, filled as tokens come up
            token_texts = lm.runtime.setdefault("token_texts", TokenTexts(lm.tokenizer))
        source = request_grammar(params, lm)
        grammar = constraint_for(lm, source) if source else None
        return cls(list(prompt_ids), params, cancel, session_key,
                   budget=min(params.max_tokens, lm.context_length - len(prompt_ids)),
                   detok=IncrementalDetokenizer(lm.tokenizer), stops=StopMatcher(params.stop),
                   stop_token_ids=lm.stop_token_ids, generator=generator, on_done=on_done,
                   token_texts=token_texts, grammar=grammar)

    @property
    def history(self) -> torch.Tensor | None:
        """The produced tokens, when a penalty needs them."""
        return torch.tensor(self.produced, dtype=torch.long) if self.params.penalised else None

    def allowed(self, vocab_size: int) -> torch.Tensor | None:
        """The tokens the grammar allows next (a boolean mask), or None when the reply is free text."""
        return self.grammar.allowed(vocab_size) if self.grammar is not None else None

    def accept(self, token: int, logits: torch.Tensor | None = None) -> bool:
        """Take the next sampled token (drawn from `logits`, which a request asking for logprobs
        needs) and stream its text; True once the request is finished."""
        if self.first_at is None:
            self.first_at = time.perf_counter()
        if token in self.stop_token_ids:
            self.finish("stop")
            return True
        self.produced.append(token)
        if self.token_texts is not None and logits is not None:
            self.pending_logprobs.append(self._logprob_of(token, logits))
        text, hit = self.stops.feed(self.detok.add(token))
        if text:
            self.out.put(Chunk(text=text, completion_tokens=len(self.produced), prompt_tokens=len(self.prompt_ids),
                               logprobs=self._take_logprobs()))
        if hit:
            self.finish("stop", stopped_by_string=True)
            return True
        if self.grammar is not None and self._advance_grammar(token):
            return True
        if len(self.produced) >= self.budget:
            self.finish("length")
            return True
        return False

    def _advance_grammar(self, token: int) -> bool:
        """Feed the token to the grammar; True once that ended the request: the grammar is complete (finish
        reason "stop"), or the matcher failed (the request fails, the rest of the batch carries on)."""
        try:
            complete = self.grammar.advance(token)
        except GrammarError as error:
            self.fail(error)
            return True
        if complete:
            self.finish("stop")
        return complete

    def finish(self, reason: str, stopped_by_string: bool = False) -> None:
        """Stream the held-back text and the last chunk: finish reason, token counts and timings."""
        tail = ""
        if not stopped_by_string:  # a stop string ends the text where it matched; else flush what is held
            tail, hit = self.stops.feed(self.detok.flush())
            tail += "" if hit else self.stops.flush()
        now = time.perf_counter()
        produced = len(self.produced)
        decode = now - (self.first_at or now)
        timings = {"ttft_s": (self.first_at or now) - self.started, "total_s": now - self.started,
                   "tokens_per_second": (produced - 1) / decode if produced > 1 and decode > 0 else 0.0}
        if self.report_cache:
            timings["cached_prompt_tokens"] = self.reused
        self.finished = True
        self.out.put(Chunk(text=tail, completion_tokens=produced, prompt_tokens=len(self.prompt_ids),
                           finish_reason=reason, timings=timings, logprobs=self._take_logprobs()))
        self._done()

    def _logprob_of(self, token: int, logits: torch.Tensor) -> TokenLogprob:
        chosen, top = token_logprobs(logits, token, self.params.logprobs)
        return TokenLogprob(*self.token_texts(token), chosen,
                            [TokenLogprob(*self.token_texts(alt), value) for alt, value in top])

    def _take_logprobs(self) -> list[TokenLogprob] | None:
        """The logprobs of the tokens since the last chunk (None when the request did not ask)."""
        if self.token_texts is None:
            return None
        taken, self.pending_logprobs = self.pending_logprobs, []
        return taken

    def fail(self, error: BaseException) -> None:
        """End the request with `error`, which its caller's stream raises."""
        self.finished = True
        self.out.put(error)
        self._done()

    def _done(self) -> None:
        """Tell the owner (the admission gate) that nothing more is computed for this request: its
        slot is free, whether or not its consumer is still reading the queued chunks."""
        done, self.on_done = self.on_done, None
        if done is not None:
            done()
