"""The orchestrator running agents through the real provider services (all
in-process, real gRPC): the pipeline, budget refusal and release, memory
degradation, model fallback, tools (built-in, remote, not allowed), the
stream of events, idempotent replays, deadlines and breakers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import uuid

import grpc
import fakes.mesh as fake_mesh
import pytest
from fakes.mesh import ArtifactOutage, mesh

from hivemesh.client import ArtifactClient, InformationClient, from_rpc_error
from hivemesh.client.errors import (
    DeadlineExceededError, InternalError, InvalidArgumentError, NotFoundError,
    ResourceExhaustedError, UnavailableError)
from hivemesh.client.memory import MemoryClient
from hivemesh.common.v1 import RequestContext, StreamOutcome
from hivemesh.information.v1 import Budget, Scope
from hivemesh.llm.v1 import GenerateResponse
from hivemesh.memory.v1 import MemoryServiceServicer, add_MemoryServiceServicer_to_server
from hivemesh.orchestrator.v1 import (
    AgentDefinition, BudgetEnforcement, BudgetPolicy, DegradedComponent, EventPriority, EventType,
    ExecuteToolResponse, ListToolsResponse, MemoryConfig, RegisterAgentRequest, RunAgentRequest,
    SamplingConfig, StreamAgentRequest, ToolDefinition, ToolError, ToolServiceServicer,
    add_ToolServiceServicer_to_server)
from hivemesh.runtime import errors
from hivemesh.runtime.request_records import SqliteRequestRecords
from hivemesh.services.llm.backends.base import (
    BackendError, ErrorKind, ToolCall, ToolCallDelta)
from hivemesh.services.llm.settings import ModelSettings
from hivemesh.services.orchestrator.runner import AgentRunner


def rid() -> str:
    return str(uuid.uuid4())


async def call(method, request, timeout=20):
    try:
        return await method(request, timeout=timeout)
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err) from err


async def register(m, **fields) -> AgentDefinition:
    fields.setdefault("model", "main")
    agent = AgentDefinition(**fields)
    response = await call(m.orchestrator.RegisterAgent,
                          RegisterAgentRequest(request_id=rid(), agent=agent))
    return response.agent


async def _register_remembering_coder(m) -> RequestContext:
    """A coder that recalls, writes back and keeps history in the namespace
    "retried"; the context its runs go under."""
    await register(m, name="coder", system_prompt="You write code.",
                   output_artifact_type="code",
                   memory=MemoryConfig(enabled=True, write_back=True, history_enabled=True,
                                       namespace="retried"))
    return RequestContext(tenant_id="acme", session_id="s-1")


async def run(m, agent: str, text: str = "Implement a function that adds two numbers",
              context: RequestContext | None = None, request_id: str | None = None, **kw):
    response = await call(m.orchestrator.RunAgent, RunAgentRequest(
        request_id=request_id or rid(), agent=agent, input=text,
        context=context or RequestContext(tenant_id="acme"), **kw))
    return response


async def test_pipeline_recalls_reserves_generates_saves_commits_and_writes_back(tmp_path):
    async with mesh(tmp_path) as m:
        async with InformationClient(m.addresses["information"]) as info:
            await info.set_price("main", input_micros_per_million=1_000_000,
                                 output_micros_per_million=2_000_000)
            budget = await info.create_budget(Budget(scope=Scope(tenant_id="acme"),
                                                     limit_micros=10_000_000))
        await register(m, name="coder", system_prompt="You are a coding expert.",
                       output_artifact_type="code",
                       memory=MemoryConfig(enabled=True, write_back=True, namespace="acme"))
        first = (await run(m, "coder")).result
        assert first.output.startswith("def solve")
        assert first.llm_calls == 1 and first.model == "main" and first.backend == "primary"
        assert first.cost_micros > 0 and first.currency == "USD"
        assert len(first.trace_id) == 32 and first.context_id.startswith("ctx-")
        assert first.memories_recalled == 0 and not first.degraded
        async with ArtifactClient(m.addresses["artifact"]) as artifacts:
            (saved,) = first.artifact_ids
            artifact = await artifacts.get(saved)
            assert artifact.content == first.output and artifact.agent_id == "coder"
            assert artifact.artifact_type == "code"
        async with MemoryClient(m.addresses["memory"]) as memory:
            assert await memory.count(namespace="acme") == 2  # input and output
        second = (await run(m, "coder", "add two numbers again")).result
        assert second.memories_recalled > 0
        system = m.primary.calls[-1].messages[0].content
        assert "Relevant memories" in system and "adds two numbers" in system
        async with InformationClient(m.addresses["information"]) as info:
            (status,) = await info.status(budget_id=budget.budget_id)
        assert status.spent_micros == first.cost_micros + second.cost_micros
        assert status.reserved_micros == 0
        # The generation may use no more tokens than the reservation held.
        assert m.primary.calls[-1].max_tokens == 1024


async def test_an_agent_without_a_model_runs_on_the_default_alias_under_its_budget(tmp_path):
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        budget = await _budget_with_price(info)
        await register(m, name="plain", model="", system_prompt="You write code.")
        result = (await run(m, "plain")).result
        assert result.output and result.model == "main"  # the LLM service's default
        assert result.cost_micros > 0 and result.currency == "USD"
        status = await _settled(info, budget.budget_id)
        assert (status.reserved_micros, status.spent_micros) == (0, result.cost_micros)


async def test_refused_budget_generates_nothing(tmp_path):
    async with mesh(tmp_path) as m:
        async with InformationClient(m.addresses["information"]) as info:
            await info.set_price("main", input_micros_per_million=1_000_000,
                                 output_micros_per_million=1_000_000)
            await info.create_budget(Budget(scope=Scope(tenant_id="poor"), limit_micros=1))
        await register(m, name="coder", system_prompt="You write code.")
        with pytest.raises(ResourceExhaustedError) as err:
            await run(m, "coder", context=RequestContext(tenant_id="poor"))
        assert err.value.reason == "BUDGET_EXCEEDED"
        assert m.primary.calls == []


async def test_failed_generation_releases_the_reservation(tmp_path):
    async with mesh(tmp_path) as m:
        async with InformationClient(m.addresses["information"]) as info:
            await info.set_price("main", input_micros_per_million=1_000_000,
                                 output_micros_per_million=1_000_000)
            budget = await info.create_budget(Budget(scope=Scope(tenant_id="acme"),
                                                     limit_micros=1_000_000))
            await register(m, name="coder", system_prompt="You write code.")
            m.primary.simulate_failure(ErrorKind.UNAVAILABLE, times=10)
            with pytest.raises(UnavailableError):
                await run(m, "coder")
            (status,) = await info.status(budget_id=budget.budget_id)
        assert status.reserved_micros == 0 and status.spent_micros == 0


async def test_a_defect_in_a_run_fails_it_cleanly_and_releases_its_hold(tmp_path, monkeypatch):
    """An unexpected error inside the pipeline (a defect, not a provider's
    answer) ends the run as INTERNAL like any failed run: AGENT_FAILED is
    sent and the budget hold released, not left to its TTL."""
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        budget = await _budget_with_price(info)
        await register(m, name="coder", system_prompt="You write code.",
                       output_artifact_type="code")

        def broken(self, run, generated, iteration):
            raise RuntimeError("a defect")  # after the generation, before its commit
        monkeypatch.setattr(AgentRunner, "_generated", broken)
        failed = []
        m.backend.bus.subscribe(lambda e: failed.append(e.agent_failed)
                                if e.type == EventType.EVENT_TYPE_AGENT_FAILED else None)
        with pytest.raises(InternalError):
            await run(m, "coder")
        assert [f.error.code for f in failed] == [grpc.StatusCode.INTERNAL.value[0]]
        status = await _settled(info, budget.budget_id)
        assert status.reserved_micros == 0


async def _budget_with_price(info, tenant: str = "acme", *, output_micros: int = 1_000_000,
                             limit_micros: int = 1_000_000):
    await info.set_price("main", input_micros_per_million=1_000_000,
                         output_micros_per_million=output_micros)
    return await info.create_budget(Budget(scope=Scope(tenant_id=tenant),
                                           limit_micros=limit_micros))


async def _settled(info, budget_id: str, tries: int = 50):
    """The budget's status once nothing is reserved any more (or the last)."""
    for _ in range(tries):
        (status,) = await info.status(budget_id=budget_id)
        if status.reserved_micros == 0:
            break
        await asyncio.sleep(0.1)
    return status


async def test_a_failed_run_runs_again_when_retried_with_its_request_id(tmp_path):
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        budget = await _budget_with_price(info)
        await register(m, name="coder", system_prompt="You write code.",
                       output_artifact_type="code")
        request_id = rid()
        m.primary.simulate_failure(ErrorKind.UNAVAILABLE, times=10)
        with pytest.raises(UnavailableError):
            await run(m, "coder", request_id=request_id)
        m.primary.reset_failure()
        retried = await run(m, "coder", request_id=request_id)
        assert not retried.replayed and retried.result.output.startswith("def solve")
        again = await run(m, "coder", request_id=request_id)
        assert again.replayed and again.result == retried.result
        status = await _settled(info, budget.budget_id)
        assert (status.reserved_micros, status.spent_micros) == (0, retried.result.cost_micros)


async def test_a_retried_run_is_checked_against_the_budget_again(tmp_path):
    """Its first attempt's hold was released when it failed: the retry must
    hold again, and is refused when the budget has filled meanwhile."""
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        budget = await _budget_with_price(info)
        await register(m, name="coder", system_prompt="You write code.")
        request_id = rid()
        m.primary.simulate_failure(ErrorKind.UNAVAILABLE, times=10)
        with pytest.raises(UnavailableError):
            await run(m, "coder", request_id=request_id)
        m.primary.reset_failure()
        await info.reserve(RequestContext(tenant_id="acme"), model="main",
                           prompt_tokens=999_000, max_tokens=1)  # someone else fills it
        calls = len(m.primary.calls)
        with pytest.raises(ResourceExhaustedError) as err:
            await run(m, "coder", request_id=request_id)
        assert err.value.reason == "BUDGET_EXCEEDED" and len(m.primary.calls) == calls
        (status,) = await info.status(budget_id=budget.budget_id)
        assert status.spent_micros == 0


async def test_a_retried_run_that_fails_again_releases_its_hold_again(tmp_path):
    """The retry's Reserve (same request id) holds again under the first
    attempt's reservation id; when the retry fails too, that hold is
    released, not answered with the first release (under the same release
    request id) and left to its TTL."""
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        budget = await _budget_with_price(info)
        await register(m, name="coder", system_prompt="You write code.")
        request_id = rid()
        m.primary.simulate_failure(ErrorKind.UNAVAILABLE, times=20)
        for _ in range(2):
            with pytest.raises(UnavailableError):
                await run(m, "coder", request_id=request_id)
            (status,) = await info.status(budget_id=budget.budget_id)
            assert (status.reserved_micros, status.spent_micros) == (0, 0)


