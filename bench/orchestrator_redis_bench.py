"""The orchestrator's Redis round trips: the commands one plain RunAgent
sends to the redis state backend, and RunAgent's latency at c=1.

    python bench/orchestrator_redis_bench.py [--runs N] [--redis URL]

The whole mesh runs in this process (tests/fakes/mesh.py: every service a
real gRPC server on loopback, the LLM a mock), the orchestrator on the
redis state backend under a fresh key prefix (dropped afterwards). The
agent is the orchestrator benchmark's: memory recall and write-back, a
RESERVE budget, one generation, an output artifact. Every command the
orchestrator sends to Redis is counted (the client's ``execute_command``
wrapped; a script shows as the name it has in ``redis_state``), first for
one run, then ``--runs`` runs are timed one after the other.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from fakes.mesh import mesh  # noqa: E402
from fakes.redis_commands import CommandLog  # noqa: E402

from hivemesh.client import InformationClient  # noqa: E402
from hivemesh.common.v1 import RequestContext  # noqa: E402
from hivemesh.information.v1 import Budget, Scope  # noqa: E402
from hivemesh.orchestrator.v1 import (  # noqa: E402
    AgentDefinition, MemoryConfig, RegisterAgentRequest, RunAgentRequest)

AGENT = "bench-coder"
CTX = RequestContext(tenant_id="bench")


async def prepare(m) -> None:
    async with InformationClient(m.addresses["information"]) as info:
        await info.set_price("main", input_micros_per_million=1_000_000,
                             output_micros_per_million=2_000_000)
        await info.create_budget(Budget(scope=Scope(tenant_id=CTX.tenant_id),
                                        limit_micros=10**15))
    await m.orchestrator.RegisterAgent(RegisterAgentRequest(
        request_id=str(uuid.uuid4()), agent=AgentDefinition(
            name=AGENT, model="main", system_prompt="You are a careful Python programmer.",
            output_artifact_type="code",
            memory=MemoryConfig(enabled=True, write_back=True, namespace="bench"))), timeout=30)


async def run_once(m, i: int) -> None:
    response = await m.orchestrator.RunAgent(RunAgentRequest(
        request_id=str(uuid.uuid4()), agent=AGENT, context=CTX,
        input=f"Implement function {i} ({uuid.uuid4().hex[:8]}) that adds two numbers"),
        timeout=30)
    r = response.result
    assert r.output and r.cost_micros > 0 and len(r.artifact_ids) == 1 and not r.degraded, r


async def main(runs: int, url: str) -> None:
    prefix = f"hmbench:orch:{uuid.uuid4().hex}:"
    with tempfile.TemporaryDirectory() as tmp:
        async with mesh(Path(tmp), state_backend="redis", redis_url=url,
                        redis_prefix=prefix) as m:
            state = m.backend.redis
            try:
                await prepare(m)
                await run_once(m, -1)  # the scripts loaded, the channels up
                log = CommandLog(state)
                await run_once(m, 0)
                print(f"one RunAgent: {len(log.commands)} Redis commands: {log.line()}")
                latencies = []
                for i in range(runs):
                    started = time.perf_counter()
                    await run_once(m, i + 1)
                    latencies.append(time.perf_counter() - started)
                latencies.sort()
                print(f"{runs} RunAgents at c=1: p50={statistics.median(latencies) * 1e3:.2f} ms "
                      f"p90={latencies[int(0.9 * (runs - 1))] * 1e3:.2f} ms")
            finally:
                keys = [k async for k in state.client.scan_iter(match=f"{prefix}*")]
                if keys:
                    await state.client.delete(*keys)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.redis))
