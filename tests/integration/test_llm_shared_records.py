"""Two LLM replicas on one Redis (HIVEMESH_LLM_RECORDS_BACKEND=redis) keep
one set of request_id records: a call retried on the other replica replays
the first result and never calls the upstream again, identical calls on both
replicas at once call it once, the same request_id with another request is
a conflict, a failed call releases its claim so that its retry runs, and a
Redis that fails answers UNAVAILABLE without calling the upstream.

Each replica is an in-process service with its own counting mock backend.
The scenarios run on the local Redis (HIVEMESH_TEST_REDIS_URL, skipped when
it is not reachable, failed under CI) and on a Redis Cluster started for the
session, each test under a unique key prefix dropped afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import uuid

import grpc
import pytest
from conftest import LOCAL_REDIS, REDIS_URL, RedisProxy, RedisTarget, drop_redis_prefix, on_redis
from pydantic import ValidationError
from test_llm_records import (
    expect_replayed_stream, generate_request, read_stream, rid, stream_request)

from hivemesh.client import from_rpc_error
from hivemesh.client.errors import AlreadyExistsError
from hivemesh.common.v1 import RequestContext, StreamOutcome
from hivemesh.llm.v1 import EmbedRequest, LlmServiceStub
from hivemesh.runtime.redis import open_redis
from hivemesh.runtime.redis_records import RedisRequestRecords
from hivemesh.runtime.settings import ServerSettings
from hivemesh.services.llm.server import create_server, open_backends
from hivemesh.services.llm.settings import BackendSettings, LlmSettings, ModelSettings

TIMEOUT = 20  # seconds, every call


def settings(**overrides) -> LlmSettings:
    return LlmSettings(
        server=ServerSettings(host="127.0.0.1", port=0, grace_period_s=1),
        backends={"primary": BackendSettings(type="mock", max_attempts=1)},
        models=[ModelSettings(alias="main", backend="primary", upstream_model="p-1",
                              default=True),
                ModelSettings(alias="embed", kind="embedding", backend="primary",
                              upstream_model="e-1", embedding_dimensions=16, default=True)],
        **overrides)


class Replica:
    def __init__(self, stub: LlmServiceStub, backends) -> None:
        self.stub = stub
        self.backends = backends
        self.mock = backends.by_name["primary"]
        self.records: RedisRequestRecords = backends.records


@contextlib.asynccontextmanager
async def replica(**overrides):
    """One LLM service in this process on the records backend of ``overrides``."""
    s = settings(**overrides)
    backends = await open_backends(s)
    try:
        running, port = await create_server(s, backends)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield Replica(LlmServiceStub(channel), backends)
        finally:
            await running.shutdown(0)
    finally:
        await backends.close()


def shared_settings(target: RedisTarget, prefix: str) -> dict:
    return dict(records_backend="redis", redis_url=target.url, redis_cluster=target.cluster,
                redis_prefix=prefix)


@pytest.fixture
async def shared(redis_target):
    """The replicas' Redis settings, under a unique prefix whose keys are
    dropped afterwards."""
    prefix = f"hmtest:llm:{uuid.uuid4().hex}:"
    client = await on_redis(redis_target, lambda url: open_redis(
        url, cluster=redis_target.cluster))
    try:
        yield shared_settings(redis_target, prefix)
    finally:
        await drop_redis_prefix(client, redis_target.key_prefix(prefix))
        await client.aclose()


@contextlib.asynccontextmanager
async def two_replicas(shared: dict):
    async with replica(**shared) as a, replica(**shared) as b:
        yield a, b


async def call(method, request):
    try:
        return await method(request, timeout=TIMEOUT)
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err) from err


def upstream_calls(*replicas: Replica) -> int:
    return sum(len(r.mock.calls) for r in replicas)


def hold_upstream(r: Replica) -> tuple[asyncio.Event, asyncio.Event]:
    """(gate, entered): the replica's upstream calls set ``entered``, then
    wait until ``gate`` is set."""
    gate, entered = asyncio.Event(), asyncio.Event()
    begin = r.mock._begin

    async def held(request, timeout_s):
        entered.set()
        await gate.wait()
        return await begin(request, timeout_s)

    r.mock._begin = held
    return gate, entered


def watch_claims(r: Replica) -> asyncio.Event:
    """Set when the replica's records find a request running elsewhere."""
    seen = asyncio.Event()
    run = r.records.scripts.run

    async def watched(script, *args):
        reply = await run(script, *args)
        if script == "claim" and reply[0] in (b"running", "running"):
            seen.set()
        return reply

    r.records.scripts.run = watched
    return seen


async def wait(event: asyncio.Event) -> None:
    # A bound only, so that a broken run fails instead of hanging.
    await asyncio.wait_for(event.wait(), TIMEOUT)


# -- replays across replicas ----------------------------------------------------

