"""Two orchestrator replicas on one Redis (HIVEMESH_ORCHESTRATOR_STATE_BACKEND
=redis) behave as one: agents registered through either are seen by both,
a request retried on the other replica replays the first result instead of
running the agent again, a stale claim of a dead replica is taken over, and
an unreachable Redis fails clearly without running anything. Also the
local backend (the default) as it always was.

Uses the local Redis (HIVEMESH_TEST_REDIS_URL, default
redis://127.0.0.1:6379/0) under a unique key prefix per test, dropped after
it; skipped when Redis is not reachable (failed under CI). The shared-state
scenarios run again on a Redis Cluster started for the session."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

import grpc
import pytest
from conftest import (
    LOCAL_REDIS, REDIS_URL, RedisProxy, RedisTarget, drop_redis_prefix, on_redis)
from fakes.mesh import SERVER, ArtifactOutage, mesh
from fakes.redis_commands import CommandLog

from hivemesh.client import InformationClient, from_rpc_error
from hivemesh.client.errors import AlreadyExistsError, UnavailableError
from hivemesh.common.v1 import RequestContext, StreamOutcome
from hivemesh.information.v1 import Budget, Scope
from hivemesh.orchestrator.v1 import (
    AgentDefinition, BudgetPolicy, DegradedComponent, DeleteAgentRequest, MemoryConfig,
    EventType, GetAgentRequest, ListAgentsRequest, OrchestratorServiceStub, RegisterAgentRequest,
    RunAgentRequest, RunWorkflowRequest, StreamAgentRequest, TaskSpec, WorkflowDefinition)
from hivemesh.runtime.resilience import fingerprint
from hivemesh.services.llm.backends.base import ErrorKind
from hivemesh.services.orchestrator.server import create_server, open_backend
from hivemesh.services.orchestrator.servicer import _as_run
from hivemesh.services.orchestrator.settings import OrchestratorSettings

TIMEOUT = 20  # seconds, every call


def rid() -> str:
    return str(uuid.uuid4())


async def call(method, request, timeout=TIMEOUT):
    try:
        return await method(request, timeout=timeout)
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err) from err


async def rpc_error(method, request, timeout=TIMEOUT) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await method(request, timeout=timeout)
    return err.value


def agent(name: str, **fields) -> AgentDefinition:
    fields.setdefault("model", "main")
    fields.setdefault("system_prompt", "You write code.")
    fields.setdefault("budget", BudgetPolicy(enforcement=3))  # no budget needed
    return AgentDefinition(name=name, **fields)


async def register(stub, definition: AgentDefinition, allow_update: bool = False):
    return await call(stub.RegisterAgent, RegisterAgentRequest(
        request_id=rid(), agent=definition, allow_update=allow_update))


def run_request(name: str, request_id: str | None = None, text: str = "implement add"):
    return RunAgentRequest(request_id=request_id or rid(), agent=name, input=text,
                           context=RequestContext(tenant_id="acme"))


async def list_names(stub, page_size: int) -> list[str]:
    names, token = [], ""
    while True:
        page = await call(stub.ListAgents, ListAgentsRequest(page_size=page_size,
                                                             page_token=token))
        names += [a.name for a in page.agents]
        token = page.next_page_token
        if not token:
            return names


# -- fixtures -------------------------------------------------------------------

async def open_redis_state(prefix: str, target: RedisTarget = LOCAL_REDIS):
    from hivemesh.services.orchestrator.redis_state import RedisState
    return await on_redis(target, lambda url: RedisState.open(url, prefix=prefix,
                                                              cluster=target.cluster))


async def drop_prefix(state) -> None:
    await drop_redis_prefix(state.client, state.prefix)


@contextlib.asynccontextmanager
async def state_on(target: RedisTarget):
    """A view of ``target`` under a unique prefix, dropped afterwards."""
    state = await open_redis_state(f"hmtest:orch:{uuid.uuid4().hex}:", target)
    try:
        yield state
    finally:
        await drop_prefix(state)
        await state.close()


@pytest.fixture
async def redis_state(redis_target):
    """The test's own view of the shared Redis (the local one, then the
    cluster), under a unique prefix that is dropped afterwards."""
    async with state_on(redis_target) as state:
        yield state


@pytest.fixture
async def local_redis_state():
    """As ``redis_state``, on the local Redis only (which a proxy can cut)."""
    async with state_on(LOCAL_REDIS) as state:
        yield state


def redis_settings(target: RedisTarget, state) -> dict:
    """The settings of a replica on ``state``'s Redis and prefix."""
    return dict(state_backend="redis", redis_url=target.url, redis_cluster=target.cluster,
                redis_prefix=state.prefix)


