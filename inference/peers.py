"""Local and remote models behind one small protocol: `stream`, `context_length`, `count_tokens`.

The engine turns whatever the model manager hands out (a `LoadedModel`, or a remote engine's
`ModelSpec`) into a peer once, in `peer_for`; nothing above asks which kind a model is.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator, Protocol

from .generate import Chunk, check_prompt, stream_generate
from .params import GenerationParams

REMOTE_CONTEXT = 8192  # assumed context of a remote engine, which does not tell us its own


def approx_tokens(text: str) -> int:
    """About four characters a token: for text no tokenizer of ours will see."""
    return (len(text) + 3) // 4


class Peer(Protocol):
    context_length: int

    def count_tokens(self, text: str) -> int: ...

    def prepare(self, messages: list[dict] | str, tools=None) -> object:
        """Check and render `messages` (and the `ToolSet` offered, if any) before a generation slot is taken
        (raises `PromptTooLong`); a string is a raw prompt, given to the model as it is, without the chat
        template."""

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

    def prepare(self, messages: list[dict] | str, tools=None) -> list[int]:
        if isinstance(messages, str):  # a raw prompt: the tokenizer's own special tokens (BOS) and the text
            if tools is not None:
                raise ValueError("tools: a raw prompt takes no tools")
            prompt_ids = self.model.tokenizer(messages, add_special_tokens=True)["input_ids"]
        elif tools is not None or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            from .tools import render_prompt

            prompt_ids = self.model.encode(render_prompt(self.model, messages, tools))
        else:
            prompt_ids = self.model.render_chat(messages)
        check_prompt(len(prompt_ids), self.context_length)
        return prompt_ids

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

    def prepare(self, messages: list[dict] | str, tools=None) -> list[dict]:
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
