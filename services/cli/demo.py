"""``hivemesh up``: start the whole mesh, each service in its own process
with embedded defaults (mock LLM unless a backend is configured, embedded
Qdrant, SQLite), and run a coding -> test -> review workflow
through the orchestrator.

The orchestrator loads the example agents (``orchestrator/examples/agents``)
and runs the workflow as a DAG: each agent recalls memories and reserves
budget, generates through the LLM service, saves its output as an
artifact, commits its usage and writes memory back. The demonstration
subscribes to the workflow's events first, then prints the events, each
task's output, the artifacts, the budget status and the trace id, and
replays the workflow under the same request id to show it is not run twice.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
import uuid
from importlib import resources
from pathlib import Path

from hivemesh.cli.processes import Mesh, ServiceDidNotStart, start_service

PROVIDERS = ("artifact", "information", "llm", "memory")
MODEL = "mock-small"
PROJECT = "a calculator library"


def example_agents() -> Path:
    return Path(str(resources.files("hivemesh.services.orchestrator")
                    .joinpath("examples", "agents")))


def _workflow(workflow_id: str):
    from hivemesh.orchestrator.v1 import TaskSpec, WorkflowDefinition
    return WorkflowDefinition(workflow_id=workflow_id, display_name="code, test, review",
                              tasks=[
        TaskSpec(task_id="code", agent="coder",
                 input_template="Implement a function that adds two integers."),
        TaskSpec(task_id="test", agent="tester", depends_on=["code"],
                 input_template="Write a test for this code:\n{{tasks.code.output}}"),
        TaskSpec(task_id="review", agent="reviewer", depends_on=["code", "test"],
                 input_template="Review the code and its test.\n\nCode:\n"
                                "{{tasks.code.output}}\n\nTest:\n{{tasks.test.output}}"),
    ])


def _describe(event) -> str:
    from hivemesh.orchestrator.v1 import EventType, TaskStatus
    kind = EventType.Name(event.type).removeprefix("EVENT_TYPE_")
    detail = ""
    payload = event.WhichOneof("payload")
    if payload == "task_start":
        detail = event.task_start.task_id
    elif payload == "task_complete":
        detail = (f"{event.task_complete.task_id} "
                  f"{TaskStatus.Name(event.task_complete.status).removeprefix('TASK_STATUS_')}")
    elif payload == "memory_recalled":
        detail = f"{len(event.memory_recalled.chunk_ids)} memories"
    elif payload == "generation_complete":
        g = event.generation_complete
        detail = f"{g.model} {g.usage.total_tokens} tokens {g.finish_reason}"
    elif payload == "artifact_saved":
        detail = f"{event.artifact_saved.artifact_id} ({event.artifact_saved.artifact_type})"
    elif payload == "memory_written":
        detail = f"{len(event.memory_written.chunk_ids)} chunks"
    elif payload == "budget_alert":
        detail = f"{event.budget_alert.threshold_percent}% of budget"
    elif payload == "degraded":
        detail = f"{event.degraded.reason}: {event.degraded.message}"
    agent = f" [{event.agent}]" if event.agent else ""
    return f"  #{event.sequence:<3} {kind:<19}{agent} {detail}".rstrip()


async def _demonstrate(addresses: dict[str, str]) -> None:
    from hivemesh.client import ArtifactClient, InformationClient
    from hivemesh.client.channel import insecure_channel
    from hivemesh.client.memory import MemoryClient
    from hivemesh.common.v1 import RequestContext
    from hivemesh.information.v1 import Budget, Scope
    from hivemesh.orchestrator.v1 import (
        OrchestratorServiceStub, RunWorkflowRequest, SubscribeEventsRequest, TaskStatus,
        WorkflowStatus)

    workflow_id = f"wf-{uuid.uuid4().hex[:8]}"
    channel = insecure_channel(addresses["orchestrator"], "orchestrator")
    orchestrator = OrchestratorServiceStub(channel)
    async with ArtifactClient(addresses["artifact"]) as artifacts, \
            InformationClient(addresses["information"]) as info, \
            MemoryClient(addresses["memory"]) as memory:
        await info.set_price(MODEL, input_micros_per_million=500_000,
                             output_micros_per_million=1_500_000)
        budget = await info.create_budget(Budget(
            display_name=f"demo workflow {workflow_id}", scope=Scope(workflow_id=workflow_id),
            limit_micros=500, alert_thresholds_percent=[25, 50, 100], mode=2))
        print(f"\nworkflow {workflow_id}: code -> test -> review")
        print(f"budget {budget.budget_id}: {budget.limit_micros} micro-USD, soft, "
              f"alerts at {list(budget.alert_thresholds_percent)}%")

        events = orchestrator.SubscribeEvents(SubscribeEventsRequest(
            workflow_id=workflow_id, until_workflow_complete=True))
        await events.read()  # the heartbeat: the subscription is live
        request = RunWorkflowRequest(
            request_id=str(uuid.uuid4()), workflow=_workflow(workflow_id),
            context=RequestContext(tenant_id="demo"), variables={"project": PROJECT})
        response = await orchestrator.RunWorkflow(request, timeout=120)
        print("\nevents:")
        while True:
            message = await events.read()
            if message.WhichOneof("event") == "end":
                break
            if message.WhichOneof("event") == "agent_event":
                print(_describe(message.agent_event))

        print(f"\nworkflow {WorkflowStatus.Name(response.status).removeprefix('WORKFLOW_STATUS_')}"
              f" in {response.latency.ToMilliseconds()} ms: "
              f"{response.usage.total_tokens} tokens, {response.cost_micros} micro-USD")
        for task in response.tasks:
            r = task.result
            print(f"  {task.task_id:<7} {TaskStatus.Name(task.status).removeprefix('TASK_STATUS_')}"
                  f"  by {r.agent:<9} {r.model:<11} {r.usage.total_tokens:>4} tokens"
                  f" {r.cost_micros:>4} micros  recalled {r.memories_recalled}"
                  f"  artifact {', '.join(r.artifact_ids)}")
        for task in response.tasks:
            print(f"\n--- {task.task_id} ({task.result.agent}) ---\n{task.output.rstrip()}")

        again = await orchestrator.RunWorkflow(request, timeout=120)
        print(f"\nretried workflow request -> replayed={again.replayed} "
              f"(same trace {again.trace_id == response.trace_id})")

        print("\nartifacts of the workflow, newest first:")
        async for a in artifacts.iter(workflow_id=workflow_id, page_size=2):
            print(f"  {a.create_time.ToJsonString()}  {a.artifact_id}  {a.artifact_type:<6}"
                  f" by {a.agent_id}")
        (status,) = await info.status(budget_id=budget.budget_id)
        print(f"\nbudget status: spent {status.spent_micros} of {status.limit_micros} micro-USD "
              f"({status.percent_used:.0f}%), {status.spent_tokens} tokens, reserved "
              f"{status.reserved_micros}, thresholds crossed {list(status.thresholds_crossed)}")
        print(f"memory: {await memory.count(namespace='demo')} chunks in namespace demo")
        print(f"trace id: {response.trace_id}")
    await channel.close()


class _Stop(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: stop the mesh. A KeyboardInterrupt, as
    Python makes of SIGINT itself: the event loop of the demonstration lets
    it through where it drops other exceptions raised in its callbacks."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum, frame) -> None:
    raise _Stop(signum)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_up(data_dir: str | None, keep_running: bool) -> int:
    """Starts the mesh, runs the demonstration and stops every process,
    also when SIGINT or SIGTERM comes first (and ignores a second one while
    the services shut down)."""
    previous = {s: signal.signal(s, _stop) for s in _STOP_SIGNALS}
    try:
        return _up(data_dir, keep_running)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _up(data_dir: str | None, keep_running: bool) -> int:
    code = 0
    serving = False  # the demonstration is done and the mesh kept running
    with tempfile.TemporaryDirectory(prefix="hivemesh-") as tmp:
        root = Path(data_dir) if data_dir else Path(tmp)
        mesh = Mesh()
        try:
            for service in PROVIDERS:
                mesh.services[service] = start_service(
                    service, data_dir=root / service, log_path=Path(tmp) / f"{service}.log")
            env = {f"HIVEMESH_ORCHESTRATOR_{s.upper()}_ADDRESS": mesh.services[s].address
                   for s in PROVIDERS}
            env["HIVEMESH_ORCHESTRATOR_AGENTS_DIR"] = str(example_agents())
            mesh.services["orchestrator"] = start_service(
                "orchestrator", data_dir=root / "orchestrator", env=env,
                log_path=Path(tmp) / "orchestrator.log")
            for name, proc in mesh.services.items():
                print(f"{name:<12} listening on {proc.address} (pid {proc.process.pid})")
            asyncio.run(_demonstrate({n: p.address for n, p in mesh.services.items()}))
            if keep_running:
                serving = True
                print("\nthe mesh keeps running; Ctrl-C or SIGTERM stops it", flush=True)
                while True:
                    signal.pause()
        except _Stop as stop:
            print(f"\n{stop}: stopping the mesh", flush=True)
            # A mesh kept running is stopped by a signal, and that is a
            # success, as for `hivemesh serve`. Before that, the signal
            # interrupted the command: 128 + its number, as a shell reports
            # a command it killed (130 for SIGINT, 143 for SIGTERM).
            code = 0 if serving else 128 + stop.signum
        except ServiceDidNotStart as exc:
            # Its message quotes the log: said plainly, without a traceback.
            print(exc, file=sys.stderr, flush=True)
            code = 1
        finally:
            for s in _STOP_SIGNALS:
                signal.signal(s, signal.SIG_IGN)
            mesh.stop()
        print("\nall services stopped")
    return code
