"""The Redis backends' key layout and the cluster client. On a single Redis
each backend writes the key names earlier versions wrote (so their data is
still found); on a Redis Cluster the same names under the prefix as a hash
tag, every one of them in one slot. The cluster client follows the
cluster's slots, packs its commands with hiredis and names the cluster in
its errors."""

from __future__ import annotations

import re
import uuid

import pytest
from conftest import REDIS_URL, RedisTarget, drop_redis_prefix, on_local_redis, on_redis
from redis.crc import key_slot
from test_information_store import budget, commit_op, hold, reserve_op

from hivemesh.memory.v1 import HistoryMessage, MessageRole
from hivemesh.orchestrator.v1 import AgentDefinition
from hivemesh.runtime.redis import RedisUnavailable, open_redis
from hivemesh.services.memory.redis_ledger import SEP, RedisLedger
from hivemesh.services.orchestrator.redis_state import RedisAgents, RedisState
from hivemesh.services.orchestrator.redis_state import RedisLedger as OrchestratorLedger


async def names_under(client, prefix: str) -> set[str]:
    """The keys under ``prefix``, without it."""
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
    return {k.decode()[len(prefix):] async for k in client.scan_iter(match=pattern)}


def expect_layout(target: RedisTarget, prefix: str, backend, names: set[str]) -> str:
    """Checks where ``backend`` (opened with ``prefix`` on ``target``)
    keeps its keys and that ``names`` are in one slot on a cluster; returns
    the prefix its keys are under."""
    if target.cluster:
        assert backend.prefix == "{" + prefix + "}"
        slots = {key_slot(f"{backend.prefix}{name}".encode()) for name in names}
        assert slots == {key_slot(prefix.encode())}
    else:
        assert backend.prefix == prefix  # as earlier versions wrote them
    return backend.prefix


async def test_the_information_store_keys(redis_target):
    from hivemesh.services.information.store.redis import RedisStore
    prefix = f"hmtest:{uuid.uuid4().hex}:"
    store = await on_redis(redis_target, lambda url: RedisStore.open(
        url, prefix=prefix, cluster=redis_target.cluster))
    try:
        b = budget("b1", thresholds=(50,))
        await store.create_budget(b, "req-create", "fp")
        await store.reserve(reserve_op([hold(b)], 600, request_id="req-reserve",
                                       reservation_id="res-1"))
        await store.settle(commit_op("res-1", 600, request_id="req-commit"))  # fires 50 %
        names = await names_under(store.client, store.prefix)
        assert names == {
            "budget:b1", "budgets", f"scope:{b.scope_key}", "config:version", "ctr:b1:0",
            "fired:b1:0", "req:req-create", "req:req-reserve", "req:req-commit", "res:res-1",
            "calls", "calls:seq", "alerts", "alerts:seq", "alerts:time", "reservations:seq"}
        expect_layout(redis_target, prefix, store, names)
    finally:
        await drop_redis_prefix(store.client, store.prefix)
        await store.close()


async def test_the_memory_ledger_keys(redis_target):
    prefix = f"hmtest:{uuid.uuid4().hex}:"
    ledger = await on_redis(redis_target, lambda url: RedisLedger.open(
        url, prefix, cluster=redis_target.cluster))
    try:
        hello = HistoryMessage(role=MessageRole.MESSAGE_ROLE_USER, content="hello")
        await ledger.append("ns", "chat", [hello], "req-1", "fp")
        async with ledger.one_at_a_time("AddMemories", "ns", "req-2"):
            names = await names_under(ledger.client, ledger.prefix)
        assert names == {f"req:AppendHistory:ns{SEP}req-1", f"hist:ns{SEP}chat", "sessions:ns",
                         f"turn:AddMemories:ns{SEP}req-2", "reqs:ns"}
        expect_layout(redis_target, prefix, ledger, names)
        assert await ledger.forget("ns") == 1
    finally:
        await drop_redis_prefix(ledger.client, ledger.prefix)
        await ledger.close()


