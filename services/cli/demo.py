"""``hivemesh up``: start every service built so far, each in its own
process, and run a demonstration through the mesh.

The demonstration accounts and stores the work of seed 004's coding ->
test -> review workflow: a budget for the workflow, a price for the model,
and for each step a reservation of the worst case before the (simulated)
generation, the artifact saved, the actual usage committed. It then lists
the artifacts page by page, replays a retried save, and prints the budget
status with the alerts that fired. The LLM and the orchestrator join the
demonstration when their services exist.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import uuid
from pathlib import Path

from hivemesh.cli.processes import Mesh, start_service

SERVICES = ("artifact", "information")
MODEL = "mock-small"
_WORK = [
    ("code", "coding-agent", "def add(a: int, b: int) -> int:\n    return a + b\n",
     {"language": "python"}),
    ("test", "test-agent", "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n",
     {"language": "python", "framework": "pytest"}),
    ("review", "review-agent", "LGTM: add() is typed and covered by a test.",
     {"verdict": "approve"}),
]


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


async def _demonstrate(addresses: dict[str, str]) -> None:
    from hivemesh.client import ArtifactClient, InformationClient
    from hivemesh.common.v1 import RequestContext, Usage
    from hivemesh.information.v1 import Budget, Scope

    workflow_id = f"wf-{uuid.uuid4().hex[:8]}"
    async with ArtifactClient(addresses["artifact"]) as artifacts, \
            InformationClient(addresses["information"]) as info:
        await info.set_price(MODEL, input_micros_per_million=500_000,
                             output_micros_per_million=1_500_000)
        budget = await info.create_budget(Budget(
            display_name=f"demo workflow {workflow_id}", scope=Scope(workflow_id=workflow_id),
            limit_micros=100, alert_thresholds_percent=[25, 50, 100], mode=2))
        print(f"\nworkflow {workflow_id}: coding -> test -> review")
        print(f"budget {budget.budget_id}: {budget.limit_micros} micro-USD, soft, "
              f"alerts at {list(budget.alert_thresholds_percent)}%")
        first_request = None
        for step, (kind, agent, content, metadata) in enumerate(_WORK, 1):
            ctx = RequestContext(tenant_id="demo", workflow_id=workflow_id,
                                 task_id=f"task-{step}", agent_id=agent)
            prompt = f"write the {kind} for step {step}"
            held = await info.reserve(ctx, model=MODEL, prompt_tokens=_tokens(prompt),
                                      max_tokens=256)
            request_id = str(uuid.uuid4())
            first_request = first_request or (request_id, kind, agent, content, metadata)
            saved = await artifacts.save(workflow_id=workflow_id, task_id=f"task-{step}",
                                         agent_id=agent, artifact_type=kind, content=content,
                                         metadata=metadata, request_id=request_id)
            charged = await info.commit(held.reservation_id, Usage(
                prompt_tokens=_tokens(prompt), completion_tokens=_tokens(content),
                total_tokens=_tokens(prompt) + _tokens(content)), model=MODEL)
            a = saved.artifact
            alerts = "".join(f"  ALERT {x.threshold_percent}%" for x in charged.alerts)
            print(f"  saved {a.artifact_id}  {kind:<7} by {agent:<13} {a.size_bytes:>4} bytes"
                  f"  held {held.reserved_micros} -> charged {charged.cost_micros} micros"
                  f"{alerts}")
        rid, kind, agent, content, metadata = first_request
        retry = await artifacts.save(workflow_id=workflow_id, task_id="task-1", agent_id=agent,
                                     artifact_type=kind, content=content, metadata=metadata,
                                     request_id=rid)
        print(f"  retried save of task-1 -> replayed={retry.replayed} "
              f"(same id {retry.artifact.artifact_id})")
        print("\nartifacts of the workflow, newest first (2 per page):")
        async for a in artifacts.iter(workflow_id=workflow_id, page_size=2):
            print(f"  {a.create_time.ToJsonString()}  {a.artifact_id}  {a.artifact_type}")
        total = await artifacts.count(workflow_id=workflow_id)
        reviews = await artifacts.count(workflow_id=workflow_id, artifact_type="review")
        print(f"\ncount: {total} artifacts, {reviews} review")
        (status,) = await info.status(budget_id=budget.budget_id)
        print(f"budget status: spent {status.spent_micros} of {status.limit_micros} micro-USD "
              f"({status.percent_used:.0f}%), {status.spent_tokens} tokens, reserved "
              f"{status.reserved_micros}, thresholds crossed {list(status.thresholds_crossed)}")
        code = (await artifacts.list(workflow_id=workflow_id, artifact_type="code")).artifacts[0]
        print(f"\n{code.artifact_id} ({code.artifact_type}):\n{code.content}")


def run_up(data_dir: str | None, keep_running: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="hivemesh-") as tmp:
        root = Path(data_dir) if data_dir else Path(tmp)
        mesh = Mesh()
        try:
            for service in SERVICES:
                proc = start_service(service, data_dir=root / service,
                                     log_path=Path(tmp) / f"{service}.log")
                mesh.services[service] = proc
                print(f"{service:<11} listening on {proc.address} (pid {proc.process.pid})")
            asyncio.run(_demonstrate({n: p.address for n, p in mesh.services.items()}))
            if keep_running:
                print("\nthe mesh keeps running; Ctrl-C stops it")
                signal.sigwait({signal.SIGINT, signal.SIGTERM})
        finally:
            mesh.stop()
        print("\nall services stopped")
    return 0
