"""The llama.cpp anchor: the same GGUF file and thread count through llama-cpp-python, in a child process.

    python bench/llamacpp.py MODEL.gguf [--threads 2] [--tokens 64]   # prints one JSON object

llama-cpp-python is optional and not in requirements.txt (it builds llama.cpp from source, ~6 min on
2 cores): `python -m venv /tmp/llamacpp && /tmp/llamacpp/bin/pip install llama-cpp-python`, then
`python bench/run.py --llamacpp-python /tmp/llamacpp/bin/python`, or install it into the app's own
environment and the benchmark finds it there. Figures: load (model file to ready), single-stream
greedy decode tok/s on the benchmark's prompt, and the time to prefill 512 tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PREFILL_TOKENS = 512


def measure(model: Path, threads: int, tokens: int, prompt: str, prefill_text: str) -> dict:
    from llama_cpp import Llama, __version__

    started = time.perf_counter()
    llm = Llama(model_path=str(model), n_threads=threads, n_threads_batch=threads, n_ctx=2048, verbose=False)
    loaded = time.perf_counter()
    first = last = None
    count = 0
    for _ in llm(prompt, max_tokens=tokens, temperature=0.0, stream=True):
        last = time.perf_counter()
        first = first or last
        count += 1
    decode = (count - 1) / (last - first) if count > 1 and last > first else None
    ids = llm.tokenize(prefill_text.encode())[:PREFILL_TOKENS]
    times = []
    for _ in range(2):
        llm.reset()
        began = time.perf_counter()
        llm.eval(ids)
        times.append(time.perf_counter() - began)
    return {"version": __version__, "threads": threads, "load_s": round(loaded - started, 3),
            "decode_tok_s": round(decode, 2) if decode else None, "decode_tokens": count,
            "prefill_tokens": len(ids), "prefill_s": round(min(times), 3),
            "prefill_tok_s": round(len(ids) / min(times), 1)}


def run_child(python: str, model: Path, threads: int, tokens: int, prompt: str, prefill_text: str,
              timeout_s: float = 600) -> dict:
    """The figures from a child process, or {"error": why} (llama_cpp missing, a crash, a time-out)."""
    command = [python, str(Path(__file__).resolve()), str(model), "--threads", str(threads), "--tokens", str(tokens),
               "--prompt", prompt, "--prefill-text", prefill_text]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"error": str(error)}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {done.returncode}: {tail[0]}"}
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": f"no figures in its output: {done.stdout.strip()[-200:]!r}"}


def available(python: str) -> bool:
    done = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True)
    return done.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt", default="Write a long story about a dragon who learns to bake bread.")
    parser.add_argument("--prefill-text", default="The river town woke slowly on market days. " * 100)
    args = parser.parse_args()
    print(json.dumps(measure(args.model, args.threads, args.tokens, args.prompt, args.prefill_text)))


if __name__ == "__main__":
    sys.exit(main())