async def test_the_orchestrator_state_keys(redis_target):
    prefix = f"hmtest:orch:{uuid.uuid4().hex}:"
    state = await on_redis(redis_target, lambda url: RedisState.open(
        url, prefix=prefix, cluster=redis_target.cluster))
    try:
        agents = RedisAgents(state)
        await agents.register(AgentDefinition(name="kept", model="m"), False)
        await agents.register(AgentDefinition(name="gone", model="m"), False)
        assert await agents.delete("gone")

        async def run():
            return AgentDefinition(name="result")
        result, replayed = await OrchestratorLedger(state, 60).once(
            "run", "req-1", "fp", run, AgentDefinition, 60)
        assert (result.name, replayed) == ("result", False)
        names = await names_under(state.client, state.prefix)
        assert names == {"agent:kept", "agents", "deleted", "req:run:req-1"}
        expect_layout(redis_target, prefix, state, names)
    finally:
        await drop_redis_prefix(state.client, state.prefix)
        await state.close()


async def test_the_llm_records_keys(redis_target):
    from hivemesh.llm.v1 import GenerateResponse
    from hivemesh.services.llm.server import records_unavailable
    from hivemesh.runtime.redis_records import RedisRequestRecords
    prefix = f"hmtest:llm:{uuid.uuid4().hex}:"
    records = await on_redis(redis_target, lambda url: RedisRequestRecords.open(
        url, prefix, 60, lease_s=60, cluster=redis_target.cluster,
        unavailable=records_unavailable))
    try:
        async def run():
            return GenerateResponse(model="m")
        result, replayed = await records.once("llm", "req-1", "fp", run, GenerateResponse)
        assert (result.model, replayed) == ("m", False)
        assert await records.once("llm", "req-1", "fp", run, GenerateResponse) == (result, True)
        names = await names_under(records.scripts.client, records.prefix)
        assert names == {"req:llm:req-1"}
        expect_layout(redis_target, prefix, records, names)
    finally:
        await drop_redis_prefix(records.scripts.client, records.prefix)
        await records.close()


async def expect_every_node_reached(url: str, connection_class: str) -> None:
    """A cluster client of ``url`` writes and reads keys on each of the
    three masters, through connections of ``connection_class``."""
    from redis.asyncio.cluster import RedisCluster
    client = await open_redis(url, cluster=True)
    try:
        assert isinstance(client, RedisCluster)
        prefix = f"hmtest:{uuid.uuid4().hex}:"
        keys = [f"{prefix}{i}" for i in range(32)]  # spread over the slots
        for key in keys:
            await client.set(key, key)
        assert len({client.get_node_from_key(k).name for k in keys}) == 3
        for key in keys:
            assert await client.get(key) == key.encode()
        assert {n.connection_class.__name__ for n in client.get_nodes()} == {connection_class}
        await client.delete(*keys)
    finally:
        await client.aclose()


async def test_a_cluster_client_follows_the_slots_and_packs_with_hiredis(redis_cluster):
    await expect_every_node_reached(redis_cluster, "HiredisPackingConnection")


async def test_a_cluster_client_names_what_it_could_not_reach(redis_cluster):
    with pytest.raises(RedisUnavailable, match="Redis Cluster is not reachable at "
                                               "redis://127.0.0.1:1/0"):
        await open_redis("redis://127.0.0.1:1/0", cluster=True, socket_connect_timeout=2)
    with pytest.raises(RedisUnavailable, match="invalid Redis URL"):
        await open_redis("unix:///tmp/redis.sock", cluster=True)
    single = await on_local_redis(open_redis)  # a Redis that is not a cluster
    await single.aclose()
    with pytest.raises(RedisUnavailable, match="Cluster mode is not enabled"):
        await open_redis(REDIS_URL, cluster=True)
