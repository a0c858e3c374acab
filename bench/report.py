"""Targets, ratios to the baseline, and the table printed at the end of a run."""

from __future__ import annotations

from .stats import Target, check, ratio

TARGETS = {
    "single_stream_decode": Target("single_stream_decode", "engine decode tok/s over baseline decode tok/s",
                                   2.0, "x baseline", lower_is_better=False),
    "aggregate_8": Target("aggregate_8", "aggregate tok/s at 8 concurrent /v1 sessions over baseline "
                          "single-stream decode tok/s", 8.0, "x baseline", lower_is_better=False),
    "ttft_p95_8": Target("ttft_p95_8", "p95 TTFT at 8 concurrent /v1 sessions", 2.0, "s", lower_is_better=True,
                         strict=True),
    "followup_ttft": Target("followup_ttft", "follow-up TTFT with ~2,000 tokens of history, cached over uncached",
                            0.1, "x uncached", lower_is_better=True),
    "warm_load": Target("warm_load", "warm load (cache present) to first token, fresh service", 3.0, "s",
                        lower_is_better=True),
    "warm_load_running": Target("warm_load_running", "warm load to first token in a started service (model "
                                "code imported at start)", 3.0, "s", lower_is_better=True),
    "cold_load": Target("cold_load", "cold load (first start, empty data dir) to first token", 15.0, "s",
                        lower_is_better=True),
    "hot_swap": Target("hot_swap", "hot-swap to first token minus warm load to first token", 1.0, "s",
                       lower_is_better=True),
    "load_peak_memory_warm": Target("load_peak_memory_warm", "peak RSS during a warm load over steady RSS", 1.3,
                                    "x steady", lower_is_better=True),
    "load_peak_memory_cold": Target("load_peak_memory_cold", "peak RSS during a cold load (conversion) over "
                                    "the warm load's steady RSS", 1.3, "x steady", lower_is_better=True),
    "decode_vs_llamacpp": Target("decode_vs_llamacpp", "engine single-stream decode tok/s over llama.cpp's "
                                 "(same file, same threads)", 1.0, "x llama.cpp", lower_is_better=False),
    "aggregate_8_vs_llamacpp": Target("aggregate_8_vs_llamacpp", "aggregate tok/s at 8 concurrent /v1 sessions "
                                      "over llama.cpp's single-stream decode", 4.0, "x llama.cpp",
                                      lower_is_better=False),
    "ttft_p95_8_1s": Target("ttft_p95_8_1s", "p95 TTFT at 8 concurrent /v1 sessions", 1.0, "s",
                            lower_is_better=True, strict=True),
    "prefill_vs_llamacpp": Target("prefill_vs_llamacpp", "512-token prefill tok/s over llama.cpp's", 1.0,
                                  "x llama.cpp", lower_is_better=False),
    "load_growth": Target("load_growth", "what the started service grows by when the model loads, over the "
                          "GGUF file's size", 1.5, "x file", lower_is_better=True),
    "warm_load_running_05": Target("warm_load_running_05", "load of a converted model in a started service, "
                                   "request to first token", 0.5, "s", lower_is_better=True),
    "warm_process_4s": Target("warm_process_4s", "process start to first token with warm caches (the model "
                              "side: ChatService start, load, first token)", 4.0, "s", lower_is_better=True),
    "app_first_token_4s": Target("app_first_token_4s", "`python app.py` to the first token of a /v1 stream with "
                                 "warm caches (the whole app: HTTP server first, the UI after)", 4.0, "s",
                                 lower_is_better=True),
    "cold_load_8s": Target("cold_load_8s", "cold load (first start, conversion included) to first token", 8.0, "s",
                           lower_is_better=True),
    "v1_itl_overhead": Target("v1_itl_overhead", "/v1 streaming inter-token latency p50 over the engine's",
                              1.10, "x engine", lower_is_better=True),
}


