"""The benchmark's plumbing, without the measuring: arguments, machine description, report and verdicts.

A full run takes many minutes on the bundled model (python bench/run.py); these checks keep its
code paths that run before and after the measurements from breaking unnoticed.
"""

from __future__ import annotations

import json

from bench import report, run


def fake_results() -> dict:
    stream = {"decode_tok_s": 20.0, "ttft_s": 0.3, "itl_p50_s": 0.05, "itl_p95_s": 0.06, "tokens": 64,
              "cpu_ms_per_token": 90.0}
    load = {"start_to_first_token_s": 5.0, "started_to_first_token_s": 2.5, "process_to_first_token_s": 8.0,
            "start_s": 2.5, "load_s": 2.2, "peak_rss_mib": 1200.0, "steady_rss_mib": 1190.0, "peak_over_steady": 1.01}
    return {
        "baseline": {**stream, "decode_tok_s": 10.0, "load_to_first_token_s": 40.0},
        "engine": stream, "api": {**stream, "itl_p50_s": 0.052}, "engine_sampled": {**stream, "decode_tok_s": 19.0},
        "concurrency": {"1": {"aggregate_tok_s": 20.0, "ttft_p50_s": 0.3, "ttft_p95_s": 0.3, "itl_p50_s": 0.05},
                        "8": {"aggregate_tok_s": 60.0, "ttft_p50_s": 0.9, "ttft_p95_s": 1.5, "itl_p50_s": 0.13}},
        "followup": {"history_tokens": 2000, "ttft_cached_s": 0.5, "ttft_uncached_s": 20.0, "first_turn_ttft_s": 20.0},
        "load": {"cold": {**load, "start_to_first_token_s": 14.0, "peak_over_warm_steady": 1.1}, "warm": load,
                 "hot_swap_s": 3.0, "app": {"ok": True, "api_s": 3.5, "ready_s": 3.6, "first_token_s": 3.9, "ui_s": 9.0}},
    }


def test_arguments_and_machine_description():
    args = run.parse_args(["--quick", "--json", "out.json"])
    notes: list[str] = []
    meta = run.describe_machine(args, notes)
    assert meta["machine"]["nproc"] >= 1 and meta["notes"] is notes
    json.dumps(meta)


def test_ratios_targets_and_table():
    result = fake_results()
    result["meta"] = run.describe_machine(run.parse_args([]), ["a note"])
    result["ratios"] = report.compute_ratios(result)
    result["targets"] = report.compute_targets(result)
    verdicts = {t["name"]: t["pass"] for t in result["targets"]}
    assert verdicts["single_stream_decode"] is True  # 20 tok/s against 10
    assert verdicts["aggregate_8"] is False  # 6x, under 8x
    assert verdicts["warm_load"] is False and verdicts["warm_load_running"] is True
    assert verdicts["app_first_token_4s"] is True  # 3.9 s
    assert set(verdicts) == set(report.TARGETS)
    assert result["ratios"]["sampled_decode_vs_engine"] == 0.95
    text = report.table(result)
    assert "Targets" in text and "a note" in text and "engine, chat sampling" in text
    assert "first /v1 token at 3.900 s, web UI at 9.000 s" in text
    json.dumps(result)


def test_llamacpp_runs_interleaved_with_ours_are_merged_by_median():
    runs = [{"version": "0.3", "threads": 2, "load_s": 1.0, "decode_tok_s": 40.0, "decode_tokens": 65,
             "prefill_tokens": 512, "prefill_s": 1.6, "prefill_tok_s": 320.0},
            {"error": "exit 1: crashed"},
            {"version": "0.3", "threads": 2, "load_s": 0.8, "decode_tok_s": 48.0, "decode_tokens": 65,
             "prefill_tokens": 512, "prefill_s": 1.4, "prefill_tok_s": 366.0}]
    merged = run.merge_anchor_runs(runs)
    assert merged["decode_tok_s"] == 44.0 and merged["prefill_tok_s"] == 343.0 and merged["load_s"] == 0.9
    assert merged["interleaved"] and merged["runs"] == runs and "error" not in merged
    assert run.merge_anchor_runs([{"error": "no llama_cpp"}]) == {"error": "no llama_cpp"}
    result = fake_results()
    result["llamacpp"], result["prefill"] = merged, {"tokens": 512, "seconds": 1.5, "tok_s": 341.3}
    result["meta"] = run.describe_machine(run.parse_args([]), [])
    ratios = report.compute_ratios(result)
    assert ratios["decode_vs_llamacpp"] == round(20.0 / 44.0, 4)
    assert ratios["prefill_vs_llamacpp"] == round(341.3 / 343.0, 4)


def test_llamacpps_own_batched_run_is_reported_beside_ours():
    result = fake_results()
    result["llamacpp"] = {"decode_tok_s": 40.0, "prefill_tok_s": 300.0, "load_s": 0.3,
                          "batched_8": {"sequences": 8, "tokens_each": 48, "aggregate_tok_s": 72.0}}
    result["prefill"] = {"tok_s": 330.0}
    result["meta"] = run.describe_machine(run.parse_args([]), [])
    result["ratios"] = report.compute_ratios(result)
    result["targets"] = report.compute_targets(result)
    assert result["ratios"]["aggregate_8_vs_llamacpp_batched_8"] == round(60.0 / 72.0, 4)
    assert result["ratios"]["llamacpp_batched_8_vs_single"] == 1.8
    text = report.table(result)
    assert "aggregate tok/s, 8 sessions" in text and "1.800x its single-stream decode" in text
    del result["llamacpp"]["batched_8"]  # not run (no llama_cpp, or an older result)
    assert report.compute_ratios(result)["aggregate_8_vs_llamacpp_batched_8"] is None


def test_the_batched_child_reports_a_missing_llama_cpp_as_an_error(tmp_path):
    import sys

    from bench import llamacpp

    if llamacpp.available(sys.executable):
        return  # this environment has llama_cpp: nothing to refuse
    done = llamacpp.run_batched_child(sys.executable, tmp_path / "none.gguf", 2, [[2, 3]], 4, timeout_s=120)
    assert "error" in done and "llama_cpp" in done["error"]
