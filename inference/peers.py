"""Local and remote models behind one small protocol: `stream`, `context_length`, `count_tokens`.

The engine turns whatever the model manager hands out (a `LoadedModel`, or a remote engine's
`ModelSpec`) into a peer once, in `peer_for`; nothing above asks which kind a model is.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

from .generate import Chunk, check_prompt, stream_generate
from .params import GenerationParams

REMOTE_CONTEXT = 8192  # assumed context of a remote engine, which does not tell us its own


@dataclass(frozen=True)
class FillIn:
    """A raw prompt with a hole: the model writes what goes between `prefix` and `suffix` (for code
    models with fill-in-the-middle tokens)."""

    prefix: str
    suffix: str


class FillInUnsupported(ValueError):
    """The model cannot fill a hole; `param` names the request field that asked for it."""

    param = "suffix"


def approx_tokens(text: str) -> int:
    """About four characters a token: for text no tokenizer of ours will see."""
    return (len(text) + 3) // 4


class Peer(Protocol):
    context_length: int

    def count_tokens(self, text: str) -> int: ...

    def prepare(self, messages: list[dict] | str | FillIn, tools=None) -> object:
        """Check and render `messages` (and the `ToolSet` offered, if any) before a generation slot is taken
        (raises `PromptTooLong`); a string is a raw prompt, given to the model as it is, without the chat
        template; a `FillIn`, a raw prompt with a hole (raises `FillInUnsupported` where the model has
        no fill-in-the-middle tokens)."""

    def stream(self, prepared: object, params: GenerationParams, cancel: threading.Event,
               session_id: str | None = None, on_done: Callable[[], None] | None = None) -> Iterator[Chunk]:
        """The reply's chunks; `on_done()` is called once the generation has stopped computing (where
        the peer can tell sooner than its consumer closing the stream)."""


class LocalPeer:
    """A loaded model: its chat format and tokenizer, and the decode loop that serves it."""

    def __init__(self, model, scheduler: Callable | None):
        self.model = model
        self.scheduler = scheduler  # the model's batch scheduler, or None to run each request alone
        self.context_length = model.context_length

    def count_tokens(self, text: str) -> int:
        return self.model.count_tokens(text)

    def prepare(self, messages: list[dict] | str | FillIn, tools=None) -> list[int]:
        if isinstance(messages, (str, FillIn)) and tools is not None:
            raise ValueError("tools: a raw prompt takes no tools")
        if isinstance(messages, str):  # a raw prompt: the tokenizer's own special tokens (BOS) and the text
            prompt_ids = self.model.tokenizer(messages, add_special_tokens=True)["input_ids"]
        elif isinstance(messages, FillIn):
            prompt_ids = self._fill_in(messages)
        elif tools is not None or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            from .tools import render_prompt

            prompt_ids = self.model.encode(render_prompt(self.model, messages, tools))
        else:
            prompt_ids = self.model.render_chat(messages)
        check_prompt(len(prompt_ids), self.context_length)
        return prompt_ids

    def _fill_in(self, hole: FillIn) -> list[int]:
        """`prefix {before} suffix {after} middle` by id (PSM order), the texts without special tokens,
        after the BOS token where the tokenizer starts every text with one."""
        fim = getattr(self.model, "fim", None)
        if fim is None:
            raise FillInUnsupported("suffix: this model has no fill-in-the-middle tokens in its vocabulary; "
                                    "use a code model that has them (Qwen2.5-Coder, StarCoder, CodeGemma...) "
                                    "or send the prompt without 'suffix'")
        start = self.model.tokenizer("", add_special_tokens=True)["input_ids"]
        return [*start, fim.prefix, *self.model.encode(hole.prefix), fim.suffix, *self.model.encode(hole.suffix),
                fim.middle]

    def stream(self, prompt_ids: list[int], params: GenerationParams, cancel: threading.Event,
               session_id: str | None = None, on_done: Callable[[], None] | None = None) -> Iterator[Chunk]:
        if self.scheduler is None:
            return stream_generate(self.model, prompt_ids, params, cancel, on_done=on_done)
        return self.scheduler().stream(prompt_ids, params, cancel, session_key=session_id, on_done=on_done)


class RemotePeer:
    """An OpenAI-compatible server: the messages go as they are; tokens are estimated."""

    context_length = REMOTE_CONTEXT

    def __init__(self, spec):
        self.spec = spec

    @staticmethod
    def count_tokens(text: str) -> int:
        return approx_tokens(text)

    def prepare(self, messages: list[dict] | str | FillIn, tools=None) -> list[dict]:
        if isinstance(messages, FillIn):
            raise FillInUnsupported(f"suffix: {self.spec.id} is a remote engine, which takes chat messages: "
                                    "fill-in-the-middle needs a local model")
        if isinstance(messages, str):
            raise ValueError(f"{self.spec.id} is a remote engine, which takes chat messages: a raw prompt "
                             "needs a local model")
        if tools is not None or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            raise ValueError("tools: tool calling is not passed on to remote engines yet")
        return messages

    def stream(self, messages: list[dict], params: GenerationParams, cancel: threading.Event,
               session_id: str | None = None, on_done: Callable[[], None] | None = None) -> Iterator[Chunk]:
        # on_done is not called: the remote generation stops when its consumer closes this stream
        from .remote import stream_remote

        return stream_remote(self.spec.remote, messages, params, cancel, name=self.spec.id)


def peer_for(model, scheduler: Callable | None) -> Peer:
    """The peer of what the model manager handed out: a remote engine's spec, or a loaded model."""
    if getattr(model, "remote", None) is not None:
        return RemotePeer(model)
    return LocalPeer(model, scheduler)
