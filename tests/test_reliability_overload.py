"""More /v1 clients than the engine runs at once, with a long queue: nobody starves, and a client who
leaves the queue frees its place at once (issue: 14 concurrent requests used to stall every generation,
because requests waiting for a slot held every thread the running ones needed)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from app_harness import app_config, counted_forwards, running_app, wait_until

MODEL = "tiny-qwen2"


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models, model_cache):
    config = app_config(tmp_path_factory.mktemp("overload"), tiny_models, model_cache,
                        max_concurrent_generations=4, max_queue=32)
    with running_app(config) as running:
        running.service.load_model(MODEL)
        yield running


def stream_one(url: str, index: int, results: dict) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"client {index}"}], "max_tokens": 12,
            "temperature": 0, "stream": True}
    try:
        response = httpx.post(f"{url}/chat/completions", json=body, timeout=60)
        done = response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]")
        finishes = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in response.text.splitlines()
                    if line.startswith("data: {") and json.loads(line[6:]).get("choices")]
        results[index] = (response.status_code, done and finishes[-1] in ("stop", "length"))
    except httpx.HTTPError as error:
        results[index] = (None, repr(error))


@pytest.mark.parametrize("clients", [16, 30])
def test_more_clients_than_slots_all_get_their_reply(app, clients):
    results: dict = {}
    gate = app.service.engine.gate
    with counted_forwards(app.service, MODEL, delay_s=0.01):  # slow enough that a queue forms
        threads = [threading.Thread(target=stream_one, args=(app.v1, i, results)) for i in range(clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
    assert not any(thread.is_alive() for thread in threads), "a client never got its reply"
    assert sorted(results) == list(range(clients))
    assert all(result == (200, True) for result in results.values()), results
    assert time.monotonic() - started < 60
    wait_until(lambda: gate.running == 0 and gate.waiting == 0, timeout=10, what="the engine to drain")


def test_a_client_leaving_the_queue_frees_its_place(app):
    gate = app.service.engine.gate
    holding_body = {"model": MODEL, "messages": [{"role": "user", "content": "hold"}], "max_tokens": 4000,
                    "temperature": 0, "stream": True}
    with counted_forwards(app.service, MODEL, delay_s=0.05) as forwards:
        holders = [httpx.stream("POST", f"{app.v1}/chat/completions", json=holding_body, timeout=60)
                   for _ in range(gate.max_running)]
        responses = [holder.__enter__() for holder in holders]
        try:
            wait_until(lambda: gate.running == gate.max_running, what="every slot to be taken")
            outcome = []

            def impatient():  # queues, then gives up after 2 s and closes its connection
                try:
                    httpx.post(f"{app.v1}/chat/completions", json=holding_body, timeout=2.0)
                    outcome.append("answered")
                except httpx.TimeoutException:
                    outcome.append("gave up")

            client = threading.Thread(target=impatient)
            client.start()
            wait_until(lambda: gate.waiting == 1, what="the request to queue")
            client.join(timeout=10)
            assert outcome == ["gave up"]
            # the client left while queued: its wait ends (no thread held for the 300 s wait limit)
            wait_until(lambda: gate.waiting == 0, timeout=5, what="the queued request to leave")
            assert gate.running == gate.max_running  # and it never took a slot
            assert all(response.status_code == 200 for response in responses)
            assert forwards.calls > 0
        finally:
            for holder in holders:
                holder.__exit__(None, None, None)
    wait_until(lambda: gate.running == 0, timeout=10, what="the holders to stop")
