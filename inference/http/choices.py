"""Several choices in one reply (OpenAI's `n`, or a list of prompts on `/v1/completions`): each choice is a
generation of its own, started together with the others (the batch scheduler runs them as rows of one
batch), and answered through the one-choice code; this module starts them and merges what they give.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Awaitable

from fastapi.responses import JSONResponse

DONE = b"data: [DONE]\n\n"


async def start_together(starts: list[Awaitable]) -> list:
    """Await every `streams.start_generation(...)` together: their `(chunks, first)` pairs in order. If any
    fails, the others are closed and its error is raised."""
    results = await asyncio.gather(*starts, return_exceptions=True)
    errors = [result for result in results if isinstance(result, BaseException)]
    if errors:
        for result in results:
            if not isinstance(result, BaseException):
                result[0].close_soon()
        raise errors[0]
    return results


def merge_replies(replies: list, distinct_prompts: bool = False):
    """One reply from each choice's whole reply (or the first error response among them): the choices
    indexed 0..n-1, completion tokens summed, and the prompt tokens once (summed for distinct prompts)."""
    failed = next((reply for reply in replies if isinstance(reply, JSONResponse)), None)
    if failed is not None:
        return failed
    merged = replies[0]
    merged["choices"] = [{**reply["choices"][0], "index": index} for index, reply in enumerate(replies)]
    prompt = sum(r["usage"]["prompt_tokens"] for r in replies) if distinct_prompts else merged["usage"]["prompt_tokens"]
    completion = sum(reply["usage"]["completion_tokens"] for reply in replies)
    merged["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return merged


async def merge_events(streams: list[AsyncIterator[bytes]], include_usage: bool,
                       distinct_prompts: bool = False) -> AsyncIterator[bytes]:
    """Interleave the choices' event streams (each asked for its usage) as their events come, each chunk
    carrying its choice's index; one usage event and one `[DONE]` at the end. An error event from any
    choice ends the whole stream."""
    pending = {asyncio.ensure_future(anext(stream)): index for index, stream in enumerate(streams)}
    usage, meta = {"prompt_tokens": 0, "completion_tokens": 0}, {}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.get):
                index = pending.pop(task)
                try:
                    event = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[index]))] = index
                if event == DONE:
                    continue
                payload = json.loads(event[len(b"data: "):])
                if "error" in payload:
                    yield event
                    yield DONE
                    return
                if payload.get("usage") is not None:
                    prompt = payload["usage"]["prompt_tokens"]
                    usage["prompt_tokens"] = usage["prompt_tokens"] + prompt if distinct_prompts else prompt
                    usage["completion_tokens"] += payload["usage"]["completion_tokens"]
                    continue
                meta = {key: payload[key] for key in ("id", "object", "created", "model") if key in payload}
                for choice in payload["choices"]:
                    choice["index"] = index
                yield f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()
        if include_usage:
            total = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
            yield f"data: {json.dumps({**meta, 'choices': [], 'usage': total})}\n\n".encode()
        yield DONE
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)  # a generator is closed only once it is not running
        for stream in streams:
            await stream.aclose()
