"""OpenAI's legacy text completions, `POST /v1/completions`: a raw prompt continued, no chat format; a
list of prompts gives one choice per prompt, generated together (`choices`).

The same key check, body limit, admission, disconnect watch and error shapes as chat (`openai`,
`streams`); only the request's fields and the response's shape differ. Logprobs come in the legacy
form: `tokens`, `token_logprobs`, `top_logprobs` (a {token: logprob} object per token) and
`text_offset` (each token's first character in the choice's text).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..params import MAX_TOP_LOGPROBS, GenerationParams, InvalidParams
from ..peers import FillIn
from .openai import APIError, _as_api_error, _finish, _include_usage, _read_json, _read_reply
from .choices import merge_events, merge_replies, start_together
from .streams import ChunkSource, Disconnected, EventStream, next_or_disconnect, start_generation

log = logging.getLogger(__name__)

_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "repetition_penalty",
                    "presence_penalty", "frequency_penalty")
_OTHER_FIELDS = {"model", "prompt", "stream", "stream_options", "echo", "logprobs", "n", "best_of", "suffix",
                 "logit_bias", "user"}
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this route


def add_completions_route(router: APIRouter, service, workers, check_key) -> None:
    config = service.config

    @router.post("/v1/completions")
    async def completions(request: Request):
        try:
            check_key(request)
            body = await _read_json(request)
            model_id, prompts, params, stream, echo, suffix = parse_completion_request(body, config.max_tokens_limit)
            if len(prompts) > config.max_concurrent_generations:
                raise APIError(400, f"'prompt': at most {config.max_concurrent_generations} prompts in one "
                                    f"request on this server (one per generation slot)", param="prompt")
            longest = max(len(prompt) for prompt in prompts) + len(suffix)
            if longest > config.max_prompt_chars:
                raise APIError(400, f"the prompt is {longest:,} characters; the limit is "
                                    f"{config.max_prompt_chars:,}", param="prompt")
            include_usage = _include_usage(body)
            if request.headers.get("x-session-id"):
                raise APIError(400, "/v1/completions continues a raw prompt and is not bound to sessions; "
                                    "send X-Session-Id to /v1/chat/completions", param="X-Session-Id")
            # a string for messages: a raw prompt, without the chat template (streams.open_stream); with a
            # suffix, a hole to fill between the prompt and the suffix (the peer refuses it without FIM tokens)
            raw = [FillIn(prompt, suffix) if suffix else prompt for prompt in prompts]
            started = await start_together([start_generation(request, service, model_id, prompt, params, None, "",
                                                             workers) for prompt in raw])
        except Disconnected:
            return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)
        except Exception as error:
            return _as_api_error(error).response()
        completion_id, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        replies = [_Reply(completion_id, created, model_id, prompt if echo else "", params.logprobs)
                   for prompt in prompts]
        if len(prompts) == 1:
            (chunks, first), = started
            if stream:
                return EventStream(_sse_events(request, chunks, first, replies[0], include_usage),
                                   on_close=chunks.close_soon)
            return await _collect(request, chunks, first, replies[0])
        if stream:  # one choice per prompt, merged as chat merges its n choices
            streams = [_sse_events(request, chunks, first, reply, True) for (chunks, first), reply in zip(started, replies)]
            return EventStream(merge_events(streams, include_usage, distinct_prompts=True),
                               on_close=lambda: [chunks.close_soon() for chunks, _ in started])
        return merge_replies(await asyncio.gather(*(_collect(request, chunks, first, reply)
                                                    for (chunks, first), reply in zip(started, replies))),
                             distinct_prompts=True)


def parse_completion_request(body: dict, max_tokens_limit: int
                             ) -> tuple[str, list[str], GenerationParams, bool, bool, str]:
    """(model id, prompts, parameters, stream, echo, suffix) from a /v1/completions body; a 400 naming the
    field for anything it cannot honour. Whether the model can fill a hole (`suffix`) is the peer's to say."""
    model_id = body.get("model")
    if not isinstance(model_id, str) or not model_id:
        raise APIError(400, "'model' is required and must be a string", param="model")
    suffix = "" if body.get("suffix") is None else body["suffix"]
    if not isinstance(suffix, str):
        raise APIError(400, "'suffix' must be a string", param="suffix")
    prompts = _prompts(body.get("prompt"), may_be_empty=bool(suffix))
    unknown = sorted(set(body) - set(_SAMPLING_FIELDS) - _OTHER_FIELDS)
    if unknown:
        log.info("ignoring unsupported fields: %s", ", ".join(unknown))
    for field, neutral in (("n", (None, 1)), ("best_of", (None, 1)), ("logit_bias", (None, {}))):
        if body.get(field) not in neutral:
            raise APIError(400, f"'{field}' is not supported by this server on /v1/completions; send it without "
                                f"this field (README lists the fields honoured)", param=field)
    echo, stream = body.get("echo", False), body.get("stream", False)
    for field, value in (("echo", echo), ("stream", stream)):
        if not isinstance(value, bool):
            raise APIError(400, f"'{field}' must be true or false", param=field)
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise APIError(400, f"'logprobs' must be a whole number from 0 to {MAX_TOP_LOGPROBS}", param="logprobs")
    if echo and suffix:
        raise APIError(400, "'echo' with 'suffix' is not supported: the completion is the text between the prompt "
                            "and the suffix; ask for one of them", param="echo")
    if echo and logprobs is not None:
        raise APIError(400, "'echo' with 'logprobs' would need the prompt's logprobs, which this server does "
                            "not compute; ask for one of them", param="echo")
    sampling = {name: body[name] for name in _SAMPLING_FIELDS if body.get(name) is not None}
    sampling = {"max_tokens": DEFAULT_MAX_TOKENS, "temperature": 1.0, "top_p": 1.0, "top_k": 0, **sampling,
                "logprobs": logprobs}
    try:
        params = GenerationParams.from_dict(sampling, max_tokens_limit=max_tokens_limit)
    except (InvalidParams, TypeError) as error:
        raise APIError(400, str(error), param=str(error).split(":")[0]) from None
    return model_id, prompts, params, stream, echo, suffix


