"""More clients than the engine runs or queues (issue 14): nobody starves, every request ends with its
reply or a clean 429/503, clients that leave give their place and slot back at once, and afterwards
the engine holds no thread, slot or KV cache and serves the next request at once.

14 concurrent /v1 requests used to stop all generation: requests waiting for a slot held every thread
of the shared pool, so the running ones could not deliver their next token or finish. And a stream
whose client hung up gave its slot back only when the garbage collector got round to its generator.
"""

from __future__ import annotations

import gc
import json
import threading
import time

import httpx
import pytest
from gradio_client import Client

from app_harness import app_config, counted_forwards, gradio_call, running_app, wait_until
from inference.engine import AdmissionGate, Busy, Cancelled
from sessions import LOCAL_USER

MODEL = "tiny-qwen2"
RUNNING, QUEUED = 2, 4


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models, model_cache):
    config = app_config(tmp_path_factory.mktemp("overload"), tiny_models, model_cache,
                        max_concurrent_generations=RUNNING, max_queue=QUEUED, max_tokens_limit=4000)
    with running_app(config) as running:
        running.service.load_model(MODEL)
        yield running


@pytest.fixture(scope="module")
def deep_app(tmp_path_factory, tiny_models, model_cache):
    """A long queue: more waiting requests than any thread pool the server has."""
    config = app_config(tmp_path_factory.mktemp("overload-deep"), tiny_models, model_cache,
                        max_concurrent_generations=4, max_queue=32)
    with running_app(config) as running:
        running.service.load_model(MODEL)
        yield running


def body(index: int, stream: bool, max_tokens: int = 8) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"client {index}"}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}


def ask(url: str, index: int, stream: bool, results: dict, timeout: float = 60) -> None:
    """results[index] = ("ok", text) for a whole reply, ("busy", status) for a clean refusal, else ("failed", why)."""
    try:
        response = httpx.post(f"{url}/chat/completions", json=body(index, stream), timeout=timeout)
    except httpx.HTTPError as error:
        results[index] = ("failed", repr(error))
        return
    if response.status_code in (429, 503):
        error = response.json()["error"]
        clean = error["message"] and error["type"] and int(response.headers["retry-after"]) > 0
        results[index] = ("busy", response.status_code) if clean else ("failed", response.text)
    elif response.status_code != 200:
        results[index] = ("failed", f"{response.status_code} {response.text[:200]}")
    elif stream:
        events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
        finishes = [e["choices"][0]["finish_reason"] for e in events if e.get("choices")]
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
        whole = response.text.rstrip().endswith("data: [DONE]") and finishes[-1] in ("stop", "length")
        results[index] = ("ok", text) if whole else ("failed", response.text[-200:])
    else:
        choice = response.json()["choices"][0]
        whole = choice["finish_reason"] in ("stop", "length")
        results[index] = ("ok", choice["message"]["content"]) if whole else ("failed", response.text[:200])


def leave_early(url: str, index: int, results: dict, patience_s: float) -> None:
    """Sends a request and hangs up after `patience_s` without an answer (typically while queued)."""
    try:
        response = httpx.post(f"{url}/chat/completions", json=body(index, index % 2 == 0, max_tokens=4000),
                              timeout=httpx.Timeout(patience_s, connect=10))
        results[index] = ("answered", response.status_code)
    except httpx.TimeoutException:
        results[index] = ("left", None)


def threads_named(prefix: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith(prefix)]


def assert_nothing_left_behind(app) -> None:
    """No slot, no queued request, no decode loop (its thread and its batch KV) once the requests ended."""
    engine = app.service.engine
    wait_until(lambda: engine.idle, timeout=5, what="the engine to drain")
    assert threads_named("decode-loop") == []


def run_all(threads: list[threading.Thread], limit_s: float) -> None:
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + limit_s
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), f"a client had no answer after {limit_s:.0f} s"


# ----- the whole app ----------------------------------------------------------------------------------------
def test_three_times_capacity_at_once_every_request_ends_cleanly(app):
    """3 x (running + queued) clients, streaming and not, plus a batch that hangs up while queued."""
    clients = 3 * (RUNNING + QUEUED)
    results: dict = {}
    with counted_forwards(app.service, MODEL, delay_s=0.02):  # slow enough that the queue fills
        threads = [threading.Thread(target=ask, args=(app.v1, i, i % 2 == 0, results)) for i in range(clients)]
        threads += [threading.Thread(target=leave_early, args=(app.v1, clients + i, results, 0.5))
                    for i in range(QUEUED)]
        run_all(threads, limit_s=90)
    answers = [results[i] for i in range(clients)]
    assert [kind for kind, _ in answers if kind not in ("ok", "busy")] == [], answers
    assert sum(kind == "ok" for kind, _ in answers) >= RUNNING, answers
    assert all(text for kind, text in answers if kind == "ok")
    assert {kind for kind, _ in (results[clients + i] for i in range(QUEUED))} <= {"left", "answered"}
    assert_nothing_left_behind(app)
    ask(app.v1, 999, False, results, timeout=30)  # the next request is served: no leftover holds a slot
    assert results[999][0] == "ok", results[999]
    assert_nothing_left_behind(app)


