"""Faults inside a running app are contained, reported, and the app carries on.

A model load that fails halfway, a model file deleted while loaded, a load over the memory budget,
a parse worker that crashes or hangs, a generation that fails part-way, and a busy engine: each
is seen through the public APIs (Gradio and /v1), and each time another session keeps chatting.
(A client that disconnects mid-stream: test_app_api.py and test_openai_api.py; a parse pool on its
own: test_parsers_pool.py; budget arithmetic and corrupt files: test_manager.py.)
"""

from __future__ import annotations

import sys

import httpx
import pytest
from gradio_client import Client, handle_file

from app_harness import app_config, running_app, wait_until
from inference.generate import Chunk
from parsers import ParseLimits
from parsers.pool import ParsePool
from sessions import LOCAL_USER

GREEDY = '{"temperature": 0, "max_tokens": 6}'


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models, model_cache, bundled_model):
    config = app_config(tmp_path_factory.mktemp("faults"), tiny_models, model_cache, bundled_model,
                        max_concurrent_generations=1, max_queue=0, parse_timeout_s=3.0)
    with running_app(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False, download_files=False)


def new_session(client) -> str:
    return client.predict("", api_name="/new_session")["id"]


def chat(client, sid, message="Hello", model_id="", settings=GREEDY) -> str:
    return client.predict(sid, message, model_id, settings, api_name="/chat")


def record(client, model_id) -> dict:
    return next(m for m in client.predict(api_name="/list_models") if m["id"] == model_id)


def v1_chat(app, model_id) -> httpx.Response:
    body = {"model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    return httpx.post(f"{app.v1}/chat/completions", json=body, timeout=60)


def assert_carries_on(app, client) -> None:
    """Another session, on another model, still chats through both APIs."""
    assert chat(client, new_session(client), model_id="tiny-llama")
    assert v1_chat(app, "tiny-llama").status_code == 200
    assert app.service.engine.gate.running == 0


# ----- models -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure, words", [(RuntimeError("the disk went away"), "the disk went away"),
                                            (MemoryError(), "ran out of memory")])
def test_a_load_that_fails_halfway_is_reported_and_can_be_retried(app, client, monkeypatch, failure, words):
    manager = app.service.manager
    client.predict("tiny-qwen2", api_name="/unload_model")
    client.predict("tiny-llama", api_name="/load_model")  # the model the others chat with meanwhile
    real_loader, steps = manager._loader, []
    used = manager.memory_used()

    def failing_loader(path, cache_root, options, progress=None, header=None):
        progress(0.5, "half loaded")
        steps.append(manager.memory_used())  # the estimate is reserved while it loads
        raise failure

    monkeypatch.setattr(manager, "_loader", failing_loader)
    with pytest.raises(Exception) as caught:
        client.predict("tiny-qwen2", api_name="/load_model")
    assert words in str(caught.value) and "Traceback" not in str(caught.value)
    assert steps and steps[0] > used
    failed = record(client, "tiny-qwen2")
    assert failed["state"] == "error" and words in failed["error"]
    assert manager.memory_used() == used, "the failed load kept its reservation"
    response = v1_chat(app, "tiny-qwen2")
    assert response.status_code == 503 and words in response.json()["error"]["message"]
    assert_carries_on(app, client)

    monkeypatch.setattr(manager, "_loader", real_loader)  # the fault is gone: a retry loads it
    assert client.predict("tiny-qwen2", api_name="/load_model")["state"] == "loaded"
    assert chat(client, new_session(client), model_id="tiny-qwen2")
    client.predict("tiny-qwen2", api_name="/unload_model")


def test_a_model_file_deleted_while_loaded(app, client):
    path = app.config.models_dir / "tiny-gemma3.gguf"
    client.predict("tiny-gemma3", api_name="/load_model")
    sid = new_session(client)
    path.unlink()
    listed = record(client, "tiny-gemma3")  # still listed while it holds memory, with the reason
    assert listed["state"] == "loaded" and "removed" in listed["error"]
    assert chat(client, sid, model_id="tiny-gemma3")  # the weights are in memory: it keeps serving
    assert client.predict("tiny-gemma3", api_name="/unload_model")["state"] == "unloaded"
    with pytest.raises(Exception) as caught:
        client.predict("tiny-gemma3", api_name="/load_model")
    assert "missing" in str(caught.value)
    with pytest.raises(Exception):
        chat(client, sid, model_id="tiny-gemma3")
    assert [m["role"] for m in client.predict(sid, api_name="/history")] == ["user", "assistant"]
    assert v1_chat(app, "tiny-gemma3").status_code in (404, 503)
    assert "tiny-gemma3" not in {m["id"] for m in client.predict(api_name="/list_models")}
    assert_carries_on(app, client)