def compute_ratios(r: dict) -> dict:
    base, engine, api = r["baseline"], r["engine"], r["api"]
    conc8 = r["concurrency"].get("8", {})
    loads = r["load"]
    follow = r["followup"]
    llama = r.get("llamacpp") or {}
    batched = llama.get("batched_8") or {}
    return {
        "engine_decode_vs_baseline": _r(ratio(engine.get("decode_tok_s"), base.get("decode_tok_s"))),
        "api_decode_vs_baseline": _r(ratio(api.get("decode_tok_s"), base.get("decode_tok_s"))),
        "engine_ttft_vs_baseline": _r(ratio(engine.get("ttft_s"), base.get("ttft_s"))),
        "api_ttft_vs_baseline": _r(ratio(api.get("ttft_s"), base.get("ttft_s"))),
        "engine_itl_p50_vs_baseline": _r(ratio(engine.get("itl_p50_s"), base.get("itl_p50_s"))),
        "engine_cpu_per_token_vs_baseline": _r(ratio(engine.get("cpu_ms_per_token"), base.get("cpu_ms_per_token"))),
        "api_itl_p50_vs_engine": _r(ratio(api.get("itl_p50_s"), engine.get("itl_p50_s"))),
        "api_itl_p95_vs_engine": _r(ratio(api.get("itl_p95_s"), engine.get("itl_p95_s"))),
        "sampled_decode_vs_engine": _r(ratio(r.get("engine_sampled", {}).get("decode_tok_s"),
                                             engine.get("decode_tok_s"))),
        "aggregate_vs_baseline_single": {
            level: _r(ratio(figures.get("aggregate_tok_s"), base.get("decode_tok_s")))
            for level, figures in r["concurrency"].items()},
        "aggregate_8_vs_baseline_single": _r(ratio(conc8.get("aggregate_tok_s"), base.get("decode_tok_s"))),
        "followup_cached_vs_uncached": _r(ratio(follow.get("ttft_cached_s"), follow.get("ttft_uncached_s"))),
        "decode_vs_llamacpp": _r(ratio(engine.get("decode_tok_s"), llama.get("decode_tok_s"))),
        "api_decode_vs_llamacpp": _r(ratio(api.get("decode_tok_s"), llama.get("decode_tok_s"))),
        "aggregate_8_vs_llamacpp": _r(ratio(conc8.get("aggregate_tok_s"), llama.get("decode_tok_s"))),
        "aggregate_8_vs_llamacpp_batched_8": _r(ratio(conc8.get("aggregate_tok_s"), batched.get("aggregate_tok_s"))),
        "llamacpp_batched_8_vs_single": _r(ratio(batched.get("aggregate_tok_s"), llama.get("decode_tok_s"))),
        "prefill_vs_llamacpp": _r(ratio(r.get("prefill", {}).get("tok_s"), llama.get("prefill_tok_s"))),
        "warm_load_running_vs_llamacpp_load": _r(ratio(loads["warm"].get("started_to_first_token_s"),
                                                       llama.get("load_s"))),
        "load_growth_vs_file": _r(ratio(loads["warm"].get("model_growth_mib"), r["meta"].get("model_file_mib"))),
        "cold_load_vs_baseline_load": _r(ratio(loads["cold"].get("start_to_first_token_s"),
                                               base.get("load_to_first_token_s"))),
        "warm_load_vs_baseline_load": _r(ratio(loads["warm"].get("start_to_first_token_s"),
                                               base.get("load_to_first_token_s"))),
    }


