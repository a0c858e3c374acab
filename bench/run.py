"""Benchmark the app on the bundled model against plain transformers `generate()` in the same run.

    python bench/run.py --json PATH [--quick] [--skip-baseline-load] [--work-dir DIR] [--keep] (--help: all)

Measures single-stream decode / TTFT / inter-token latency (baseline, engine, /v1), aggregate
throughput at 1/2/4/8 concurrent /v1 sessions, follow-up TTFT with ~2,000 tokens of history,
cold / warm load to first token and peak memory (fresh processes), and hot-swap. Prints a table
and writes the figures, the ratios to the baseline and each target's verdict as JSON
(every key is described in bench/KEYS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import api, loads, report  # noqa: E402
from bench.stats import StreamTiming, median, summarize_single  # noqa: E402

MODEL_ID = "gemma-3-270m"
SWAP_STEM = "gemma-3-270m-swap-copy"
SINGLE_PROMPT = "Write a long story about a dragon who learns to bake bread."
CHAT_SAMPLING = {"temperature": 0.7, "top_k": 40, "top_p": 0.95, "seed": 1234}  # the chat's defaults, seeded
PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Count from 1 to 400, separated by commas.",
    "Explain in detail how a steam engine works, step by step.",
    "Write a long poem about the sea, with at least twenty verses.",
    "List fifty animals, one per line, with a short fact about each.",
    "Describe a walk through a busy city market in great detail.",
    "Write a detailed recipe for a three-course dinner, with every step.",
    "Tell the history of the bicycle from its invention to today, at length.",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--quick", action="store_true",
                        help="few tokens, one repetition, short history, no baseline load (for development)")
    parser.add_argument("--skip-baseline-load", action="store_true",
                        help="skip timing plain transformers' from_pretrained(gguf_file=...) (45-90 s)")
    parser.add_argument("--tokens", type=int, help="single-stream tokens (default 64; --quick 16)")
    parser.add_argument("--concurrent-tokens", type=int, help="max_tokens per concurrent request (48; --quick 16)")
    parser.add_argument("--levels", default="1,2,4,8", help="concurrent session counts")
    parser.add_argument("--repeats", type=int, help="single-stream repetitions, interleaved (2; --quick 1)")
    parser.add_argument("--history-tokens", type=int, help="history before the follow-up turn (2000; --quick 400)")
    parser.add_argument("--followups", type=int, default=1, help="follow-up turns timed (median taken)")
    parser.add_argument("--warm-runs", type=int, help="warm-load processes, median taken (2; --quick 1)")
    parser.add_argument("--work-dir", type=Path, help="where data dirs go (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir afterwards")
    parser.add_argument("--llamacpp-python", default=sys.executable,
                        help="a Python with llama-cpp-python installed, for the llama.cpp anchor (default: this "
                             "one; skipped with a note where it cannot import llama_cpp)")
    parser.add_argument("--cpu-kernels", default="auto", choices=("auto", "torch", "native"),
                        help="the app's --cpu-kernels for everything measured in-process")
    args = parser.parse_args(argv)
    quick = args.quick
    args.tokens = args.tokens or (16 if quick else 64)
    args.concurrent_tokens = args.concurrent_tokens or (16 if quick else 48)
    args.repeats = args.repeats or (1 if quick else 2)
    args.warm_runs = args.warm_runs or (1 if quick else 2)
    args.history_tokens = args.history_tokens or (400 if quick else 2000)
    args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    args.skip_baseline_load = args.skip_baseline_load or quick
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    began = time.perf_counter()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="llm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    meta = describe_machine(args, notes)
    try:
        results = run_all(args, work, notes)
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    meta["model_file_mib"] = results.pop("model_file_mib", None)
    meta["load_avg_end"] = list(os.getloadavg())
    meta["duration_s"] = round(time.perf_counter() - began, 1)
    if max(meta["load_avg_start"][0], meta["load_avg_end"][0]) > 0.5 * meta["machine"]["nproc"]:
        notes.append(f"the machine was busy (load average {meta['load_avg_start'][0]:.1f} at start, "
                     f"{meta['load_avg_end'][0]:.1f} at end, {meta['machine']['nproc']} cores): figures are noisy")
    result = {"schema": 1, "meta": meta, **results}
    result["ratios"] = report.compute_ratios(result)
    result["targets"] = report.compute_targets(result)
    result["summary"] = {k: sum(t["pass"] is v for t in result["targets"])
                         for k, v in (("passed", True), ("failed", False), ("not_measured", None))}
    print(report.table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(f"\nwrote {args.json}")
    return result


def run_all(args, work: Path, notes: list[str]) -> dict:
    cold_dir, main_dir = work / "cold", work / "data"
    gguf = cold_dir / "models" / "gemma-3-270m-q4_k_m.gguf"
    step("cold load (fresh process, empty data dir: assembles, converts, loads)")
    cold = loads.measure_load(["app", str(cold_dir), MODEL_ID])
    warm_runs = []
    for i in range(args.warm_runs):
        step(f"warm load {i + 1}/{args.warm_runs} (fresh process, caches present)")
        warm_runs.append(loads.measure_load(["app", str(cold_dir), MODEL_ID]))
    warm = merge_runs(warm_runs)
    app_runs = []
    for i in range(args.warm_runs):
        step(f"python app.py {i + 1}/{args.warm_runs} (fresh process, caches present): /health, first /v1 token, UI")
        app_runs.append(loads.measure_app_process(str(cold_dir), MODEL_ID))
    cold["peak_over_warm_steady"] = ratio_or_none(cold.get("peak_rss_mib"), warm.get("steady_rss_mib"))
    if not gguf.exists():
        raise SystemExit(f"the cold start did not produce {gguf}: {cold.get('error')}")
    baseline_load = None
    if args.skip_baseline_load:
        notes.append("baseline load (from_pretrained(gguf_file=...)) skipped"
                     + (" (--quick)" if args.quick else " (--skip-baseline-load)"))
    else:
        step("baseline load: transformers from_pretrained(gguf_file=...) + AutoTokenizer (fresh process)")
        baseline_load = loads.measure_load(["baseline", str(gguf)], timeout_s=900)
    prepare_data_dir(main_dir, cold_dir, gguf)
    served = serve(args, main_dir, gguf, notes)
    anchor = served["llamacpp"] or {}
    failed = [run["error"] for run in anchor.get("runs", []) if "error" in run]
    if "error" in anchor or failed:
        notes.append(f"llama.cpp anchor failed in {len(failed) or 'every'} run(s): {anchor.get('error') or failed[0]}")
    return {
        "model_file_mib": round(gguf.stat().st_size / 2**20, 1),
        "llamacpp": served.pop("llamacpp"),
        "baseline": {**served.pop("baseline"), "load_skipped": baseline_load is None, "load": baseline_load,
                     "load_to_first_token_s": (baseline_load or {}).get("start_to_first_token_s")},
        **served,
        "load": {"cold": cold, "warm": warm, "warm_runs": warm_runs, "hot_swap_s": served["hot_swap"]["hot_swap_s"],
                 "app": merge_runs(app_runs), "app_runs": app_runs},
    }


def serve(args, main_dir: Path, gguf: Path, notes: list[str]) -> dict:
    """Everything measured with the app running in this process."""
    from inference.config import AppConfig

    config = AppConfig(data_dir=main_dir, preload=False, default_model=MODEL_ID, port=api.free_port(),
                       idle_unload_s=None, kernels=args.cpu_kernels)
    anchor = llamacpp_anchor(args, gguf, notes)
    step("starting the app in-process (ChatService + create_app + uvicorn)")
    running = api.start_app(config)
    try:
        running.service.load_model(MODEL_ID)
        single = measure_single(args, running, anchor)
        concurrency = {}
        for level in args.levels:
            step(f"{level} concurrent /v1 session(s), {args.concurrent_tokens} tokens each")
            concurrency[str(level)] = api.run_concurrent(running.chat_url, MODEL_ID, PROMPTS, level,
                                                         args.concurrent_tokens)
            if anchor and level == 8:  # (with an anchor, single["llamacpp"] holds its merged runs)
                step("llama.cpp's own batched decoding of the same 8 prompts (child process)")
                batched = single["llamacpp"]["batched_8"] = llamacpp_batched(args, running, gguf, level)
                if "error" in batched:
                    notes.append(f"llama.cpp's batched run failed: {batched['error']}")
        followup = measure_followup(args, running, main_dir, notes)
        step("hot-swap: unload one model, first token from another (same weights, cache warm)")
        swap_id = api.add_model_copy(main_dir / "models", gguf, SWAP_STEM)
        swap = api.hot_swap(running, MODEL_ID, swap_id)
    finally:
        running.stop()
    return {**single, "concurrency": concurrency, "followup": followup, "hot_swap": swap,
            "app_config": app_config_summary(config)}


def measure_single(args, running, anchor=None) -> dict:
    """Baseline generate(), engine, /v1, the engine with the chat's sampling settings and a 512-token
    prefill, interleaved per repetition so drift hits all of them alike; with `anchor`, llama.cpp's
    run (a child process, while the app idles) joins each repetition, so their ratios compare figures
    measured minutes, not a whole benchmark, apart."""
    import httpx
    import torch

    from bench.baseline import Baseline
    from models.gguf_file import read_header
    from models.loader import prepare_checkpoint

    service = running.service
    messages = [{"role": "user", "content": SINGLE_PROMPT}]
    with service.manager.use(MODEL_ID) as lm:
        prompt_ids = lm.render_chat(messages)
        device = lm.device
        loaded = {"weights": lm.weights, "kernels": getattr(lm, "kernels", "torch"),
                  "output_projection": type(lm.model.lm_head).__name__}
    header = read_header(service.catalog.get(MODEL_ID).path)
    folder = prepare_checkpoint(header, service.config.cache_dir, torch.bfloat16, "dense")  # the exact weights
    step(f"baseline model from {folder.name} (bfloat16)")
    baseline = Baseline(folder, device)
    runs: dict[str, list[StreamTiming]] = {"baseline": [], "engine": [], "api": [], "engine_sampled": []}
    prefills, anchors = [], []
    with httpx.Client(timeout=api.REQUEST_TIMEOUT_S) as http:
        step("warm-up (untimed)")
        baseline.generate(prompt_ids, 4)
        api.stream_engine(service, MODEL_ID, messages, 4)
        api.stream_v1(http, running.chat_url, MODEL_ID, messages, 4)
        prefill_once(service)
        for i in range(args.repeats):
            step(f"single stream {i + 1}/{args.repeats}: baseline, engine, /v1, engine sampled "
                 f"({args.tokens} tokens each), a {PREFILL_TOKENS}-token prefill"
                 + (", llama.cpp's decode and prefill" if anchor else ""))
            runs["baseline"].append(baseline.generate(prompt_ids, args.tokens))
            runs["engine"].append(api.stream_engine(service, MODEL_ID, messages, args.tokens))
            runs["api"].append(api.stream_v1(http, running.chat_url, MODEL_ID, messages, args.tokens))
            runs["engine_sampled"].append(api.stream_engine(service, MODEL_ID, messages, args.tokens,
                                                            CHAT_SAMPLING))
            prefills.append(min(prefill_once(service) for _ in range(2)))  # best of two, as llama.cpp's
            if anchor:
                anchors.append(anchor())
    baseline.close()
    gc.collect()
    result = {name: summarize_single(timings) for name, timings in runs.items()}
    result["baseline"]["prompt_tokens"] = len(prompt_ids)
    result["loaded_model"] = loaded
    result["prefill"] = {"tokens": PREFILL_TOKENS, "seconds": round(median(prefills), 3),
                         "tok_s": round(median([PREFILL_TOKENS / t for t in prefills]), 1),
                         "runs_s": [round(t, 3) for t in prefills]}
    result["llamacpp"] = merge_anchor_runs(anchors) if anchor else None
    return result


PREFILL_TOKENS = 512


def prefill_once(service) -> float:
    """Seconds for one 512-token prompt fed in one forward (what the batcher does for a prompt of that
    length): the figure llama.cpp's prefill is compared with."""
    import torch

    from bench.llamacpp import PREFILL_TOKENS as LLAMA_PREFILL
    from inference import kv

    assert LLAMA_PREFILL == PREFILL_TOKENS
    with service.manager.use(MODEL_ID) as lm:
        ids = lm.encode(PREFILL_TEXT)[:PREFILL_TOKENS]
        assert len(ids) == PREFILL_TOKENS
        batch = torch.tensor([ids], device=lm.device)
        began = time.perf_counter()
        with torch.inference_mode():
            lm.model(input_ids=batch, cache=kv.new_cache(lm.model), use_cache=True, logits_to_keep=1)
        return time.perf_counter() - began