@pytest.fixture
def shared(redis_target, redis_state) -> dict:
    """The settings of the replicas sharing ``redis_state``."""
    return redis_settings(redis_target, redis_state)


@contextlib.asynccontextmanager
async def replica(m, **settings):
    """One more orchestrator on the mesh's providers; yields its stub."""
    full = OrchestratorSettings(
        server=SERVER, llm_address=m.addresses["llm"], memory_address=m.addresses["memory"],
        information_address=m.addresses["information"],
        artifact_address=m.addresses["artifact"], **settings)
    backend = await open_backend(full)
    try:
        running, port = await create_server(full, backend)
        try:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            try:
                yield OrchestratorServiceStub(channel)
            finally:
                await channel.close()
        finally:
            await running.shutdown(0)
    finally:
        await backend.close()


@contextlib.asynccontextmanager
async def two_replicas(tmp_path, shared: dict, **settings):
    """(mesh, stub of replica A, stub of replica B) on one Redis prefix
    (``shared``: the replicas' Redis settings)."""
    shared = {**shared, **settings}
    async with mesh(tmp_path, **shared) as m, replica(m, **shared) as b:
        yield m, m.orchestrator, b


def agents_dir(tmp_path, *names: str):
    folder = tmp_path / "agents"
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / f"{name}.json").write_text(json.dumps({
            "name": name, "description": "from the file", "model": "main",
            "budget": {"enforcement": 3}}))
    return folder


# -- agents -----------------------------------------------------------------------

async def test_an_agent_registered_on_one_replica_is_run_listed_and_deleted_on_the_other(
        tmp_path, shared):
    async with two_replicas(tmp_path, shared) as (m, a, b):
        created = (await register(a, agent("coder", description="first"))).agent
        seen = (await call(b.GetAgent, GetAgentRequest(name="coder"))).agent
        assert seen == created
        assert "coder" in await list_names(b, 50)
        result = (await call(b.RunAgent, run_request("coder"))).result
        assert result.output and len(m.primary.calls) == 1

        err = await rpc_error(b.RegisterAgent, RegisterAgentRequest(
            request_id=rid(), agent=agent("coder", description="second")))
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS
        updated = await register(b, agent("coder", description="second"), allow_update=True)
        assert not updated.created
        assert updated.agent.create_time == created.create_time
        assert (await call(a.GetAgent, GetAgentRequest(name="coder"))).agent == updated.agent

        gone = await call(b.DeleteAgent, DeleteAgentRequest(request_id=rid(), name="coder"))
        assert gone.deleted
        err = await rpc_error(a.GetAgent, GetAgentRequest(name="coder"))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        err = await rpc_error(a.RunAgent, run_request("coder"))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert "coder" not in await list_names(a, 50)
        again = await call(a.DeleteAgent, DeleteAgentRequest(request_id=rid(), name="coder"))
        assert not again.deleted


async def test_a_registration_retried_on_the_other_replica_is_replayed(tmp_path, shared):
    async with two_replicas(tmp_path, shared) as (m, a, b):
        request = RegisterAgentRequest(request_id=rid(), agent=agent("coder"))
        first = await call(a.RegisterAgent, request)
        retry = await call(b.RegisterAgent, request)  # not ALREADY_EXISTS
        assert first.created and not first.replayed
        assert retry.replayed and retry.agent == first.agent


