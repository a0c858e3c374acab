"""Measurements through the running app: the engine alone, and the public `/v1` streaming path.

The app runs in this process as `python app.py` builds it (ChatService, create_app, uvicorn on a
daemon thread, a free loopback port); clients stream `/v1/chat/completions` with httpx and time
each server-sent event as it arrives.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from .stats import StreamTiming, median, summarize_concurrent

START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 900.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningApp:
    service: object  # inference.service.ChatService
    server: object  # uvicorn.Server
    thread: threading.Thread
    port: int

    @property
    def chat_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.service.close()


def start_app(config) -> RunningApp:
    """Build the service and app as `python app.py` does and serve it until /health answers."""
    import app as app_module
    from inference.service import ChatService

    service = ChatService(config)
    service.start()
    asgi = app_module.create_app(service)
    make_server = getattr(app_module, "make_server", None)
    if make_server is not None:
        server = make_server(asgi, "127.0.0.1", config.port)
    else:
        import uvicorn

        server = uvicorn.Server(uvicorn.Config(asgi, host="127.0.0.1", port=config.port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"bench-uvicorn-{config.port}", daemon=True)
    thread.start()
    running = RunningApp(service, server, thread, config.port)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{config.port}/health", timeout=5).status_code == 200:
                return running
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            running.stop()
            raise RuntimeError(f"the app did not answer /health on port {config.port}")
        time.sleep(0.05)


# ----- one stream -------------------------------------------------------------------------------
def stream_engine(service, model_id: str, messages: list[dict], max_tokens: int,
                  sampling: dict | None = None) -> StreamTiming:
    """One reply straight from `Engine.stream_chat`, timed per text delta: greedy unless `sampling`
    gives other settings (temperature, top_k, top_p, seed)."""
    from inference.params import GenerationParams

    params = GenerationParams.from_dict({"temperature": 0, **(sampling or {}), "max_tokens": max_tokens})
    with service.manager.use(model_id) as lm:
        timing = StreamTiming(started=time.perf_counter())
        for chunk in service.engine.stream_chat(lm, messages, params, threading.Event()):
            now = time.perf_counter()
            if chunk.text:
                timing.arrivals.append(now)
            if chunk.finish_reason is not None:
                timing.tokens = chunk.completion_tokens
        timing.finish()
    return timing


def stream_v1(client: httpx.Client, url: str, model_id: str, messages: list[dict], max_tokens: int,
              session_id: str | None = None) -> StreamTiming:
    """One greedy streamed reply through `/v1/chat/completions`, timed per SSE content event."""
    body = {"model": model_id, "messages": messages, "stream": True, "max_tokens": max_tokens,
            "temperature": 0, "stream_options": {"include_usage": True}}
    headers = {"X-Session-Id": session_id} if session_id else {}
    timing = StreamTiming(started=time.perf_counter())
    try:
        with client.stream("POST", url, json=body, headers=headers, timeout=REQUEST_TIMEOUT_S) as response:
            if response.status_code != 200:
                timing.error = f"HTTP {response.status_code}: {response.read().decode(errors='replace')[:200]}"
                return timing
            for line in response.iter_lines():
                now = time.perf_counter()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                payload = json.loads(line[len("data: "):])
                if "error" in payload:
                    timing.error = str(payload["error"].get("message"))
                    break
                if payload.get("usage"):
                    timing.tokens = payload["usage"]["completion_tokens"]
                if any(choice.get("delta", {}).get("content") for choice in payload.get("choices", [])):
                    timing.arrivals.append(now)
    except httpx.HTTPError as error:
        timing.error = f"{type(error).__name__}: {error}"
    timing.finish()
    if not timing.tokens:
        timing.tokens = len(timing.arrivals)
    return timing


# ----- concurrency --------------------------------------------------------------------------------
def run_concurrent(url: str, model_id: str, prompts: list[str], sessions: int, max_tokens: int) -> dict:
    """`sessions` clients, each its own prompt and connection, released together."""
    barrier = threading.Barrier(sessions)
    results: list[StreamTiming | None] = [None] * sessions

    def client(index: int) -> None:
        messages = [{"role": "user", "content": prompts[index % len(prompts)]}]
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
            barrier.wait()
            results[index] = stream_v1(http, url, model_id, messages, max_tokens)

    threads = [threading.Thread(target=client, args=(i,), name=f"bench-client-{i}") for i in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarize_concurrent([r for r in results if r is not None])


# ----- follow-up turn with long history --------------------------------------------------------------
WORDS = ("river mountain lantern harvest engine garden window silver market letter winter village compass "
         "orchard bridge candle thunder meadow harbor library journey kettle forest signal morning quiet "
         "painter captain station shadow ribbon valley copper whistle pocket island ladder velvet").split()


def filler(rng: random.Random, tokens: int) -> str:
    """Plain sentences of roughly `tokens` tokens (about 1.3 tokens a word for this vocabulary)."""
    words = []
    for _ in range(max(4, int(tokens / 1.3))):
        words.append(rng.choice(WORDS))
        if rng.random() < 0.12:
            words[-1] += "."
    return " ".join(words).capitalize() + "."


def fill_history(service, owner: str, session_id: str, model_id: str, history_tokens: int) -> int:
    """Store user/assistant turns until the session's history holds about `history_tokens` tokens."""
    rng = random.Random(1234)
    with service.manager.use(model_id) as lm:
        count = lm.count_tokens
        total = 0
        while total < history_tokens:
            question = filler(rng, 120)
            answer = filler(rng, min(380, max(16, history_tokens - total - 130)))
            service.store.add_message(owner, session_id, "user", question)
            service.store.add_message(owner, session_id, "assistant", answer, model_id=model_id)
            total += count(question) + count(answer)
    return total