PREFILL_TEXT = "The river town woke slowly on market days. " * 100


def llamacpp_anchor(args, gguf: Path, notes: list[str]):
    """A function running llama.cpp once on the same file and thread count in a child process
    (bench/llamacpp.py), or None where llama_cpp cannot be imported (with a note)."""
    import torch

    from bench import llamacpp

    if not llamacpp.available(args.llamacpp_python):
        notes.append(f"llama.cpp anchor skipped: {args.llamacpp_python} cannot import llama_cpp "
                     "(see bench/llamacpp.py for how to install it)")
        return None
    threads = torch.get_num_threads()

    def run_once() -> dict:
        return llamacpp.run_child(args.llamacpp_python, gguf, threads, args.tokens, SINGLE_PROMPT, PREFILL_TEXT)

    return run_once


def llamacpp_batched(args, running, gguf: Path, sessions: int) -> dict:
    """llama.cpp decoding the concurrent sessions' prompts (as our chat template renders them) as one batch
    of sequences, `--concurrent-tokens` each: what llama.cpp itself makes of the aggregate target's load."""
    import torch

    from bench import llamacpp

    with running.service.manager.use(MODEL_ID) as lm:
        prompts = [lm.render_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]) for i in range(sessions)]
    return llamacpp.run_batched_child(args.llamacpp_python, gguf, torch.get_num_threads(), prompts,
                                      args.concurrent_tokens)


