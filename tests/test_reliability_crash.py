"""kill -9 of `python app.py` in the middle of a burst of chats, uploads and session edits, then a restart.

The store must load; every acknowledged message, session and upload must be there; an upload that
was being parsed is marked failed (never left "parsing"), and bytes a half-finished upload wrote are
removed. The restarted app chats on, and listens on loopback only. (A killed store writer on its own,
without the app: test_sessions_durability.py.)
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from app_harness import free_port, gradio_call, wait_until
from sessions import LOCAL_USER, SessionStore
from sessions.files import INTERRUPTED

ROOT = Path(__file__).resolve().parent.parent
BURST_S = 4.0
SETTINGS = '{"max_tokens": 24, "temperature": 0}'


class AppProcess:
    """`python app.py` on a loopback port, its output in a log file."""

    def __init__(self, data_dir: Path, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
               "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(data_dir / "gradio-tmp")}
        env.pop("GRADIO_SERVER_NAME", None)  # the default bind is what this test checks
        self.log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "app.py", "--data-dir", str(data_dir), "--port", str(self.port), "--no-preload",
             "--idle-unload", "off", "--memory-budget", "2GiB", "--max-concurrent", "4"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_healthy(self, log_path: Path) -> None:
        """Until /health answers and says the web UI (the Gradio API this test drives) is mounted."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, log_path.read_text(errors="replace")[-3000:]
            try:
                response = httpx.get(f"{self.url}/health", timeout=2)
                if response.status_code == 200 and response.json()["ui"] == "ready":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("the app did not become healthy:\n" + log_path.read_text(errors="replace")[-3000:])

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()


def call(http: httpx.Client, name: str, *data):
    """A named Gradio endpoint over HTTP: its final value, or raise with its error."""
    event, value = gradio_call(http, name, *data)
    if event != "complete":
        raise RuntimeError(f"{name}: {event} {value}")
    return value