async def test_files_and_registered_agents_keep_their_precedence_across_replicas(
        tmp_path, shared):
    folder = agents_dir(tmp_path, "filed-a", "filed-b", "filed-c")
    async with two_replicas(tmp_path, shared, agents_dir=folder) as (m, a, b):
        for name in ("reg-a", "reg-b", "reg-c"):
            await register(a if name != "reg-b" else b, agent(name))
        expected = ["filed-a", "filed-b", "filed-c", "reg-a", "reg-b", "reg-c"]
        assert await list_names(a, 2) == expected
        assert await list_names(b, 4) == expected

        # A file agent is taken: replacing it needs allow_update, and the
        # replacement is what every replica runs.
        err = await rpc_error(a.RegisterAgent, RegisterAgentRequest(
            request_id=rid(), agent=agent("filed-b", description="registered")))
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS
        replaced = await register(a, agent("filed-b", description="registered"),
                                  allow_update=True)
        assert not replaced.created
        for stub in (a, b):
            got = (await call(stub.GetAgent, GetAgentRequest(name="filed-b"))).agent
            assert got.description == "registered"

        # Deleting a file agent hides it on every replica; the pages stay full.
        for name in ("filed-a", "filed-b"):
            gone = await call(b.DeleteAgent, DeleteAgentRequest(request_id=rid(), name=name))
            assert gone.deleted
        for stub in (a, b):
            assert await list_names(stub, 2) == ["filed-c", "reg-a", "reg-b", "reg-c"]
            err = await rpc_error(stub.GetAgent, GetAgentRequest(name="filed-a"))
            assert err.code() == grpc.StatusCode.NOT_FOUND

        # A replica started afterwards loads its files again: files win over
        # what was registered or deleted before its start, as after a restart.
        async with replica(m, **shared, agents_dir=folder) as c:
            got = (await call(c.GetAgent, GetAgentRequest(name="filed-b"))).agent
            assert got.description == "from the file"
            assert await list_names(c, 2) == expected
            # ... and a registration made after its start wins on it too.
            await register(a, agent("filed-a", description="newer"), allow_update=True)
            got = (await call(c.GetAgent, GetAgentRequest(name="filed-a"))).agent
            assert got.description == "newer"


# -- runs -------------------------------------------------------------------------

async def test_a_run_retried_on_the_other_replica_replays_the_first_result(
        tmp_path, shared):
    async with two_replicas(tmp_path, shared) as (m, a, b):
        await register(a, agent("coder", output_artifact_type="code"))
        request = run_request("coder")
        first = await call(a.RunAgent, request)
        retry = await call(b.RunAgent, request)
        assert not first.replayed and retry.replayed
        assert retry.result == first.result  # its trace id too: not a second run
        assert len(m.primary.calls) == 1

        # StreamAgent shares the record: the retry is the final event only.
        stream = StreamAgentRequest(request_id=request.request_id, agent="coder",
                                    input=request.input, context=request.context)
        replay = [x async for x in b.StreamAgent(stream, timeout=TIMEOUT)]
        assert [x.WhichOneof("event") for x in replay] == ["agent_event", "end"]
        assert replay[0].agent_event.type == EventType.EVENT_TYPE_AGENT_COMPLETE
        assert replay[0].agent_event.agent_complete == first.result
        assert replay[1].end.outcome == StreamOutcome.STREAM_OUTCOME_COMPLETED
        assert len(m.primary.calls) == 1

        with pytest.raises(Exception) as err:
            await call(b.RunAgent, run_request("coder", request.request_id, "another input"))
        assert err.value.reason == "IDEMPOTENCY_CONFLICT"
        assert len(m.primary.calls) == 1


