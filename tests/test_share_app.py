"""--share takes the normal serving path (app.serve): the same app from create_app, with its middleware,
limits and handlers, on the same server, with the same start-up warning and the same orderly close on
SIGTERM; Gradio's share tunnel is only opened to that server's port once it listens and the UI is mounted.

`python app.py --share` runs here as a real process with the tunnel replaced (the real one needs the
internet and would publish a link): the replacement records the port it was asked to expose.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app_harness import free_port

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = """
import json, sys
import app

def fake_tunnel(host, port, demo):
    with open(sys.argv[1], "w") as out:
        json.dump({"host": host, "port": port}, out)
    return "https://example.gradio.live"

app.open_share_tunnel = fake_tunnel
app.main(sys.argv[2:])
"""


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_models, model_cache):
    data = tmp_path_factory.mktemp("share")
    (data / "models").mkdir()
    (data / "models" / "tiny-llama.gguf").write_bytes(tiny_models["llama"].read_bytes())
    os.symlink(model_cache, data / "cache", target_is_directory=True)
    port, tunnel, log_path = free_port(), data / "tunnel.json", data / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(data / "gradio-tmp")}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, str(tunnel), "--share", "--data-dir", str(data), "--port", str(port),
             "--no-preload", "--idle-unload", "off", "--memory-budget", "2GiB", "--max-upload", "64KiB",
             "--auth", "alice:pw1"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not tunnel.exists():
            assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "no tunnel was opened:\n" + log_path.read_text(errors="replace")
            time.sleep(0.2)
        yield {"url": url, "port": port, "process": process, "tunnel": tunnel, "log": log_path}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_the_tunnel_opens_to_the_apps_own_port_once_it_listens(shared):
    assert json.loads(shared["tunnel"].read_text()) == {"host": "127.0.0.1", "port": shared["port"]}
    assert httpx.get(f"{shared['url']}/health", timeout=10).status_code == 200
    assert "public link: https://example.gradio.live" in shared["log"].read_text(errors="replace")


def test_the_v1_warning_is_given_at_start(shared):
    text = shared["log"].read_text(errors="replace")
    assert "a public share link without --api-key" in text and "/v1 and /api routes" in text


def test_large_bodies_are_refused_before_they_are_read_or_a_login_is_checked(shared):
    for path in ("/gradio_api/queue/join", "/gradio_api/upload", "/v1/chat/completions"):
        with socket.create_connection(("127.0.0.1", shared["port"]), timeout=10) as sock:  # headers only
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {51_000_000}\r\n\r\n".encode())
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413"), (path, answer[:200])


def test_the_same_handlers_answer(shared):
    url = shared["url"]
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.post("/login", data={"username": "alice", "password": "pw1"}).status_code == 200
        unknown = http.post("/gradio_api/call/no_such_endpoint", json={"data": []})
        assert unknown.status_code == 404, unknown.text
        assert "Traceback" not in unknown.text
        v1 = http.delete("/v1/chat/completions")  # OpenAI's error shape, not FastAPI's {"detail": ...}
        assert v1.status_code == 405 and "error" in v1.json(), v1.text
        assert http.get("/v1/no-such-route").json()["error"]["type"]
    assert httpx.post(f"{url}/gradio_api/call/list_sessions", json={"data": []}, timeout=30).status_code == 401


def test_sigterm_closes_the_app_in_order(shared):
    process = shared["process"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, shared["log"].read_text(errors="replace")[-3000:]
    assert "closed" in shared["log"].read_text(errors="replace").splitlines()[-1]


def test_sigterm_closes_the_plain_app_in_order(tmp_path, tiny_models, model_cache):
    """Without --share too: SIGTERM stops the server in order and closes the service, with status 0."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-llama.gguf").write_bytes(tiny_models["llama"].read_bytes())
    os.symlink(model_cache, tmp_path / "cache", target_is_directory=True)
    port, log_path = free_port(), tmp_path / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio-tmp")}
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "app.py", "--data-dir", str(tmp_path), "--port", str(port),
                                    "--no-preload", "--idle-unload", "off", "--memory-budget", "2GiB"],
                                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text(errors="replace")[-3000:]
        assert "closed" in log_path.read_text(errors="replace").splitlines()[-1]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
