"""32 clients at once on a small app: every request completes or gets a clean "busy", nothing else.

gradio_client chats, /v1 chats (streamed and not, some bound to sessions), /v1 streams that hang up
after their first token, and readers listing sessions and models, all for a bounded time against an
app with room for two generations and two waiting. Afterwards: no 500s, every session's history is
exactly its acknowledged turns, the engine is idle, and the process's memory stayed bounded.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import httpx
import psutil
import pytest
from gradio_client import Client

from app_harness import app_config, running_app, wait_until
from inference.config import config_from_args
from sessions import LOCAL_USER

LOAD_S = 15.0
MODELS = ("tiny-llama", "tiny-qwen2")
MEMORY_GROWTH_LIMIT = 400 * 2**20


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models, model_cache, bundled_model):
    models = {arch: tiny_models[arch] for arch in ("llama", "qwen2")}
    config = app_config(tmp_path_factory.mktemp("load"), models, model_cache, bundled_model,
                        max_concurrent_generations=2, max_queue=2, max_tokens_limit=32)
    with running_app(config) as running:
        yield running


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.failures: list[str] = []

    def add(self, kind: str, failure: str | None = None) -> None:
        with self.lock:
            self.counts[kind] += 1
            if failure:
                self.failures.append(failure)


def gradio_chatter(url, sid, index, deadline, tally, turns):
    client = Client(url, verbose=False, download_files=False)
    settings = json.dumps({"max_tokens": 6 + index % 6, "temperature": 0.7, "seed": index})
    n = 0
    while time.monotonic() < deadline:
        message = f"gradio client {index}, turn {n}"
        n += 1
        try:
            reply = client.predict(sid, message, MODELS[index % 2], settings, api_name="/chat")
        except Exception as error:  # gradio_client raises AppError with the app's message
            kind = "busy" if "busy" in str(error).lower() else "failed"
            tally.add(kind, None if kind == "busy" else f"gradio {index}: {error!r}"[:300])
            time.sleep(0.2)
            continue
        turns.extend([{"role": "user", "content": message}, {"role": "assistant", "content": reply}])
        tally.add("ok")


def v1_chatter(url, sid, index, deadline, tally, turns):
    stream = index % 2 == 0
    headers = {"X-Session-Id": sid} if sid else {}
    n = 0
    with httpx.Client(timeout=120) as http:
        while time.monotonic() < deadline:
            message = f"v1 client {index}, turn {n}"
            n += 1
            body = {"model": MODELS[index % 2], "messages": [{"role": "user", "content": message}],
                    "max_tokens": 4 + index % 8, "stream": stream, "seed": index}
            response = http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            if response.status_code in (429, 503):
                assert response.json()["error"]["message"]
                tally.add("busy")
                time.sleep(float(response.headers.get("retry-after", "1")) / 4)
                continue
            if response.status_code != 200:
                tally.add("failed", f"v1 {index}: {response.status_code} {response.text[:200]}")
                continue
            if stream:
                if not response.text.rstrip().endswith("data: [DONE]") or '"error"' in response.text:
                    tally.add("failed", f"v1 {index}: stream {response.text[-200:]}")
                    continue
                text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                               for line in response.text.splitlines()
                               if line.startswith("data: {") and json.loads(line[6:]).get("choices"))
            else:
                text = response.json()["choices"][0]["message"]["content"]
            if sid:
                turns.extend([{"role": "user", "content": message}, {"role": "assistant", "content": text}])
            tally.add("ok")


def hang_up(url, index, deadline, tally):
    """Streams and leaves after the first token: the engine must get its slot back."""
    body = {"model": MODELS[index % 2], "messages": [{"role": "user", "content": "Tell me everything."}],
            "max_tokens": 16, "stream": True}
    while time.monotonic() < deadline:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
            if response.status_code in (429, 503):
                tally.add("busy")
            elif response.status_code == 200:
                next(response.iter_lines(), None)
                tally.add("hung up")
            else:
                tally.add("failed", f"hang-up {index}: {response.status_code}")
        time.sleep(0.3)


def reader(url, sids, deadline, tally):
    client = Client(url, verbose=False, download_files=False)
    while time.monotonic() < deadline:
        try:
            assert {s["id"] for s in client.predict(api_name="/list_sessions")} >= set(sids)
            assert len(client.predict(api_name="/list_models")) >= 2
            client.predict(sids[0], api_name="/history")
            tally.add("read")
        except Exception as error:
            tally.add("failed", f"reader: {error!r}"[:300])
        time.sleep(0.2)


def test_32_clients_get_an_answer_or_a_clean_busy(app):
    service = app.service
    for model_id in MODELS:
        service.load_model(model_id)
    process = psutil.Process()
    sids = [service.new_session(LOCAL_USER, f"load {i}")["id"] for i in range(18)]
    for sid, model_id in zip(sids[:2], MODELS):  # warm both decode loops before measuring memory
        list(service.chat(LOCAL_USER, sid, "warm up", model_id, '{"max_tokens": 4}'))
    expected = {sid: service.history(LOCAL_USER, sid) for sid in sids}
    baseline = process.memory_info().rss
    peak, sampling = [baseline], threading.Event()

    def sample():
        while not sampling.wait(0.25):
            peak.append(process.memory_info().rss)

    tally = Tally()
    deadline = time.monotonic() + LOAD_S
    threads = [threading.Thread(target=gradio_chatter, args=(app.url, sids[i], i, deadline, tally, expected[sids[i]]))
               for i in range(12)]
    threads += [threading.Thread(target=v1_chatter, args=(app.url, sids[12 + i] if i < 6 else None, i, deadline,
                                                          tally, expected[sids[12 + i]] if i < 6 else []))
                for i in range(12)]
    threads += [threading.Thread(target=hang_up, args=(app.url, i, deadline, tally)) for i in range(4)]
    threads += [threading.Thread(target=reader, args=(app.url, sids, deadline, tally)) for i in range(4)]
    assert len(threads) == 32
    sampler = threading.Thread(target=sample)
    sampler.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=LOAD_S + 60)
    sampling.set()
    sampler.join()
    assert not any(thread.is_alive() for thread in threads), "a client never got an answer"

    counts = tally.counts
    assert tally.failures == [], tally.failures[:5]
    assert counts["ok"] >= 20 and counts["busy"] >= 1 and counts["read"] >= 4, counts
    wait_until(lambda: service.engine.gate.running == 0 and service.engine.gate.waiting == 0, timeout=10,
               what="the engine to drain")
    for sid in sids:  # exactly the acknowledged turns: a busy answer stored nothing
        assert service.history(LOCAL_USER, sid) == expected[sid], sid
    assert httpx.get(f"{app.url}/health", timeout=10).json()["status"] == "ok"
    growth = max(peak) - baseline
    assert growth < MEMORY_GROWTH_LIMIT, f"memory grew by {growth / 2**20:.0f} MiB under load"
    print(f"load: {dict(counts)}, memory growth {growth / 2**20:.0f} MiB")


def test_every_limit_is_configurable_from_the_command_line():
    config = config_from_args(["--max-concurrent", "3", "--max-queue", "5", "--max-prompt-chars", "1234",
                               "--max-tokens-limit", "77", "--max-upload", "2MiB", "--max-files", "6",
                               "--parse-timeout", "9s", "--memory-budget", "1GiB", "--max-context", "1024"])
    assert (config.max_concurrent_generations, config.max_queue, config.max_prompt_chars, config.max_tokens_limit,
            config.max_upload_bytes, config.max_files_per_session, config.parse_timeout_s, config.memory_budget,
            config.max_context) == (3, 5, 1234, 77, 2 * 2**20, 6, 9.0, 2**30, 1024)