async def test_a_run_retried_on_the_other_replica_after_its_write_back_sends_its_first_prompt(
        tmp_path, shared):
    """What the first attempt recalled is kept in Redis: the other replica,
    retrying after the first attempt wrote back to memory and failed,
    builds the same prompt and the LLM service replays the generation."""
    store = ArtifactOutage()
    async with mesh(tmp_path, artifact_backend=store, **shared) as m, \
            replica(m, **shared) as b:
        await register(m.orchestrator, agent("coder", output_artifact_type="code",
                                             memory=MemoryConfig(enabled=True, write_back=True,
                                                                 namespace="retried")))
        request = run_request("coder")
        with pytest.raises(UnavailableError):
            await call(m.orchestrator.RunAgent, request)
        store.down = False
        retry = await call(b.RunAgent, request)
        assert retry.result.output and len(retry.result.artifact_ids) == 1
        assert len(m.primary.calls) == 1  # replayed by the LLM service


async def test_a_run_whose_memory_reads_failed_retried_on_the_other_replica_sends_its_prompt(
        tmp_path, shared):
    """Replica A cannot reach memory: its attempt generates without
    memories and history, then fails on the artifact store. Replica B
    reaches memory, which holds what to recall; retrying, it finds A's
    failed reads kept in Redis as having read nothing, builds A's prompt
    (the generation is replayed, not refused as another prompt under the
    same request id) and reports the reads as degraded, as A did."""
    store = ArtifactOutage()
    store.down = False
    async with mesh(tmp_path, memory=False, artifact_backend=store, **shared) as m, \
            replica(m, **shared) as b:
        memory = MemoryConfig(enabled=True, write_back=True, history_enabled=True,
                              namespace="retried")
        await register(m.orchestrator, agent("coder", output_artifact_type="code",
                                             memory=memory))
        seeded = RunAgentRequest(request_id=rid(), agent="coder", input="implement add",
                                 context=RequestContext(tenant_id="acme", session_id="s-1"))
        assert not (await call(b.RunAgent, seeded)).result.degraded  # something to find
        store.down = True
        request = RunAgentRequest(request_id=rid(), agent="coder", input="implement add",
                                  context=RequestContext(tenant_id="acme", session_id="s-1"))
        with pytest.raises(UnavailableError):
            await call(m.orchestrator.RunAgent, request)
        assert len(m.primary.calls[-1].messages) == 2  # no memories, no history
        store.down = False
        retry = (await call(b.RunAgent, request)).result
        assert retry.output and len(retry.artifact_ids) == 1
        assert len(m.primary.calls) == 2  # replayed
        assert retry.memories_recalled == 0
        assert sorted(d.component for d in retry.degraded) == [
            DegradedComponent.DEGRADED_COMPONENT_MEMORY_RECALL,
            DegradedComponent.DEGRADED_COMPONENT_HISTORY]


async def test_a_streamed_run_retried_on_the_other_replica_replays(tmp_path, shared):
    async with two_replicas(tmp_path, shared) as (m, a, b):
        await register(a, agent("coder"))
        request = StreamAgentRequest(request_id=rid(), agent="coder", input="implement add")
        first = [x async for x in a.StreamAgent(request, timeout=TIMEOUT)]
        assert len(first) > 2 and first[-1].end.outcome == StreamOutcome.STREAM_OUTCOME_COMPLETED
        retry = await call(b.RunAgent, RunAgentRequest(
            request_id=request.request_id, agent="coder", input="implement add"))
        assert retry.replayed
        assert retry.result == first[-2].agent_event.agent_complete
        assert len(m.primary.calls) == 1


async def test_identical_requests_on_both_replicas_at_once_run_once(tmp_path, shared):
    async with two_replicas(tmp_path, shared) as (m, a, b):
        await register(a, agent("coder", output_artifact_type="code"))
        m.primary.latency_s = 0.3  # the second request finds the first running
        request = run_request("coder")
        one, two = await asyncio.gather(call(a.RunAgent, request), call(b.RunAgent, request))
        assert sorted([one.replayed, two.replayed]) == [False, True]
        assert one.result == two.result
        assert len(m.primary.calls) == 1
        assert len(one.result.artifact_ids) == 1