def attach(http, sid: str, name: str, data: bytes) -> dict:
    path = http.post("/gradio_api/upload", files={"files": (name, data)}).json()[0]
    return call(http, "upload_file", sid, {"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}})


@pytest.fixture
def data_dir(tmp_path, tiny_models, model_cache, bundled_model) -> Path:
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    (data / "models" / "tiny-llama.gguf").write_bytes(tiny_models["llama"].read_bytes())
    os.symlink(bundled_model, data / "models" / bundled_model.name)  # reused as is: no 250 MB copy per start
    os.symlink(model_cache, data / "cache", target_is_directory=True)
    return data


class Burst:
    """Threads that chat, upload and edit sessions until the app dies, keeping what was acknowledged."""

    def __init__(self, url: str, sessions: list[str]):
        self.url, self.sessions, self.stop = url, sessions, threading.Event()
        self.turns: dict[str, list[tuple[str, str]]] = {sid: [] for sid in sessions}
        self.sent: dict[str, str] = {}  # the last message sent to each session (maybe stored, maybe not)
        self.files: dict[str, list[str]] = {sid: [] for sid in sessions}
        self.created: list[str] = []
        rng = random.Random(7)
        words = "alpha beta gamma delta epsilon notes report budget river mountain".split()
        self.payload = " ".join(rng.choice(words) for _ in range(40_000)).encode()  # ~280 KB: copy + parse take time
        self.threads = [threading.Thread(target=self._chat, args=(sid,)) for sid in sessions[:3]]
        self.threads += [threading.Thread(target=self._upload, args=(sid,)) for sid in sessions[3:5]]
        self.threads.append(threading.Thread(target=self._sessions))

    def run(self):
        for thread in self.threads:
            thread.start()

    def join(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _loop(self, step):
        with httpx.Client(base_url=self.url, timeout=60) as http:
            index = 0
            while not self.stop.is_set():
                try:
                    step(http, index)
                except (httpx.HTTPError, RuntimeError, ValueError):
                    if self.stop.is_set():
                        return
                    time.sleep(0.05)
                index += 1

    def _chat(self, sid):
        def step(http, index):
            message = f"turn {index} of {sid[:6]}"
            self.sent[sid] = message
            reply = call(http, "chat", sid, message, "tiny-llama", SETTINGS)
            self.turns[sid].append((message, reply))
        self._loop(step)

    def _upload(self, sid):
        def step(http, index):
            self.files[sid].append(attach(http, sid, f"notes-{index}.txt", self.payload)["id"])
        self._loop(step)

    def _sessions(self):
        def step(http, index):
            self.created.append(call(http, "new_session", f"made {index}")["id"])
        self._loop(step)


def non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it only picks a source address
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_kill_9_during_a_burst_loses_nothing_acknowledged(data_dir, tmp_path):
    log_path = tmp_path / "app.log"
    first = AppProcess(data_dir, log_path)
    try:
        first.wait_healthy(log_path)
        with httpx.Client(base_url=first.url, timeout=60) as http:
            call(http, "load_model", "tiny-llama")
            sessions = [call(http, "new_session", f"burst {i}")["id"] for i in range(5)]
        burst = Burst(first.url, sessions)
        burst.run()
        wait_until(lambda: all(burst.turns[s] for s in sessions[:3]) and all(burst.files[s] for s in sessions[3:5]),
                   timeout=60, what="every thread to have something acknowledged")
        time.sleep(BURST_S)
    finally:
        first.kill9()
    burst.join()

    second = AppProcess(data_dir, log_path)
    try:
        second.wait_healthy(log_path)
        with httpx.Client(base_url=second.url, timeout=60) as http:
            listed = {s["id"] for s in call(http, "list_sessions")}
            assert set(sessions) | set(burst.created) <= listed

            for sid in sessions[:3]:  # every acknowledged turn, in order
                history = call(http, "history", sid)
                acked = [m for user, reply in burst.turns[sid]
                         for m in ({"role": "user", "content": user}, {"role": "assistant", "content": reply})]
                assert history[:len(acked)] == acked
                rest = history[len(acked):]  # the turn in flight: not stored, asked only, or answered unheard
                assert rest == [] or (rest[0] == {"role": "user", "content": burst.sent[sid]} and len(rest) <= 2
                                      and all(m["role"] == "assistant" for m in rest[1:])), rest

            for sid in sessions[3:5]:  # every acknowledged upload, parsed or marked failed, none left parsing
                files = {f["id"]: f for f in call(http, "list_files", sid)}
                assert set(burst.files[sid]) <= set(files)
                for record in files.values():
                    assert record["state"] in ("ready", "error"), record
                    assert record["state"] == "ready" or record["error"] == INTERRUPTED, record
                stored = list((data_dir / "sessions" / sid / "files").iterdir())
                assert len(stored) == len(files), "bytes of an unrecorded upload were left behind"

            leftovers = [p for p in (data_dir / "sessions").rglob("*") if p.name.endswith(".tmp")]
            assert leftovers == [], leftovers

            sid = sessions[0]  # and the restarted app goes on where it stopped
            before = len(call(http, "history", sid))
            reply = call(http, "chat", sid, "after the restart", "tiny-llama", SETTINGS)
            assert call(http, "history", sid)[before:] == [{"role": "user", "content": "after the restart"},
                                                           {"role": "assistant", "content": reply}]

        address = non_loopback_address()
        if address is not None:  # `python app.py` without --host listens on 127.0.0.1 only
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://{address}:{second.port}/health", timeout=5)
    finally:
        second.stop()


def test_a_restart_clears_what_half_finished_uploads_left(tmp_path):
    """Killed between copying an upload and recording it, or while writing its parsed text: nothing stays."""
    store = SessionStore(tmp_path)
    sid = store.create(LOCAL_USER)["id"]
    kept = store.safe_upload_path(LOCAL_USER, sid, "kept.txt")
    kept.write_text("kept")
    ready = store.add_file(LOCAL_USER, sid, "kept.txt", str(kept))["id"]
    store.set_file_ready(LOCAL_USER, sid, ready, "kept", {}, 1)
    pending = store.safe_upload_path(LOCAL_USER, sid, "pending.txt")
    pending.write_text("pending")
    parsing = store.add_file(LOCAL_USER, sid, "pending.txt", str(pending))["id"]
    orphan = store.safe_upload_path(LOCAL_USER, sid, "orphan.txt")  # copied, never recorded
    orphan.write_text("orphan")
    parsed = tmp_path / "sessions" / sid / "parsed"
    (parsed / f".{parsing}.json.1234abcd.tmp").write_text('{"half": ')  # a parsed-text write cut short
    (parsed / f"{parsing}.json").write_text('{"text": "never marked ready"}')
    store.close()  # the kill

    again = SessionStore(tmp_path)
    assert again.mark_interrupted_uploads() == 1
    states = {f["id"]: (f["state"], f["error"]) for f in again.list_files(LOCAL_USER, sid)}
    assert states == {ready: ("ready", None), parsing: ("error", INTERRUPTED)}
    assert sorted(p.name for p in (tmp_path / "sessions" / sid / "files").iterdir()) == sorted([kept.name,
                                                                                                pending.name])
    assert [p.name for p in parsed.iterdir()] == [f"{ready}.json"]
    assert again.file_text(LOCAL_USER, sid, ready)[0] == "kept"
