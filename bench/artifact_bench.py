"""Artifact store benchmark: save and get through the service (SQLite, the
durable default) next to a bare gRPC round trip (a health check on the same
server) measured in the same run, at concurrency 1 and 16.

    python bench/artifact_bench.py [--calls N] [--repeat R]

The service runs in its own process (``hivemesh serve artifact``); this
process is the load generator. Every save is acknowledged only after its
transaction is on disk (fsync), so the saves/s figure is durable saves.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
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
        lines.append(f"target >= {TARGETS['durable saves/s at c=16']} durable saves/s at c=16: "
                     f"{figures['saves/s c=16']:.0f}/s")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per round at c=1 (x4 at c=16)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="interleaved rounds per figure (median taken)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hivemesh-bench-") as tmp:
        proc = start_service("artifact", data_dir=Path(tmp) / "artifact",
                             env={"HIVEMESH_ARTIFACT_SERVER__LOG_LEVEL": "WARNING"})
        try:
            print(f"artifact service (SQLite, fsync per commit) at {proc.address}")
            for line in asyncio.run(bench(proc.address, args.calls, args.repeat)):
                print(line)
        finally:
            proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