async def test_a_workflow_retried_on_the_other_replica_replays(tmp_path, shared):
    async with two_replicas(tmp_path, shared) as (m, a, b):
        await register(b, agent("coder"))
        request = RunWorkflowRequest(request_id=rid(), workflow=WorkflowDefinition(
            tasks=[TaskSpec(task_id="a", agent="coder", input_template="x")]))
        first = await call(a.RunWorkflow, request)
        again = await call(b.RunWorkflow, request)
        assert not first.replayed and again.replayed
        assert again.tasks == first.tasks
        assert len(m.primary.calls) == 1


async def test_a_failed_run_releases_its_claim_so_a_retry_runs(tmp_path, shared):
    async with two_replicas(tmp_path, shared) as (m, a, b):
        await register(a, agent("coder"))
        m.primary.simulate_failure(ErrorKind.BAD_REQUEST, times=1)
        request = run_request("coder")
        err = await rpc_error(a.RunAgent, request)
        assert err.code() != grpc.StatusCode.OK
        assert len(m.primary.calls) == 1
        retry = await call(b.RunAgent, request)
        assert not retry.replayed and retry.result.output
        assert len(m.primary.calls) == 2
        again = await call(a.RunAgent, request)
        assert again.replayed and again.result == retry.result


async def test_a_running_claim_holds_until_its_lease_ends_then_is_taken_over(
        tmp_path, redis_state, shared):
    async with two_replicas(tmp_path, shared) as (m, a, b):
        await register(a, agent("coder"))
        # A replica that claimed these requests and died: its claims stay
        # until their lease ends.
        held, stale = run_request("coder"), run_request("coder")
        for request, lease_ms in ((held, 600_000), (stale, 300)):
            claimed = await redis_state.run("claim", f"run:{request.request_id}",
                                            fingerprint(_as_run(request)), "dead", lease_ms)
            assert claimed == [b"claimed"]
        err = await rpc_error(b.RunAgent, held, timeout=1.0)
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # waited, never ran
        assert m.primary.calls == []
        taken = await call(b.RunAgent, stale)
        assert not taken.replayed and taken.result.output
        assert len(m.primary.calls) == 1
        replay = await call(a.RunAgent, stale)
        assert replay.replayed and replay.result == taken.result
        # A different request under a claimed request_id is a conflict at once.
        with pytest.raises(Exception) as conflict:
            await call(a.RunAgent, run_request("coder", held.request_id, "other input"))
        assert conflict.value.reason == "IDEMPOTENCY_CONFLICT"


# -- round trips --------------------------------------------------------------------

async def plain_agent(m, name: str = "coder") -> None:
    """The benchmark's agent: memory recall and write-back, a RESERVE budget
    (a priced model, a tenant budget), one generation, an output artifact."""
    async with InformationClient(m.addresses["information"]) as info:
        await info.set_price("main", input_micros_per_million=1_000_000,
                             output_micros_per_million=2_000_000)
        await info.create_budget(Budget(scope=Scope(tenant_id="acme"), limit_micros=10**12))
    await register(m.orchestrator, agent(
        name, output_artifact_type="code", budget=BudgetPolicy(),
        memory=MemoryConfig(enabled=True, write_back=True, namespace="plain")))


async def test_a_plain_run_makes_seven_redis_round_trips(tmp_path, shared):
    """Pins the Redis commands of one plain RunAgent (a regression adds
    one): the run's claim and the agent's lookup (sent together), the
    memory read kept (claim, finish), the generation kept (claim, finish)
    and the run's result. A replay is its claim (and the unused lookup)."""
    async with mesh(tmp_path, **shared) as m:
        await plain_agent(m)
        await call(m.orchestrator.RunAgent, run_request("coder"))  # scripts loaded
        log = CommandLog(m.backend.redis)
        request = run_request("coder")
        result = (await call(m.orchestrator.RunAgent, request)).result
        assert result.memories_recalled > 0 and result.cost_micros > 0
        assert len(result.artifact_ids) == 1 and not result.degraded
        run = f"run:{request.request_id}"
        gen = f"read:{request.request_id}:gen:1:main"
        reads = [s for n, s in log.commands if s.startswith(f"read:{request.request_id}:read:")]
        assert len(reads) == 2, log.line()
        assert sorted(log.commands) == sorted([
            ("claim", run), ("get", "coder"), ("claim", reads[0]), ("finish", reads[0]),
            ("claim", gen), ("finish", gen), ("finish", run)]), log.line()

        log.clear()
        assert (await call(m.orchestrator.RunAgent, request)).replayed
        assert sorted(log.commands) == [("claim", run), ("get", "coder")], log.line()


