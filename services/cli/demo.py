"""``hivemesh up``: start every service built so far, each in its own
process, and run a demonstration through the mesh.

The demonstration runs seed 004's coding -> test -> review workflow by
hand (the orchestrator will run it when it exists): a budget for the
workflow and a price for the model; for each step a reservation of the
worst case, a generation by the LLM service (the keyless mock unless a
backend is configured), the artifact saved, the actual usage committed.
It then lists the artifacts page by page, replays a retried save, and
prints the budget status with the alerts that fired.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import uuid
from pathlib import Path

from hivemesh.cli.processes import Mesh, start_service

SERVICES = ("artifact", "information", "llm")
MODEL = "mock-small"
_WORK = [
    ("code", "coding-agent", "You are a coding expert. Write the code.",
     "Implement a function that adds two integers.", {"language": "python"}),
    ("test", "test-agent", "You write pytest tests for the code you are given.",
     "Write a test for the add function.", {"language": "python", "framework": "pytest"}),
    ("review", "review-agent", "You review code and tests and give a verdict.",
     "Review the add function and its test.", {}),
]


async def _demonstrate(addresses: dict[str, str]) -> None:
    import grpc

    from hivemesh.client import ArtifactClient, InformationClient
    from hivemesh.client.channel import insecure_channel
    from hivemesh.common.v1 import RequestContext
    from hivemesh.information.v1 import Budget, Scope
    from hivemesh.llm.v1 import GenerateRequest, GenerationConfig, LlmServiceStub, Prompt

    workflow_id = f"wf-{uuid.uuid4().hex[:8]}"
    llm_channel = insecure_channel(addresses["llm"], "llm")
    llm = LlmServiceStub(llm_channel)
    async with ArtifactClient(addresses["artifact"]) as artifacts, \
            InformationClient(addresses["information"]) as info:
        await info.set_price(MODEL, input_micros_per_million=500_000,
                             output_micros_per_million=1_500_000)
        budget = await info.create_budget(Budget(
            display_name=f"demo workflow {workflow_id}", scope=Scope(workflow_id=workflow_id),
            limit_micros=500, alert_thresholds_percent=[25, 50, 100], mode=2))
        print(f"\nworkflow {workflow_id}: coding -> test -> review")
        print(f"budget {budget.budget_id}: {budget.limit_micros} micro-USD, soft, "
              f"alerts at {list(budget.alert_thresholds_percent)}%")
        first_request = None
        previous = ""
        for step, (kind, agent, system, task, metadata) in enumerate(_WORK, 1):
            ctx = RequestContext(tenant_id="demo", workflow_id=workflow_id,
                                 task_id=f"task-{step}", agent_id=agent)
            prompt = f"{task}\n\n{previous}".strip()
            held = await info.reserve(ctx, model=MODEL, prompt_tokens=len(prompt) // 4 + 8,
                                      max_tokens=256)
            try:
                generated = await llm.Generate(GenerateRequest(
                    request_id=str(uuid.uuid4()), context=ctx, model=MODEL,
                    prompt=Prompt(system_prompt=system, prompt=prompt),
                    config=GenerationConfig(max_tokens=256)), timeout=30)
            except grpc.RpcError:
                await info.release(held.reservation_id, reason=3)
                raise
            content = generated.message.content
            previous = content
            metadata = {**metadata, "model": generated.model,
                        "tokens": generated.usage.total_tokens}
            request_id = str(uuid.uuid4())
            first_request = first_request or (request_id, kind, agent, content, metadata)
            saved = await artifacts.save(workflow_id=workflow_id, task_id=f"task-{step}",
                                         agent_id=agent, artifact_type=kind, content=content,
                                         metadata=metadata, request_id=request_id)
            charged = await info.commit(held.reservation_id, generated.usage, model=MODEL,
                                        backend=generated.backend,
                                        latency_s=generated.latency.ToNanoseconds() / 1e9)
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
        print(f"\n{code.artifact_id} ({code.artifact_type}, by {code.metadata['model']}):\n"
              f"{code.content}")
    await llm_channel.close()


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