async def test_a_run_past_its_deadline_still_releases_its_hold(tmp_path):
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        budget = await _budget_with_price(info)
        await register(m, name="coder", system_prompt="You write code.")
        m.primary.latency_s = 1.0
        with pytest.raises(DeadlineExceededError):
            await call(m.orchestrator.RunAgent, RunAgentRequest(
                request_id=rid(), agent="coder", input="x",
                context=RequestContext(tenant_id="acme")), timeout=0.5)
        status = await _settled(info, budget.budget_id)
        assert (status.reserved_micros, status.spent_micros) == (0, 0)


async def test_a_reservation_answered_too_late_is_released_not_left_to_its_ttl(
        tmp_path, monkeypatch):
    """The information service made the hold but its answer came after the
    Reserve call's deadline: the run fails, and the hold it never heard of
    is released (asked for again under its request id), as when a run is
    cancelled while reserving, not kept until its TTL."""
    from hivemesh.services.information.store.sqlite import SqliteStore
    reserve = SqliteStore.reserve
    answered = asyncio.Event()

    async def slow(self, op):
        result = await reserve(self, op)
        if op.request_id.endswith(":reserve:1") and not answered.is_set():
            answered.set()
            await asyncio.sleep(2)  # the hold is stored; the answer is late
        return result
    monkeypatch.setattr(SqliteStore, "reserve", slow)
    async with mesh(tmp_path, call_timeout_s=0.5) as m, \
            InformationClient(m.addresses["information"]) as info:
        budget = await _budget_with_price(info)
        await register(m, name="coder", system_prompt="You write code.")
        with pytest.raises(DeadlineExceededError) as err:
            await run(m, "coder")
        assert err.value.metadata["provider"] == "information"
        assert answered.is_set() and m.primary.calls == []
        status = await _settled(info, budget.budget_id)
        assert (status.reserved_micros, status.spent_micros) == (0, 0)


async def test_a_generation_asks_for_no_more_tokens_than_the_run_has_left(tmp_path):
    async with mesh(tmp_path) as m:
        await register(m, name="capped", system_prompt="You write code.",
                       budget=BudgetPolicy(max_tokens_per_run=200))
        m.primary.queue_response("x" * 4000)  # 1000 tokens if nothing bounded it
        result = (await run(m, "capped")).result
        (asked,) = m.primary.calls
        assert asked.max_tokens < 200
        assert 0 < len(result.output) < 4000 and result.usage.total_tokens <= 200


async def test_a_run_over_its_cost_cap_fails_before_keeping_anything(tmp_path):
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        budget = await _budget_with_price(info)
        await register(m, name="capped", system_prompt="You write code.",
                       output_artifact_type="code",
                       budget=BudgetPolicy(max_cost_micros_per_run=1),
                       memory=MemoryConfig(write_back=True, namespace="capped"))
        events = []
        m.backend.bus.subscribe(lambda event: events.append(event.type))
        with pytest.raises(ResourceExhaustedError) as err:
            await run(m, "capped")
        assert err.value.reason == "BUDGET_EXCEEDED"
        assert (err.value.metadata["scope"], err.value.metadata["unit"]) == ("run", "micros")
        assert EventType.EVENT_TYPE_ARTIFACT_SAVED not in events
        assert EventType.EVENT_TYPE_MEMORY_WRITTEN not in events
        async with ArtifactClient(m.addresses["artifact"]) as artifacts:
            assert await artifacts.count(agent_id="capped") == 0
        async with MemoryClient(m.addresses["memory"]) as memory:
            assert await memory.count(namespace="capped") == 0
        status = await _settled(info, budget.budget_id)
        assert status.spent_micros > 1  # what it spent is charged all the same


async def test_the_token_cap_holds_without_accounting_and_a_cost_cap_needs_it(tmp_path):
    async with mesh(tmp_path) as m:
        with pytest.raises(InvalidArgumentError) as err:
            await register(m, name="unpriced", budget=BudgetPolicy(
                enforcement=3, max_cost_micros_per_run=1000))
        assert [f for f, _ in err.value.field_violations] == [
            "agent.budget.max_cost_micros_per_run"]
        await register(m, name="capped", system_prompt="You search.",
                       allowed_tools=["memory_search"],
                       budget=BudgetPolicy(enforcement=3, max_tokens_per_run=100))
        m.primary.queue_response(tool_calls=(  # the arguments alone are over the cap
            ToolCall("c1", "memory_search", json.dumps({"query": "q" * 800})),))
        m.primary.queue_response("found nothing")
        with pytest.raises(ResourceExhaustedError) as err:
            await run(m, "capped")
        assert err.value.reason == "BUDGET_EXCEEDED" and err.value.metadata["unit"] == "tokens"
        assert len(m.primary.calls) == 1  # no second turn after the cap was passed


async def test_the_callers_agent_id_scopes_the_budget(tmp_path):
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        await info.set_price("main", input_micros_per_million=1_000_000,
                             output_micros_per_million=1_000_000)
        budget = await info.create_budget(Budget(scope=Scope(agent_id="custom-x"),
                                                 limit_micros=1_000_000))
        await register(m, name="coder", system_prompt="You write code.")
        done = await run(m, "coder", context=RequestContext(tenant_id="acme",
                                                            agent_id="custom-x"))
        (status,) = await info.status(budget_id=budget.budget_id)
        assert status.spent_micros == done.result.cost_micros > 0


async def test_memory_outage_degrades_the_run(tmp_path):
    async with mesh(tmp_path, memory=False) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       memory=MemoryConfig(enabled=True, write_back=True))
        result = (await run(m, "coder")).result
        assert result.output
        components = [d.component for d in result.degraded]
        assert components == [DegradedComponent.DEGRADED_COMPONENT_MEMORY_RECALL,
                              DegradedComponent.DEGRADED_COMPONENT_MEMORY_WRITE_BACK]
        assert result.degraded[0].reason == "BACKEND_UNAVAILABLE"  # names the cause