async def test_a_generate_retried_on_the_other_replica_replays(shared):
    request = generate_request()
    async with two_replicas(shared) as (a, b):
        a.mock.queue_response("def add(a, b):\n    return a + b\n")
        first = await call(a.stub.Generate, request)
        again = await call(b.stub.Generate, request)
        assert upstream_calls(a, b) == 1
        # Another tenant's request_id of the same value is another request.
        other = type(request)()
        other.CopyFrom(request)
        other.context.tenant_id = "globex"
        assert not (await call(b.stub.Generate, other)).replayed
        assert upstream_calls(a, b) == 2
    assert not first.replayed and again.replayed
    assert again.message == first.message and again.usage == first.usage
    assert (again.model, again.backend, again.latency) == (first.model, first.backend,
                                                           first.latency)


async def test_an_embed_retried_on_the_other_replica_replays(shared):
    request = EmbedRequest(request_id=rid(), model="embed", texts=["one", "two"],
                           context=RequestContext(tenant_id="acme"))
    async with two_replicas(shared) as (a, b):
        first = await call(a.stub.Embed, request)
        b.mock.simulate_failure(message="down", times=10)  # only a replay answers
        again = await call(b.stub.Embed, request)
    assert again.replayed and not first.replayed and again.embeddings == first.embeddings


async def test_a_stream_retried_on_the_other_replica_replays(shared):
    request = stream_request()
    async with two_replicas(shared) as (a, b):
        a.mock.queue_response("alpha beta gamma")
        first = await read_stream(a.stub, request)
        again = await read_stream(b.stub, request)
        assert upstream_calls(a, b) == 1
    expect_replayed_stream(first, again, "alpha beta gamma")


async def test_identical_calls_on_both_replicas_at_once_call_the_upstream_once(shared):
    generate, stream = generate_request(), stream_request()
    async with two_replicas(shared) as (a, b):
        gate, entered = hold_upstream(a)
        seen = watch_claims(b)
        for send, request in ((lambda r, x: call(r.stub.Generate, x), generate),
                              (lambda r, x: read_stream(r.stub, x), stream)):
            gate.clear()
            entered.clear()
            seen.clear()
            first = asyncio.ensure_future(send(a, request))
            await wait(entered)  # A holds the claim and calls its upstream
            second = asyncio.ensure_future(send(b, request))
            await wait(seen)  # B found it running on A: it waits
            gate.set()
            one, two = await asyncio.gather(first, second)
            if isinstance(one, list):
                one, two = one[-1].summary, two[-1].summary
            assert not one.replayed and two.replayed and one.message == two.message
        assert (len(a.mock.calls), len(b.mock.calls)) == (2, 0)


async def test_identical_calls_on_one_replica_at_once_call_the_upstream_once(shared):
    request = generate_request()
    async with two_replicas(shared) as (a, b):
        gate, entered = hold_upstream(a)
        first = asyncio.ensure_future(call(a.stub.Generate, request))
        await wait(entered)
        second = asyncio.ensure_future(call(a.stub.Generate, request))
        gate.set()
        one, two = await asyncio.gather(first, second)
        assert [one.replayed, two.replayed] == [False, True] and one.message == two.message
        assert (await call(b.stub.Generate, request)).replayed
        assert upstream_calls(a, b) == 1


async def test_a_call_running_longer_than_its_lease_keeps_its_claim(shared):
    """A call without a deadline gets a lease of twice the default deadline;
    one that runs longer (a long stream) has its claim renewed while it
    runs, so a retry on the other replica waits for it and replays instead
    of calling the upstream a second time."""
    request = generate_request()
    async with replica(**shared, default_deadline_s=0.75) as a, \
            replica(**shared, default_deadline_s=0.75) as b:
        gate, entered = hold_upstream(a)
        seen = watch_claims(b)
        first = asyncio.ensure_future(a.stub.Generate(request))  # no deadline: 1.5 s lease
        await wait(entered)
        await asyncio.sleep(4)  # well past the first lease
        second = asyncio.ensure_future(b.stub.Generate(request))
        await wait(seen)  # still running on A: B waits
        gate.set()
        one, two = await asyncio.gather(first, second)
        assert not one.replayed and two.replayed and one.message == two.message
        assert (len(a.mock.calls), len(b.mock.calls)) == (1, 0)


async def test_a_claim_whose_answer_was_lost_does_not_hold_off_the_retry(shared):
    """Redis ran the claim script but its answer was lost (the connection
    dropped): the call answers UNAVAILABLE, and the claim it may have left
    is dropped, so the client's retry runs at once instead of waiting out
    a lease nobody holds."""
    request = generate_request()
    async with replica(**shared) as a:
        run = a.records.scripts.run
        lost = []

        async def answer_lost(script, *args):
            reply = await run(script, *args)
            if script == "claim" and not lost:
                lost.append(args)
                raise a.records.scripts.unavailable("connection closed by server")
            return reply

        a.records.scripts.run = answer_lost
        with pytest.raises(Exception) as err:
            await call(a.stub.Generate, request)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and lost
        retried = await a.stub.Generate(request, timeout=5)
        assert not retried.replayed and len(a.mock.calls) == 1


# -- conflicts ------------------------------------------------------------------------

