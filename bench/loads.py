"""Load-to-first-token and memory, each measured in a fresh process.

The parent (`measure_load`) starts this file as a child, polls the child's resident memory every
20 ms with psutil, and reads the child's progress events from stdout. The child reports wall-clock
times for each phase and its own high-water mark (`VmHWM`, exact, unlike 20 ms polling).

    python bench/loads.py app DATA_DIR MODEL_ID        # our app: ChatService start, load, first token
    python bench/loads.py baseline GGUF_PATH           # plain transformers from_pretrained(gguf_file=...)

Phases (all relative to `start`, after the imports):
  start -> started (ChatService built and started, the catalog listed: assembles the GGUF on a first
           start, imports the model code and reads the models' headers, as `python app.py` does before
           it serves)
        -> loaded (weights and tokenizer ready) -> first_token (first text of a reply)
then the child finishes a short reply, collects garbage, waits a second and reports steady memory.

`measure_app_process` times `python app.py` itself from the outside (/health, a /v1 stream, the UI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = "BENCH-EVENT "
PROMPT = [{"role": "user", "content": "Say hello in one short sentence."}]
POLL_S = 0.02
MIB = 1024 * 1024


# ----- child -------------------------------------------------------------------------------------
def _proc_status(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _emit(event: str, **data) -> None:
    print(MARK + json.dumps({"event": event, "t": time.time(), **data}), flush=True)


def _child_app(data_dir: str, model_id: str) -> None:
    sys.path.insert(0, str(ROOT))
    from inference.config import AppConfig
    from inference.params import GenerationParams
    from inference.service import ChatService

    _emit("imported")
    _emit("start")
    service = ChatService(AppConfig(data_dir=Path(data_dir), preload=False, default_model=model_id,
                                    idle_unload_s=None))
    service.start()
    service.list_models()  # app.py lists the catalog (its headers read) as it builds the model dropdown
    _emit("started", rss=_proc_status("VmRSS"))
    service.load_model(model_id)
    _emit("loaded")
    params = GenerationParams.from_dict({"temperature": 0, "max_tokens": 16})
    with service.manager.use(model_id) as lm:
        first = True
        for chunk in service.engine.stream_chat(lm, PROMPT, params, threading.Event()):
            if first and (chunk.text or chunk.finish_reason):
                _emit("first_token", hwm=_proc_status("VmHWM"), rss=_proc_status("VmRSS"))
                first = False
    _steady()
    service.close()


def _child_baseline(gguf_path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_path)
    _emit("imported")
    _emit("start")
    _emit("started")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    _emit("loaded")
    try:
        ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    except ValueError:  # transformers' GGUF tokenizer may come without the chat template: plain text will do
        ids = tokenizer(PROMPT[0]["content"], return_tensors="pt")
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=1, do_sample=False)
    _emit("first_token", hwm=_proc_status("VmHWM"), rss=_proc_status("VmRSS"))
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=16, do_sample=False)
    _steady()


def _steady() -> None:
    import gc

    gc.collect()
    time.sleep(1.0)
    _emit("steady", rss=_proc_status("VmRSS"), hwm=_proc_status("VmHWM"))


# ----- parent ------------------------------------------------------------------------------------
def measure_load(args: list[str], timeout_s: float = 600.0, env: dict | None = None) -> dict:
    """Run the child with `args`, poll its RSS, and return the phase times and memory figures."""
    import psutil

    spawned = time.time()
    child_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], cwd=ROOT, env=child_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events: dict[str, dict] = {}
    stderr_tail: list[str] = []
    readers = [threading.Thread(target=_read_events, args=(proc.stdout, events), daemon=True),
               threading.Thread(target=_read_tail, args=(proc.stderr, stderr_tail), daemon=True)]
    for reader in readers:
        reader.start()
    samples = _poll_rss(psutil.Process(proc.pid), proc, spawned + timeout_s)
    for reader in readers:
        reader.join(timeout=5)
    return _load_figures(events, samples, spawned, proc.returncode, stderr_tail)


def _read_events(stream, events: dict) -> None:
    for line in stream:
        if line.startswith(MARK):
            event = json.loads(line[len(MARK):])
            events[event["event"]] = event


def _read_tail(stream, tail: list[str]) -> None:
    for line in stream:
        tail.append(line.rstrip())
        del tail[:-20]


def _poll_rss(process, proc: subprocess.Popen, deadline: float) -> list[tuple[float, int]]:
    samples: list[tuple[float, int]] = []
    while proc.poll() is None:
        if time.time() > deadline:
            proc.kill()
            proc.wait()
            break
        try:
            samples.append((time.time(), process.memory_info().rss))
        except Exception:  # the process ended between poll() and memory_info()
            break
        time.sleep(POLL_S)
    return samples


def _load_figures(events: dict, samples: list[tuple[float, int]], spawned: float, returncode: int | None,
                  stderr_tail: list[str]) -> dict:
    def at(name: str) -> float | None:
        return events.get(name, {}).get("t")

    def since(a: str, b: str) -> float | None:
        return round(at(b) - at(a), 4) if at(a) is not None and at(b) is not None else None

    first = events.get("first_token", {})
    steady = events.get("steady", {})
    window = [rss for t, rss in samples if at("start") and t >= at("start") and t <= (at("first_token") or t)]
    peak = max([first.get("hwm") or 0, max(window, default=0)]) or None
    steady_rss = steady.get("rss")
    started_rss = events.get("started", {}).get("rss")
    ok = returncode == 0 and "first_token" in events
    return {
        "ok": ok,
        "error": None if ok else f"child exited with {returncode}: " + " | ".join(stderr_tail[-5:]),
        "start_to_first_token_s": since("start", "first_token"),
        # the same load in a service that has started (model code imported): loading a model in the running app
        "started_to_first_token_s": since("started", "first_token"),
        "process_to_first_token_s": round(at("first_token") - spawned, 4) if at("first_token") else None,
        "import_s": round(at("imported") - spawned, 4) if at("imported") else None,
        "start_s": since("start", "started"),
        "load_s": since("started", "loaded"),
        "first_token_s": since("loaded", "first_token"),
        "peak_rss_mib": _mib(peak),
        "polled_peak_rss_mib": _mib(max(window, default=None)),
        "steady_rss_mib": _mib(steady_rss),
        "peak_over_steady": round(peak / steady_rss, 4) if peak and steady_rss else None,
        # what loading the model (weights and tokenizer) and one short reply added to the started service
        "model_growth_mib": _mib(steady_rss - started_rss) if steady_rss and started_rss else None,
    }


# ----- the whole app -----------------------------------------------------------------------------
def measure_app_process(data_dir: str, model_id: str, timeout_s: float = 120.0) -> dict:
    """`python app.py` as a user starts it (caches as they are in `data_dir`): seconds from the spawn
    until /health answers, until the default model is ready, until the first text of a /v1 streamed reply
    sent then, and until the web UI is mounted (/health's "ui")."""
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    spawned = time.time()
    proc = subprocess.Popen([sys.executable, "app.py", "--data-dir", data_dir, "--port", str(port),
                             "--idle-unload", "off"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tail: list[str] = []
    threading.Thread(target=_read_tail, args=(proc.stderr, tail), daemon=True).start()
    figures: dict = {"ok": False, "error": None}
    try:
        health = _poll_health(url, proc, spawned, timeout_s, lambda h: h.get("ready"), figures, "api_s")
        figures["ready_s"] = round(time.time() - spawned, 4)
        body = {"model": model_id, "messages": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    figures["first_token_s"] = round(time.time() - spawned, 4)
                    break
        if health.get("ui") != "ready":
            _poll_health(url, proc, spawned, timeout_s, lambda h: h.get("ui") == "ready", figures, None)
        figures["ui_s"] = round(time.time() - spawned, 4)
        figures["ok"] = "first_token_s" in figures
    except Exception as error:  # noqa: BLE001 - reported, not raised: the other figures still print
        figures["error"] = f"{type(error).__name__}: {error} | " + " | ".join(tail[-5:])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return figures


def _poll_health(url: str, proc, spawned: float, timeout_s: float, done, figures: dict,
                 first_answer: str | None) -> dict:
    """Poll /health every 20 ms until `done(body)`; note when it first answered (seconds from `spawned`)
    as `figures[first_answer]`."""
    import httpx

    while time.time() < spawned + timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}")
        try:
            body = httpx.get(f"{url}/health", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(POLL_S)
            continue
        if first_answer and first_answer not in figures:
            figures[first_answer] = round(time.time() - spawned, 4)
        if done(body):
            return body
        time.sleep(POLL_S)
    raise TimeoutError("app.py did not get there in time")


def _mib(value: int | None) -> float | None:
    return round(value / MIB, 1) if value else None


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "app":
        _child_app(*rest)
    elif mode == "baseline":
        _child_baseline(*rest)
    else:
        sys.exit(f"unknown mode {mode!r}; use app or baseline")
