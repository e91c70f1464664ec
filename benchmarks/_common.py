"""Shared helpers: medians over repeated runs, and a uniform report line."""
from __future__ import annotations

import statistics
import time


def median_of(fn, runs: int = 7) -> float:
    """Median of fn()'s returned figure over `runs` runs (these machines are noisy)."""
    return statistics.median(fn() for _ in range(runs))


def timed(fn, *args) -> float:
    t = time.perf_counter_ns()
    fn(*args)
    return time.perf_counter_ns() - t


def report(name: str, value: float, unit: str, baseline_name: str, baseline: float,
           target: str = "") -> dict:
    ratio = value / baseline if baseline else float("inf")
    line = "%-46s %10.2f %-6s | %-34s %10.2f %-6s | ratio %6.2fx" % (
        name, value, unit, baseline_name, baseline, unit, ratio)
    if target:
        line += "  (target %s)" % target
    print(line, flush=True)
    return {"name": name, "value": value, "unit": unit, "baseline": baseline_name,
            "baseline_value": baseline, "ratio": ratio, "target": target}