async def test_a_memory_service_that_hangs_degrades_the_run_instead_of_failing_it(tmp_path):
    """A memory service that accepts connections and never answers (hung,
    not down) is an outage too: recall and write-back are skipped and the
    run succeeds within its caller's deadline, instead of the memory calls
    taking all of the run's time and failing it with DEADLINE_EXCEEDED."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen()  # never accepted: no answer to anything
        address = f"127.0.0.1:{hung.getsockname()[1]}"
        async with mesh(tmp_path, memory_address=address) as m:
            await register(m, name="coder", system_prompt="You write code.",
                           memory=MemoryConfig(enabled=True, write_back=True))
            events = []
            m.backend.bus.subscribe(lambda event: events.append(event))
            result = (await call(m.orchestrator.RunAgent, RunAgentRequest(
                request_id=rid(), agent="coder", input="implement add",
                context=RequestContext(tenant_id="acme")), timeout=4)).result
        assert result.output
        assert [(d.component, d.reason) for d in result.degraded] == [
            (DegradedComponent.DEGRADED_COMPONENT_MEMORY_RECALL, "DEADLINE_EXCEEDED"),
            (DegradedComponent.DEGRADED_COMPONENT_MEMORY_WRITE_BACK, "DEADLINE_EXCEEDED")]
        assert [e.degraded.component for e in events
                if e.type == EventType.EVENT_TYPE_DEGRADED] == [
            DegradedComponent.DEGRADED_COMPONENT_MEMORY_RECALL,
            DegradedComponent.DEGRADED_COMPONENT_MEMORY_WRITE_BACK]


async def test_an_artifact_outage_fails_the_run_instead_of_degrading_it(tmp_path):
    async with mesh(tmp_path, artifact=False) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       output_artifact_type="code", budget=BudgetPolicy(enforcement=3))
        events = []
        m.backend.bus.subscribe(lambda event: events.append(event))
        with pytest.raises(UnavailableError) as err:
            await run(m, "coder")
        assert err.value.metadata["provider"] == "artifact"
        assert EventType.EVENT_TYPE_DEGRADED not in [e.type for e in events]
        (failed,) = [e.agent_failed for e in events
                     if e.type == EventType.EVENT_TYPE_AGENT_FAILED]
        assert list(failed.degraded) == []


async def test_a_run_retried_after_writing_back_sends_its_first_prompt_again(tmp_path):
    """The first attempt recalled, read the session's history, generated,
    wrote its input and output to memory and history, then failed on the
    artifact store. Read again, memory and history would hold that
    attempt's own write-back: the retry builds its prompt from what the
    first attempt read, so the LLM service replays the generation instead
    of refusing another prompt under the same request id."""
    store = ArtifactOutage()
    async with mesh(tmp_path, artifact_backend=store) as m:
        context = await _register_remembering_coder(m)
        request_id = rid()
        with pytest.raises(UnavailableError):
            await run(m, "coder", context=context, request_id=request_id)
        (first,) = m.primary.calls
        async with MemoryClient(m.addresses["memory"]) as memory:
            tenant = RequestContext(tenant_id="acme")
            history = await memory.get_history("s-1", namespace="retried", context=tenant)
            found = await memory.search("Implement a function that adds two numbers",
                                        namespace="retried", context=tenant)
        assert len(history.messages) == 2 and found.results  # the write-back landed

        store.down = False
        done = (await run(m, "coder", context=context, request_id=request_id)).result
        assert done.output and len(done.artifact_ids) == 1
        assert done.memories_recalled == 0  # as in the first attempt
        assert len(m.primary.calls) == 1  # the generation was replayed, not sent again
        assert first.messages == m.primary.calls[0].messages
        # A new request reads what is there now.
        later = (await run(m, "coder", context=context)).result
        assert later.memories_recalled > 0
        assert len(m.primary.calls[-1].messages) > len(first.messages)  # with the history


def providers_down(m, monkeypatch, *names: str) -> set[str]:
    """The orchestrator's calls to the providers named in the returned set
    fail as unreachable (UNAVAILABLE) until their names are taken out."""
    down = set(names)
    providers = m.backend.providers
    real = providers.call

    async def call_(name, method, request, **kwargs):
        if name in down:
            raise errors.ServiceError(grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE",
                                      f"{name}: connection refused", {"provider": name})
        return await real(name, method, request, **kwargs)
    monkeypatch.setattr(providers, "call", call_)
    return down


async def test_a_run_retried_after_its_memory_reads_failed_sends_its_first_prompt_again(
        tmp_path, monkeypatch):
    """The first attempt found memory down: it generated without memories
    and history (degraded), then failed on the artifact store. Memory back,
    the retry does not read them afresh (it would find them, a different
    prompt under the generation's request id, IDEMPOTENCY_CONFLICT): it goes
    without them as the first attempt did, and reports why again."""
    store = ArtifactOutage()
    store.down = False
    async with mesh(tmp_path, artifact_backend=store) as m:
        context = await _register_remembering_coder(m)
        seeded = (await run(m, "coder", context=context)).result  # something to find
        assert not seeded.degraded
        store.down = True
        down = providers_down(m, monkeypatch, "memory")
        request_id = rid()
        with pytest.raises(UnavailableError):
            await run(m, "coder", context=context, request_id=request_id)
        first = m.primary.calls[-1]
        assert len(first.messages) == 2  # the system prompt and the input only

        down.clear()
        store.down = False
        events = []
        m.backend.bus.subscribe(lambda event: events.append(event))
        done = (await run(m, "coder", context=context, request_id=request_id)).result
        assert done.output and len(done.artifact_ids) == 1
        assert len(m.primary.calls) == 2  # the generation was replayed, not sent again
        assert done.memories_recalled == 0
        failed_reads = {(d.component, d.reason) for d in done.degraded}
        assert failed_reads == {
            (DegradedComponent.DEGRADED_COMPONENT_MEMORY_RECALL, "BACKEND_UNAVAILABLE"),
            (DegradedComponent.DEGRADED_COMPONENT_HISTORY, "BACKEND_UNAVAILABLE")}
        assert len(done.degraded) == 2  # its write-back went through this time
        assert {e.degraded.component for e in events
                if e.type == EventType.EVENT_TYPE_DEGRADED} == {c for c, _ in failed_reads}
        # A new request reads what is there now.
        later = (await run(m, "coder", context=context)).result
        assert later.memories_recalled > 0 and not later.degraded


async def test_a_read_that_failed_before_anything_was_generated_is_read_again(
        tmp_path, monkeypatch):
    """A first attempt that failed before generating (here its budget hold)
    sent no prompt: its retry reads memory afresh."""
    async with mesh(tmp_path) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       memory=MemoryConfig(enabled=True, write_back=True, namespace="afresh"))
        await run(m, "coder")  # something to find
        down = providers_down(m, monkeypatch, "memory", "information")
        request_id = rid()
        with pytest.raises(UnavailableError) as err:
            await run(m, "coder", request_id=request_id)
        assert err.value.metadata["provider"] == "information"
        assert len(m.primary.calls) == 1
        down.clear()
        done = (await run(m, "coder", request_id=request_id)).result
        assert done.memories_recalled > 0 and not done.degraded
        assert "Relevant memories" in m.primary.calls[-1].messages[0].content


async def test_budget_outage_fails_clearly_and_opens_the_breaker(tmp_path):
    async with mesh(tmp_path, information=False, breaker_failure_threshold=2) as m:
        await register(m, name="coder", system_prompt="You write code.")
        reasons = []
        for _ in range(3):
            with pytest.raises(UnavailableError) as err:
                await run(m, "coder")
            assert err.value.metadata["provider"] == "information"
            reasons.append(err.value.reason)
        assert reasons[0] == "BACKEND_UNAVAILABLE" and reasons[-1] == "CIRCUIT_OPEN"
        assert m.primary.calls == []
        # An agent that does not account budgets still runs.
        await register(m, name="free", system_prompt="You write code.",
                       budget=BudgetPolicy(enforcement=3))
        assert (await run(m, "free")).result.output


async def test_one_models_upstream_outage_does_not_open_the_llm_services_breaker(tmp_path):
    """The LLM service answers that a model's upstream failed (or that its
    own breakers are open for it): the service is healthy and serves other
    models, which must not fail fast with CIRCUIT_OPEN."""
    async with mesh(tmp_path, breaker_failure_threshold=2) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       budget=BudgetPolicy(enforcement=3))
        await register(m, name="other", model="backup",
                       budget=BudgetPolicy(enforcement=3))
        m.primary.simulate_failure(ErrorKind.UNAVAILABLE, times=50)
        for _ in range(4):
            with pytest.raises(UnavailableError) as err:
                await run(m, "coder")
            assert err.value.metadata["provider"] == "llm"
            assert err.value.reason != "CIRCUIT_OPEN" or "backends" in err.value.metadata
        assert m.backend.providers.breaker("llm").state == "closed"
        assert (await run(m, "other")).result.model == "backup"


async def test_a_run_retried_after_a_fallback_keeps_the_model_that_answered(tmp_path):
    """The first attempt's model failed, its fallback answered, the usage
    was committed and the artifact store was down. Its retry, with the
    first model healthy again, must end the run with what the fallback
    answered (charged and saved once), not generate with the first model
    under the request ids of the fallback's commit and save (refused as
    IDEMPOTENCY_CONFLICT on every retry)."""
    store = ArtifactOutage()
    async with mesh(tmp_path, artifact_backend=store) as m, \
            InformationClient(m.addresses["information"]) as info:
        budget = await _budget_with_price(info)
        await info.set_price("backup", input_micros_per_million=1_000_000,
                             output_micros_per_million=1_000_000)
        await register(m, name="coder", system_prompt="You write code.",
                       output_artifact_type="code", fallback_models=["backup"])
        request_id = rid()
        m.primary.simulate_failure(ErrorKind.UNAVAILABLE, times=5)
        with pytest.raises(UnavailableError) as err:
            await run(m, "coder", request_id=request_id)
        assert err.value.metadata["provider"] == "artifact"
        m.primary.reset_failure()
        store.down = False
        done = (await run(m, "coder", request_id=request_id)).result
        assert done.model == "backup" and done.fallback_used
        assert len(done.artifact_ids) == 1
        status = await _settled(info, budget.budget_id)
        assert (status.spent_micros, status.reserved_micros) == (done.cost_micros, 0)
        assert len(m.secondary.calls) == 1  # the fallback's answer was not asked for again


async def test_a_failed_run_retried_with_another_model_runs_with_it(tmp_path):
    """A failed run is not kept: its request id may come again asking for
    another model, whose generation has request ids of its own. The model
    the first attempt's chain chose is no answer for that other chain: the
    retry runs, not refused as IDEMPOTENCY_CONFLICT."""
    store = ArtifactOutage()
    async with mesh(tmp_path, artifact_backend=store) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       output_artifact_type="code", budget=BudgetPolicy(enforcement=3))
        request_id = rid()
        with pytest.raises(UnavailableError):
            await run(m, "coder", request_id=request_id)
        store.down = False
        done = (await run(m, "coder", request_id=request_id, model_override="backup")).result
        assert done.model == "backup" and len(done.artifact_ids) == 1
        assert len(m.secondary.calls) == 1


@pytest.mark.parametrize("kind", [ErrorKind.UNAVAILABLE, ErrorKind.OVERLOADED])
async def test_model_fallback_from_the_agent_definition(tmp_path, kind):
    """A provider that is down or overloaded (Anthropic's 529) is passing
    trouble: the run falls back to the next model, and without a fallback
    fails UNAVAILABLE (BACKEND_UNAVAILABLE), not as a quota exhausted."""
    async with mesh(tmp_path) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       fallback_models=["backup"], budget=BudgetPolicy(enforcement=3))
        m.primary.simulate_failure(kind, times=5)
        result = (await run(m, "coder")).result
        assert result.model == "backup" and result.backend == "secondary"
        assert result.fallback_used
        assert [d.component for d in result.degraded] == [
            DegradedComponent.DEGRADED_COMPONENT_MODEL_FALLBACK]
        assert result.degraded[0].reason == "BACKEND_UNAVAILABLE"
        m.primary.simulate_failure(kind, times=5)
        with pytest.raises(UnavailableError) as err:
            await run(m, "coder", disable_fallback=True)
        assert err.value.reason == "BACKEND_UNAVAILABLE"


async def test_built_in_tools_allowlist_and_results_fed_back(tmp_path):
    async with mesh(tmp_path) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       allowed_tools=["artifact_save"], budget=BudgetPolicy(enforcement=3))
        m.primary.queue_response(tool_calls=(
            ToolCall("c1", "artifact_save",
                     json.dumps({"artifact_type": "code", "content": "print(1)"})),
            ToolCall("c2", "memory_search", json.dumps({"query": "x"}))))
        m.primary.queue_response("saved it")
        result = (await run(m, "coder")).result
        assert result.output == "saved it" and result.llm_calls == 2
        saved, refused = result.tool_calls
        assert json.loads(saved.result)["artifact_id"] and not saved.HasField("error")
        assert refused.error.code == "NOT_ALLOWED"
        tool_messages = [x for x in m.primary.calls[-1].messages if x.role == "tool"]
        assert [x.tool_call_id for x in tool_messages] == ["c1", "c2"]
        offered = [t.name for t in m.primary.calls[0].tools]
        assert offered == ["artifact_save"]


async def test_a_run_retried_after_writing_back_gives_its_tools_first_results_again(
        tmp_path):
    """The first attempt searched memory through its tool, generated its
    answer, wrote it back to memory and failed on the artifact store. The
    retry must send the conversation of the first attempt again (as it
    does for the memories it recalled): searched again, memory would hold
    the first attempt's own write-back, and the next generation another
    prompt under the same request id (IDEMPOTENCY_CONFLICT)."""
    store = ArtifactOutage()
    async with mesh(tmp_path, artifact_backend=store) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       output_artifact_type="code", allowed_tools=["memory_search"],
                       memory=MemoryConfig(enabled=False, write_back=True, namespace="tools"),
                       budget=BudgetPolicy(enforcement=3))
        m.primary.queue_response(tool_calls=(
            ToolCall("c1", "memory_search", json.dumps({"query": "add two numbers"})),))
        m.primary.queue_response("def add(a, b): return a + b  # add two numbers")
        request_id = rid()
        with pytest.raises(UnavailableError):
            await run(m, "coder", "add two numbers", request_id=request_id)
        async with MemoryClient(m.addresses["memory"]) as memory:
            found = await memory.search("add two numbers", namespace="tools",
                                        context=RequestContext(tenant_id="acme"))
        assert found.results  # the write-back landed
        store.down = False
        done = (await run(m, "coder", "add two numbers", request_id=request_id)).result
        assert done.output.startswith("def add") and len(done.artifact_ids) == 1
        (searched,) = done.tool_calls
        assert json.loads(searched.result) == {"results": []} or \
            "def add" not in searched.result
        assert len(m.primary.calls) == 2  # both generations kept, none sent again


async def test_tool_arguments_json_cannot_parse_are_a_tool_error_not_a_crash(tmp_path):
    async with mesh(tmp_path) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       allowed_tools=["memory_search"], budget=BudgetPolicy(enforcement=3))
        # Valid JSON that Python's parser refuses: nested too deep, an
        # integer of too many digits.
        m.primary.queue_response(tool_calls=(
            ToolCall("c1", "memory_search", "[" * 100_000 + "]" * 100_000),
            ToolCall("c2", "memory_search", '{"query": "x", "limit": ' + "1" * 5000 + "}")))
        m.primary.queue_response("done without it")
        result = (await run(m, "coder")).result
        assert result.output == "done without it"
        assert [c.error.code for c in result.tool_calls] == ["INVALID_ARGUMENTS"] * 2


async def test_a_tool_name_the_llm_contract_refuses_is_a_tool_error_not_a_failed_run(tmp_path):
    async with mesh(tmp_path) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       allowed_tools=["memory_search"], budget=BudgetPolicy(enforcement=3))
        # Models make up names such as these; the conversation sent back to
        # the LLM service must still be one it accepts.
        m.primary.queue_response(tool_calls=(
            ToolCall("c1", "functions.memory_search", json.dumps({"query": "x"})),
            ToolCall("c2", "t" * 200, "{}")))
        m.primary.queue_response("done without them")
        result = (await run(m, "coder")).result
        assert result.output == "done without them"
        assert [c.tool_name for c in result.tool_calls] == ["functions.memory_search", "t" * 200]
        assert [c.error.code for c in result.tool_calls] == ["NOT_ALLOWED"] * 2
        sent = m.primary.calls[-1].messages
        names = [c.name for x in sent for c in x.tool_calls]
        assert len(names) == 2 and len(set(names)) == 2
        assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", n) for n in names)


async def test_tool_calls_without_ids_or_with_one_id_twice_get_their_own(tmp_path):
    async with mesh(tmp_path) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       allowed_tools=["artifact_save"], budget=BudgetPolicy(enforcement=3))
        save = json.dumps({"artifact_type": "code", "content": "print(1)"})
        other = json.dumps({"artifact_type": "code", "content": "print(2)"})
        m.primary.queue_response(tool_calls=(ToolCall("", "artifact_save", save),
                                             ToolCall("x", "artifact_save", save),
                                             ToolCall("x", "artifact_save", other)))
        m.primary.queue_response("saved them")
        result = (await run(m, "coder")).result
        ids = [c.tool_call_id for c in result.tool_calls]
        assert len(set(ids)) == 3 and all(ids)
        assert all(not c.HasField("error") for c in result.tool_calls)
        saved = {json.loads(c.result)["artifact_id"] for c in result.tool_calls}
        assert len(saved) == 3  # the third call was not answered with the second's result
        tool_messages = [x for x in m.primary.calls[-1].messages if x.role == "tool"]
        assert [x.tool_call_id for x in tool_messages] == ids


async def test_tool_call_ids_sent_back_are_ones_the_llm_contract_accepts(tmp_path):
    async with mesh(tmp_path) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       allowed_tools=["memory_search"], budget=BudgetPolicy(enforcement=3))
        search = json.dumps({"query": "x"})
        # Too long an id, and ids a server numbers afresh in each reply: the
        # contract wants at most 128 characters, unique within the conversation.
        m.primary.queue_response(tool_calls=(ToolCall("i" * 200, "memory_search", search),
                                             ToolCall("call_0", "memory_search", search)))
        m.primary.queue_response(tool_calls=(ToolCall("call_0", "memory_search", search),))
        m.primary.queue_response("found nothing")
        result = (await run(m, "coder")).result
        assert result.output == "found nothing"
        ids = [c.tool_call_id for c in result.tool_calls]
        assert len(ids) == 3 and len(set(ids)) == 3 and all(0 < len(i) <= 128 for i in ids)
        sent = m.primary.calls[-1].messages
        assert [c.id for x in sent for c in x.tool_calls] == ids
        assert [x.tool_call_id for x in sent if x.role == "tool"] == ids


async def test_request_ids_of_any_allowed_length_run(tmp_path):
    async with mesh(tmp_path) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       output_artifact_type="code",
                       memory=MemoryConfig(enabled=True, write_back=True))
        long_id = "r" * 128
        first = await run(m, "coder", request_id=long_id)
        again = await run(m, "coder", request_id=long_id)
        assert first.result.output and again.replayed


async def test_tool_iteration_limit_fails_the_run(tmp_path):
    async with mesh(tmp_path) as m:
        await register(m, name="looper", system_prompt="You loop.", max_tool_iterations=2,
                       allowed_tools=["memory_search"], budget=BudgetPolicy(enforcement=3))
        for i in range(3):
            m.primary.queue_response(tool_calls=(
                ToolCall(f"c{i}", "memory_search", json.dumps({"query": "x"})),))
        with pytest.raises(Exception) as err:
            await run(m, "looper")
        assert err.value.reason == "TOOL_ITERATION_LIMIT"


class _Tools(ToolServiceServicer):
    def __init__(self) -> None:
        self.calls = []

    async def ListTools(self, request, context):
        tool = ToolDefinition(name="weather", description="Weather in a city")
        tool.parameters.update({"type": "object", "properties": {"city": {"type": "string"}}})
        return ListToolsResponse(tools=[tool])

    async def ExecuteTool(self, request, context):
        self.calls.append(request)
        city = json.loads(request.arguments).get("city")
        if not city:
            return ExecuteToolResponse(error=ToolError(code="INVALID_ARGUMENTS",
                                                       message="city is required"))
        return ExecuteToolResponse(result=json.dumps({"city": city, "sky": "clear"}))


@contextlib.asynccontextmanager
async def tool_server(tools: ToolServiceServicer):
    """(server, address) of ``tools`` served on a loopback port 0."""
    server = grpc.aio.server()
    add_ToolServiceServicer_to_server(tools, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_remote_tool_server_in_any_language(tmp_path):
    tools = _Tools()
    async with tool_server(tools) as (server, address):
        async with mesh(tmp_path, tool_servers={"wx": address}) as m:
            await register(m, name="forecaster", system_prompt="You tell the weather.",
                           allowed_tools=["weather"], budget=BudgetPolicy(enforcement=3))
            m.primary.queue_response(tool_calls=(
                ToolCall("a", "weather", json.dumps({"city": "Oslo"})),
                ToolCall("b", "weather", json.dumps({}))))
            m.primary.queue_response("clear in Oslo")
            result = (await run(m, "forecaster")).result
            ok, bad = result.tool_calls
            assert json.loads(ok.result) == {"city": "Oslo", "sky": "clear"}
            assert bad.error.code == "INVALID_ARGUMENTS"
            assert {c.tool_call_id for c in tools.calls} == {"a", "b"}
            assert all(c.context.agent_id == "forecaster" for c in tools.calls)
            await server.stop(0)  # the tool server goes away: the run continues
            m.primary.queue_response(tool_calls=(
                ToolCall("c", "weather", json.dumps({"city": "Oslo"})),))
            m.primary.queue_response("no weather today")
            result = (await run(m, "forecaster")).result
            assert result.output == "no weather today"
            assert result.tool_calls[0].error.code == "UNAVAILABLE"
            assert result.degraded[0].component == DegradedComponent.DEGRADED_COMPONENT_TOOL


class _BrokenTools(ToolServiceServicer):
    """Tools that fail to answer (a crash, a timeout) or declare an error."""

    async def ListTools(self, request, context):
        return ListToolsResponse(tools=[ToolDefinition(name=n, description=n)
                                        for n in ("crash", "stuck", "picky")])

    async def ExecuteTool(self, request, context):
        if request.tool_name == "crash":
            await context.abort(grpc.StatusCode.INTERNAL, "tool crashed")
        if request.tool_name == "stuck":
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "tool took too long")
        return ExecuteToolResponse(error=ToolError(code="NOT_FOUND", message="no such city"))


async def test_a_remote_tool_that_fails_to_answer_is_unavailable_and_degrades_the_run(tmp_path):
    async with tool_server(_BrokenTools()) as (_, address), \
            mesh(tmp_path, tool_servers={"broken": address}) as m:
        await register(m, name="user", system_prompt="You use tools.",
                       allowed_tools=["crash", "stuck", "picky"],
                       budget=BudgetPolicy(enforcement=3))
        m.primary.queue_response(tool_calls=tuple(
            ToolCall(n, n, "{}") for n in ("crash", "stuck", "picky")))
        m.primary.queue_response("went without")
        result = (await run(m, "user")).result
        assert result.output == "went without"
        errors_by_tool = {c.tool_name: (c.error.code, c.error.retryable)
                          for c in result.tool_calls}
        assert errors_by_tool == {"crash": ("UNAVAILABLE", False),
                                  "stuck": ("UNAVAILABLE", True),
                                  "picky": ("NOT_FOUND", False)}  # as the tool declared it
        assert {d.component for d in result.degraded} == {
            DegradedComponent.DEGRADED_COMPONENT_TOOL}
        assert sorted(d.reason for d in result.degraded) == ["DEADLINE_EXCEEDED",
                                                             "UPSTREAM_ERROR"]
        # A built-in tool's provider refusing the model's arguments is the
        # tool's own error, not an outage.
        await register(m, name="searcher", allowed_tools=["memory_search"],
                       budget=BudgetPolicy(enforcement=3))
        m.primary.queue_response(tool_calls=(
            ToolCall("s", "memory_search", json.dumps({"query": "q" * 20_000})),))
        m.primary.queue_response("found nothing")
        result = (await run(m, "searcher")).result
        assert result.tool_calls[0].error.code == "INVALID_ARGUMENTS" and not result.degraded


class _MisbehavingTools(ToolServiceServicer):
    """A tool server breaking the tool contract in every way it can, or
    hanging: a tool description over its limit, an answer without an
    outcome, a result over 1 MiB, a call that never ends."""

    async def ListTools(self, request, context):
        return ListToolsResponse(tools=[
            ToolDefinition(name="hang", description="never answers"),
            ToolDefinition(name="empty", description="answers nothing"),
            ToolDefinition(name="huge", description="answers too much"),
            ToolDefinition(name="verbose", description="x" * 9000)])

    async def ExecuteTool(self, request, context):
        if request.tool_name == "hang":
            await asyncio.sleep(60)
        if request.tool_name == "huge":
            return ExecuteToolResponse(result="x" * (1024 * 1024 + 1))
        return ExecuteToolResponse()


async def test_a_tool_server_that_hangs_or_breaks_the_contract_degrades_the_run(tmp_path):
    """A hanging tool gets half the run's time, as a memory call does, and
    the run goes on without it; answers outside the contract are the
    tool's error, given to the model; a tool whose definition breaks the
    contract is not offered (the LLM service would refuse it as the
    caller's mistake, failing every generation)."""
    async with tool_server(_MisbehavingTools()) as (_, address), \
            mesh(tmp_path, tool_servers={"bad": address}) as m:
        with pytest.raises(InvalidArgumentError) as err:  # not offered: unknown
            await register(m, name="verbose-user", allowed_tools=["verbose"])
        assert "unknown tool 'verbose'" in err.value.message
        await register(m, name="user", system_prompt="You use tools.",
                       allowed_tools=["hang", "empty", "huge"],
                       budget=BudgetPolicy(enforcement=3))
        m.primary.queue_response(tool_calls=tuple(
            ToolCall(n, n, "{}") for n in ("hang", "empty", "huge")))
        m.primary.queue_response("went without")
        response = await m.orchestrator.RunAgent(RunAgentRequest(
            request_id=rid(), agent="user", input="go",
            context=RequestContext(tenant_id="acme")), timeout=8)
        result = response.result
        assert result.output == "went without"
        codes = {c.tool_name: c.error.code for c in result.tool_calls}
        assert codes == {"hang": "UNAVAILABLE", "empty": "INVALID_RESPONSE",
                         "huge": "INVALID_RESPONSE"}
        assert [d.reason for d in result.degraded] == ["DEADLINE_EXCEEDED"]


class _EndlessPages(ToolServiceServicer):
    async def ListTools(self, request, context):
        return ListToolsResponse(next_page_token=str(int(request.page_token or 0) + 1))


async def test_a_tool_server_paging_without_end_is_unreachable_not_a_hang(tmp_path):
    async with tool_server(_EndlessPages()) as (_, address), \
            mesh(tmp_path, tool_servers={"endless": address}) as m:
        assert await m.backend.tools.refresh() == ["endless"]


class _ToolsClaimingABuiltIn(_Tools):
    async def ListTools(self, request, context):
        listed = await super().ListTools(request, context)
        listed.tools.add(name="artifact_save", description="not the built-in one")
        return listed


async def test_a_tool_server_down_at_start_brings_its_tools_once_it_is_up(tmp_path,
                                                                        monkeypatch):
    from hivemesh.services.orchestrator import tools as tool_registry
    monkeypatch.setattr(tool_registry, "RELIST_AFTER_S", 0.0)
    with socket.socket() as probe:  # a port where nothing listens yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tmp_path / "agents"
    folder.mkdir()
    (folder / "forecaster.toml").write_text(
        'name = "forecaster"\nmodel = "main"\nallowed_tools = ["weather"]\n'
        '[budget]\nenforcement = "BUDGET_ENFORCEMENT_DISABLED"\n')
    server = grpc.aio.server()
    add_ToolServiceServicer_to_server(_ToolsClaimingABuiltIn(), server)
    try:
        async with mesh(tmp_path, tool_servers={"wx": f"127.0.0.1:{port}"},
                        breaker_reset_s=0.2, agents_dir=folder) as m:
            # The server is down: registering an agent that needs one of its
            # tools cannot be checked (not the caller's fault), and a run of
            # the filed agent goes without the tool, reported.
            with pytest.raises(UnavailableError) as err:
                await register(m, name="other", allowed_tools=["weather"])
            assert err.value.reason == "BACKEND_UNAVAILABLE"
            m.primary.queue_response("no tools today")
            down = (await run(m, "forecaster")).result
            assert down.degraded[0].component == DegradedComponent.DEGRADED_COMPONENT_TOOL
            assert "weather" in down.degraded[0].message
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            for _ in range(50):  # until the channel reconnects and the breaker lets it
                await asyncio.sleep(0.2)
                m.primary.queue_response(tool_calls=(
                    ToolCall("a", "weather", json.dumps({"city": "Oslo"})),))
                m.primary.queue_response("clear in Oslo")
                result = (await run(m, "forecaster")).result
                if not result.degraded:
                    break
            assert json.loads(result.tool_calls[0].result)["sky"] == "clear"
            # A remote tool never replaces a built-in one of the same name.
            await register(m, name="saver", allowed_tools=["artifact_save"],
                           budget=BudgetPolicy(enforcement=3))
            m.primary.queue_response("done")
            await run(m, "saver")
            offered = {t.name: t.description for t in m.primary.calls[-1].tools}
            assert offered["artifact_save"] != "not the built-in one"
    finally:
        await server.stop(0)


async def test_stream_agent_events_end_and_replay(tmp_path):
    async with mesh(tmp_path) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       output_artifact_type="code", budget=BudgetPolicy(enforcement=3))
        request = StreamAgentRequest(request_id=rid(), agent="coder", input="implement add")
        messages = [x async for x in m.orchestrator.StreamAgent(request, timeout=20)]
        events = [x.agent_event for x in messages[:-1]]
        types = [e.type for e in events]
        assert types[0] == EventType.EVENT_TYPE_AGENT_START
        assert EventType.EVENT_TYPE_GENERATION_CHUNK in types
        assert types[-3:] == [EventType.EVENT_TYPE_GENERATION_COMPLETE,
                              EventType.EVENT_TYPE_ARTIFACT_SAVED,
                              EventType.EVENT_TYPE_AGENT_COMPLETE]
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        chunks = "".join(e.generation_chunk.text for e in events
                         if e.type == EventType.EVENT_TYPE_GENERATION_CHUNK)
        assert chunks == events[-1].agent_complete.output
        assert messages[-1].end.outcome == StreamOutcome.STREAM_OUTCOME_COMPLETED
        calls = len(m.primary.calls)
        replay = [x async for x in m.orchestrator.StreamAgent(request, timeout=20)]
        assert [x.WhichOneof("event") for x in replay] == ["agent_event", "end"]
        assert replay[0].agent_event.agent_complete == events[-1].agent_complete
        # An event like the live one: its own id, the same priority.
        replayed = replay[0].agent_event
        assert uuid.UUID(replayed.event_id) != uuid.UUID(events[-1].event_id)
        assert replayed.priority == events[-1].priority == EventPriority.EVENT_PRIORITY_NORMAL
        assert len(m.primary.calls) == calls
        # The same request id with another input fails before any event: as
        # the call's status, like any call's.
        request.input = "something else"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [x async for x in m.orchestrator.StreamAgent(request, timeout=20)]
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_stream_agent_failure_ends_with_agent_failed(tmp_path):
    async with mesh(tmp_path) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       budget=BudgetPolicy(enforcement=3))
        m.primary.simulate_failure(ErrorKind.BAD_REQUEST, times=1)
        request = StreamAgentRequest(request_id=rid(), agent="coder", input="x",
                                     omit_generation_chunks=True)
        messages = [x async for x in m.orchestrator.StreamAgent(request, timeout=20)]
        assert messages[-2].agent_event.type == EventType.EVENT_TYPE_AGENT_FAILED
        assert messages[-1].end.outcome == StreamOutcome.STREAM_OUTCOME_FAILED
        assert messages[-1].end.error == messages[-2].agent_event.agent_failed.error
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in m.orchestrator.StreamAgent(StreamAgentRequest(
                    request_id=rid(), agent="nobody", input="x"), timeout=20):
                pass
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("enforcement", [BudgetEnforcement.BUDGET_ENFORCEMENT_RESERVE,
                                         BudgetEnforcement.BUDGET_ENFORCEMENT_TRACK])
