"""The Redis backends on a Redis Cluster whose topology changes under them,
with no restart of the backend: the slot of the backend's keys moves to
another master (what resharding does), then that master dies and its
replica takes over (a failover). Each backend finds its data, scripts
included, on the new master. A call made once the master is dead is
retried by the cluster client itself (three attempts, with backoff, each
after a fresh look at the cluster's slots), which usually outlasts the
failover; should it not, the call fails as the services answer UNAVAILABLE
(a Redis failure) and the test retries it, as a client would. Once a
replica has taken over, nothing written before is lost (the test waits for
the replicas to have every write before it kills the master: replication
is asynchronous, see the README)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import grpc
import pytest
from redis.crc import key_slot
from redis_cluster import Cluster, cluster_tools, cluster_with_replicas
from test_information_store import budget, commit_op, hold, reserve_op

from hivemesh.memory.v1 import HistoryMessage, MessageRole
from hivemesh.orchestrator.v1 import AgentDefinition
from hivemesh.runtime import errors
from hivemesh.runtime.redis import redis_failures
from hivemesh.services.memory.redis_ledger import RedisLedger
from hivemesh.services.orchestrator.redis_state import RedisAgents, RedisState
from hivemesh.services.orchestrator.redis_state import RedisLedger as OrchestratorLedger

T = TypeVar("T")
# A replica takes over about two seconds after its master dies (a second of
# silence, then an election); this bounds the wait.
FAILOVER_WAIT_S = 30.0


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    tools = cluster_tools()
    if tools is None:
        pytest.skip("redis-server and redis-cli are needed to start a Redis Cluster")
    with cluster_with_replicas(tmp_path, *tools) as started:
        yield started


def _unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` is what a service answers UNAVAILABLE for."""
    if isinstance(exc, errors.ServiceError):
        return exc.code == grpc.StatusCode.UNAVAILABLE
    return isinstance(exc, redis_failures())