def chat_in_gradio(url: str, index, session_id: str, results: dict) -> None:
    """results[index] = ("ok", text) for a whole reply through the Gradio API's /chat, ("busy", message) for
    a clean refusal, else ("failed", why)."""
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            event, value = gradio_call(http, "chat", session_id, f"client {index}", MODEL,
                                       '{"max_tokens": 8, "temperature": 0}')
    except httpx.HTTPError as error:
        results[index] = ("failed", repr(error))
        return
    if event == "complete" and value:
        results[index] = ("ok", value)
    elif event == "error" and "busy" in str(value).lower():
        results[index] = ("busy", value)
    else:
        results[index] = ("failed", f"{event} {value}")


def test_gradio_chats_and_v1_clients_at_three_times_capacity_share_one_queue(app):
    """The same burst with a third of the clients on the Gradio API's /chat: every request of either API
    ends with its reply or a clean busy within the bound, and afterwards both APIs answer at once."""
    clients = 3 * (RUNNING + QUEUED)
    sessions = [app.service.new_session(LOCAL_USER, title=f"burst {i}")["id"] for i in range(clients // 3 + 1)]
    results: dict = {}
    with counted_forwards(app.service, MODEL, delay_s=0.02):
        threads = [threading.Thread(target=ask, args=(app.v1, i, i % 2 == 0, results))
                   for i in range(clients - clients // 3)]
        threads += [threading.Thread(target=chat_in_gradio, args=(app.url, ("gradio", i), sessions[i], results))
                    for i in range(clients // 3)]
        threads += [threading.Thread(target=leave_early, args=(app.v1, clients + i, results, 0.5))
                    for i in range(QUEUED)]
        run_all(threads, limit_s=120)
    answers = {key: value for key, value in results.items() if not (isinstance(key, int) and key >= clients)}
    assert len(answers) == clients
    assert [value for value in answers.values() if value[0] not in ("ok", "busy")] == [], answers
    # Gradio's clients reach the gate after its own queue, so all of them may find it full: each must
    # still have its answer (a reply or a clean busy), which the line above checks, and be served after.
    assert sum(isinstance(key, tuple) for key in answers) == clients // 3
    assert_nothing_left_behind(app)
    started = time.monotonic()
    ask(app.v1, 1000, True, results, timeout=30)
    chat_in_gradio(app.url, 1001, sessions[-1], results)
    assert (results[1000][0], results[1001][0]) == ("ok", "ok"), (results[1000], results[1001])
    assert time.monotonic() - started < 20  # served at once, not after some leftover times out
    assert_nothing_left_behind(app)


def test_clients_leaving_the_queue_give_their_place_up_at_once(app):
    gate = app.service.engine.gate
    holding = body(0, True, max_tokens=4000)
    with counted_forwards(app.service, MODEL, delay_s=0.05):
        holders = [httpx.stream("POST", f"{app.v1}/chat/completions", json=holding, timeout=60)
                   for _ in range(RUNNING)]
        responses = [holder.__enter__() for holder in holders]
        try:
            wait_until(lambda: gate.running == RUNNING, what="every slot to be taken")
            results: dict = {}
            leavers = [threading.Thread(target=leave_early, args=(app.v1, i, results, 1.5)) for i in range(QUEUED)]
            for thread in leavers:
                thread.start()
            wait_until(lambda: gate.waiting == QUEUED, what="the queue to fill")
            full = httpx.post(f"{app.v1}/chat/completions", json=body(9, False), timeout=10)
            assert full.status_code == 429 and int(full.headers["retry-after"]) > 0
            assert httpx.get(f"{app.url}/health", timeout=5).status_code == 200
            for thread in leavers:
                thread.join(timeout=10)
            assert [results[i][0] for i in range(QUEUED)] == ["left"] * QUEUED
            wait_until(lambda: gate.waiting == 0, timeout=5, what="the queued requests to leave")
            assert gate.running == RUNNING  # they never took a slot
            assert all(response.status_code == 200 for response in responses)
        finally:
            for holder in holders:  # hang up mid-reply
                holder.__exit__(None, None, None)
        assert_nothing_left_behind(app)


def test_hung_up_streams_give_their_slot_back_without_the_garbage_collector(app):
    """The slot goes back when the decode loop drops the cancelled request, not when the collector finds
    the abandoned stream: with the cyclic collector off, streams that hang up mid-reply under load still
    drain (before, a hang-up whose close was cancelled with its response kept its slot until a collection)."""
    hung_up, results = [], {}

    def hang_up(index: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            with httpx.stream("POST", f"{app.v1}/chat/completions", json=body(index, True, 64), timeout=60) as r:
                if r.status_code == 200:
                    next(line for line in r.iter_lines() if '"content": "' in line and '"content": ""' not in line)
                    hung_up.append(index)
                else:
                    assert r.status_code == 429
            time.sleep(0.05)

    def keep_asking(index: int, deadline: float) -> None:
        turn = 0
        while time.monotonic() < deadline:
            ask(app.v1, (index, turn), index % 2 == 0, results)
            if results[(index, turn)][0] == "busy":
                time.sleep(0.1)
            turn += 1

    gc.disable()
    try:
        with counted_forwards(app.service, MODEL, delay_s=0.01):
            deadline = time.monotonic() + 6
            threads = [threading.Thread(target=hang_up, args=(i, deadline)) for i in range(4)]
            threads += [threading.Thread(target=keep_asking, args=(100 + i, deadline)) for i in range(8)]
            run_all(threads, limit_s=60)
            assert len(hung_up) >= 4
            assert [kind for kind, _ in results.values() if kind not in ("ok", "busy")] == [], results
            assert_nothing_left_behind(app)
    finally:
        gc.enable()


def test_the_gradio_chat_waits_in_the_same_queue_and_a_stop_ends_its_wait(app):
    gate = app.service.engine.gate
    client = Client(app.url, verbose=False, download_files=False)
    session = client.predict("", api_name="/new_session")
    holding = body(0, True, max_tokens=4000)
    with counted_forwards(app.service, MODEL, delay_s=0.05):
        holders = [httpx.stream("POST", f"{app.v1}/chat/completions", json=holding, timeout=60)
                   for _ in range(RUNNING)]
        try:
            for holder in holders:
                holder.__enter__()
            wait_until(lambda: gate.running == RUNNING, what="every slot to be taken")
            job = client.submit(session["id"], "Hello", MODEL, "", api_name="/chat")
            wait_until(lambda: gate.waiting == 1, what="the chat to queue for a slot")
            assert client.predict(session["id"], api_name="/stop") == {"stopped": True}
            job.result(timeout=10)
            wait_until(lambda: gate.waiting == 0, timeout=5, what="the chat to leave the queue")
            assert gate.running == RUNNING
        finally:
            for holder in holders:
                holder.__exit__(None, None, None)
    assert_nothing_left_behind(app)


def test_a_long_queue_starves_nobody(deep_app):
    """30 clients on 4 slots with room for 32 waiting: every one gets its whole reply."""
    results: dict = {}
    with counted_forwards(deep_app.service, MODEL, delay_s=0.01):
        threads = [threading.Thread(target=ask, args=(deep_app.v1, i, i % 2 == 0, results)) for i in range(30)]
        run_all(threads, limit_s=90)
    assert [kind for kind, _ in results.values()] == ["ok"] * 30, results
    assert_nothing_left_behind(deep_app)


# ----- the gate alone ---------------------------------------------------------------------------------------
def test_gate_serves_first_come_first_served_and_refuses_past_the_queue():
    gate = AdmissionGate(max_running=1, max_waiting=2)
    first = gate.reserve()
    assert first.state == "running"
    second, third = gate.reserve(), gate.reserve()
    assert (second.state, third.state, gate.waiting) == ("queued", "queued", 2)
    with pytest.raises(Busy):
        gate.reserve()
    granted = []
    third.on_grant(lambda: granted.append("third"))
    second.on_grant(lambda: granted.append("second"))
    first.release()
    first.release()  # idempotent: frees one slot once
    assert granted == ["second"] and (gate.running, gate.waiting) == (1, 1)
    second.release()
    assert granted == ["second", "third"]
    third.release()
    assert (gate.running, gate.waiting) == (0, 0)


def test_gate_wait_ends_on_cancel_or_timeout_and_gives_the_place_up():
    gate = AdmissionGate(max_running=1, max_waiting=4)
    holder = gate.reserve()
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    with pytest.raises(Cancelled):
        gate.admit(cancel)
    assert gate.waiting == 0
    with pytest.raises(Busy):
        gate.reserve().wait(timeout_s=0.2)
    assert (gate.running, gate.waiting) == (1, 0)
    queued = gate.reserve()
    assert queued.withdraw() and gate.waiting == 0
    holder.release()
    assert (gate.running, gate.waiting) == (0, 0)
