"""The mesh as separate processes, a provider killed (``kill -9``) and
restarted between a failed run and its retry under the same request_id:
the retry ends the run with each effect once."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest

from hivemesh.cli.demo import example_agents
from hivemesh.cli.processes import start_service
from hivemesh.client import ArtifactClient, InformationClient, from_rpc_error
from hivemesh.client.errors import from_status
from hivemesh.client.errors import UnavailableError
from hivemesh.common.v1 import RequestContext, StreamOutcome
from hivemesh.information.v1 import Budget, Scope
from hivemesh.orchestrator.v1 import (
    EventType, OrchestratorServiceStub, RunAgentRequest, RunAgentResponse, StreamAgentRequest)

MODEL = "mock-small"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port(proc) -> str:
    return proc.address.rsplit(":", 1)[1]


async def _run(address: str, request: RunAgentRequest | StreamAgentRequest
               ) -> RunAgentResponse:
    """RunAgent, or StreamAgent as its response: its AGENT_COMPLETE event's
    result (replayed when that is all the stream sent); a FAILED end raises
    its error."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = OrchestratorServiceStub(channel)
        try:
            if isinstance(request, RunAgentRequest):
                return await stub.RunAgent(request, timeout=30)
            messages = [m async for m in stub.StreamAgent(request, timeout=30)]
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from err
    end = messages[-1].end
    if end.outcome != StreamOutcome.STREAM_OUTCOME_COMPLETED:
        raise from_status(end.error)
    events = [m.agent_event for m in messages[:-1]]
    assert events[-1].type == EventType.EVENT_TYPE_AGENT_COMPLETE
    return RunAgentResponse(result=events[-1].agent_complete, replayed=len(events) == 1)


async def _run_until_reachable(address: str, request: RunAgentRequest):
    """The run, retried while a provider a restart brought back is still
    being reconnected to (UNAVAILABLE); a bounded number of times."""
    for _ in range(40):
        try:
            return await _run(address, request)
        except UnavailableError:
            await asyncio.sleep(0.5)
    return await _run(address, request)


@pytest.mark.parametrize("streamed", [False, True], ids=["RunAgent", "StreamAgent"])
def test_a_run_retried_after_the_llm_service_restarted_is_charged_and_saved_once(
        tmp_path, streamed):
    """The first attempt generated, committed its usage and failed on the
    artifact store (down). The LLM service is then killed and restarted:
    it no longer holds the generation's record (it runs without a data
    directory, which keeps its records in memory: as another replica, or a
    new pod, would not have them either). The retry must still end the run,
    with one charge and one artifact, not refuse it because a new generation
    is not the one committed under the same request id."""
    procs = []
    try:
        info = start_service("information", data_dir=tmp_path / "information")
        procs.append(info)
        llm = start_service("llm")
        procs.append(llm)
        artifact_port = _free_port()  # nothing listens there yet: an outage
        env = {"HIVEMESH_ORCHESTRATOR_LLM_ADDRESS": llm.address,
               "HIVEMESH_ORCHESTRATOR_INFORMATION_ADDRESS": info.address,
               "HIVEMESH_ORCHESTRATOR_ARTIFACT_ADDRESS": f"127.0.0.1:{artifact_port}",
               "HIVEMESH_ORCHESTRATOR_AGENTS_DIR": str(example_agents())}
        orchestrator = start_service("orchestrator", data_dir=tmp_path / "orchestrator",
                                     env=env)
        procs.append(orchestrator)

        async def budget() -> str:
            async with InformationClient(info.address) as client:
                await client.set_price(MODEL, input_micros_per_million=500_000,
                                       output_micros_per_million=1_500_000)
                return (await client.create_budget(Budget(
                    display_name="restarts", scope=Scope(tenant_id="restarts"),
                    limit_micros=10**9, mode=2))).budget_id

        budget_id = asyncio.run(budget())
        request = (StreamAgentRequest if streamed else RunAgentRequest)(
            request_id="run-across-restarts", agent="tester", input="Write a test for add(a, b).",
            context=RequestContext(tenant_id="restarts", workflow_id="wf-restarts"))
        try:
            asyncio.run(_run(orchestrator.address, request))
        except UnavailableError as err:
            assert err.metadata["provider"] == "artifact"
        else:
            raise AssertionError("the run succeeded without its artifact store")

        llm.kill()
        llm = start_service("llm", extra_args=["--port", _port(llm)])
        procs.append(llm)
        procs.append(start_service("artifact", data_dir=tmp_path / "artifact",
                                   extra_args=["--port", str(artifact_port)]))
        artifact_address = procs[-1].address

        done = asyncio.run(_run_until_reachable(orchestrator.address, request)).result
        again = asyncio.run(_run(orchestrator.address, request))
        assert again.replayed and again.result.artifact_ids == done.artifact_ids

        async def effects():
            async with InformationClient(info.address) as client:
                (status,) = await client.status(budget_id=budget_id)
            async with ArtifactClient(artifact_address) as artifacts:
                saved = [a.artifact_id async for a in artifacts.iter(workflow_id="wf-restarts")]
            return status, saved

        status, saved = asyncio.run(effects())
        assert len(done.artifact_ids) == 1 and saved == list(done.artifact_ids)
        assert done.cost_micros > 0
        assert status.spent_micros == done.cost_micros  # one charge
        assert status.reserved_micros == 0
    finally:
        for proc in procs:
            proc.stop()