def test_a_load_over_the_budget_is_refused_before_it_starts(app, client, monkeypatch):
    manager = app.service.manager
    client.predict("tiny-qwen2", api_name="/unload_model")
    calls = []
    real_loader = manager._loader
    monkeypatch.setattr(manager, "_loader", lambda *a, **k: calls.append(a) or real_loader(*a, **k))
    monkeypatch.setattr(manager, "memory_budget", record(client, "tiny-qwen2")["memory_bytes"] // 2)
    with pytest.raises(Exception) as caught:
        client.predict("tiny-qwen2", api_name="/load_model")
    assert "budget" in str(caught.value) and "--memory-budget" in str(caught.value)
    assert calls == [], "the loader ran although the estimate was over the budget"
    assert v1_chat(app, "tiny-qwen2").status_code == 503
    assert record(client, "tiny-qwen2")["state"] == "error"
    monkeypatch.undo()
    assert_carries_on(app, client)


# ----- parsing ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("worker, words", [
    ("import os; os.abort()", "crashed"),
    ("import sys; sys.stdout.write('not json'); sys.exit(3)", "crashed"),
    ("import time; time.sleep(60)", "too long"),
])
def test_a_parse_worker_that_crashes_or_hangs_fails_only_its_file(app, client, tmp_path, worker, words):
    service, real_pool = app.service, app.service.parse_pool
    service.parse_pool = ParsePool(1, ParseLimits(timeout_s=2.0), worker_command=[sys.executable, "-c", worker])
    try:
        sid = new_session(client)
        path = tmp_path / "notes.txt"
        path.write_text("some notes")
        uploaded = client.predict(sid, handle_file(str(path)), api_name="/upload_file")
        files = wait_until(lambda: [f for f in client.predict(sid, api_name="/list_files")
                                    if f["state"] != "parsing"], timeout=20, what="the parse to end")
        assert files[0]["id"] == uploaded["id"] and files[0]["state"] == "error"
        assert words in files[0]["error"] and "Traceback" not in files[0]["error"]
        assert chat(client, sid)  # the session itself carries on, without the file
    finally:
        service.parse_pool.shutdown()
        service.parse_pool = real_pool
    uploaded = client.predict(sid, handle_file(str(path)), api_name="/upload_file")  # the real pool again
    wait_until(lambda: any(f["id"] == uploaded["id"] and f["state"] == "ready"
                           for f in client.predict(sid, api_name="/list_files")), what="the next file to parse")


# ----- generation ---------------------------------------------------------------------------------------------
def test_a_generation_that_fails_part_way_keeps_the_turn_whole(app, client, monkeypatch):
    real = app.service.engine.stream_chat

    def breaking(model, messages, params, cancel, session_id=None, admission=None):
        yield Chunk(text="partial ", completion_tokens=1, prompt_tokens=3)
        raise RuntimeError("the device fell over")

    sid = new_session(client)
    monkeypatch.setattr(app.service.engine, "stream_chat", breaking)
    with pytest.raises(Exception) as caught:
        chat(client, sid, "First question")
    assert "the device fell over" in str(caught.value)
    stored = app.service.messages(LOCAL_USER, sid)
    assert [(m["role"], m["content"]) for m in stored] == [("user", "First question"), ("assistant", "partial ")]
    assert stored[-1]["stats"]["finish_reason"] == "error"
    monkeypatch.setattr(app.service.engine, "stream_chat", real)
    assert chat(client, sid, "Second question")
    assert [m["role"] for m in client.predict(sid, api_name="/history")] == ["user", "assistant"] * 2


def test_a_busy_answer_leaves_the_history_as_it_was(app, client):
    """Room for one generation, none waiting: with the slot taken, a chat and a regenerate are refused untouched."""
    other = new_session(client)
    chat(client, other, "Keep this turn")
    before = client.predict(other, api_name="/history")
    with app.service.engine.gate.admit():  # the one generation slot is taken (as by a long reply elsewhere)
        for attempt in (lambda: chat(client, other, "Refused?"),
                        lambda: list(app.service.chat(LOCAL_USER, other, "", settings=GREEDY, regenerate=True))):
            with pytest.raises(Exception) as caught:
                attempt()
            assert "busy" in str(caught.value)
            assert client.predict(other, api_name="/history") == before
        response = v1_chat(app, "tiny-llama")
        assert response.status_code == 429 and response.headers["retry-after"]
    regenerated = list(app.service.chat(LOCAL_USER, other, "", settings=GREEDY, regenerate=True))[-1].text
    history = client.predict(other, api_name="/history")
    assert history == [before[0], {"role": "assistant", "content": regenerated}]
