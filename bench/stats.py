"""Pure helpers of the benchmark: percentiles, stream timings, ratios and the target checks.

Nothing here imports torch or the app, so these functions are quick to test on literals.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default; None if empty."""
    data = sorted(v for v in values if v is not None)
    if not data:
        return None
    if len(data) == 1:
        return data[0]
    rank = (len(data) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return data[low] + (data[high] - data[low]) * (rank - low)


def median(values: list[float | None]) -> float | None:
    data = [v for v in values if v is not None]
    return statistics.median(data) if data else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


@dataclass
class StreamTiming:
    """When one streamed reply started and when each of its text deltas arrived."""

    started: float  # perf_counter when the request was sent / the generator was called
    arrivals: list[float] = field(default_factory=list)  # one per non-empty text delta
    tokens: int = 0  # completion tokens, as the engine or the API's usage reports them
    finished: float | None = None
    error: str | None = None
    cpu_started: float = field(default_factory=time.process_time)  # this process's CPU time, all threads
    cpu_finished: float | None = None

    def finish(self) -> None:
        self.finished = time.perf_counter()
        self.cpu_finished = time.process_time()

    @property
    def cpu_ms_per_token(self) -> float | None:
        """Process CPU time (all threads) per generated token: less sensitive than wall time to other
        processes competing for the cores, though spinning worker threads still inflate it."""
        if self.cpu_finished is None or not self.tokens:
            return None
        return (self.cpu_finished - self.cpu_started) * 1000 / self.tokens

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0] - self.started if self.arrivals else None

    @property
    def gaps(self) -> list[float]:
        """Inter-token latencies: the time between successive deltas (≈ one token each)."""
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens after the first, over the time from the first delta to the last."""
        if self.tokens < 2 or len(self.arrivals) < 2:
            return None
        span = self.arrivals[-1] - self.arrivals[0]
        return (self.tokens - 1) / span if span > 0 else None


def summarize_single(runs: list[StreamTiming]) -> dict:
    """Median over repetitions of decode tok/s and TTFT; ITL percentiles over all gaps pooled."""
    good = [r for r in runs if r.error is None and r.arrivals]
    gaps = [g for r in good for g in r.gaps]
    return {
        "decode_tok_s": _round(median([r.decode_tok_s for r in good])),
        "ttft_s": _round(median([r.ttft for r in good])),
        "itl_p50_s": _round(percentile(gaps, 50)),
        "itl_p95_s": _round(percentile(gaps, 95)),
        "tokens": _round(median([r.tokens for r in good])),
        "cpu_ms_per_token": _round(median([r.cpu_ms_per_token for r in good])),
        "runs": len(good),
        "errors": [r.error for r in runs if r.error],
    }


def summarize_concurrent(runs: list[StreamTiming]) -> dict:
    """Aggregate throughput of requests that ran together, and their TTFT / ITL spread."""
    good = [r for r in runs if r.error is None and r.arrivals]
    tokens = sum(r.tokens for r in good)
    start = min((r.started for r in runs), default=0.0)
    end = max((r.finished or r.arrivals[-1] for r in good), default=start)
    wall = end - start
    ttfts = [r.ttft for r in good]
    gaps = [g for r in good for g in r.gaps]
    return {
        "requests": len(runs),
        "completion_tokens": tokens,
        "wall_s": _round(wall),
        "aggregate_tok_s": _round(tokens / wall) if wall > 0 and good else None,
        "ttft_p50_s": _round(percentile(ttfts, 50)),
        "ttft_p95_s": _round(percentile(ttfts, 95)),
        "itl_p50_s": _round(percentile(gaps, 50)),
        "itl_p95_s": _round(percentile(gaps, 95)),
        "errors": [r.error for r in runs if r.error],
    }


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    limit: float
    unit: str  # what `measured` is: "x baseline", "s", "x uncached", ...
    lower_is_better: bool  # pass when measured <= limit (else measured >= limit)
    strict: bool = False  # "<" rather than "<="


def check(target: Target, measured: float | None, note: str | None = None) -> dict:
    """A target with its measured value and verdict (pass is None when it was not measured)."""
    if measured is None:
        verdict = None
    elif target.lower_is_better:
        verdict = measured < target.limit if target.strict else measured <= target.limit
    else:
        verdict = measured >= target.limit
    op = ("<" if target.strict else "≤") if target.lower_is_better else "≥"
    return {"name": target.name, "description": target.description, "limit": f"{op} {target.limit:g} {target.unit}",
            "threshold": target.limit, "measured": _round(measured), "unit": target.unit, "pass": verdict,
            "note": note}


def _round(value, digits: int = 4):
    if value is None or isinstance(value, int):
        return value
    return round(float(value), digits)