async def test_a_cut_stream_each_cut_of_its_retries_and_the_retry_that_ends_are_charged(
        tmp_path, enforcement):
    """The upstream produced (and bills) the text it streamed before the
    stream broke: the budget is charged for it and the failed run reports
    it, instead of the hold being released as if nothing was used. Each cut
    is charged under a request id of its own, so a retry cut again is
    another charge, and a retry that ends generates again (the LLM service
    keeps no broken stream) and is charged too: none is a different request
    under an earlier charge's request id (IDEMPOTENCY_CONFLICT, its tokens
    charged nothing)."""
    async with mesh(tmp_path) as m:
        async with InformationClient(m.addresses["information"]) as info:
            budget = await _budget_with_price(info, output_micros=2_000_000,
                                              limit_micros=10_000_000)
            await register(m, name="coder", system_prompt="You write code.",
                           budget=BudgetPolicy(enforcement=enforcement))
            request = StreamAgentRequest(request_id=rid(), agent="coder",
                                         input="implement add",
                                         context=RequestContext(tenant_id="acme"))
            costs = []
            for chunks in (3, 5):
                m.primary.cut_next_stream_after(chunks)
                cut = [x async for x in m.orchestrator.StreamAgent(request, timeout=20)]
                assert cut[-1].end.outcome == StreamOutcome.STREAM_OUTCOME_FAILED
                failed = cut[-2].agent_event.agent_failed
                assert failed.partial_output and failed.usage.completion_tokens > 0
                assert failed.cost_micros > 0, [d.message for d in failed.degraded]
                costs.append(failed.cost_micros)
                (status,) = await info.status(budget_id=budget.budget_id)
                assert status.spent_micros == sum(costs) and status.reserved_micros == 0
            retried = [x async for x in m.orchestrator.StreamAgent(request, timeout=20)]
            assert retried[-1].end.outcome == StreamOutcome.STREAM_OUTCOME_COMPLETED, \
                retried[-1].end.error.message
            done = retried[-2].agent_event.agent_complete
            assert done.output and done.cost_micros > 0
            (status,) = await info.status(budget_id=budget.budget_id)
            assert status.spent_micros == sum(costs) + done.cost_micros
            assert status.reserved_micros == 0


