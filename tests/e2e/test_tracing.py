"""One trace per request across every hop: the whole mesh runs as separate
processes exporting spans over OTLP/gRPC to a real receiver built from the
opentelemetry-proto contracts; a workflow with a fan-out runs while the LLM
service fails its first call (so the orchestrator's channel retries it);
every span must belong to the one trace, with correct parent links."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import defaultdict

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from hivemesh.cli.processes import start_service
from hivemesh.client.channel import insecure_channel
from hivemesh.orchestrator.v1 import (
    AgentDefinition, AgentList, CombineMode, FanOut, MemoryConfig, OrchestratorServiceStub,
    RegisterAgentRequest, RunWorkflowRequest, TaskSpec, WorkflowDefinition, WorkflowStatus)
from hivemesh.common.v1 import RequestContext

SERVER, CLIENT = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, trace_pb2.Span]] = []  # (service.name, span)

    async def Export(self, request, context):
        for resource_spans in request.resource_spans:
            service = next(a.value.string_value for a in resource_spans.resource.attributes
                           if a.key == "service.name")
            for scope in resource_spans.scope_spans:
                self.spans += [(service, s) for s in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


def attributes(span: trace_pb2.Span) -> dict:
    out = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        value = getattr(a.value, kind)
        out[a.key] = list(v.string_value for v in value.values) if kind == "array_value" \
            else value
    return out


@pytest.fixture
async def receiver():
    server = grpc.aio.server()
    collected = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collected, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield collected, f"http://127.0.0.1:{port}"
    await server.stop(0)


async def test_a_workflow_is_one_trace_across_every_hop(tmp_path, receiver):
    collected, endpoint = receiver
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": "600000"}
    llm_env = {**otel, "HIVEMESH_LLM_BACKENDS": json.dumps(
        {"mock": {"type": "mock", "max_attempts": 1, "mock_fail_first": 1}}),
        "HIVEMESH_LLM_MODELS": json.dumps(
            [{"alias": "mock-small", "backend": "mock", "upstream_model": "mock-small",
              "default": True}])}
    procs = {}
    try:
        for name, env in (("artifact", otel), ("information", otel), ("llm", llm_env),
                          ("memory", otel)):
            procs[name] = start_service(name, data_dir=tmp_path / name, env=env,
                                        log_path=tmp_path / f"{name}.log")
        procs["orchestrator"] = start_service("orchestrator", env={
            **otel, **{f"HIVEMESH_ORCHESTRATOR_{n.upper()}_ADDRESS": p.address
                       for n, p in procs.items()}}, log_path=tmp_path / "orchestrator.log")
        channel = insecure_channel(procs["orchestrator"].address, "orchestrator")
        stub = OrchestratorServiceStub(channel)
        for name, memory in (("coder", MemoryConfig(enabled=True, write_back=True)),
                             ("reviewer-a", MemoryConfig()), ("reviewer-b", MemoryConfig())):
            await stub.RegisterAgent(RegisterAgentRequest(request_id=str(uuid.uuid4()),
                                                          agent=AgentDefinition(
                name=name, model="mock-small", system_prompt=f"You are {name}.",
                output_artifact_type="report", memory=memory)), timeout=10)
        response = await stub.RunWorkflow(RunWorkflowRequest(
            request_id=str(uuid.uuid4()), context=RequestContext(tenant_id="acme"),
            workflow=WorkflowDefinition(tasks=[
                TaskSpec(task_id="code", agent="coder", input_template="implement add"),
                TaskSpec(task_id="review", input_template="review {{tasks.code.output}}",
                         depends_on=["code"], fan_out=FanOut(
                             agents=AgentList(agents=["reviewer-a", "reviewer-b"]),
                             combine=CombineMode.COMBINE_MODE_ALL))])), timeout=60)
        await channel.close()
        assert response.status == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED, response.error
    finally:
        # SIGTERM: each service flushes its spans on the way out, to the
        # receiver served by this event loop (so stop them off the loop).
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs.values()))
    trace_id = bytes.fromhex(response.trace_id)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(s.trace_id == trace_id
                                                  and a == "hivemesh-orchestrator"
                                                  for a, s in collected.spans):
        await asyncio.sleep(0.1)

    spans = [(service, s) for service, s in collected.spans if s.trace_id == trace_id]
    ids = {s.span_id for _, s in spans}
    roots = [s for _, s in spans if not s.parent_span_id]
    assert len(roots) == 1 and roots[0].name.endswith("OrchestratorService/RunWorkflow")
    orphans = [s.name for _, s in spans if s.parent_span_id and s.parent_span_id not in ids]
    assert orphans == []
    # Every span the providers exported is in this one trace (the only other
    # traces are the three RegisterAgent calls, which call no provider).
    assert {s.trace_id for service, s in collected.spans
            if service != "hivemesh-orchestrator"} == {trace_id}
    assert len({s.trace_id for _, s in collected.spans}) == 4
    assert {service for service, _ in spans} == {
        "hivemesh-orchestrator", "hivemesh-llm", "hivemesh-memory", "hivemesh-information",
        "hivemesh-artifact"}

    by_id = {s.span_id: s for _, s in spans}
    children = defaultdict(list)
    for _, s in spans:
        children[s.parent_span_id].append(s)
    # Every provider server span is the child of an orchestrator client span.
    for service, s in spans:
        if s.kind == SERVER and service != "hivemesh-orchestrator":
            parent = by_id[s.parent_span_id]
            assert parent.kind == CLIENT and parent.name == s.name
            assert attributes(s).get("hivemesh.tenant_id") == "acme"
            assert attributes(s).get("hivemesh.workflow_id") == response.workflow_id
    # The forced retry: one Generate client span with two server attempts,
    # the first one failed with UNAVAILABLE.
    generate = [s for _, s in spans
                if s.kind == CLIENT and s.name.endswith("LlmService/Generate")]
    assert len(generate) == 3  # coder, reviewer-a, reviewer-b
    retried = [g for g in generate if len(children[g.span_id]) == 2]
    assert len(retried) == 1
    attempts = sorted(children[retried[0].span_id], key=lambda s: s.start_time_unix_nano)
    assert [attributes(a)["rpc.grpc.status_code"] for a in attempts] == [14, 0]
    # Generation spans carry the GenAI attributes.
    for g in generate:
        a = attributes(g)
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.request.model"] == "mock-small"
        assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
        assert a["gen_ai.response.finish_reasons"] == ["stop"]
    # Agent spans, one per run, under their task spans.
    agent_spans = sorted(attributes(s)["gen_ai.agent.name"] for _, s in spans
                         if s.name.startswith("invoke_agent "))
    assert agent_spans == ["coder", "reviewer-a", "reviewer-b"]
    for _, s in spans:
        if s.name.startswith("invoke_agent "):
            assert by_id[s.parent_span_id].name.startswith("task ")
    # The memory service traces its Qdrant engine calls inside its server spans.
    qdrant = [s for service, s in spans if service == "hivemesh-memory"
              and s.name.startswith("qdrant ")]
    assert qdrant and all(by_id[s.parent_span_id].kind == SERVER for s in qdrant)
    # At most 2 spans per hop: a client and a server span (plus retried attempts).
    hops = sum(1 for _, s in spans if s.kind == CLIENT)
    rpc_spans = sum(1 for _, s in spans if s.kind in (CLIENT, SERVER))
    assert rpc_spans <= 2 * hops + 1


# Run in a process of its own: the tracer provider is global, once per process.
_CUT_STREAM_TRACE = r'''
import asyncio, json, pathlib, sys, tempfile
sys.path.insert(0, sys.argv[1])
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
from fakes.mesh import mesh
from hivemesh.common.v1 import RequestContext
from hivemesh.orchestrator.v1 import (
    AgentDefinition, BudgetPolicy, RegisterAgentRequest, StreamAgentRequest)

async def main():
    with tempfile.TemporaryDirectory() as tmp:
        async with mesh(pathlib.Path(tmp)) as m:
            await m.orchestrator.RegisterAgent(RegisterAgentRequest(
                request_id="reg", agent=AgentDefinition(name="a", model="main")), timeout=20)
            m.primary.queue_response("one two three four five")
            m.primary.cut_next_stream_after(2)
            async for _ in m.orchestrator.StreamAgent(StreamAgentRequest(
                    request_id="run", agent="a", input="go",
                    context=RequestContext(tenant_id="acme")), timeout=20):
                pass
    spans = exporter.get_finished_spans()
    print(json.dumps([{"name": s.name, "id": s.context.span_id, "kind": s.kind.name,
                       "parent": s.parent.span_id if s.parent else None,
                       "status": s.status.status_code.name,
                       "attributes": {k: str(v) for k, v in (s.attributes or {}).items()}}
                      for s in spans]))
asyncio.run(main())
'''


def test_a_stream_cut_by_its_terminal_message_ends_its_span_and_parents_nothing(tmp_path):
    """The LLM service ends a cut stream with a FAILED terminal message: the
    orchestrator's client span of that stream ends there, as an error with
    the usage, and the run's later calls (the cut's charge, the release of
    its hold) are children of the agent span, not of the stream's."""
    import subprocess
    import sys
    from pathlib import Path
    tests = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _CUT_STREAM_TRACE, str(tests)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Failed to detach context" not in done.stderr
    spans = json.loads(done.stdout.strip().splitlines()[-1])
    by_id = {s["id"]: s for s in spans}
    (stream,) = [s for s in spans if s["kind"] == "CLIENT" and s["name"].endswith(
        "LlmService/StreamGenerate")]
    (agent,) = [s for s in spans if s["name"] == "invoke_agent a"]
    assert stream["status"] == "ERROR" and stream["parent"] == agent["id"]
    assert int(stream["attributes"]["gen_ai.usage.output_tokens"]) > 0
    later = [s for s in spans if s["kind"] == "CLIENT" and "InformationService" in s["name"]]
    assert {s["name"].rsplit("/", 1)[1] for s in later} >= {"Reserve", "TrackCompletion"}
    assert all(by_id[s["parent"]]["name"] == "invoke_agent a" for s in later), later