def merge_anchor_runs(runs: list[dict]) -> dict:
    """llama.cpp's figures over the repetitions: the median of each, and every run."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[0]["error"] if runs else "not run"}
    merged = {key: good[0][key] for key in ("version", "threads", "decode_tokens", "prefill_tokens") if key in good[0]}
    for key in ("load_s", "decode_tok_s", "prefill_s", "prefill_tok_s"):
        values = [r[key] for r in good if r.get(key) is not None]
        merged[key] = round(median(values), 3) if values else None
    return {**merged, "interleaved": True, "runs": runs}


def measure_followup(args, running, main_dir: Path, notes: list[str]) -> dict:
    """Follow-up TTFT with and without prefix-cache reuse (AppConfig.prefix_cache, when it exists)."""
    from inference.config import AppConfig

    has_flag = "prefix_cache" in {f.name for f in dataclasses.fields(AppConfig)}
    step(f"follow-up turns after ~{args.history_tokens} tokens of history"
         + (" (prefix_cache on)" if has_flag else ""))
    first = api.followup_ttft(running, MODEL_ID, args.history_tokens, args.followups)
    seed = first.pop("seed_messages")
    if not has_flag:
        notes.append("AppConfig has no prefix_cache flag yet: only the uncached follow-up TTFT was measured")
        return {"history_tokens": first["history_tokens"], "ttft_uncached_s": first["followup_ttft_s"],
                "ttft_cached_s": None, "first_turn_ttft_s": first["first_turn_ttft_s"], "cached": None,
                "uncached": first, "note": "no AppConfig.prefix_cache flag; cached not measured"}
    step("the same follow-up turns, second app with prefix_cache=False")
    other_dir = main_dir.parent / "data-uncached"
    prepare_data_dir(other_dir, main_dir, main_dir / "models" / "gemma-3-270m-q4_k_m.gguf")
    config = AppConfig(data_dir=other_dir, preload=False, default_model=MODEL_ID, port=api.free_port(),
                       idle_unload_s=None, prefix_cache=False)
    other = api.start_app(config)
    try:
        other.service.load_model(MODEL_ID)
        uncached = api.followup_ttft(other, MODEL_ID, args.history_tokens, args.followups, seed_messages=seed)
        uncached.pop("seed_messages")
    finally:
        other.stop()
    return {"history_tokens": first["history_tokens"], "ttft_uncached_s": uncached["followup_ttft_s"],
            "ttft_cached_s": first["followup_ttft_s"], "first_turn_ttft_s": first["first_turn_ttft_s"],
            "cached": first, "uncached": uncached, "note": None}


def prepare_data_dir(target: Path, source: Path, gguf: Path) -> None:
    """A data dir sharing `source`'s conversion cache and holding the bundled GGUF (hard link or copy)."""
    (target / "models").mkdir(parents=True, exist_ok=True)
    model = target / "models" / gguf.name
    if not model.exists():
        try:
            os.link(gguf, model)
        except OSError:
            shutil.copyfile(gguf, model)
    cache = target / "cache"
    if not cache.exists():
        os.symlink((source / "cache").resolve(), cache, target_is_directory=True)