FOLLOWUP_QUESTIONS = ["Summarize what we discussed in one sentence.", "Which word came up most often?",
                      "Name three places from our conversation.", "Say it again, shorter."]


def followup_ttft(running: RunningApp, model_id: str, history_tokens: int, followups: int,
                  seed_messages: list[dict] | None = None) -> dict:
    """TTFT of follow-up turns in a session holding ~`history_tokens` tokens.

    Without `seed_messages`: fill the history, answer a first turn through /v1 (which leaves the
    session's KV in the prefix cache, if there is one), then time `followups` more turns. With them:
    store exactly those messages (another run's history and first turn) and time the follow-ups only,
    so both runs time the same prompts without paying for the first turn twice.
    """
    from sessions import LOCAL_USER

    service = running.service
    session_id = service.new_session(LOCAL_USER, "bench follow-up", model_id)["id"]
    first = None
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
        def ask(question: str) -> StreamTiming:
            return stream_v1(http, running.chat_url, model_id, [{"role": "user", "content": question}],
                             max_tokens=8, session_id=session_id)

        if seed_messages is None:
            stored = fill_history(service, LOCAL_USER, session_id, model_id, history_tokens)
            first = ask(FOLLOWUP_QUESTIONS[0])
        else:
            stored = None
            for message in seed_messages:
                service.store.add_message(LOCAL_USER, session_id, message["role"], message["content"])
        seed = [{"role": m["role"], "content": m["content"]} for m in service.store.messages(LOCAL_USER, session_id)
                if m["role"] in ("user", "assistant")]
        turns = [ask(question) for question in FOLLOWUP_QUESTIONS[1: followups + 1]]
    errors = [t.error for t in [first, *turns] if t is not None and t.error]
    return {"history_tokens": stored, "first_turn_ttft_s": first.ttft if first else None,
            "followup_ttft_s": median([t.ttft for t in turns]),
            "followup_ttfts_s": [round(t.ttft, 4) if t.ttft is not None else None for t in turns],
            "errors": errors, "seed_messages": seed}


# ----- hot swap -----------------------------------------------------------------------------------
def add_model_copy(models_dir: Path, source: Path, stem: str) -> str:
    """A second catalog entry for the same weights: `<stem>.gguf` in the models folder; returns its id."""
    from models.catalog import slug

    target = models_dir / f"{stem}.gguf"
    if not target.exists():
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    return slug(stem)


def hot_swap(running: RunningApp, from_id: str, to_id: str) -> dict:
    """Unload `from_id`, then time the first streamed token from `to_id` (its converted cache warm)."""
    service = running.service
    service.load_model(to_id)  # once, untimed: hashes the new file and warms the page cache
    service.unload_model(to_id)
    service.load_model(from_id)
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
        started = time.perf_counter()
        service.unload_model(from_id)
        unloaded = time.perf_counter()
        timing = stream_v1(http, running.chat_url, to_id, [{"role": "user", "content": "Say hello."}], max_tokens=4)
    timing.started = started
    return {"hot_swap_s": timing.ttft, "unload_s": unloaded - started, "error": timing.error}
