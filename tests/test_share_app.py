"""--share serves through Gradio's own launcher (app.serve_shared); its app gets the same protections as
create_app's. Launched here without the public link (which needs internet), with the same options."""

from __future__ import annotations

import socket

import httpx
import pytest

import app as app_module
from app_harness import app_config, free_port
from inference.service import ChatService


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_models, model_cache):
    config = app_config(tmp_path_factory.mktemp("share"), tiny_models, model_cache, max_upload_bytes=64 * 1024)
    service = ChatService(config)
    demo = app_module.queued_ui(service)
    port = free_port()
    demo.launch(share=False, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                app_kwargs=app_module.shared_app_options(config))
    try:
        yield f"http://127.0.0.1:{port}", config
    finally:
        demo.close()
        service.close()


def test_large_bodies_are_refused_before_they_are_read(launched):
    url, config = launched
    port = int(url.rsplit(":", 1)[1])
    for path in ("/gradio_api/queue/join", "/gradio_api/upload"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # headers only, no body sent
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {51_000_000}\r\n\r\n".encode())
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413"), (path, answer[:200])


def test_an_unknown_api_name_is_a_404(launched):
    url, _ = launched
    response = httpx.post(f"{url}/gradio_api/call/no_such_endpoint", json={"data": []}, timeout=30)
    assert response.status_code == 404, response.text