def compute_targets(r: dict) -> list[dict]:
    ratios, loads, conc8 = r["ratios"], r["load"], r["concurrency"].get("8", {})
    warm = loads["warm"].get("start_to_first_token_s")
    swap = loads.get("hot_swap_s")
    follow_note = r["followup"].get("note")
    llama_note = None if r.get("llamacpp") and "error" not in r["llamacpp"] else "no llama.cpp anchor in this run"
    return [
        check(TARGETS["single_stream_decode"], ratios["engine_decode_vs_baseline"]),
        check(TARGETS["aggregate_8"], ratios["aggregate_8_vs_baseline_single"]),
        check(TARGETS["ttft_p95_8"], conc8.get("ttft_p95_s")),
        check(TARGETS["followup_ttft"], ratios["followup_cached_vs_uncached"], follow_note),
        check(TARGETS["warm_load"], warm, f"of which service start {loads['warm'].get('start_s')} s"),
        check(TARGETS["warm_load_running"], loads["warm"].get("started_to_first_token_s")),
        check(TARGETS["cold_load"], loads["cold"].get("start_to_first_token_s")),
        check(TARGETS["hot_swap"], swap - warm if swap is not None and warm is not None else None,
              f"hot_swap_s={swap}, warm={warm}" if swap is not None else None),
        check(TARGETS["load_peak_memory_warm"], loads["warm"].get("peak_over_steady")),
        check(TARGETS["load_peak_memory_cold"], loads["cold"].get("peak_over_warm_steady"),
              f"over its own steady RSS: {loads['cold'].get('peak_over_steady')}"),
        check(TARGETS["v1_itl_overhead"], ratios["api_itl_p50_vs_engine"]),
        check(TARGETS["decode_vs_llamacpp"], ratios["decode_vs_llamacpp"], llama_note),
        check(TARGETS["aggregate_8_vs_llamacpp"], ratios["aggregate_8_vs_llamacpp"], llama_note),
        check(TARGETS["ttft_p95_8_1s"], conc8.get("ttft_p95_s")),
        check(TARGETS["prefill_vs_llamacpp"], ratios["prefill_vs_llamacpp"], llama_note),
        check(TARGETS["load_growth"], ratios["load_growth_vs_file"]),
        check(TARGETS["warm_load_running_05"], loads["warm"].get("started_to_first_token_s")),
        check(TARGETS["warm_process_4s"], loads["warm"].get("process_to_first_token_s")),
        check(TARGETS["app_first_token_4s"], loads.get("app", {}).get("first_token_s"),
              f"API at {loads.get('app', {}).get('api_s')} s, UI at {loads.get('app', {}).get('ui_s')} s"),
        check(TARGETS["cold_load_8s"], loads["cold"].get("start_to_first_token_s")),
    ]


def _r(value):
    return round(value, 4) if value is not None else None


# ----- table -------------------------------------------------------------------------------------
def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        text = f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    else:
        text = str(value)
    return f"{text}{unit}"


