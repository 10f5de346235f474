"""Artifact store benchmark: save and get through the service on SQLite
next to a bare gRPC round trip (a health check on the same server) measured
in the same run, at concurrency 1 and 16.

    python bench/artifact_bench.py [--calls N] [--repeat R] [--synchronous full,normal]

The service runs in its own process (``hivemesh serve artifact``); this
process is the load generator. It runs once per SQLite durability level:
``full`` (the default: a save is acknowledged after its transaction is
fsynced, so it survives power loss) and ``normal`` (acknowledged after the
WAL write: survives ``kill -9`` of the service, not a power loss). The raw
cost of one fsynced SQLite commit on this disk, measured in the same run,
is printed as the backend's own floor.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import median_of, run  # noqa: E402

from hivemesh.artifact.v1 import (  # noqa: E402
    ArtifactServiceStub, GetArtifactRequest, SaveArtifactRequest)
from hivemesh.cli.processes import start_service  # noqa: E402

TARGETS = {"save p50/bare": 1.5, "get p50/bare": 1.3, "durable saves/s at c=16": 1500}
CONTENT = "def add(a: int, b: int) -> int:\n    return a + b\n" * 20  # ~1 KiB of code


async def bench(address: str, calls: int, repeat: int) -> list[str]:
    lines: list[str] = []
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        artifacts = ArtifactServiceStub(channel)
        ping = health_pb2.HealthCheckRequest()
        seeded = await artifacts.SaveArtifact(SaveArtifactRequest(
            request_id=str(uuid.uuid4()), workflow_id="wf-bench", agent_id="bench",
            artifact_type="code", content=CONTENT))
        get_request = GetArtifactRequest(artifact_id=seeded.artifact.artifact_id)

        async def bare(_: int):
            return await health.Check(ping, timeout=10)

        async def save(_: int):
            return await artifacts.SaveArtifact(SaveArtifactRequest(
                request_id=str(uuid.uuid4()), workflow_id="wf-bench", task_id="t",
                agent_id="bench", artifact_type="code", content=CONTENT,
            ), timeout=10)

        async def get(_: int):
            return await artifacts.GetArtifact(get_request, timeout=10)

        figures: dict[str, float] = {}
        for concurrency in (1, 16):
            n = calls if concurrency == 1 else calls * 4
            # Rounds interleave the baseline and the operations, so drift in
            # the machine's speed hits all of them alike; the median round counts.
            rounds: dict[str, list] = {}
            for _ in range(repeat):
                for name, fn in (("bare round trip (health)", bare), ("save", save),
                                 ("get", get)):
                    rounds.setdefault(name, []).append(
                        await run(name, fn, concurrency=concurrency, calls=n))
            results = {name: median_of(runs) for name, runs in rounds.items()}
            baseline = results["bare round trip (health)"]
            lines.append(baseline.line())
            for name in ("save", "get"):
                lines.append(results[name].line(baseline))
                figures[f"{name} p50/bare c={concurrency}"] = results[name].p50_us / baseline.p50_us
            figures[f"saves/s c={concurrency}"] = results["save"].throughput
        lines.append("")
        lines.append(f"target save p50 <= {TARGETS['save p50/bare']}x bare: "
                     f"c=1 {figures['save p50/bare c=1']:.2f}x, "
                     f"c=16 {figures['save p50/bare c=16']:.2f}x")
        lines.append(f"target get p50 <= {TARGETS['get p50/bare']}x bare: "
                     f"c=1 {figures['get p50/bare c=1']:.2f}x, "
                     f"c=16 {figures['get p50/bare c=16']:.2f}x")
        lines.append(f"target >= {TARGETS['durable saves/s at c=16']} acknowledged saves/s at c=16: "
                     f"{figures['saves/s c=16']:.0f}/s")
    return lines


def raw_commit_p50_us(directory: Path, commits: int = 300) -> float:
    """p50 of one 1 KiB insert + fsynced COMMIT in SQLite (WAL, FULL) on this
    disk, without any service: the floor under a durable save."""
    conn = sqlite3.connect(directory / "raw.sqlite3", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (content TEXT)")
    times = []
    for _ in range(commits):
        start = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (?)", (CONTENT,))
        conn.execute("COMMIT")
        times.append(time.perf_counter() - start)
    conn.close()
    times.sort()
    return times[len(times) // 2] * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per round at c=1 (x4 at c=16)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="interleaved rounds per figure (median taken)")
    parser.add_argument("--synchronous", default="full,normal",
                        help="SQLite durability levels to run, comma-separated")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hivemesh-bench-") as tmp:
        print(f"raw SQLite commit with fsync on this disk (no service): "
              f"p50={raw_commit_p50_us(Path(tmp)):.0f}us")
        for synchronous in args.synchronous.split(","):
            proc = start_service("artifact", data_dir=Path(tmp) / f"artifact-{synchronous}",
                                 env={"HIVEMESH_ARTIFACT_SERVER__LOG_LEVEL": "WARNING",
                                      "HIVEMESH_ARTIFACT_SQLITE_SYNCHRONOUS": synchronous})
            try:
                print(f"\nartifact service (SQLite, synchronous={synchronous}) at {proc.address}")
                for line in asyncio.run(bench(proc.address, args.calls, args.repeat)):
                    print(line)
            finally:
                proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
