"""Run the whole app (Gradio UI + API, /health, /v1) on a loopback port inside the test process.

    from app_harness import app_config, running_app
    config = app_config(tmp_path, tiny_models, model_cache, bundled_model)
    with running_app(config) as app:
        Client(app.url).predict(api_name="/list_models")

The data dir holds copies of the tiny GGUFs (tiny-llama.gguf -> model id "tiny-llama"), the bundled
model as a symlink (so start() finds it and does not write 250 MB per app), and `cache` as a symlink
to the run's shared conversion cache, so each tiny model is converted once per run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from inference.config import AppConfig
from models.catalog import DEFAULT_MODEL_FILE

START_TIMEOUT_S = 60.0
GIB = 1024**3


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_config(data_dir: Path, tiny_models: dict[str, Path], model_cache: Path,
               bundled_model: Path | None = None, **overrides) -> AppConfig:
    """An AppConfig for tests: tiny models in data_dir/models, the shared conversion cache, no preload."""
    data_dir = Path(data_dir)
    models_dir = data_dir / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    for arch, path in tiny_models.items():
        target = models_dir / f"tiny-{arch}.gguf"
        if not target.exists():
            shutil.copyfile(path, target)
    if bundled_model is not None and not (models_dir / DEFAULT_MODEL_FILE).exists():
        os.symlink(bundled_model, models_dir / DEFAULT_MODEL_FILE)
    cache = data_dir / "cache"
    if not cache.exists():
        os.symlink(model_cache, cache, target_is_directory=True)
    values = dict(data_dir=data_dir, port=free_port(), default_model="tiny-llama", preload=False,
                  memory_budget=4 * GIB, idle_unload_s=None, parse_workers=1, max_context=512)
    values.update(overrides)
    return AppConfig(**values)


@dataclass
class RunningApp:
    config: AppConfig
    service: object  # inference.service.ChatService
    server: object  # uvicorn.Server
    thread: threading.Thread
    stopped: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config.port}"

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def stop(self) -> None:
        """Shut the server down (idempotent); its port refuses connections afterwards."""
        if self.stopped:
            return
        self.stopped = True
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.service.close()


def start_app(config: AppConfig) -> RunningApp:
    """Build the service and the app as `python app.py` does, serve it on a daemon thread, wait for /health."""
    from app import create_app, make_server
    from inference.service import ChatService

    service = ChatService(config)
    service.start()
    server = make_server(create_app(service), "127.0.0.1", config.port, timeout_graceful_shutdown=3)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{config.port}", daemon=True)
    thread.start()
    running = RunningApp(config, service, server, thread)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{running.url}/health", timeout=2).status_code == 200:
                return running
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            running.stop()
            raise RuntimeError(f"the app did not answer /health on port {config.port}")
        time.sleep(0.05)


@contextlib.contextmanager
def running_app(config: AppConfig) -> Iterator[RunningApp]:
    app = start_app(config)
    try:
        yield app
    finally:
        app.stop()


def gradio_call(client: httpx.Client, name: str, *data) -> tuple[str, object]:
    """A named Gradio endpoint over plain HTTP (`client` has the app's base URL).

    ("complete", value), ("error", message) or ("http <status>", body): the event stream is read up
    to its first result, the way a script without gradio_client would.
    """
    response = client.post(f"/gradio_api/call/{name}", json={"data": list(data)})
    if response.status_code != 200:
        return f"http {response.status_code}", response.text
    event, payload = None, None
    with client.stream("GET", f"/gradio_api/call/{name}/{response.json()['event_id']}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: ") and event in ("complete", "error"):
                payload = json.loads(line[len("data: "):])
                break
    if event == "error":
        return "error", payload.get("error") if isinstance(payload, dict) else payload
    return event, payload[0] if isinstance(payload, list) and payload else payload


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; return that, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class CapturedLog(logging.Handler):
    """Every log record of the process, formatted, while installed on the root logger."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a log line that cannot format is not ours to fail on
            pass

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@contextlib.contextmanager
def captured_log() -> Iterator[CapturedLog]:
    handler = CapturedLog()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


class ForwardCounter:
    """Counts (and optionally slows) the forward passes of a loaded model: one pass per generated token."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.calls = 0
        self.times: list[float] = []

    def __call__(self, module, args):
        self.calls += 1
        self.times.append(time.monotonic())
        if self.delay_s:
            time.sleep(self.delay_s)

    def calls_after(self, moment: float) -> int:
        return sum(t > moment for t in self.times)


@contextlib.contextmanager
def counted_forwards(service, model_id: str, delay_s: float = 0.0) -> Iterator[ForwardCounter]:
    """Load `model_id` and count its forward passes; `delay_s` per pass makes a tiny model slow enough
    that a test can act in the middle of a generation. Counted at the output projection, which every
    pass runs once: a prefill through the model's forward and a decode step (models/decode_step.py)."""
    service.load_model(model_id)
    with service.manager.use(model_id) as lm:
        model = lm.model
    counter = ForwardCounter(delay_s)
    handle = model.lm_head.register_forward_pre_hook(counter)
    try:
        yield counter
    finally:
        handle.remove()