@pytest.mark.parametrize("how", ["cancel", "deadline"])
async def test_text_streamed_to_a_caller_who_leaves_is_charged(tmp_path, how):
    """A caller that reads most of a StreamAgent's text and then cancels (or
    whose deadline passes) got that text: the budget is charged what it
    cost (estimated, as for a stream cut below its end), not released as if
    nothing was used, whatever state the run was in when it was cut."""
    async with mesh(tmp_path) as m:
        async with InformationClient(m.addresses["information"]) as info:
            budget = await _budget_with_price(info, limit_micros=10_000_000)
            await register(m, name="writer")
            text = "word " * 200
            m.primary.stream_chunk_delay_s = 0.005
            m.primary.queue_response(text)
            call = m.orchestrator.StreamAgent(StreamAgentRequest(
                request_id=rid(), agent="writer", input="write",
                context=RequestContext(tenant_id="acme")),
                timeout=30 if how == "cancel" else 0.6)
            received = ""
            with contextlib.suppress(grpc.aio.AioRpcError):
                async for message in call:
                    received += message.agent_event.generation_chunk.text
                    if how == "cancel" and len(received) >= len(text) // 2:
                        call.cancel()
                        break
            assert 0 < len(received) < len(text)
            status = await _settled(info, budget.budget_id)
            for _ in range(50):  # the charge is sent once the run has been cut
                if status.spent_micros:
                    break
                await asyncio.sleep(0.1)
                (status,) = await info.status(budget_id=budget.budget_id)
            assert status.reserved_micros == 0
            # At least the output the caller got (a token a few characters).
            assert status.spent_tokens >= len(received) // 8
            assert status.spent_micros > 0


