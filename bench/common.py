"""Shared by the benchmark scripts: medians and p95 of repeated timings."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def stats(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"p50_ms": statistics.median(s) * 1000, "p95_ms": s[min(len(s) - 1, int(len(s) * 0.95))] * 1000,
            "n": len(s)}


def timeit(fn: Callable[[], object], runs: int, warmup: int = 0, setup: Callable[[], object] | None = None) -> list[float]:
    """Run ``fn`` ``runs`` times (after ``warmup`` untimed runs); ``setup`` runs untimed before each."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        if setup:
            setup()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out
