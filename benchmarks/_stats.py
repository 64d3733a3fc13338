"""Small helpers shared by the benchmarks: percentiles and a uniform report line."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def report(name: str, seconds: Sequence[float], unit: str = "ms", target: str = "") -> float:
    """Print ``name: median X, p95 Y`` and return the median in ``unit``."""
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
    median = statistics.median(seconds) * scale
    p95 = percentile(seconds, 95) * scale
    suffix = f"  (target: {target})" if target else ""
    print(
        f"{name:<58} median {median:9.3f} {unit}   p95 {p95:9.3f} {unit}   n={len(seconds)}{suffix}"
    )
    return median