async def test_stream_agent_refuses_an_invalid_request_as_the_calls_status(tmp_path):
    async with mesh(tmp_path) as m:
        await register(m, name="greeter", system_prompt="Greet {{variables.name}}.",
                       budget=BudgetPolicy(enforcement=3))
        events = []
        m.backend.bus.subscribe(lambda event: events.append(event.type))
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for message in m.orchestrator.StreamAgent(StreamAgentRequest(
                    request_id=rid(), agent="greeter", input="hi"), timeout=20):
                received.append(message)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert from_rpc_error(err.value).field_violations[0][0] == "variables"
        assert received == [] and events == [] and m.primary.calls == []


async def test_run_agent_is_idempotent_and_concurrent_retries_wait(tmp_path):
    async with mesh(tmp_path) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       output_artifact_type="code", budget=BudgetPolicy(enforcement=3))
        m.primary.latency_s = 0.2
        request_id = rid()
        first, second = await asyncio.gather(run(m, "coder", request_id=request_id),
                                             run(m, "coder", request_id=request_id))
        assert sorted([first.replayed, second.replayed]) == [False, True]
        assert first.result == second.result
        assert len(m.primary.calls) == 1
        with pytest.raises(Exception) as err:
            await run(m, "coder", "another input", request_id=request_id)
        assert err.value.reason == "IDEMPOTENCY_CONFLICT"


async def test_a_completed_run_replays_after_its_agent_was_deleted(tmp_path):
    from hivemesh.orchestrator.v1 import DeleteAgentRequest
    async with mesh(tmp_path) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       budget=BudgetPolicy(enforcement=3))
        request_id = rid()
        first = await run(m, "coder", request_id=request_id)
        await call(m.orchestrator.DeleteAgent, DeleteAgentRequest(request_id=rid(),
                                                                  name="coder"))
        again = await run(m, "coder", request_id=request_id)
        assert again.replayed and again.result == first.result
        streamed = [x async for x in m.orchestrator.StreamAgent(StreamAgentRequest(
            request_id=request_id, agent="coder", input="Implement a function that adds two "
            "numbers", context=RequestContext(tenant_id="acme")), timeout=20)]
        assert streamed[0].agent_event.agent_complete == first.result
        with pytest.raises(NotFoundError):  # a new run of it is refused, as before
            await run(m, "coder")


async def test_a_provider_failure_is_not_retried_again_by_the_callers_channel(tmp_path):
    """The orchestrator has retried the provider already: its UNAVAILABLE tells
    gRPC clients not to retry the whole run (each retry would run the agent
    again against a provider that is down)."""
    from hivemesh.client.channel import insecure_channel
    from hivemesh.orchestrator.v1 import OrchestratorServiceStub
    async with mesh(tmp_path) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       budget=BudgetPolicy(enforcement=3))
        m.primary.simulate_failure(ErrorKind.UNAVAILABLE, times=1000)
        m.secondary.simulate_failure(ErrorKind.UNAVAILABLE, times=1000)
        runs = []
        m.backend.bus.subscribe(lambda event: runs.append(event)
                                if event.type == EventType.EVENT_TYPE_AGENT_START else None)
        async with insecure_channel(m.addresses["orchestrator"], "orchestrator") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:  # retries UNAVAILABLE otherwise
                await OrchestratorServiceStub(channel).RunAgent(RunAgentRequest(
                    request_id=rid(), agent="coder", input="x",
                    context=RequestContext(tenant_id="acme")), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(runs) == 1


async def test_too_little_time_fails_fast_without_starting_work(tmp_path):
    async with mesh(tmp_path, min_call_time_s=0.5) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       budget=BudgetPolicy(enforcement=3))
        with pytest.raises(DeadlineExceededError) as err:
            await call(m.orchestrator.RunAgent, RunAgentRequest(
                request_id=rid(), agent="coder", input="x"), timeout=0.3)
        assert err.value.reason == "DEADLINE_TOO_SHORT"
        assert m.primary.calls == []


async def test_bad_requests_are_rejected_before_any_work(tmp_path):
    async with mesh(tmp_path) as m:
        await register(m, name="greeter", system_prompt="Greet {{variables.name}}.",
                       budget=BudgetPolicy(enforcement=3))
        with pytest.raises(InvalidArgumentError) as err:
            await run(m, "greeter")
        assert err.value.field_violations[0][0] == "variables"
        result = (await run(m, "greeter", variables={"name": "Ada"})).result
        assert result.output
        assert m.primary.calls[-1].messages[0].content == "Greet Ada."
        with pytest.raises(NotFoundError):
            await run(m, "nobody")
        with pytest.raises(InvalidArgumentError):
            await register(m, name="bad", allowed_tools=["no_such_tool"])
        # What would make every run fail is refused when the agent is registered.
        with pytest.raises(InvalidArgumentError) as err:
            await register(m, name="bad", system_prompt="Hi {{foo}}, see {{tasks.x.output}}.")
        assert [f for f, _ in err.value.field_violations] == ["agent.system_prompt"] * 2
        with pytest.raises(InvalidArgumentError) as err:
            await register(m, name="bad", model="main", fallback_models=["backup", "main"])
        assert [f for f, _ in err.value.field_violations] == ["agent.fallback_models[1]"]


async def test_a_fallback_model_is_held_for_at_its_own_price_before_it_generates(tmp_path):
    """The run holds budget for its first model; when that model fails and a
    fallback priced higher would answer, the fallback is held for first: a
    HARD budget it does not fit refuses it before anything is generated, and
    one it fits is charged what the fallback cost, with no hold left."""
    from hivemesh.information.v1 import BudgetMode
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        await info.set_price("main", input_micros_per_million=1, output_micros_per_million=1)
        await info.set_price("backup", input_micros_per_million=10_000_000,
                             output_micros_per_million=10_000_000)
        await register(m, name="fb", model="main", fallback_models=["backup"])
        tight = await info.create_budget(Budget(scope=Scope(tenant_id="tight"), limit_micros=100,
                                                mode=BudgetMode.BUDGET_MODE_HARD))
        m.primary.simulate_failure(times=10)
        with pytest.raises(ResourceExhaustedError) as err:
            await run(m, "fb", "hello there", context=RequestContext(tenant_id="tight"))
        assert err.value.reason == "BUDGET_EXCEEDED"
        assert not m.secondary.calls  # the fallback never generated
        (status,) = await info.status(budget_id=tight.budget_id)
        assert (status.spent_micros, status.reserved_micros) == (0, 0)

        roomy = await info.create_budget(Budget(scope=Scope(tenant_id="roomy"),
                                                limit_micros=100_000_000,
                                                mode=BudgetMode.BUDGET_MODE_HARD))
        answered = (await run(m, "fb", "hello there",
                              context=RequestContext(tenant_id="roomy"))).result
        assert answered.model == "backup" and answered.cost_micros > 100
        (status,) = await info.status(budget_id=roomy.budget_id)
        assert (status.spent_micros, status.reserved_micros) == (answered.cost_micros, 0)


async def test_a_fallback_is_held_for_without_the_first_models_hold(tmp_path):
    """A HARD budget with room for one hold, not two: the fallback's hold is
    made once the failed model's is released, so the fallback runs."""
    from hivemesh.information.v1 import BudgetMode
    from hivemesh.orchestrator.v1 import SamplingConfig
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        for model in ("main", "backup"):
            await info.set_price(model, input_micros_per_million=1_000_000,
                                 output_micros_per_million=1_000_000)
        await register(m, name="fb", model="main", fallback_models=["backup"],
                       sampling=SamplingConfig(max_tokens=1000))
        one = await info.create_budget(Budget(scope=Scope(tenant_id="one"), limit_micros=1500,
                                              mode=BudgetMode.BUDGET_MODE_HARD))
        m.primary.simulate_failure(times=10)
        answered = (await run(m, "fb", "hello there",
                              context=RequestContext(tenant_id="one"))).result
        assert answered.model == "backup"
        (status,) = await info.status(budget_id=one.budget_id)
        assert (status.spent_micros, status.reserved_micros) == (answered.cost_micros, 0)


async def test_a_run_cancelled_while_a_fallback_takes_over_leaves_no_hold(tmp_path, monkeypatch):
    """Cancelled while the failed model's hold is being released (for the
    fallback's), the run still releases it: nothing stays reserved."""
    from hivemesh.information.v1 import BudgetMode
    original = AgentRunner._release_id
    entered, gate = asyncio.Event(), asyncio.Event()

    async def held(self, reservation, reason):
        entered.set()
        await gate.wait()
        return await original(self, reservation, reason)

    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        await info.set_price("main", input_micros_per_million=1_000_000,
                             output_micros_per_million=1_000_000)
        await register(m, name="fb", model="main", fallback_models=["backup"])
        budget = await info.create_budget(Budget(scope=Scope(tenant_id="t"), limit_micros=10**9,
                                                 mode=BudgetMode.BUDGET_MODE_HARD))
        m.primary.simulate_failure(times=10)
        monkeypatch.setattr(AgentRunner, "_release_id", held)
        running = asyncio.ensure_future(run(m, "fb", "hello there",
                                            context=RequestContext(tenant_id="t")))
        await asyncio.wait_for(entered.wait(), 20)
        running.cancel()
        with contextlib.suppress(BaseException):
            await running
        gate.set()
        status = await _settled(info, budget.budget_id)
        assert (status.reserved_micros, status.spent_micros) == (0, 0)


async def test_a_refused_reservation_reaches_the_caller_with_its_quota_failure(tmp_path):
    async with mesh(tmp_path) as m:
        async with InformationClient(m.addresses["information"]) as info:
            budget = await _budget_with_price(info, "poor", limit_micros=1)
        await register(m, name="coder", system_prompt="You write code.")
        with pytest.raises(ResourceExhaustedError) as err:
            await run(m, "coder", context=RequestContext(tenant_id="poor"))
        assert err.value.reason == "BUDGET_EXCEEDED"
        ((subject, _),) = err.value.quota_violations
        assert subject == f"budget:{budget.budget_id}"


async def run_within(m, agent: str, timeout: float):
    return await call(m.orchestrator.RunAgent, RunAgentRequest(
        request_id=rid(), agent=agent, input="add two numbers",
        context=RequestContext(tenant_id="acme")), timeout=timeout)


class _HangingMemory(MemoryServiceServicer):
    async def SearchMemories(self, request, context):
        await asyncio.sleep(3600)


