"""`python app.py` starts in two steps (app.serve): the HTTP API answers as soon as the server listens, and the
web UI is mounted on the same port once Gradio has loaded. Until then, and if the UI cannot start, every other
path says so; /health's "ui" tells which."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from gradio_client import Client

import app as app_module
from app_harness import app_config
from inference.service import ChatService

HTML = {"Accept": "text/html"}


@pytest.fixture
def serving(tmp_path, tiny_models, model_cache, bundled_model, monkeypatch):
    """app.serve on a thread, with the UI's build held until the test releases it (and failing if asked)."""
    config = app_config(tmp_path, tiny_models, model_cache, bundled_model)
    release, servers, outcome = threading.Event(), [], {}
    build = app_module.build_gradio_app

    def held_build(service):
        release.wait(60)
        if "error" in outcome:
            raise outcome["error"]
        return build(service)

    def make_server(app, host, port, **options):
        servers.append(real_make_server(app, host, port, timeout_graceful_shutdown=3, **options))
        return servers[-1]

    real_make_server = app_module.make_server
    monkeypatch.setattr(app_module, "build_gradio_app", held_build)
    monkeypatch.setattr(app_module, "make_server", make_server)
    service = ChatService(config)
    service.start()
    thread = threading.Thread(target=app_module.serve, args=(service,), daemon=True)
    thread.start()
    running = SimpleNamespace(url=f"http://127.0.0.1:{config.port}", release=release, outcome=outcome)
    wait_for(lambda: health(running) is not None, "the HTTP API to answer")
    yield running
    release.set()
    servers[0].should_exit = True
    thread.join(timeout=30)
    assert not thread.is_alive()


def health(running) -> dict | None:
    try:
        response = httpx.get(f"{running.url}/health", timeout=5)
    except httpx.HTTPError:
        return None
    assert response.status_code == 200
    return response.json()


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_api_answers_while_the_ui_starts_then_the_ui_follows(serving):
    assert health(serving)["ui"] == "starting"
    page = httpx.get(serving.url + "/", headers=HTML, timeout=10)
    assert page.status_code == 503 and page.headers["retry-after"] == "2"
    assert "starting" in page.text and "http-equiv='refresh'" in page.text
    assert httpx.get(serving.url + "/gradio_api/info", timeout=10).status_code == 503  # not a 404: try again
    assert httpx.get(serving.url + "/v1/models", timeout=10).status_code == 200
    reply = httpx.post(serving.url + "/v1/chat/completions", timeout=120, json={
        "model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] in ("stop", "length")

    serving.release.set()
    wait_for(lambda: health(serving)["ui"] == "ready", "the UI to be mounted")
    page = httpx.get(serving.url + "/", headers=HTML, timeout=30)
    assert page.status_code == 200 and "gradio" in page.text.lower()
    models = Client(serving.url, verbose=False).predict(api_name="/list_models")  # Gradio's queue runs
    assert "tiny-llama" in {m["id"] for m in models}


def test_a_ui_that_cannot_start_leaves_the_api_serving_and_says_why(serving):
    serving.outcome["error"] = RuntimeError("no theme files")
    serving.release.set()
    wait_for(lambda: health(serving)["ui"] == "failed", "the UI to fail")
    page = httpx.get(serving.url + "/", timeout=10)
    assert page.status_code == 500 and "no theme files" in page.text and "HTTP API" in page.text
    assert httpx.get(serving.url + "/v1/models", timeout=10).status_code == 200


def test_the_ui_restarts_with_each_start_of_its_server(tmp_path, tiny_models, model_cache, bundled_model):
    """An app served twice (a test client used twice, a server restarted) starts Gradio's queue each time."""
    from starlette.testclient import TestClient

    from app_harness import gradio_call

    service = ChatService(app_config(tmp_path, tiny_models, model_cache, bundled_model))
    service.start()
    try:
        asgi = app_module.create_app(service)
        for _ in range(2):
            with TestClient(asgi) as client:
                assert client.get("/health").json()["ui"] == "ready"
                event, models = gradio_call(client, "list_models")
                assert event == "complete" and "tiny-llama" in {m["id"] for m in models}
    finally:
        service.close()