def _prompts(prompt, may_be_empty: bool = False) -> list[str]:
    """The text prompts: a string, or a list of strings (one choice each); `may_be_empty` with a suffix,
    where an empty prompt is a hole at the start of the text."""
    prompts = prompt if isinstance(prompt, list) else [prompt]
    if not prompts or not all(isinstance(item, str) and (item or may_be_empty) for item in prompts):
        raise APIError(400, "'prompt' must be a non-empty string or a list of them (token-id prompts are not "
                            "supported)", param="prompt")
    return prompts


class _Reply:
    """One completion's identity and its legacy logprobs, kept as its chunks arrive."""

    def __init__(self, completion_id: str, created: int, model_id: str, echoed: str, logprobs: int | None):
        self.id, self.created, self.model, self.echoed = completion_id, created, model_id, echoed
        self.wants_logprobs = logprobs is not None
        self._chars = len(echoed)  # whole characters so far in the choice's text (text_offset's count)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def logprobs(self, chunk) -> dict | None:
        """The chunk's tokens in the legacy logprobs shape; None when the request did not ask."""
        if not self.wants_logprobs:
            return None
        part = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry in getattr(chunk, "logprobs", None) or []:
            part["tokens"].append(entry.token)
            part["token_logprobs"].append(entry.logprob)
            part["top_logprobs"].append({alt.token: alt.logprob for alt in entry.top})
            part["text_offset"].append(self._offset(bytes(entry.bytes)))
        return part

    def _offset(self, raw: bytes) -> int:
        """Where a token with bytes `raw` starts in the text: a token that completes a character starts
        where that character does; bytes that turn out not to be UTF-8 count as the U+FFFD they show as."""
        held = self._utf8.getstate()[0]
        out = self._utf8.decode(raw)
        invalidated = bool(held) and out.startswith("\ufffd")
        start = self._chars + (len(held.decode("utf-8", "replace")) if invalidated else 0)
        self._chars += len(out)
        return start

    def payload(self, text: str, finish: str | None, logprobs: dict | None) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}]}


def _usage(chunk) -> dict:
    prompt, completion = getattr(chunk, "prompt_tokens", 0), getattr(chunk, "completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _sse_events(request: Request, source: ChunkSource, first, reply: _Reply,
                      include_usage: bool) -> AsyncIterator[bytes]:
    """The completion as server-sent events; `EventStream` closes `source` however this ends."""
    def event(payload: dict) -> bytes:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

    chunk = first
    try:
        if reply.echoed:
            yield event(reply.payload(reply.echoed, None, None))
        while chunk is not None:
            finish = _finish(chunk) if chunk.finish_reason is not None else None
            if chunk.text or chunk.logprobs or finish:
                yield event(reply.payload(chunk.text, finish, reply.logprobs(chunk)))
            if finish:
                if include_usage:
                    yield event({**reply.payload("", None, None), "choices": [], "usage": _usage(chunk)})
                break
            chunk = await next_or_disconnect(request, source)
        yield b"data: [DONE]\n\n"
    except Disconnected:
        log.info("client went away; completion %s cancelled", reply.id)
    except Exception as error:
        api_error = _as_api_error(error)
        yield event({"error": {"message": api_error.message, "type": api_error.kind, "code": api_error.code}})
        yield b"data: [DONE]\n\n"


async def _collect(request: Request, source: ChunkSource, first, reply: _Reply):
    chunks: list = []
    failed = await _read_reply(request, source, first, chunks.append)
    if failed is not None:
        return failed
    text, last = reply.echoed + "".join(chunk.text for chunk in chunks), chunks[-1] if chunks else None
    logprobs = reply.logprobs(None) if reply.wants_logprobs else None
    for chunk in chunks if logprobs is not None else ():
        for key, values in reply.logprobs(chunk).items():
            logprobs[key] += values
    return {**reply.payload(text, _finish(last) if last else "stop", logprobs), "usage": _usage(last)}