async def test_a_built_in_tool_on_a_hanging_provider_fails_as_the_tool_and_the_run_goes_on(
        tmp_path):
    server = grpc.aio.server()
    add_MemoryServiceServicer_to_server(_HangingMemory(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with mesh(tmp_path, memory_address=f"127.0.0.1:{port}") as m:
            await register(m, name="coder", system_prompt="You write code.",
                           allowed_tools=["memory_search"], budget=BudgetPolicy(
                               enforcement=BudgetEnforcement.BUDGET_ENFORCEMENT_DISABLED))
            m.primary.queue_response(tool_calls=(
                ToolCall("c1", "memory_search", json.dumps({"query": "x"})),))
            m.primary.queue_response("done without memory")
            result = (await run_within(m, "coder", 2)).result
            assert result.output == "done without memory"
            (record,) = result.tool_calls
            assert record.error.code == "UNAVAILABLE"
            assert [d.component for d in result.degraded] == [
                DegradedComponent.DEGRADED_COMPONENT_TOOL]
    finally:
        await server.stop(0)


class _ListedOnce(ToolServiceServicer):
    hang = False

    async def ListTools(self, request, context):
        if self.hang:
            await asyncio.sleep(3600)
        return ListToolsResponse()


async def test_a_run_waiting_on_another_runs_listing_keeps_to_its_own_deadline(
        tmp_path, monkeypatch):
    from hivemesh.services.orchestrator import tools as tool_registry
    monkeypatch.setattr(tool_registry, "RELIST_AFTER_S", 0.0)
    with socket.socket() as probe:  # nothing listens there: unreachable
        probe.bind(("127.0.0.1", 0))
        down = probe.getsockname()[1]
    tools = _ListedOnce()
    server = grpc.aio.server()
    add_ToolServiceServicer_to_server(tools, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    folder = tmp_path / "agents"
    folder.mkdir()
    (folder / "forecaster.toml").write_text(
        'name = "forecaster"\nmodel = "main"\nallowed_tools = ["weather"]\n'
        '[budget]\nenforcement = "BUDGET_ENFORCEMENT_DISABLED"\n')
    try:
        async with mesh(tmp_path, tool_servers={"down": f"127.0.0.1:{down}",
                                                "wx": f"127.0.0.1:{port}"},
                        agents_dir=folder) as m:
            tools.hang = True
            long_run = asyncio.ensure_future(run_within(m, "forecaster", 30))
            while not m.backend.tools._listing or m.backend.tools._listing.done():
                await asyncio.sleep(0.02)  # the long run's listing is under way
            result = (await run_within(m, "forecaster", 2)).result
            long_run.cancel()
            assert result.output
            assert [d.component for d in result.degraded] == [
                DegradedComponent.DEGRADED_COMPONENT_TOOL]
    finally:
        await server.stop(0)


async def test_artifacts_saved_by_the_artifact_save_tool_are_the_runs(tmp_path):
    async with mesh(tmp_path) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       output_artifact_type="code", allowed_tools=["artifact_save"],
                       budget=BudgetPolicy(
                           enforcement=BudgetEnforcement.BUDGET_ENFORCEMENT_DISABLED))
        events = []
        m.backend.bus.subscribe(lambda e: events.append(e))
        m.primary.queue_response(tool_calls=(ToolCall("c1", "artifact_save", json.dumps(
            {"artifact_type": "test", "content": "assert add(1, 2) == 3"})),))
        m.primary.queue_response("def add(a, b): return a + b")
        result = (await run(m, "coder")).result
        by_tool = json.loads(result.tool_calls[0].result)["artifact_id"]
        saved = [e.artifact_saved for e in events
                 if e.type == EventType.EVENT_TYPE_ARTIFACT_SAVED]
        assert [s.artifact_id for s in saved] == list(result.artifact_ids)
        assert len(result.artifact_ids) == 2 and result.artifact_ids[0] == by_tool
        assert [s.artifact_type for s in saved] == ["test", "code"]
        async with ArtifactClient(m.addresses["artifact"]) as artifacts:
            assert (await artifacts.get(by_tool)).content == "assert add(1, 2) == 3"


def _llm_settings_with(**changes):
    """The test mesh's LLM settings, "main" changed by ``changes`` (such as
    a fallback chain of the LLM service's own)."""
    original = fake_mesh.llm_settings

    def settings(server=fake_mesh.SERVER):
        s = original(server)
        models = [ModelSettings(**{**model.model_dump(), **changes})
                  if model.alias == "main" else model for model in s.models]
        return s.model_copy(update={"models": models})
    return settings


async def test_a_fallback_done_by_the_llm_service_is_reported_as_degraded(tmp_path, monkeypatch):
    monkeypatch.setattr(fake_mesh, "llm_settings", _llm_settings_with(fallback=["backup"]))
    async with mesh(tmp_path) as m:
        await register(m, name="coder", system_prompt="You write code.",
                       budget=BudgetPolicy(enforcement=BudgetEnforcement.BUDGET_ENFORCEMENT_DISABLED))
        events = []
        m.backend.bus.subscribe(lambda e: events.append(e.type))
        m.primary.simulate_failure(ErrorKind.UNAVAILABLE, times=10)
        result = (await run(m, "coder", "add two numbers")).result
        assert result.model == "backup" and result.fallback_used
        assert [d.component for d in result.degraded] == [
            DegradedComponent.DEGRADED_COMPONENT_MODEL_FALLBACK]
        assert EventType.EVENT_TYPE_DEGRADED in events


async def test_a_run_cancelled_while_its_answer_is_kept_is_charged_for_it(tmp_path, monkeypatch):
    """The ledger keeps the generation's answer slowly (a slow disk, a Redis
    round trip) and the caller's deadline passes meanwhile: the tokens were
    used, so they are committed all the same."""
    keep = SqliteRequestRecords._keep

    async def slow_keep(self, kind, request_id, fingerprint, result):
        if kind == "read" and isinstance(result, GenerateResponse):
            await asyncio.sleep(1.0)
        return await keep(self, kind, request_id, fingerprint, result)
    monkeypatch.setattr(SqliteRequestRecords, "_keep", slow_keep)
    async with mesh(tmp_path, data_dir=tmp_path / "orch") as m, \
            InformationClient(m.addresses["information"]) as info:
        budget = await _budget_with_price(info)
        await register(m, name="coder", system_prompt="You write code.")
        with pytest.raises(DeadlineExceededError):
            await run_within(m, "coder", 0.5)
        assert len(m.primary.calls) == 1
        for _ in range(100):
            (status,) = await info.status(budget_id=budget.budget_id)
            if status.spent_micros:
                break
            await asyncio.sleep(0.1)
        assert status.spent_micros > 0 and status.reserved_micros == 0


async def test_a_failed_read_of_an_attempt_refused_before_generating_is_read_again(tmp_path):
    ctx = RequestContext(tenant_id="acme")
    async with mesh(tmp_path) as m:
        async with MemoryClient(m.addresses["memory"]) as memory:
            await memory.add_text("to add two numbers use the plus operator",
                                  namespace="n", context=ctx)
        await register(m, name="coder", system_prompt="You write code.",
                       budget=BudgetPolicy(enforcement=BudgetEnforcement.BUDGET_ENFORCEMENT_TRACK),
                       memory=MemoryConfig(enabled=True, namespace="n"))
        request_id = rid()
        # The first attempt's recall has too little time (half of 90 ms is
        # under the 50 ms a call needs), and its generation is refused
        # before it is sent (the LLM breaker is open).
        breaker = m.backend.providers.breaker("llm")
        for _ in range(breaker.failure_threshold):
            breaker.record_failure(breaker.allow())
        with pytest.raises(grpc.aio.AioRpcError):
            await m.orchestrator.RunAgent(RunAgentRequest(
                request_id=request_id, agent="coder", input="add two numbers",
                context=ctx), timeout=0.09)
        assert m.primary.calls == []
        breaker.record_success()
        result = (await run(m, "coder", "add two numbers", context=ctx,
                            request_id=request_id)).result
        assert result.memories_recalled == 1 and not result.degraded


async def _refused_before_generating(m, info, budget_id: str, ctx) -> None:
    """A run of "coder" fails BUDGET_EXCEEDED with nothing generated, and
    nothing spent or held once it is over."""
    with pytest.raises(ResourceExhaustedError) as err:
        await run(m, "coder", "add two numbers", context=ctx)
    assert err.value.reason == "BUDGET_EXCEEDED"
    assert m.primary.calls == []
    status = await _settled(info, budget_id)
    assert (status.spent_micros, status.reserved_micros) == (0, 0)


async def test_a_hold_covers_the_recalled_memories_and_history_before_generating(tmp_path):
    """The first hold is made while memory is read (its prompt has neither);
    once the prompt is known it is held for again, and refused, before
    anything is generated, when the budget cannot take it."""
    ctx = RequestContext(tenant_id="acme", session_id="s-1")
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        async with MemoryClient(m.addresses["memory"]) as memory:
            await memory.append_history("s-1", [("user", "word " * 700),
                                                ("assistant", "word " * 700)],
                                        namespace="h", context=ctx)
        # Room for the system prompt, the input and 50 tokens of output, not
        # for 1,400 words of history besides.
        budget = await _budget_with_price(info, limit_micros=300)
        await register(m, name="coder", system_prompt="You write code.",
                       sampling=SamplingConfig(max_tokens=50),
                       memory=MemoryConfig(history_enabled=True, namespace="h"))
        await _refused_before_generating(m, info, budget.budget_id, ctx)
        # With room for it, the run generates within the budget it was held in.
        await info.update_budget(Budget(budget_id=budget.budget_id, limit_micros=10_000),
                                 ["limit_micros"])
        result = (await run(m, "coder", "add two numbers", context=ctx)).result
        assert result.usage.prompt_tokens > 1000
        status = await _settled(info, budget.budget_id)
        assert (status.spent_micros, status.reserved_micros) == (result.cost_micros, 0)


async def test_the_llm_services_fallback_is_held_for_at_its_own_price(tmp_path, monkeypatch):
    """"main" falls back to "backup" in the LLM service, 100 times dearer:
    under RESERVE the run tries that chain itself, each model held for at
    its own price, so a HARD budget refuses the dear fallback instead of
    being spent past."""
    monkeypatch.setattr(fake_mesh, "llm_settings", _llm_settings_with(fallback=["backup"]))
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        budget = await _budget_with_price(info, limit_micros=2_000)
        await info.set_price("backup", input_micros_per_million=100_000_000,
                             output_micros_per_million=100_000_000)
        await register(m, name="coder", system_prompt="You write code.")
        m.primary.simulate_failure(ErrorKind.UNAVAILABLE, times=10)
        with pytest.raises(ResourceExhaustedError) as err:
            await run(m, "coder", "add two numbers")
        assert err.value.reason == "BUDGET_EXCEEDED"
        assert m.secondary.calls == []
        status = await _settled(info, budget.budget_id)
        assert (status.spent_micros, status.reserved_micros) == (0, 0)
        # A fallback the budget can hold answers, reported as the run's own.
        await info.set_price("backup", input_micros_per_million=1_000_000,
                             output_micros_per_million=1_000_000)
        result = (await run(m, "coder", "add two numbers")).result
        assert result.model == "backup" and result.fallback_used
        assert [d.component for d in result.degraded] == [
            DegradedComponent.DEGRADED_COMPONENT_MODEL_FALLBACK]
        assert len(m.secondary.calls) == 1
        status = await _settled(info, budget.budget_id)
        assert (status.spent_micros, status.reserved_micros) == (result.cost_micros, 0)


async def test_a_hold_asks_for_no_more_output_than_the_model_can_write(tmp_path, monkeypatch):
    """The LLM service caps max_tokens at the model's max_output_tokens: the
    hold is made for that, not for the agent's larger max_tokens."""
    monkeypatch.setattr(fake_mesh, "llm_settings", _llm_settings_with(max_output_tokens=100))
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        budget = await _budget_with_price(info, limit_micros=1_000)
        await register(m, name="coder", system_prompt="You write code.",
                       sampling=SamplingConfig(max_tokens=100_000))
        result = (await run(m, "coder", "add two numbers")).result
        assert result.output and result.cost_micros > 0
        status = await _settled(info, budget.budget_id)
        assert (status.spent_micros, status.reserved_micros) == (result.cost_micros, 0)


async def test_a_reserve_that_fails_unavailable_after_it_was_made_is_released(tmp_path):
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        budget = await _budget_with_price(info)
        await register(m, name="coder", system_prompt="You write code.")
        providers = m.backend.providers
        real = providers.call

        async def dropped(name, method, request, **kw):
            response = await real(name, method, request, **kw)
            if method == "Reserve" and not dropped.done:
                # Held, and the connection dropped before the answer came.
                dropped.done = True
                raise errors.ServiceError(grpc.StatusCode.UNAVAILABLE,
                                          "BACKEND_UNAVAILABLE", "connection reset")
            return response
        dropped.done = False
        providers.call = dropped
        with pytest.raises(UnavailableError):
            await run(m, "coder", "add two numbers")
        assert m.primary.calls == []
        status = await _settled(info, budget.budget_id)
        assert (status.spent_micros, status.reserved_micros) == (0, 0)


async def test_recalled_memories_larger_than_the_first_hold_allowed_are_held_for_again(
        tmp_path):
    """The first hold counts a chunk of the default size per memory to
    recall; memories stored whole and larger are held for again once read,
    and refused, before anything is generated, when the budget cannot take
    them."""
    ctx = RequestContext(tenant_id="acme")
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        async with MemoryClient(m.addresses["memory"]) as memory:
            await memory.add(["add two numbers: " + "word " * 1600], namespace="big",
                             context=ctx, whole_item=True)  # about 2,000 tokens
        # Room for the first hold (system prompt, input, one memory of the
        # default size, 50 tokens of output), not for the memory as read.
        budget = await _budget_with_price(info, limit_micros=1_000)
        await register(m, name="coder", system_prompt="You write code.",
                       sampling=SamplingConfig(max_tokens=50),
                       memory=MemoryConfig(enabled=True, namespace="big", recall_limit=1))
        await _refused_before_generating(m, info, budget.budget_id, ctx)


async def test_a_listmodels_outage_fails_no_reserve_run_that_names_its_model(tmp_path):
    """The LLM service's table of models serves a run that names its model
    only to follow the LLM service's chain and cap the hold: without it the
    run keeps to its own chain, each model held for; ListModels is asked
    again a few seconds later, not by every run."""
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        await _budget_with_price(info)
        await register(m, name="coder", system_prompt="You write code.",
                       fallback_models=["backup"])
        providers = m.backend.providers
        real = providers.call

        async def no_list(name, method, request, **kw):
            if method == "ListModels":
                raise errors.ServiceError(grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE",
                                          "ListModels down")
            return await real(name, method, request, **kw)
        providers.call = no_list
        for _ in range(2):
            result = (await run(m, "coder", "add two numbers")).result
            assert result.output
        await register(m, name="plain", system_prompt="You write code.")
        assert (await run(m, "plain", "add two numbers")).result.output


async def test_runs_finding_the_table_of_models_old_at_once_ask_for_it_once(tmp_path):
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        await _budget_with_price(info)
        await register(m, name="coder", system_prompt="You write code.")
        providers = m.backend.providers
        real = providers.call
        asked = []

        async def counting(name, method, request, **kw):
            if method == "ListModels":
                asked.append(1)
                await asyncio.sleep(0.2)
            return await real(name, method, request, **kw)
        providers.call = counting
        await asyncio.gather(*(run(m, "coder", "add two numbers") for _ in range(8)))
        assert len(asked) == 1, f"ListModels asked {len(asked)} times"


async def test_a_first_hold_refused_for_what_reads_might_add_is_made_once_they_are_read(
        tmp_path):
    """recall_limit 20 and nothing to recall: the run's prompt and output
    (~70 micros) fit a 300-micro HARD budget, though a first hold counting
    20 memories does not: it is held for once the reads are known."""
    ctx = RequestContext(tenant_id="acme")
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        budget = await _budget_with_price(info, limit_micros=300)
        await register(m, name="coder", system_prompt="You write code.",
                       sampling=SamplingConfig(max_tokens=50),
                       memory=MemoryConfig(enabled=True, namespace="empty-r9", recall_limit=20))
        result = (await run(m, "coder", "add two numbers", context=ctx)).result
        assert result.output
        status = await _settled(info, budget.budget_id)
        assert status.spent_micros == result.cost_micros


async def test_a_generation_is_sent_the_output_limit_its_hold_was_made_for(tmp_path,
                                                                           monkeypatch):
    """The cached ListModels (up to 60 s old) says main writes at most 100
    tokens; the LLM service now allows 4,096 (restarted with new settings,
    or another replica). The hold is made for 100 output tokens and the
    generation is sent that limit, so a HARD budget is not spent past."""
    from hivemesh.services.orchestrator.runner import AgentRunner
    real_models = AgentRunner._models

    async def stale(self):
        table = await real_models(self)
        old = {k: type(v)() for k, v in table.items()}
        for k, v in table.items():
            old[k].CopyFrom(v)
        old["main"].max_output_tokens = 100
        return old
    monkeypatch.setattr(AgentRunner, "_models", stale)
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        budget = await _budget_with_price(info, limit_micros=1_000)
        await register(m, name="coder", system_prompt="You write code.",
                       sampling=SamplingConfig(max_tokens=4_000))
        m.primary.default_response = "word " * 3000
        result = (await run(m, "coder", "add two numbers")).result
        sent = m.primary.calls[-1].max_tokens
        status = await _settled(info, budget.budget_id)
        assert sent == 100 and status.spent_micros == result.cost_micros <= 1_000


# A tool call's arguments as a model streams them: a file's content.
_TOOL_ARGUMENTS = '{"path": "a.py", "content": "' + "x = 1\\n" * 200


async def _priced_coder(m, info, enforcement):
    """A priced model "main", a large budget of tenant acme (returned) and
    the agent "coder" on them under ``enforcement``."""
    await info.set_price("main", input_micros_per_million=1_000_000,
                         output_micros_per_million=2_000_000)
    budget = await info.create_budget(Budget(scope=Scope(tenant_id="acme"),
                                             limit_micros=10_000_000))
    await m.orchestrator.RegisterAgent(RegisterAgentRequest(request_id=rid(), agent=AgentDefinition(
        name="coder", model="main", budget=BudgetPolicy(enforcement=enforcement))), timeout=10)
    return budget


@pytest.mark.parametrize("enforcement", [BudgetEnforcement.BUDGET_ENFORCEMENT_RESERVE,
                                         BudgetEnforcement.BUDGET_ENFORCEMENT_TRACK])
async def test_a_stream_cut_after_only_a_tool_call_is_charged(tmp_path, enforcement):
    """The model streamed a tool call's arguments and no text, then the
    stream broke: that output was generated and is charged, as text is."""
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        budget = await _priced_coder(m, info, enforcement)
        args = _TOOL_ARGUMENTS

        async def cut_stream(request, timeout_s):
            m.primary.calls.append(request)
            yield ToolCallDelta(0, "c1", "write_file", args)
            raise BackendError(ErrorKind.STREAM_CUT, "primary: stream cut")
        m.primary.stream = cut_stream
        messages = [x async for x in m.orchestrator.StreamAgent(StreamAgentRequest(
            request_id=rid(), agent="coder", input="write it",
            context=RequestContext(tenant_id="acme")), timeout=20)]
        assert messages[-1].end.outcome == StreamOutcome.STREAM_OUTCOME_FAILED
        failed = messages[-2].agent_event.agent_failed
        assert failed.usage.completion_tokens > 0 and failed.cost_micros > 0
        for _ in range(20):
            (status,) = await info.status(budget_id=budget.budget_id)
            if status.reserved_micros == 0:
                break
            await asyncio.sleep(0.1)
        assert status.reserved_micros == 0
        assert status.spent_micros == failed.cost_micros


async def test_a_caller_leaving_after_a_streamed_tool_call_is_charged_for_it(tmp_path):
    """The caller leaves once the model has streamed a tool call's
    arguments: the hold is released and what was generated is charged."""
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        budget = await _priced_coder(m, info, BudgetEnforcement.BUDGET_ENFORCEMENT_RESERVE)
        args = _TOOL_ARGUMENTS

        streamed = asyncio.Event()

        async def slow_stream(request, timeout_s):
            m.primary.calls.append(request)
            yield ToolCallDelta(0, "c1", "write_file", args)
            streamed.set()  # asked for more: the delta went on its way
            await asyncio.sleep(30)
        m.primary.stream = slow_stream
        call = m.orchestrator.StreamAgent(StreamAgentRequest(
            request_id=rid(), agent="coder", input="write it",
            context=RequestContext(tenant_id="acme")), timeout=20)
        await call.read()  # AGENT_START
        await asyncio.wait_for(streamed.wait(), 10)
        await asyncio.sleep(0.3)  # and reached the orchestrator
        call.cancel()
        for _ in range(30):
            (status,) = await info.status(budget_id=budget.budget_id)
            if status.reserved_micros == 0 and status.spent_micros:
                break
            await asyncio.sleep(0.1)
        assert status.reserved_micros == 0
        assert status.spent_micros > 0
