"""Closed-loop load generation for the benchmarks: ``concurrency`` workers
issue calls back to back for a fixed number of calls; latencies are taken
per call and throughput over the whole run. Ratios against a baseline
measured in the same run are what the benchmarks report."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Result:
    name: str
    concurrency: int
    calls: int
    p50_us: float
    p99_us: float
    throughput: float  # calls per second

    def line(self, baseline: Result | None = None) -> str:
        text = (f"{self.name:<28} c={self.concurrency:<3} n={self.calls:<6} "
                f"p50={self.p50_us:8.0f}us p99={self.p99_us:8.0f}us "
                f"throughput={self.throughput:8.0f}/s")
        if baseline is not None:
            text += (f"  p50/bare={self.p50_us / baseline.p50_us:5.2f}x"
                     f"  p99/bare={self.p99_us / baseline.p99_us:5.2f}x"
                     f"  throughput/bare={self.throughput / baseline.throughput:5.2f}x")
        return text


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def run(name: str, call: Callable[[int], Awaitable[object]], *, concurrency: int,
              calls: int, warmup: int = 200) -> Result:
    for i in range(warmup):
        await call(-1 - i)
    latencies: list[float] = []
    counter = iter(range(calls))

    async def worker() -> None:
        for i in counter:
            start = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    elapsed = time.perf_counter() - started
    latencies.sort()
    return Result(name, concurrency, calls, _percentile(latencies, 0.5) * 1e6,
                  _percentile(latencies, 0.99) * 1e6, calls / elapsed)


def median_of(results: list[Result]) -> Result:
    """The run with the median p50 out of several repetitions."""
    ordered = sorted(results, key=lambda r: r.p50_us)
    mid = ordered[len(ordered) // 2]
    return Result(mid.name, mid.concurrency, mid.calls, mid.p50_us,
                  statistics.median(r.p99_us for r in results),
                  statistics.median(r.throughput for r in results))
