"""Memory service replicas sharing one ledger in Redis
(``HIVEMESH_MEMORY_LEDGER=redis``): a session's history and the answers to
request ids are the same whichever replica a call reaches, requests of one
request_id take turns across replicas, and a Redis outage is UNAVAILABLE.
The shared scenarios run on the local Redis and on a Redis Cluster.

Each replica here has a store of its own (qdrant-client's local mode), so
what a replica stored shows in its own store only."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest
from conftest import LOCAL_REDIS, REDIS_URL, RedisProxy, RedisTarget
from test_memory_service import memory_settings, redis_prefix, serve

from hivemesh.client import AlreadyExistsError, UnavailableError
from hivemesh.client.memory import memory_item
from hivemesh.services.memory import redis_ledger
from hivemesh.services.memory.redis_ledger import RedisLedger
from hivemesh.services.memory.server import open_backend
from hivemesh.services.memory.settings import MemorySettings


@contextlib.asynccontextmanager
async def replicas(tmp_path, target: RedisTarget = LOCAL_REDIS, redis_url: str = ""):
    """Two replicas on ``target`` (through ``redis_url`` when given)."""
    async with redis_prefix(target) as prefix, contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(serve(memory_settings(
            tmp_path / name, store="qdrant", qdrant_location=":memory:", history_retention=5,
            ledger="redis", redis_url=redis_url or target.url, redis_cluster=target.cluster,
            redis_prefix=prefix)))
            for name in ("a", "b")]


async def test_history_appended_on_one_replica_is_read_on_the_other(tmp_path, redis_target):
    async with replicas(tmp_path, redis_target) as (a, b):
        await a.append_history("chat", [("user", "hello"), ("assistant", "hi there")],
                               namespace="h")
        await b.append_history("chat", [("user", "and you?")], namespace="h")
        for replica in (a, b):
            got = await replica.get_history("chat", namespace="h")
            assert [m.content for m in got.messages] == ["hello", "hi there", "and you?"]
            assert got.session_message_count == 3
        # The retention limit (5 per session) holds across replicas.
        await b.append_history("chat", [("user", f"m{i}") for i in range(4)], namespace="h")
        got = await a.get_history("chat", namespace="h")
        assert [m.content for m in got.messages] == ["and you?", "m0", "m1", "m2", "m3"]
        forgotten = await b.forget("h")
        assert forgotten.deleted_session_count == 1
        assert (await a.get_history("chat", namespace="h")).session_message_count == 0


async def test_a_retry_on_another_replica_replays_the_first_answer(tmp_path, redis_target):
    rid = str(uuid.uuid4())
    async with replicas(tmp_path, redis_target) as (a, b):
        first = await a.append_history("s", [("user", "once")], namespace="h", request_id=rid)
        again = await b.append_history("s", [("user", "once")], namespace="h", request_id=rid)
        assert again.replayed and not first.replayed
        assert list(again.message_ids) == list(first.message_ids)
        assert again.session_message_count == first.session_message_count == 1
        assert (await a.get_history("s", namespace="h")).session_message_count == 1
        with pytest.raises(AlreadyExistsError) as caught:
            await b.append_history("s", [("user", "twice")], namespace="h", request_id=rid)
        assert caught.value.reason == "IDEMPOTENCY_CONFLICT"
        added = await a.add([memory_item("a fact to keep")], namespace="n", request_id=rid)
        replayed = await b.add([memory_item("a fact to keep")], namespace="n", request_id=rid)
        assert replayed.replayed
        assert [i.chunk_ids for i in replayed.items] == [i.chunk_ids for i in added.items]
        # The retry was answered from the ledger: b's own store holds nothing.
        assert await b.count(namespace="n") == 0 and await a.count(namespace="n") == 1


async def test_one_request_id_takes_turns_across_replicas(tmp_path, redis_target):
    """Two different requests under one request_id at once, one per
    replica: one is stored, the other is refused having stored nothing."""
    async with replicas(tmp_path, redis_target) as (a, b):
        for round_ in range(5):
            rid, namespace = str(uuid.uuid4()), f"n{round_}"
            outcomes = await asyncio.gather(
                a.add([memory_item(f"first text {i}") for i in range(20)],
                      namespace=namespace, request_id=rid),
                b.add([memory_item(f"second text {i}") for i in range(20)],
                      namespace=namespace, request_id=rid),
                return_exceptions=True)
            stored = [await r.count(namespace=namespace) for r in (a, b)]
            refused = [isinstance(o, AlreadyExistsError) for o in outcomes]
            assert sorted(refused) == [False, True], outcomes
            assert stored == [0 if r else 20 for r in refused]


async def test_a_request_longer_than_the_lease_keeps_its_turn(monkeypatch, redis_target):
    """The replica running a request renews its lease, so a twin on another
    replica waits however long the first one runs; a replica that stops
    renewing (it died) lets go of the turn when the lease lapses."""
    monkeypatch.setattr(redis_ledger, "TURN_LEASE_MS", 150)
    async with redis_prefix(redis_target) as prefix:
        a = await RedisLedger.open(redis_target.url, prefix, cluster=redis_target.cluster)
        b = await RedisLedger.open(redis_target.url, prefix, cluster=redis_target.cluster)
        try:
            order: list[str] = []
            a_inside = asyncio.Event()

            async def first():
                async with a.one_at_a_time("AddMemories", "n", "rid"):
                    a_inside.set()
                    await asyncio.sleep(1.0)  # about seven leases
                    order.append("a done")

            async def twin():
                await a_inside.wait()
                async with b.one_at_a_time("AddMemories", "n", "rid"):
                    order.append("b in")

            await asyncio.gather(first(), twin())
            assert order == ["a done", "b in"]

            # A holder that stopped renewing: its lease lapses and the twin goes.
            turn = f"{a.prefix}turn:AddMemories:n{redis_ledger.SEP}rid"
            await a.client.set(turn, "a replica that died", px=150)
            async with asyncio.timeout(10):
                async with b.one_at_a_time("AddMemories", "n", "rid"):
                    assert await b.client.get(turn) != b"a replica that died"
            assert not await b.client.exists(turn)  # released on the way out
        finally:
            await a.close()
            await b.close()


async def test_an_unreachable_redis_is_unavailable(tmp_path):
    proxy = RedisProxy(REDIS_URL)
    await proxy.start()
    try:
        async with replicas(tmp_path, redis_url=proxy.url) as (a, _):
            await a.append_history("s", [("user", "kept")], namespace="h")
            await proxy.cut()
            calls = (lambda: a.append_history("s", [("user", "lost?")], namespace="h"),
                     lambda: a.get_history("s", namespace="h"),
                     lambda: a.add([memory_item("not stored")], namespace="h"))
            for call in calls:
                with pytest.raises(UnavailableError) as caught:
                    await call()
                assert caught.value.reason == "BACKEND_UNAVAILABLE"
                assert caught.value.metadata["backend"] == "memory ledger"
            # Nothing half-written is reported: the add never reached the store.
            assert await a.count(namespace="h") == 0
    finally:
        if proxy.server is not None and proxy.server.is_serving():
            await proxy.cut()


async def test_the_redis_ledger_needs_a_url_and_a_reachable_redis(tmp_path):
    with pytest.raises(ValueError, match="ledger=redis needs HIVEMESH_MEMORY_REDIS_URL"):
        MemorySettings(ledger="redis")
    proxy = RedisProxy(REDIS_URL)
    await proxy.start()
    url = proxy.url
    await proxy.cut()  # nothing listens there any more
    with pytest.raises(ConnectionError, match="Redis is not reachable at redis://127.0.0.1"):
        await open_backend(memory_settings(tmp_path, ledger="redis", redis_url=url))
