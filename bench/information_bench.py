"""Information service benchmark: reserve+commit pairs (the accounting of
one model call) through the service on SQLite and on Redis, next to a bare
gRPC round trip (a health check on the same server) in the same run.

    python bench/information_bench.py [--pairs N] [--repeat R]

Prints, per backend: a single Reserve's p50 against the bare round trip
(c=1), and pairs per second with the p50 of a pair at c=16, next to the bare
round trip's throughput at c=16 (the pairs-per-second target is absolute, so
the machine's own speed is printed beside it). SQLite runs at
both durability levels: ``sqlite`` (synchronous=full, the default: fsync per
commit) and ``sqlite-normal`` (survives ``kill -9``, not a power loss). The service
runs in its own process; this process is the load generator.
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

from hivemesh.cli.processes import start_service  # noqa: E402
from hivemesh.common.v1 import RequestContext, Usage  # noqa: E402
from hivemesh.information.v1 import (  # noqa: E402
    Budget, CommitRequest, CreateBudgetRequest, InformationServiceStub, ModelPrice,
    ReserveRequest, Scope, SetModelPriceRequest)

REDIS_URL = "redis://127.0.0.1:6379/0"
CTX = RequestContext(tenant_id="acme", workflow_id="wf-bench", agent_id="bench")


async def bench(address: str, label: str, pairs: int, repeat: int) -> list[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        info = InformationServiceStub(channel)
        await info.SetModelPrice(SetModelPriceRequest(request_id=str(uuid.uuid4()), price=ModelPrice(
            model="gpt-bench", input_micros_per_million=2_000_000,
            output_micros_per_million=8_000_000)))
        for scope in (Scope(tenant_id="acme"), Scope(tenant_id="acme", agent_id="bench")):
            await info.CreateBudget(CreateBudgetRequest(request_id=str(uuid.uuid4()), budget=Budget(
                scope=scope, limit_micros=10**15, alert_thresholds_percent=[50, 80, 100])))
        ping = health_pb2.HealthCheckRequest()

        def reserve_request() -> ReserveRequest:
            return ReserveRequest(request_id=str(uuid.uuid4()), context=CTX, model="gpt-bench",
                                  estimated_prompt_tokens=800, max_tokens=400)

        async def bare(_: int):
            return await health.Check(ping, timeout=10)

        async def reserve(_: int):
            return await info.Reserve(reserve_request(), timeout=10)

        async def pair(_: int):
            reserved = await info.Reserve(reserve_request(), timeout=10)
            return await info.Commit(CommitRequest(
                request_id=str(uuid.uuid4()), reservation_id=reserved.reservation_id,
                model="gpt-bench", usage=Usage(prompt_tokens=800, completion_tokens=200),
                success=True), timeout=10)

        rounds: dict[str, list] = {}
        for _ in range(repeat):
            rounds.setdefault("bare", []).append(
                await run(f"{label} bare round trip", bare, concurrency=1, calls=pairs))
            rounds.setdefault("reserve", []).append(
                await run(f"{label} reserve", reserve, concurrency=1, calls=pairs))
            rounds.setdefault("bare16", []).append(
                await run(f"{label} bare round trip", bare, concurrency=16, calls=pairs * 2))
            rounds.setdefault("pair16", []).append(
                await run(f"{label} reserve+commit pair", pair, concurrency=16, calls=pairs * 2))
        bare_r = median_of(rounds["bare"])
        reserve_r = median_of(rounds["reserve"])
        bare16_r = median_of(rounds["bare16"])
        pair_r = median_of(rounds["pair16"])
        # A pair is two calls: its throughput against the bare one's, halved,
        # shows what the pair costs beyond its two round trips on this machine.
        return [bare_r.line(), reserve_r.line(bare_r), bare16_r.line(), pair_r.line(),
                f"{label}: a pair costs {bare16_r.throughput / pair_r.throughput / 2:.2f}x two "
                "bare round trips at c=16 (throughput)",
                f"{label}: target reserve p50 <= 1.5x bare: {reserve_r.p50_us / bare_r.p50_us:.2f}x;"
                f" target >= 1500 pairs/s at c=16: {pair_r.throughput:.0f}/s"]


async def _drop(prefix: str) -> None:
    import redis.asyncio as redis
    client = redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000, help="calls per round")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--backends", default="sqlite,sqlite-normal,redis",
                        help="sqlite (synchronous=full, the default), sqlite-normal, redis")
    args = parser.parse_args()
    for label in args.backends.split(","):
        backend, _, synchronous = label.partition("-")
        prefix = f"hmbench:{uuid.uuid4().hex}:"
        env = {"HIVEMESH_INFORMATION_BACKEND": backend,
               "HIVEMESH_INFORMATION_SQLITE_SYNCHRONOUS": synchronous or "full",
               "HIVEMESH_INFORMATION_REDIS_URL": REDIS_URL,
               "HIVEMESH_INFORMATION_REDIS_PREFIX": prefix,
               "HIVEMESH_INFORMATION_SERVER__LOG_LEVEL": "WARNING"}
        with tempfile.TemporaryDirectory(prefix="hivemesh-bench-") as tmp:
            proc = start_service("information", data_dir=Path(tmp), env=env)
            try:
                for line in asyncio.run(bench(proc.address, label, args.pairs, args.repeat)):
                    print(line)
            finally:
                proc.stop()
                if backend == "redis":
                    asyncio.run(_drop(prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