def ratio_or_none(a, b):
    return round(a / b, 4) if a is not None and b else None


def merge_runs(runs: list[dict]) -> dict:
    """Median of each numeric field over the warm runs (first run's error if none succeeded)."""
    from bench.stats import median

    good = [r for r in runs if r.get("ok")]
    if not good:
        return runs[0] if runs else {"ok": False, "error": "not run"}
    merged = {"ok": True, "error": None, "runs": len(good)}
    for key, value in good[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = round(median([r.get(key) for r in good]), 4)
    return merged


def app_config_summary(config) -> dict:
    names = {f.name for f in dataclasses.fields(config)}
    return {"prefix_cache": getattr(config, "prefix_cache", None) if "prefix_cache" in names else None,
            "batching": getattr(config, "batching", None) if "batching" in names else None,
            "max_concurrent_generations": config.max_concurrent_generations, "max_context": config.max_context,
            "has_prefix_cache_flag": "prefix_cache" in names, "has_batching_flag": "batching" in names}


def describe_machine(args, notes: list[str]) -> dict:
    import psutil
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"nproc": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
                    "cpu_model": cpu, "platform": platform.platform(), "cpu_flags": cpu_flags()},
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(), "device": device, "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain")), "model_id": MODEL_ID, "quick": args.quick,
        "settings": {"tokens": args.tokens, "concurrent_tokens": args.concurrent_tokens, "levels": args.levels,
                     "repeats": args.repeats, "history_tokens": args.history_tokens, "followups": args.followups,
                     "warm_runs": args.warm_runs,
                     "prompt": SINGLE_PROMPT},
        "load_avg_start": list(os.getloadavg()), "notes": notes,
    }


def cpu_flags() -> list[str]:
    """The CPU features that decide the kernels (models/qlinear.py): native bfloat16, AMX, VNNI, AVX2."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "avx_vnni"})


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def step(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
