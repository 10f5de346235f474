"""The LLM service's request_id records outlive a restart with a data
directory: a retry after the service restarted on the same directory
replays the first result (``replayed`` set) and never calls the upstream
again; a changed request under the same request_id is still a conflict;
records past their TTL are purged. Without a data directory they are kept
in memory, as before. The backends are counting mocks (in process) or a fake
OpenAI-compatible server (the service in its own process, killed with -9)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import uuid

import grpc
import pytest
from fakes.openai_server import FakeOpenAI

from hivemesh.cli.processes import start_service
from hivemesh.client import from_rpc_error
from hivemesh.client.errors import AlreadyExistsError
from hivemesh.common.v1 import RequestContext, StreamOutcome
from hivemesh.llm.v1 import (
    EmbedRequest, GenerateRequest, GenerationConfig, LlmServiceStub, Prompt,
    StreamGenerateRequest)
from hivemesh.runtime.request_records import FILE_NAME, SqliteRequestRecords
from hivemesh.runtime.settings import ServerSettings
from hivemesh.services.llm import server as llm_server
from hivemesh.services.llm.server import Backends, create_server, open_records
from hivemesh.services.llm.servicer import RECORDS_KIND
from hivemesh.services.llm.settings import BackendSettings, LlmSettings, ModelSettings


def rid() -> str:
    return str(uuid.uuid4())


def settings(data_dir=None, **overrides) -> LlmSettings:
    return LlmSettings(
        server=ServerSettings(port=0, grace_period_s=1), data_dir=data_dir,
        backends={"primary": BackendSettings(type="mock")},
        models=[ModelSettings(alias="main", backend="primary", upstream_model="p-1",
                              default=True),
                ModelSettings(alias="embed", kind="embedding", backend="primary",
                              upstream_model="e-1", embedding_dimensions=16, default=True)],
        **overrides)


@contextlib.asynccontextmanager
async def serve(s: LlmSettings, records=None):
    """The service in this process; ``records`` instead of those of ``s``."""
    backends = Backends(s)
    if records is not None:
        await backends.records.close()
        backends.records = records
    running, port = await create_server(s, backends)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield LlmServiceStub(channel), backends.by_name["primary"]
    finally:
        await channel.close()
        await running.shutdown(0)
        await backends.close()


async def call(method, request):
    try:
        return await method(request, timeout=10)
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err) from err


async def read_stream(stub, request) -> list:
    try:
        return [m async for m in stub.StreamGenerate(request, timeout=10)]
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err) from err


def generate_request() -> GenerateRequest:
    # Sampled (temperature 0.9): never an answer of the response cache.
    return GenerateRequest(request_id=rid(), model="main",
                           context=RequestContext(tenant_id="acme"),
                           config=GenerationConfig(temperature=0.9, max_tokens=100),
                           prompt=Prompt(system_prompt="You write code.", prompt="add"))


def stream_request() -> StreamGenerateRequest:
    return StreamGenerateRequest(request_id=rid(), model="main",
                                 context=RequestContext(tenant_id="acme"),
                                 config=GenerationConfig(temperature=0.9),
                                 prompt=Prompt(prompt="count"))


def rows(data_dir) -> list[str]:
    with contextlib.closing(sqlite3.connect(data_dir / FILE_NAME)) as conn:
        return [r for (r,) in conn.execute("SELECT request_id FROM requests ORDER BY rowid")]


def expect_replayed_stream(first, again, text: str) -> None:
    """``again`` (a retry's messages) replays the stream ``first``
    completed with ``text``: the same content and usage, marked replayed."""
    assert first[-1].end.outcome == again[-1].end.outcome == \
        StreamOutcome.STREAM_OUTCOME_COMPLETED
    assert again[-1].summary.replayed and not first[-1].summary.replayed
    replayed = "".join(m.delta.text for m in again if m.WhichOneof("event") == "delta")
    assert replayed == first[-1].summary.message.content == text
    assert again[-1].summary.usage == first[-1].summary.usage


async def test_a_generate_retried_after_a_restart_replays_without_calling_the_upstream(
        tmp_path):
    request = generate_request()
    async with serve(settings(tmp_path)) as (stub, mock):
        mock.queue_response("def add(a, b):\n    return a + b\n")
        first = await call(stub.Generate, request)
        assert not first.replayed and len(mock.calls) == 1
    async with serve(settings(tmp_path)) as (stub, mock):
        again = await call(stub.Generate, request)
        assert len(mock.calls) == 0  # the restarted service never called its upstream
        # Another tenant's request_id of the same value is another request.
        other = GenerateRequest()
        other.CopyFrom(request)
        other.context.tenant_id = "globex"
        assert not (await call(stub.Generate, other)).replayed
        assert len(mock.calls) == 1
    assert again.replayed
    assert again.message == first.message and again.usage == first.usage
    assert (again.model, again.backend, again.latency) == (first.model, first.backend,
                                                           first.latency)


async def test_a_stream_retried_after_a_restart_replays_without_calling_the_upstream(
        tmp_path):
    request = stream_request()
    async with serve(settings(tmp_path)) as (stub, mock):
        mock.queue_response("alpha beta gamma")
        first = await read_stream(stub, request)
        assert len(mock.calls) == 1
    async with serve(settings(tmp_path)) as (stub, mock):
        again = await read_stream(stub, request)
        assert len(mock.calls) == 0
    expect_replayed_stream(first, again, "alpha beta gamma")


async def test_an_embed_retried_after_a_restart_replays(tmp_path):
    request = EmbedRequest(request_id=rid(), model="embed", texts=["one", "two"])
    async with serve(settings(tmp_path)) as (stub, mock):
        first = await call(stub.Embed, request)
    async with serve(settings(tmp_path)) as (stub, mock):
        # An upstream call would fail: only a replay answers.
        mock.simulate_failure(message="down", times=10)
        again = await call(stub.Embed, request)
    assert again.replayed and again.embeddings == first.embeddings


async def test_a_changed_request_under_a_kept_request_id_is_a_conflict_after_a_restart(
        tmp_path):
    generate, stream = generate_request(), stream_request()
    async with serve(settings(tmp_path)) as (stub, _):
        await call(stub.Generate, generate)
        await read_stream(stub, stream)
    generate.prompt.prompt = "something else"
    stream.prompt.prompt = "something else"
    async with serve(settings(tmp_path)) as (stub, mock):
        for send, request in ((lambda r: call(stub.Generate, r), generate),
                              (lambda r: read_stream(stub, r), stream)):
            with pytest.raises(AlreadyExistsError) as err:
                await send(request)
            assert err.value.reason == "IDEMPOTENCY_CONFLICT"
            assert err.value.metadata["request_id"] == request.request_id
        assert len(mock.calls) == 0


async def test_failed_and_abandoned_requests_leave_no_record(tmp_path):
    request = generate_request()
    async with serve(settings(tmp_path)) as (stub, mock):
        mock.simulate_failure(message="down", times=10)
        with pytest.raises(Exception):
            await call(stub.Generate, request)
    assert rows(tmp_path) == []
    async with serve(settings(tmp_path)) as (stub, mock):
        response = await call(stub.Generate, request)
        assert not response.replayed and len(mock.calls) == 1


async def test_without_a_data_dir_the_records_are_in_memory_as_before(tmp_path,
                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    request = generate_request()
    async with serve(settings()) as (stub, mock):
        await call(stub.Generate, request)
        assert (await call(stub.Generate, request)).replayed and len(mock.calls) == 1
    async with serve(settings()) as (stub, mock):
        assert not (await call(stub.Generate, request)).replayed
        assert len(mock.calls) == 1  # a restart forgets them
    assert list(tmp_path.iterdir()) == []


async def test_without_a_data_dir_the_records_are_in_memory_and_normal_is_the_default():
    records = open_records(settings())
    assert not isinstance(records, SqliteRequestRecords)
    assert settings().sqlite_synchronous == "normal"


async def test_records_in_sqlite_with_a_data_dir(tmp_path):
    records = open_records(settings(tmp_path, sqlite_synchronous="full"))
    try:
        assert isinstance(records, SqliteRequestRecords)
        assert records.db.path == tmp_path / FILE_NAME and records.db.synchronous == "full"
    finally:
        await records.close()


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_records_past_their_ttl_are_not_replayed_and_the_sweeper_purges_them(
        tmp_path, monkeypatch):
    monkeypatch.setattr(llm_server, "_SWEEP_INTERVAL_S", 0.01)
    clock = Clock()
    s = settings(tmp_path, idempotency_ttl_s=60.0)

    def records():
        return SqliteRequestRecords(tmp_path, (RECORDS_KIND,), s.idempotency_size,
                                    s.idempotency_ttl_s, clock=clock)

    old, kept = generate_request(), generate_request()
    async with serve(s, records()) as (stub, _):
        await call(stub.Generate, old)
        assert len(rows(tmp_path)) == 1
    clock.now += 45
    async with serve(s, records()) as (stub, _):
        await call(stub.Generate, kept)
    assert len(rows(tmp_path)) == 2
    clock.now += 30  # old is past the TTL, kept is not
    async with serve(s, records()) as (stub, mock):
        for _ in range(1000):  # the sweeper's first pass
            if len(rows(tmp_path)) == 1:
                break
            await asyncio.sleep(0.01)
        assert len(rows(tmp_path)) == 1 and rows(tmp_path)[0].endswith(kept.request_id)
        assert (await call(stub.Generate, kept)).replayed
        # Past the TTL, a retry is a new request: no replay, no conflict.
        old.prompt.prompt = "another prompt"
        assert not (await call(stub.Generate, old)).replayed
        assert len(mock.calls) == 1


async def test_prune_forgets_expired_rows_in_bounded_batches(tmp_path):
    clock = Clock()
    records = SqliteRequestRecords(tmp_path, ("a", "b"), 100, 60.0, clock=clock)
    try:
        for n in range(3):
            await records.finish("a", f"a-{n}", "fp", GenerateRequest(request_id=str(n)))
        await records.finish("b", "b-0", "fp", GenerateRequest())
        assert await records.prune(10) == 0
        clock.now += 61
        await records.finish("b", "b-1", "fp", GenerateRequest())  # purges b-0 itself
        assert await records.prune(2) == 2
        assert await records.prune(10) == 1
        assert rows(tmp_path) == ["b-1"] and records.counts == {"a": 0, "b": 1}
    finally:
        await records.close()


def _backend_env(fake: FakeOpenAI) -> dict[str, str]:
    return {"HIVEMESH_LLM_BACKENDS": json.dumps(
                {"fake": {"type": "openai_compatible", "base_url": fake.base_url,
                          "max_attempts": 1}}),
            "HIVEMESH_LLM_MODELS": json.dumps(
                [{"alias": "main", "backend": "fake", "upstream_model": "fake-1",
                  "default": True}])}


async def test_a_retry_after_kill_9_and_a_restart_replays_without_a_second_upstream_call(
        tmp_path):
    """The service in its own process, on the default durability (normal):
    a record is written before its answer goes out, so it survives kill -9."""
    data = tmp_path / "data"
    generate, stream = generate_request(), stream_request()
    async with FakeOpenAI() as fake:
        env = _backend_env(fake)
        procs = [start_service("llm", data_dir=data, env=env, log_path=tmp_path / "llm.log")]
        try:
            async with grpc.aio.insecure_channel(procs[-1].address) as channel:
                stub = LlmServiceStub(channel)
                first = await call(stub.Generate, generate)
                streamed = await read_stream(stub, stream)
            assert fake.request_count == 2
            procs[-1].kill()
            procs.append(start_service("llm", data_dir=data, env=env,
                                       log_path=tmp_path / "llm.log"))
            async with grpc.aio.insecure_channel(procs[-1].address) as channel:
                stub = LlmServiceStub(channel)
                again = await call(stub.Generate, generate)
                restreamed = await read_stream(stub, stream)
                generate.prompt.prompt = "changed"
                with pytest.raises(AlreadyExistsError):
                    await call(stub.Generate, generate)
        finally:
            for proc in procs:
                proc.stop()
        assert fake.request_count == 2  # once each, before the restart
    assert again.replayed and again.message == first.message
    assert restreamed[-1].summary.replayed
    assert restreamed[-1].summary.message == streamed[-1].summary.message