async def test_a_replica_cut_from_redis_after_its_claim_is_taken_over_with_its_kept_reads(
        tmp_path, local_redis_state):
    """Replica A reaches Redis through a proxy, cut while its generation
    runs: its claims stay, as a dead replica's would, and its result is
    never recorded. Replica B's retry waits for the run's lease to end,
    then runs the request with A's kept memory read (not a read of memory
    that now holds A's write-back), so it sends A's prompt and the LLM
    service replays A's generation instead of refusing another prompt
    under its request id."""
    proxy = RedisProxy(REDIS_URL)
    await proxy.start()
    direct = redis_settings(LOCAL_REDIS, local_redis_state)
    try:
        async with mesh(tmp_path, **{**direct, "redis_url": proxy.url}) as m, \
                replica(m, **direct) as b:
            await plain_agent(m)
            await call(b.RunAgent, run_request("coder"))  # memories to recall
            request = run_request("coder", text="implement add, again")
            m.primary.latency_s = 1.0
            first = asyncio.create_task(call(m.orchestrator.RunAgent, request, timeout=2.5))
            generating = (f"{local_redis_state.prefix}req:read:{request.request_id}"
                          ":gen:1:main")
            for _ in range(400):
                if await local_redis_state.client.exists(generating) or first.done():
                    break
                await asyncio.sleep(0.025)
            assert not first.done()
            await proxy.cut()
            with contextlib.suppress(Exception):
                await first  # answered or not, nothing of its end is in Redis
            m.primary.latency_s = 0.0
            assert await local_redis_state.client.exists(
                f"{local_redis_state.prefix}req:run:{request.request_id}")  # A's lease
            retry = (await call(b.RunAgent, request)).result
            assert retry.output and len(retry.artifact_ids) == 1
            assert retry.memories_recalled > 0 and not retry.degraded
            assert len(m.primary.calls) == 2  # the seeding run and A's: B's replayed
            assert (await call(b.RunAgent, request)).replayed
    finally:
        if proxy.server is not None and proxy.server.is_serving():
            await proxy.cut()


# -- Redis unreachable ------------------------------------------------------------

async def test_an_unreachable_redis_is_unavailable_and_nothing_runs(tmp_path, local_redis_state):
    proxy = RedisProxy(REDIS_URL)
    await proxy.start()
    try:
        async with two_replicas(tmp_path, redis_settings(LOCAL_REDIS, local_redis_state),
                                redis_url=proxy.url) as (m, a, b):
            await register(a, agent("coder"))
            await proxy.cut()
            for stub in (a, b):
                err = await rpc_error(stub.RegisterAgent, RegisterAgentRequest(
                    request_id=rid(), agent=agent("other")))
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                assert "orchestrator state store is unavailable" in err.details()
                err = await rpc_error(stub.RunAgent, run_request("coder"))
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in stub.StreamAgent(StreamAgentRequest(
                            request_id=rid(), agent="coder", input="x"), timeout=TIMEOUT):
                        pass
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert m.primary.calls == []
    finally:
        if proxy.server is not None and proxy.server.is_serving():
            await proxy.cut()


async def test_the_redis_backend_needs_a_reachable_url_at_start_up():
    with pytest.raises(ValueError, match="HIVEMESH_ORCHESTRATOR_REDIS_URL is required"):
        await open_backend(OrchestratorSettings(state_backend="redis"))
    proxy = RedisProxy(REDIS_URL)
    await proxy.start()
    url = proxy.url
    await proxy.cut()  # nothing listens there any more
    with pytest.raises(ConnectionError, match="Redis is not reachable at redis://127.0.0.1"):
        await open_backend(OrchestratorSettings(state_backend="redis", redis_url=url))


