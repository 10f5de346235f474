"""Soak: the whole mesh under steady load for minutes, to see what changes
with time: the run rate, failures, each service's resident memory and CPU
per run. Not part of ``make bench`` (and never of CI): it runs as long as
it is told.

    python bench/soak.py [--minutes M] [--interval S] [--concurrency C] [--synchronous L]

The mesh and the agent are the orchestrator benchmark's (every service its
own process; memory recall and write-back, a RESERVE budget, the mock LLM,
an output artifact on every run), except that nothing is reset between
intervals: the memory namespace grows by two chunks a run, as it would for
an agent that writes its work back, and every service's records pile up
until their bounds and TTLs take over. One line per interval; at the end,
the last interval against the first (runs per second, and each service's
resident memory), and the failures by kind. A failed run is counted and
the load goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from orchestrator_bench import (  # noqa: E402
    CTX, NAMESPACE, NO_TELEMETRY, RunFailed, agent_call, check, cpu_snapshot, prepare,
    start_mesh)

from hivemesh.client.memory import MemoryClient  # noqa: E402
from hivemesh.orchestrator.v1 import OrchestratorServiceStub  # noqa: E402


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Load:
    """``concurrency`` workers calling RunAgent back to back; counts runs
    and failures as they end."""

    def __init__(self, call, concurrency: int) -> None:
        self.call = call
        self.concurrency = concurrency
        self.done = 0
        self.failures: Counter[str] = Counter()
        self._stop = asyncio.Event()

    async def _worker(self, first: int) -> None:
        i = first
        while not self._stop.is_set():
            try:
                await self.call(i)
                self.done += 1
            except RunFailed as exc:
                self.failures[str(exc).split(" message=")[0]] += 1
            i += self.concurrency

    async def run(self) -> None:
        await asyncio.gather(*(self._worker(k) for k in range(self.concurrency)))

    def stop(self) -> None:
        self._stop.set()


async def soak(mesh, minutes: float, interval_s: float, concurrency: int) -> list[str]:
    """Prints a line per interval as it ends; returns the summary lines."""
    pids = {name: proc.process.pid for name, proc in mesh.services.items()}
    lines: list[str] = []
    async with grpc.aio.insecure_channel(mesh.services["orchestrator"].address) as channel, \
            MemoryClient(mesh.services["memory"].address) as memory:
        call = agent_call(OrchestratorServiceStub(channel))
        print(check(await call(0)), flush=True)
        load = Load(call, concurrency)
        running = asyncio.create_task(load.run())
        started = time.monotonic()
        rates: list[float] = []
        rss_first: dict[str, float] = {}
        rss_last: dict[str, float] = {}
        try:
            while time.monotonic() - started < minutes * 60:
                runs0, failed0, cpu0, t0 = (load.done, sum(load.failures.values()),
                                            cpu_snapshot(mesh), time.monotonic())
                await asyncio.sleep(interval_s)
                runs, elapsed = load.done - runs0, time.monotonic() - t0
                cpu1 = cpu_snapshot(mesh)
                rss = {name: rss_mib(pid) for name, pid in pids.items()}
                rss_first = rss_first or rss
                rss_last = rss
                chunks = await memory.count(namespace=NAMESPACE, context=CTX)
                rates.append(runs / elapsed)
                per_run = {k: (cpu1[k] - cpu0[k]) * 1e3 / max(runs, 1) for k in cpu1}
                failed = sum(load.failures.values()) - failed0
                line = (f"t={time.monotonic() - started:6.0f}s runs={load.done:7d} "
                        f"rate={runs / elapsed:6.1f}/s failed={failed:4d} "
                        f"namespace={chunks:7d} chunks | RSS MiB "
                        + " ".join(f"{k}={v:.0f}" for k, v in rss.items())
                        + " | CPU ms/run "
                        + " ".join(f"{k}={v:.2f}" for k, v in per_run.items()
                                   if k != "load generator"))
                print(line, flush=True)
        finally:
            load.stop()
            await running
    if rates:
        lines.append(f"runs/s: first interval {rates[0]:.1f}, last {rates[-1]:.1f} "
                     f"(last/first {rates[-1] / rates[0]:.2f}); {load.done} runs, "
                     f"{sum(load.failures.values())} failed")
        lines.append("RSS MiB first -> last: " + ", ".join(
            f"{k} {rss_first[k]:.0f} -> {rss_last[k]:.0f}" for k in rss_last))
    lines += [f"failure: {n} x {kind}" for kind, n in load.failures.most_common()]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=60.0, help="seconds per line")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--synchronous", default="full", choices=("full", "normal"),
                        help="the providers' SQLite durability (full: their default)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hivemesh-soak-") as tmp:
        mesh = start_mesh(Path(tmp), NO_TELEMETRY, args.synchronous)
        try:
            print(f"mesh: {', '.join(f'{k} {v.address}' for k, v in mesh.services.items())}; "
                  f"SQLite synchronous={args.synchronous}; c={args.concurrency} for "
                  f"{args.minutes:g} min", flush=True)
            asyncio.run(prepare(mesh))
            lines = asyncio.run(soak(mesh, args.minutes, args.interval, args.concurrency))
        finally:
            mesh.stop()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