def _rows(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table(r: dict) -> str:
    base, engine, api = r["baseline"], r["engine"], r["api"]
    parts = [f"Benchmark {r['meta']['date']} on {r['meta']['machine']['cpu_model']} "
             f"({r['meta']['machine']['nproc']} cores), torch {r['meta']['torch']}, "
             f"transformers {r['meta']['transformers']}, device {r['meta']['device']}"]
    single = [[name, _fmt(f.get("decode_tok_s")), _fmt(f.get("ttft_s")), _fmt(f.get("itl_p50_s")),
               _fmt(f.get("itl_p95_s")), _fmt(f.get("tokens")), _fmt(f.get("cpu_ms_per_token"))]
              for name, f in (("baseline generate()", base), ("engine", engine), ("/v1 stream", api),
                              ("engine, chat sampling", r.get("engine_sampled", {})))]
    parts.append("\nSingle stream\n" + _rows(["path", "decode tok/s", "TTFT s", "ITL p50 s", "ITL p95 s", "tokens", "CPU ms/token"],
                                              single))
    conc = [[level, _fmt(f.get("aggregate_tok_s")), _fmt(r["ratios"]["aggregate_vs_baseline_single"].get(level), "x"),
             _fmt(f.get("ttft_p50_s")), _fmt(f.get("ttft_p95_s")), _fmt(f.get("itl_p50_s")), len(f.get("errors", []))]
            for level, f in r["concurrency"].items()]
    parts.append("\nConcurrent /v1 sessions\n" + _rows(
        ["sessions", "aggregate tok/s", "vs baseline", "TTFT p50 s", "TTFT p95 s", "ITL p50 s", "errors"], conc))
    follow = r["followup"]
    parts.append(f"\nFollow-up TTFT, {follow.get('history_tokens')} tokens of history: uncached "
                 f"{_fmt(follow.get('ttft_uncached_s'))} s, cached {_fmt(follow.get('ttft_cached_s'))} s "
                 f"(first turn, cold cache: {_fmt(follow.get('first_turn_ttft_s'))} s)"
                 + (f" ({follow['note']})" if follow.get("note") else ""))
    loads = r["load"]
    load_rows = [[name, _fmt(f.get("start_to_first_token_s")), _fmt(f.get("started_to_first_token_s")),
                  _fmt(f.get("process_to_first_token_s")),
                  _fmt(f.get("load_s")), _fmt(f.get("peak_rss_mib")), _fmt(f.get("steady_rss_mib")),
                  _fmt(f.get("peak_over_steady"))]
                 for name, f in (("cold", loads["cold"]), ("warm", loads["warm"]),
                                 ("baseline gguf_file=", base.get("load") or {}))]
    parts.append("\nLoads (fresh processes)\n" + _rows(
        ["load", "to 1st token s", "in started service s", "incl. imports s", "load s", "peak MiB", "steady MiB",
         "peak/steady"], load_rows))
    whole = loads.get("app") or {}
    parts.append(f"python app.py (warm caches): /health answers at {_fmt(whole.get('api_s'))} s, ready at "
                 f"{_fmt(whole.get('ready_s'))} s, first /v1 token at {_fmt(whole.get('first_token_s'))} s, "
                 f"web UI at {_fmt(whole.get('ui_s'))} s")
    parts.append(f"hot-swap (unload, first token from another model): {_fmt(loads.get('hot_swap_s'))} s")
    parts.append(f"model growth on load: {_fmt(loads['warm'].get('model_growth_mib'))} MiB for a "
                 f"{_fmt(r['meta'].get('model_file_mib'))} MiB file")
    llama, prefill, ratios = r.get("llamacpp") or {}, r.get("prefill") or {}, r["ratios"]
    batched = llama.get("batched_8") or {}
    parts.append("\nAgainst llama.cpp (same file, same threads)\n" + _rows(
        ["figure", "this app", "llama.cpp", "ratio"],
        [["decode tok/s (engine)", _fmt(engine.get("decode_tok_s")), _fmt(llama.get("decode_tok_s")),
          _fmt(ratios.get("decode_vs_llamacpp"), "x")],
         ["decode tok/s (/v1)", _fmt(api.get("decode_tok_s")), _fmt(llama.get("decode_tok_s")),
          _fmt(ratios.get("api_decode_vs_llamacpp"), "x")],
         ["512-token prefill tok/s", _fmt(prefill.get("tok_s")), _fmt(llama.get("prefill_tok_s")),
          _fmt(ratios.get("prefill_vs_llamacpp"), "x")],
         ["aggregate tok/s, 8 sessions (/v1 / batched)", _fmt(r["concurrency"].get("8", {}).get("aggregate_tok_s")),
          _fmt(batched.get("aggregate_tok_s")),
          _fmt(ratios.get("aggregate_8_vs_llamacpp_batched_8"), "x")],
         ["load s (started service / llama.cpp)", _fmt(loads["warm"].get("started_to_first_token_s")),
          _fmt(llama.get("load_s")), _fmt(ratios.get("warm_load_running_vs_llamacpp_load"), "x")]]))
    if "aggregate_tok_s" in batched:
        times = _fmt(ratios.get("llamacpp_batched_8_vs_single"), "x")
        parts.append(f"llama.cpp's own aggregate at 8 sequences is {times} its single-stream decode "
                     "(the aggregate_8_vs_llamacpp target asks 4x of ours)")
    verdict = {True: "PASS", False: "FAIL", None: "—"}
    target_rows = [[t["name"], _fmt(t["measured"]), t["limit"], verdict[t["pass"]]] for t in r["targets"]]
    parts.append("\nTargets\n" + _rows(["target", "measured", "limit", "result"], target_rows))
    for note in r["meta"]["notes"]:
        parts.append(f"note: {note}")
    return "\n".join(parts)