async def through_failover(call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` again until it succeeds, as a client retrying UNAVAILABLE
    would. Every failure must be one the services answer UNAVAILABLE."""
    deadline = time.monotonic() + FAILOVER_WAIT_S
    while True:
        try:
            return await call()
        except Exception as exc:  # noqa: BLE001 - checked just below
            assert _unavailable(exc), f"not an outage error: {exc!r}"
            assert time.monotonic() < deadline, f"no replica took over: {exc!r}"
            await asyncio.sleep(0.1)


class Counting:
    """A request to run at most once: its n-th run answers ``make(n)``;
    ``calls`` says how many runs there were."""

    def __init__(self, make: Callable[[int], T]) -> None:
        self.make = make
        self.calls = 0

    async def __call__(self) -> T:
        self.calls += 1
        return self.make(self.calls)


def move_slot(cluster: Cluster, prefix: str) -> int:
    """Moves the slot of the keys under ``prefix`` (a hash tag) to another
    master; returns the slot."""
    slot = key_slot(prefix.encode())
    _, before = cluster.master_of(slot)
    after = cluster.move_slot(slot)
    assert after != before and cluster.master_of(slot)[1] == after
    return slot


def fail_master(cluster: Cluster, slot: int) -> int:
    """Lets the replica of the slot's master catch up, then kills the
    master; returns its port."""
    _, master = cluster.master_of(slot)
    cluster.wait_replicated(master)
    cluster.kill(master)
    return master


def taken_over(cluster: Cluster, slot: int, dead: int) -> bool:
    return cluster.master_of(slot)[1] != dead


async def test_the_information_store_follows_its_slot_and_a_failover(cluster):
    from hivemesh.services.information.store.redis import RedisStore
    store = await RedisStore.open(cluster.url, prefix=f"hmtest:{uuid.uuid4().hex}:",
                                  cluster=True)
    try:
        b = budget("b1", micros=10_000)
        await store.create_budget(b, "req-create", "fp")

        async def charge(cost: int, request_id: str) -> None:
            reserved = await store.reserve(reserve_op([hold(b)], cost))
            await store.settle(commit_op(reserved.reservation_id, cost, request_id=request_id))

        async def spent() -> int:
            return (await store.counters([("b1", 0)]))[0].spent_micros

        await charge(100, "req-1")
        slot = move_slot(cluster, store.prefix)
        await charge(200, "req-2")  # its scripts, loaded again on the new master
        assert await spent() == 300
        dead = fail_master(cluster, slot)
        await through_failover(lambda: charge(400, "req-3"))
        assert taken_over(cluster, slot, dead)
        assert await spent() == 700  # nothing written before the failover is lost
        replayed = await store.settle(commit_op("res-x", 100, request_id="req-1"))
        assert replayed.replayed  # and its request records are there too
        assert await spent() == 700
    finally:
        await store.close()


async def test_the_memory_ledger_follows_its_slot_and_a_failover(cluster):
    ledger = await RedisLedger.open(cluster.url, f"hmtest:{uuid.uuid4().hex}:", cluster=True)

    def said(text: str) -> list[HistoryMessage]:
        return [HistoryMessage(role=MessageRole.MESSAGE_ROLE_USER, content=text)]

    async def contents() -> list[str]:
        messages = (await ledger.history("ns", "chat", 10_000, 100))[0]
        return [m.content for m in messages]

    try:
        await ledger.append("ns", "chat", said("one"), "req-1", "fp")
        slot = move_slot(cluster, ledger.prefix)
        await ledger.append("ns", "chat", said("two"), "req-2", "fp")
        dead = fail_master(cluster, slot)
        await through_failover(lambda: ledger.append("ns", "chat", said("three"), "req-3", "fp"))
        assert taken_over(cluster, slot, dead)
        assert sorted(await contents()) == ["one", "three", "two"]
        await ledger.append("ns", "chat", said("one"), "req-1", "fp")  # a retry: replayed
        assert sorted(await contents()) == ["one", "three", "two"]
        async with ledger.one_at_a_time("AddMemories", "ns", "req-4"):
            pass  # its lease script runs on the new master
    finally:
        await ledger.close()


async def test_the_orchestrator_state_follows_its_slot_and_a_failover(cluster):
    state = await RedisState.open(cluster.url, prefix=f"hmtest:orch:{uuid.uuid4().hex}:",
                                  cluster=True)
    agents = RedisAgents(state)
    ledger = OrchestratorLedger(state, 60)
    run = Counting(lambda n: AgentDefinition(name=f"result-{n}"))

    async def once(request_id: str) -> tuple[AgentDefinition, bool]:
        return await ledger.once("run", request_id, "fp", run, AgentDefinition, 60)

    try:
        await agents.register(AgentDefinition(name="kept", model="m"), False)
        assert (await once("req-1"))[1] is False
        slot = move_slot(cluster, state.prefix)
        assert (await once("req-1"))[0].name == "result-1"  # replayed from the new master
        dead = fail_master(cluster, slot)
        result, replayed = await through_failover(lambda: once("req-1"))
        assert taken_over(cluster, slot, dead)
        assert (result.name, replayed, run.calls) == ("result-1", True, 1)
        assert (await agents.get("kept")).model == "m"
        assert (await once("req-2"))[1] is False
    finally:
        await state.close()


async def test_the_llm_records_follow_their_slot_and_a_failover(cluster):
    from hivemesh.llm.v1 import GenerateResponse
    from hivemesh.runtime.redis_records import RedisRequestRecords
    from hivemesh.services.llm.server import records_unavailable
    records = await RedisRequestRecords.open(
        cluster.url, f"hmtest:llm:{uuid.uuid4().hex}:", 60, lease_s=60, cluster=True,
        unavailable=records_unavailable)
    run = Counting(lambda n: GenerateResponse(model=f"answer-{n}"))

    async def once(request_id: str) -> tuple[GenerateResponse, bool]:
        return await records.once("llm", request_id, "fp", run, GenerateResponse)

    try:
        assert (await once("req-1"))[1] is False
        slot = move_slot(cluster, records.prefix)
        assert (await once("req-1"))[0].model == "answer-1"  # replayed from the new master
        dead = fail_master(cluster, slot)
        result, replayed = await through_failover(lambda: once("req-1"))
        assert taken_over(cluster, slot, dead)
        assert (result.model, replayed, run.calls) == ("answer-1", True, 1)
        assert (await once("req-2"))[1] is False
    finally:
        await records.close()
