"""The llama.cpp anchor: the same GGUF file and thread count through llama-cpp-python, in a child process.

    python bench/llamacpp.py MODEL.gguf [--threads 2] [--tokens 64]   # prints one JSON object
    echo '{"prompts": [[ids...], ...], "tokens": 48}' | python bench/llamacpp.py MODEL.gguf --batched

llama-cpp-python is optional and not in requirements.txt (it builds llama.cpp from source, ~6 min on
2 cores): `python -m venv /tmp/llamacpp && /tmp/llamacpp/bin/pip install llama-cpp-python`, then
`python bench/run.py --llamacpp-python /tmp/llamacpp/bin/python`, or install it into the app's own
environment and the benchmark finds it there. Figures: load (model file to ready), single-stream
greedy decode tok/s on the benchmark's prompt, and the time to prefill 512 tokens.

`--batched`: llama.cpp's own answer to the benchmark's concurrent sessions, for comparison with our
aggregate at 8: the same prompt tokens (ids on stdin, as our chat template renders them), each its own
sequence in one context, prefilled in one batch, then greedy steps of one `llama_decode` for all
sequences at once (llama.cpp's batched decoding, as its server does), `tokens` per sequence.
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
    from llama_cpp import __version__

    started = time.perf_counter()
    llm = _llama(model, threads, 2048)
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


def measure_batched(model: Path, threads: int, prompts: list[list[int]], tokens: int) -> dict:
    """Greedy decoding of every prompt at once, one sequence each: the aggregate tok/s over the whole
    round (prefill included, as the benchmark's own concurrent figure), the prefill and the median step."""
    import llama_cpp as lc
    import numpy as np

    if tokens < 2 or not prompts or not all(prompts):
        raise ValueError("the batched run takes 2 or more tokens and a non-empty prompt for each sequence")
    llm = _llama(model, threads, 512)
    sequences, longest = len(prompts), max(len(ids) for ids in prompts)
    params = lc.llama_context_default_params()
    params.n_seq_max = sequences
    params.n_ctx = sequences * (longest + tokens + 32)  # each sequence gets an equal share
    params.n_batch = params.n_ubatch = max(512, sum(len(ids) for ids in prompts))
    params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as Llama() and `measure` run it
    ctx = lc.llama_init_from_model(llm.model, params)
    if not ctx:
        raise RuntimeError("llama.cpp could not make a context for the batched run")
    batch = lc.llama_batch_init(params.n_batch, 0, sequences)
    vocab = llm.n_vocab()

    def decode(entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """Feed (token, position, sequence, wants logits) entries; each logits row's greedy token."""
        rows = []
        for i, (token, position, sequence, wanted) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
            batch.seq_id[i][0], batch.logits[i] = sequence, wanted
            if wanted:
                rows.append(i)
        batch.n_tokens = len(entries)
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed in the batched run")
        return [int(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(vocab,)).argmax()) for i in rows]

    try:
        began = time.perf_counter()
        nexts = decode([(token, position, sequence, position == len(ids) - 1)
                        for sequence, ids in enumerate(prompts) for position, token in enumerate(ids)])
        prefilled = time.perf_counter()
        positions, steps = [len(ids) for ids in prompts], []
        for _ in range(tokens - 1):
            step = time.perf_counter()
            nexts = decode([(nexts[s], positions[s], s, True) for s in range(sequences)])
            steps.append(time.perf_counter() - step)
            positions = [p + 1 for p in positions]
        wall = time.perf_counter() - began
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
    steps.sort()
    return {"sequences": sequences, "tokens_each": tokens, "prompt_tokens": sum(len(ids) for ids in prompts),
            "prefill_s": round(prefilled - began, 3), "step_ms_p50": round(1000 * steps[len(steps) // 2], 2),
            "wall_s": round(wall, 3), "aggregate_tok_s": round(sequences * tokens / wall, 2)}


def _llama(model: Path, threads: int, context: int):
    from llama_cpp import Llama

    return Llama(model_path=str(model), n_threads=threads, n_threads_batch=threads, n_ctx=context, verbose=False)


def run_child(python: str, model: Path, threads: int, tokens: int, prompt: str, prefill_text: str,
              timeout_s: float = 600) -> dict:
    """The figures from a child process, or {"error": why} (llama_cpp missing, a crash, a time-out)."""
    return _child([python, str(Path(__file__).resolve()), str(model), "--threads", str(threads),
                   "--tokens", str(tokens), "--prompt", prompt, "--prefill-text", prefill_text], None, timeout_s)


def run_batched_child(python: str, model: Path, threads: int, prompts: list[list[int]], tokens: int,
                      timeout_s: float = 600) -> dict:
    """`measure_batched`'s figures from a child process, or {"error": why}."""
    return _child([python, str(Path(__file__).resolve()), str(model), "--threads", str(threads), "--batched"],
                  json.dumps({"prompts": prompts, "tokens": tokens}), timeout_s)


def _child(command: list[str], stdin: str | None, timeout_s: float) -> dict:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, input=stdin)
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
    parser.add_argument("--batched", action="store_true", help="the batched run, its prompts as JSON on stdin")
    args = parser.parse_args()
    if args.batched:
        job = json.loads(sys.stdin.read())
        print(json.dumps(measure_batched(args.model, args.threads, job["prompts"], int(job["tokens"]))))
        return
    print(json.dumps(measure(args.model, args.threads, args.tokens, args.prompt, args.prefill_text)))


if __name__ == "__main__":
    sys.exit(main())