# -- the local backend --------------------------------------------------------------

async def test_the_local_backend_is_the_default_and_keeps_state_in_the_process(tmp_path):
    assert OrchestratorSettings().state_backend == "local"
    folder = agents_dir(tmp_path, "filed")
    data = tmp_path / "orchestrator"
    async with mesh(tmp_path, data_dir=data, agents_dir=folder) as m:
        a = m.orchestrator
        await register(a, agent("coder"))
        stored = json.loads((data / "agents.json").read_text())
        assert "coder" in {x["name"] for x in stored}
        request = run_request("coder")
        first = await call(a.RunAgent, request)
        assert (await call(a.RunAgent, request)).replayed
        assert len(m.primary.calls) == 1
        # Files and registrations share one namespace, as always.
        err = await rpc_error(a.RegisterAgent, RegisterAgentRequest(
            request_id=rid(), agent=agent("filed")))
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS
        await register(a, agent("filed", description="registered"), allow_update=True)
        got = (await call(a.GetAgent, GetAgentRequest(name="filed"))).agent
        assert got.description == "registered"
        # A second replica on the local backend shares nothing.
        async with replica(m, data_dir=tmp_path / "other") as b:
            err = await rpc_error(b.GetAgent, GetAgentRequest(name="coder"))
            assert err.code() == grpc.StatusCode.NOT_FOUND
            await register(b, agent("coder"))
            retry = await call(b.RunAgent, request)
            # Run again (its own trace), not replayed. (The LLM service
            # itself answers the repeated generation from its own record.)
            assert not retry.replayed and retry.result.trace_id != first.result.trace_id


async def test_the_local_backend_replays_a_run_that_finished_before_a_restart(tmp_path):
    """With a data dir, finished requests outlive the orchestrator: a run
    retried after a restart on the same data dir is replayed (its artifact,
    no second generation); another request under its id is a conflict."""
    data = tmp_path / "orchestrator"
    async with mesh(tmp_path) as m:
        async with replica(m, data_dir=data) as a:
            await register(a, agent("coder", output_artifact_type="code"))
            request = run_request("coder")
            first = await call(a.RunAgent, request)
            assert not first.replayed and len(first.result.artifact_ids) == 1
        async with replica(m, data_dir=data) as restarted:
            again = await call(restarted.RunAgent, request)
            assert again.replayed and again.result == first.result
            assert len(m.primary.calls) == 1
            with pytest.raises(AlreadyExistsError) as err:
                await call(restarted.RunAgent, run_request("coder", request.request_id,
                                                           text="implement sub"))
            assert err.value.reason == "IDEMPOTENCY_CONFLICT"
        assert (data / "requests.sqlite3").exists()



async def test_a_streamed_run_that_failed_retried_as_run_agent_takes_its_generation(
        tmp_path, shared):
    """StreamAgent and RunAgent share runs: a StreamAgent attempt that
    generated, then failed on the artifact store, retried as RunAgent on
    the other replica, ends with the text the stream generated (kept in
    Redis), not with a generation read back as another message type."""
    store = ArtifactOutage()
    async with mesh(tmp_path, artifact_backend=store, **shared) as m, \
            replica(m, **shared) as b:
        await register(m.orchestrator, agent("coder", output_artifact_type="code"))
        request = StreamAgentRequest(request_id=rid(), agent="coder", input="implement add",
                                     context=RequestContext(tenant_id="acme"))
        first = [x async for x in m.orchestrator.StreamAgent(request, timeout=TIMEOUT)]
        assert first[-1].end.outcome == StreamOutcome.STREAM_OUTCOME_FAILED
        streamed = "".join(x.agent_event.generation_chunk.text for x in first
                           if x.agent_event.type == EventType.EVENT_TYPE_GENERATION_CHUNK)
        assert streamed
        store.down = False
        retry = (await call(b.RunAgent, run_request("coder", request.request_id))).result
        assert retry.output == streamed and len(retry.artifact_ids) == 1
        assert len(m.primary.calls) == 1