async def test_a_changed_request_under_a_request_id_is_a_conflict_on_the_other_replica(
        shared):
    generate, stream = generate_request(), stream_request()
    async with two_replicas(shared) as (a, b):
        await call(a.stub.Generate, generate)
        await read_stream(a.stub, stream)
        generate.prompt.prompt = "something else"
        stream.prompt.prompt = "something else"
        for send, request in ((lambda r: call(b.stub.Generate, r), generate),
                              (lambda r: read_stream(b.stub, r), stream)):
            with pytest.raises(AlreadyExistsError) as err:
                await send(request)
            assert err.value.reason == "IDEMPOTENCY_CONFLICT"
            assert err.value.metadata["request_id"] == request.request_id
        assert len(b.mock.calls) == 0


# -- failures -------------------------------------------------------------------------

async def test_a_failed_call_releases_its_claim_so_a_retry_on_the_other_replica_runs(shared):
    generate, stream = generate_request(), stream_request()
    async with two_replicas(shared) as (a, b):
        a.mock.simulate_failure(message="down", times=1)
        with pytest.raises(Exception):
            await call(a.stub.Generate, generate)
        response = await call(b.stub.Generate, generate)
        assert not response.replayed and len(b.mock.calls) == 1

        a.mock.queue_response("one two three four")
        a.mock.cut_next_stream_after(1)
        broken = await read_stream(a.stub, stream)
        assert broken[-1].end.outcome == StreamOutcome.STREAM_OUTCOME_FAILED
        again = await read_stream(b.stub, stream)
        assert again[-1].end.outcome == StreamOutcome.STREAM_OUTCOME_COMPLETED
        assert not again[-1].summary.replayed and len(b.mock.calls) == 2


async def test_a_result_that_could_not_be_recorded_is_still_answered(shared, caplog):
    request = generate_request()
    async with replica(**shared) as a:
        run = a.records.scripts.run

        async def no_finish(script, *args):
            if script == "finish":
                raise a.records.scripts.unavailable("Redis at test: connection lost")
            return await run(script, *args)

        a.records.scripts.run = no_finish
        with caplog.at_level(logging.WARNING, logger="hivemesh.llm"):
            response = await call(a.stub.Generate, request)
        assert not response.replayed and response.message.content
        assert "could not record the result of llm" in caplog.text


async def test_an_unreachable_redis_is_unavailable_and_the_upstream_is_not_called():
    proxy = RedisProxy(REDIS_URL)
    await proxy.start()
    prefix = f"hmtest:llm:{uuid.uuid4().hex}:"
    try:
        async with replica(**shared_settings(LOCAL_REDIS, prefix)) as ok:
            await call(ok.stub.Generate, generate_request())  # the local Redis is there
            await drop_redis_prefix(ok.records.scripts.client, prefix)
    except ConnectionError:
        await proxy.cut()
        if os.environ.get("CI"):
            raise
        pytest.skip(f"Redis is not reachable at {REDIS_URL}")
    try:
        async with replica(**shared_settings(LOCAL_REDIS, prefix) | {
                "redis_url": proxy.url}) as a:
            await proxy.cut()
            requests = [(a.stub.Generate, generate_request()),
                        (a.stub.Embed, EmbedRequest(request_id=rid(), model="embed",
                                                    texts=["one"]))]
            for method, request in requests:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await method(request, timeout=TIMEOUT)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "llm request records is unavailable" in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in a.stub.StreamGenerate(stream_request(), timeout=TIMEOUT):
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert a.mock.calls == []
    finally:
        if proxy.server is not None and proxy.server.is_serving():
            await proxy.cut()


async def test_the_redis_backend_needs_a_url_and_a_reachable_redis_at_start_up(tmp_path):
    with pytest.raises(ValidationError, match="HIVEMESH_LLM_REDIS_URL is required"):
        settings(records_backend="redis")
    with pytest.raises(ValidationError, match="braces but no hash tag"):
        settings(records_backend="redis", redis_url="redis://127.0.0.1:1/0",
                 redis_cluster=True, redis_prefix="a{b:")
    proxy = RedisProxy(REDIS_URL)
    await proxy.start()
    url = proxy.url
    await proxy.cut()  # nothing listens there any more
    with pytest.raises(ConnectionError, match="Redis is not reachable at redis://127.0.0.1"):
        await open_backends(settings(records_backend="redis", redis_url=url))
    # The command line: the service does not start (exit 1), naming the Redis.
    env = {**os.environ, "HIVEMESH_LLM_RECORDS_BACKEND": "redis",
           "HIVEMESH_LLM_REDIS_URL": url}
    done = subprocess.run(
        [sys.executable, "-m", "hivemesh.cli.main", "serve", "llm", "--host", "127.0.0.1",
         "--port", "0"], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 1
    assert "llm could not start: Redis is not reachable at redis://127.0.0.1" in done.stderr


async def test_the_local_backend_stays_the_default():
    assert settings().records_backend == "local"
    assert settings().redis_prefix == "hivemesh:llm:"
    async with replica() as a:
        assert not isinstance(a.records, RedisRequestRecords)
