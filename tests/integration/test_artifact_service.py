"""The artifact service over every backend (memory, SQLite, PostgreSQL):
the same scenarios, the same answers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import re
import uuid

import grpc
import pytest
from google.protobuf import json_format

from hivemesh.artifact.v1 import ArtifactServiceStub, DeleteArtifactRequest, SaveArtifactRequest
from hivemesh.client import (
    AlreadyExistsError, InvalidArgumentError, NotFoundError, UnavailableError, from_rpc_error)
from hivemesh.runtime.wellknown import now_us
from hivemesh.services.artifact.backends.base import Filter
from hivemesh.services.artifact.settings import ArtifactSettings

ID = re.compile(r"^art-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
TYPES = ["code", "test", "test_data", "review", "config", "deployment", "monitoring_report",
         "design_doc"]


async def test_save_assigns_id_checksum_and_round_trips(artifacts):
    saved = await artifacts.save(workflow_id="wf-1", task_id="t-1", agent_id="coder",
                                 artifact_type="code", content="print('héllo')",
                                 metadata={"language": "python", "tokens": 12,
                                           "tags": ["a", "b"], "nested": {"ok": True}})
    a = saved.artifact
    assert ID.match(a.artifact_id)
    assert not saved.replayed
    assert a.size_bytes == len("print('héllo')".encode())
    assert a.sha256 == hashlib.sha256("print('héllo')".encode()).hexdigest()
    assert a.create_time.seconds > 0
    got = await artifacts.get(a.artifact_id)
    assert got == a
    assert dict(got.metadata) == {"language": "python", "tokens": 12.0,
                                  "tags": ["a", "b"], "nested": {"ok": True}}


async def test_every_artifact_type_is_accepted(artifacts):
    for kind in TYPES:
        await artifacts.save(workflow_id="wf-t", agent_id="a", artifact_type=kind, content=kind)
    assert await artifacts.count(workflow_id="wf-t") == len(TYPES)
    for kind in TYPES:
        assert await artifacts.count(workflow_id="wf-t", artifact_type=kind) == 1


async def test_retried_save_is_stored_once(artifacts):
    rid = str(uuid.uuid4())
    kwargs = dict(workflow_id="wf-i", agent_id="coder", artifact_type="code", content="x = 1",
                  request_id=rid)
    first = await artifacts.save(**kwargs)
    again = await artifacts.save(**kwargs)
    assert again.replayed and again.artifact == first.artifact
    assert await artifacts.count(workflow_id="wf-i") == 1
    with pytest.raises(AlreadyExistsError) as err:
        await artifacts.save(**{**kwargs, "content": "x = 2"})
    assert err.value.reason == "IDEMPOTENCY_CONFLICT"
    assert err.value.metadata["request_id"] == rid
    assert await artifacts.count(workflow_id="wf-i") == 1


async def test_concurrent_retries_of_one_save_store_one_artifact(artifacts):
    rid = str(uuid.uuid4())
    results = await asyncio.gather(*[
        artifacts.save(workflow_id="wf-c", agent_id="a", artifact_type="code", content="same",
                       request_id=rid) for _ in range(8)])
    assert len({r.artifact.artifact_id for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1
    assert await artifacts.count(workflow_id="wf-c") == 1


async def test_list_filters_combine_and_page_newest_first(artifacts):
    ids = []
    for i in range(7):
        saved = await artifacts.save(workflow_id="wf-p" if i < 5 else "wf-other",
                                     task_id=f"t-{i % 2}", agent_id=f"agent-{i % 3}",
                                     artifact_type="code" if i % 2 else "test",
                                     content=f"c{i}")
        ids.append(saved.artifact.artifact_id)
    seen, token = [], ""
    while True:
        page = await artifacts.list(workflow_id="wf-p", page_size=2, page_token=token)
        assert len(page.artifacts) <= 2
        seen += [a.artifact_id for a in page.artifacts]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(ids[:5]))
    combo = await artifacts.list(workflow_id="wf-p", task_id="t-1", artifact_type="code")
    assert [a.artifact_id for a in combo.artifacts] == [ids[3], ids[1]]
    by_agent = [a.artifact_id async for a in artifacts.iter(agent_id="agent-0")]
    assert by_agent == [ids[6], ids[3], ids[0]]
    assert await artifacts.count(workflow_id="wf-p", agent_id="agent-1") == 2
    assert await artifacts.count() == 7
    lean = await artifacts.list(workflow_id="wf-p", omit_content=True, page_size=1)
    assert lean.artifacts[0].content == "" and lean.artifacts[0].size_bytes == 2


async def test_equal_times_and_deletes_between_pages_lose_and_repeat_nothing(
        artifacts, monkeypatch):
    """Artifacts saved in the same microsecond page in one order on every
    backend; deleting the last artifact of a page and the first of the next
    before reading on neither skips nor repeats the others."""
    from types import SimpleNamespace

    from hivemesh.services.artifact import servicer

    frozen = SimpleNamespace(time_ns=lambda: 1_700_000_000_123_456_000)
    monkeypatch.setattr(servicer, "time", frozen)
    ids = [(await artifacts.save(workflow_id="wf-eq", agent_id="a", artifact_type="code",
                                 content=str(i))).artifact.artifact_id for i in range(9)]
    monkeypatch.undo()
    newest_first = sorted(ids, reverse=True)
    first = await artifacts.list(workflow_id="wf-eq", page_size=3)
    assert [a.artifact_id for a in first.artifacts] == newest_first[:3]
    assert await artifacts.delete(newest_first[2]) and await artifacts.delete(newest_first[3])
    rest, token = [], first.next_page_token
    while token:
        page = await artifacts.list(workflow_id="wf-eq", page_size=3, page_token=token)
        rest += [a.artifact_id for a in page.artifacts]
        token = page.next_page_token
    assert rest == newest_first[4:]
    assert await artifacts.count(workflow_id="wf-eq") == 7
    assert len([a async for a in artifacts.iter(workflow_id="wf-eq", page_size=2)]) == 7


async def test_unicode_content_and_metadata_keys_round_trip_with_their_checksum(artifacts):
    content = "naïve café 🐝 日本語\r\n"
    metadata = {"ключ": "значение", "🐝": 1, "ü": {"ß": [True, None, "ø"]}, "": "empty key"}
    rid = str(uuid.uuid4())
    saved = await artifacts.save(workflow_id="wf-ü", agent_id="агент", artifact_type="code",
                                 content=content, metadata=metadata, request_id=rid)
    a = saved.artifact
    assert a.size_bytes == len(content.encode()) and a.size_bytes != len(content)
    assert a.sha256 == hashlib.sha256(content.encode()).hexdigest()
    got = await artifacts.get(a.artifact_id)
    assert got == a and got.content == content
    assert json_format.MessageToDict(got.metadata) == {**metadata, "🐝": 1.0}
    again = await artifacts.save(workflow_id="wf-ü", agent_id="агент", artifact_type="code",
                                 content=content, metadata=metadata, request_id=rid)
    assert again.replayed and again.artifact == a
    (listed,) = [x async for x in artifacts.iter(workflow_id="wf-ü", agent_id="агент")]
    assert listed == a
    assert await artifacts.count(workflow_id="wf-ü", agent_id="агент") == 1


async def test_page_token_is_bound_to_its_filter(artifacts):
    for i in range(3):
        await artifacts.save(workflow_id="wf-k", agent_id="a", artifact_type="code", content="x")
    page = await artifacts.list(workflow_id="wf-k", page_size=1)
    with pytest.raises(InvalidArgumentError) as err:
        await artifacts.list(workflow_id="wf-other", page_token=page.next_page_token)
    assert err.value.field_violations[0][0] == "page_token"
    with pytest.raises(InvalidArgumentError):
        await artifacts.list(page_token="not-a-token")



@pytest.mark.parametrize("key", [
    "[9223372036854775808,\"art-x\"]",  # past a 64-bit integer
    "[-9223372036854775809,\"art-x\"]",
    "[1,\"art\\u0000x\"]",  # NUL, which PostgreSQL text cannot hold
    "[1,\"art\\ud800x\"]",  # a lone surrogate, which UTF-8 cannot encode
])
async def test_a_forged_page_token_is_invalid_on_every_backend(artifacts, key):
    """Tokens are only base64 of JSON: a doctored one must be refused as
    page_token, not fail inside the backend as INTERNAL."""
    import base64

    from hivemesh.runtime import paging

    await artifacts.save(workflow_id="wf-f", agent_id="a", artifact_type="code", content="x")
    raw = f'[{key},"{paging.digest([])}"]'.encode()
    token = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    with pytest.raises(InvalidArgumentError) as err:
        await artifacts.list(page_token=token)
    assert err.value.field_violations[0][0] == "page_token"

async def test_delete_then_get_is_not_found(artifacts):
    saved = await artifacts.save(workflow_id="wf-d", agent_id="a", artifact_type="code",
                                 content="x")
    artifact_id = saved.artifact.artifact_id
    assert await artifacts.delete(artifact_id) is True
    assert await artifacts.delete(artifact_id) is False
    with pytest.raises(NotFoundError) as err:
        await artifacts.get(artifact_id)
    assert err.value.reason == "NOT_FOUND"
    assert err.value.domain == "hivemesh.artifact"
    assert err.value.metadata == {"resource_type": "artifact", "resource_id": artifact_id}
    assert await artifacts.count(workflow_id="wf-d") == 0


async def test_retried_delete_gets_the_first_answer(artifacts):
    """A retry of a delete (its answer lost) finds the artifact gone, and
    must still be told it was deleted, as the first attempt was."""
    saved = await artifacts.save(workflow_id="wf-rd", agent_id="a", artifact_type="code",
                                 content="x")
    artifact_id = saved.artifact.artifact_id
    rid = str(uuid.uuid4())
    assert await artifacts.delete(artifact_id, request_id=rid) is True
    assert await artifacts.delete(artifact_id, request_id=rid) is True
    # A new request (another id) is answered afresh: nothing left to delete.
    assert await artifacts.delete(artifact_id) is False
    # A first answer of "nothing deleted" is replayed as it was too.
    missing = f"art-{uuid.uuid4()}"
    gone_rid = str(uuid.uuid4())
    assert await artifacts.delete(missing, request_id=gone_rid) is False
    assert await artifacts.delete(missing, request_id=gone_rid) is False
    # The same id for another artifact, or for a save, is a conflict.
    with pytest.raises(AlreadyExistsError) as err:
        await artifacts.delete(missing, request_id=rid)
    assert err.value.reason == "IDEMPOTENCY_CONFLICT"
    with pytest.raises(AlreadyExistsError):
        await artifacts.save(workflow_id="wf-rd", agent_id="a", artifact_type="code",
                             content="y", request_id=rid)
    assert await artifacts.count(workflow_id="wf-rd") == 0


async def test_concurrent_retries_of_one_delete_all_answer_deleted(artifacts):
    saved = await artifacts.save(workflow_id="wf-cd", agent_id="a", artifact_type="code",
                                 content="x")
    rid = str(uuid.uuid4())
    results = await asyncio.gather(*[
        artifacts.delete(saved.artifact.artifact_id, request_id=rid) for _ in range(8)])
    assert results == [True] * 8


async def test_a_delete_without_request_id_is_answered_afresh(artifact_server):
    from hivemesh.client import ArtifactClient

    address, _ = artifact_server
    async with ArtifactClient(address) as client:
        saved = await client.save(workflow_id="wf-nr", agent_id="a", artifact_type="code",
                                  content="x")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ArtifactServiceStub(channel)
        request = DeleteArtifactRequest(artifact_id=saved.artifact.artifact_id)
        assert (await stub.DeleteArtifact(request)).deleted is True
        assert (await stub.DeleteArtifact(request)).deleted is False


async def test_oversize_content_is_refused_and_nothing_is_stored(artifacts):
    with pytest.raises(InvalidArgumentError) as err:
        await artifacts.save(workflow_id="wf-big", agent_id="a", artifact_type="code",
                             content="x" * (64 * 1024 + 1))
    assert err.value.reason == "PAYLOAD_TOO_LARGE"
    assert err.value.metadata["limit_bytes"] == str(64 * 1024)
    assert err.value.field_violations[0][0] == "content"
    assert await artifacts.count(workflow_id="wf-big") == 0
    at_limit = await artifacts.save(workflow_id="wf-big", agent_id="a", artifact_type="code",
                                    content="x" * (64 * 1024))
    assert at_limit.artifact.size_bytes == 64 * 1024


async def test_invalid_requests_get_field_violations_before_any_work(artifact_server):
    address, backend = artifact_server
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ArtifactServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SaveArtifact(SaveArtifactRequest(request_id="r", workflow_id="",
                                                        agent_id="a", artifact_type="Bad Type"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(err.value)
    assert error.reason == "INVALID_REQUEST"
    fields = {f for f, _ in error.field_violations}
    assert fields == {"workflow_id", "artifact_type"}
    assert await backend.count(Filter()) == 0


async def test_metadata_numbers_json_cannot_hold_are_invalid(artifacts):
    for bad in (float("nan"), float("inf")):
        with pytest.raises(InvalidArgumentError) as err:
            await artifacts.save(workflow_id="wf-nan", agent_id="a", artifact_type="code",
                                 content="x", metadata={"score": bad})
        assert err.value.field_violations[0][0] == "metadata"
    assert await artifacts.count(workflow_id="wf-nan") == 0


async def test_get_with_malformed_id_is_invalid_argument(artifacts):
    with pytest.raises(InvalidArgumentError) as err:
        await artifacts.get("not-an-artifact-id")
    assert err.value.field_violations[0][0] == "artifact_id"


@contextlib.asynccontextmanager
async def faulty_service(settings):
    """(client, backend): an artifact server over an in-memory backend that
    fails on demand (``backend.fail_next(n)``)."""
    from hivemesh.client import ArtifactClient
    from hivemesh.services.artifact.backends.memory import MemoryBackend
    from hivemesh.services.artifact.fake import FaultyBackend
    from hivemesh.services.artifact.server import create_server

    backend = FaultyBackend(MemoryBackend())
    running, port = await create_server(settings, backend)
    try:
        async with ArtifactClient(f"127.0.0.1:{port}") as client:
            yield client, backend
    finally:
        await running.shutdown(0)


async def test_backend_outage_is_unavailable_and_writes_nothing(artifact_settings):
    async with faulty_service(artifact_settings) as (client, backend):
        backend.fail_next(1)
        # The channel retries UNAVAILABLE (service config): the second try succeeds.
        saved = await client.save(workflow_id="wf-u", agent_id="a", artifact_type="code",
                                  content="x")
        assert backend.calls["save"] == 2
        assert await client.count(workflow_id="wf-u") == 1
        backend.fail_next(10)
        with pytest.raises(UnavailableError) as err:
            await client.get(saved.artifact.artifact_id)
        assert err.value.reason == "BACKEND_UNAVAILABLE"
        assert err.value.retry_delay is not None
        assert backend.calls["get"] == 4  # maxAttempts in the service config


async def test_a_channel_to_a_retrying_proxy_tries_once(artifact_settings):
    """Behind an Envoy egress listener (which retries on another pod) the
    caller's channel must not retry too: the attempts would multiply."""
    from hivemesh.client import ArtifactClient
    from hivemesh.client.channel import insecure_channel
    from hivemesh.services.artifact.backends.memory import MemoryBackend
    from hivemesh.services.artifact.fake import FaultyBackend
    from hivemesh.services.artifact.server import create_server

    backend = FaultyBackend(MemoryBackend())
    running, port = await create_server(artifact_settings, backend)
    channel = insecure_channel(f"127.0.0.1:{port}", "artifact", retries=False)
    try:
        async with ArtifactClient(channel=channel) as client:
            backend.fail_next(1)
            with pytest.raises(UnavailableError):
                await client.count(workflow_id="wf-o")
            assert backend.calls["count"] == 1
            assert await client.count(workflow_id="wf-o") == 0
        # The orchestrator's provider channels, as the envoy-sidecar
        # component configures them, and as they are by default.
        from hivemesh.artifact.v1 import CountArtifactsRequest
        from hivemesh.runtime import errors
        from hivemesh.services.orchestrator.policy import Providers
        for retries, calls in ((False, 1), (True, 2)):
            providers = Providers({"artifact": f"127.0.0.1:{port}"}, channel_retries=retries)
            try:
                backend.calls.clear()
                backend.fail_next(1)
                try:
                    await providers.call("artifact", "CountArtifacts", CountArtifactsRequest())
                except errors.ServiceError as exc:
                    assert not retries and exc.code == grpc.StatusCode.UNAVAILABLE
                assert backend.calls["count"] == calls
            finally:
                await providers.close()
    finally:
        await channel.close()
        await running.shutdown(0)


class _GoawayOnFirstCall:
    """A TCP proxy to ``target`` standing in for an Envoy listener that
    drops an idle connection just as a call arrives on it: its first
    connection answers the first call's HEADERS with a GOAWAY that excludes
    the call's stream (last stream id 0) and closes; every later connection
    is relayed to the target as it is."""

    # HTTP/2 frames: an empty SETTINGS, and a GOAWAY of last stream 0, NO_ERROR.
    _SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    _GOAWAY = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + bytes(8)

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections = 0
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.server.close()
        for task in self._tasks:
            task.cancel()

    async def _accept(self, reader, writer) -> None:
        self.connections += 1
        if self.connections == 1:
            await self._goaway(reader, writer)
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _goaway(self, reader, writer) -> None:
        try:
            await reader.readexactly(24)  # the client's connection preface
            writer.write(self._SETTINGS)
            while True:
                header = await reader.readexactly(9)
                await reader.readexactly(int.from_bytes(header[:3], "big"))
                if header[3] == 0x1:  # HEADERS: a call
                    break
            writer.write(self._GOAWAY)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    @staticmethod
    async def _pipe(src, dst) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except ConnectionError:
            pass
        finally:
            dst.close()


async def test_a_channel_without_retries_still_resends_a_call_never_taken(artifact_settings):
    """Without its retry policy (behind an Envoy egress listener) a channel
    still sends again a call the target never took: Envoy closing an idle
    or draining connection with a GOAWAY as the call arrives. That call
    reached no one, so no layer behind the target could retry it, and
    sending it again retries no failure."""
    from hivemesh.client import ArtifactClient
    from hivemesh.client.channel import insecure_channel
    from hivemesh.services.artifact.backends.memory import MemoryBackend
    from hivemesh.services.artifact.fake import FaultyBackend
    from hivemesh.services.artifact.server import create_server

    backend = FaultyBackend(MemoryBackend())
    running, port = await create_server(artifact_settings, backend)
    proxy = _GoawayOnFirstCall(port)
    channel = insecure_channel(f"127.0.0.1:{await proxy.start()}", "artifact", retries=False)
    try:
        async with ArtifactClient(channel=channel) as client:
            assert await client.count(workflow_id="wf-g") == 0
        assert proxy.connections == 2
        assert backend.calls["count"] == 1
    finally:
        await channel.close()
        await proxy.close()
        await running.shutdown(0)


async def test_a_large_save_is_retried_like_a_small_one(artifact_settings):
    # gRPC keeps 256 KiB of a call for its retries by default, and a call
    # that outgrows the buffer is never retried; a save of up to the content
    # limit must be retried on UNAVAILABLE all the same.
    settings = artifact_settings.model_copy(update={"max_content_bytes": 4 * 1024 * 1024})
    async with faulty_service(settings) as (client, backend):
        backend.fail_next(1)
        saved = await client.save(workflow_id="wf-l", agent_id="a", artifact_type="code",
                                  content="é" * (2 * 1024 * 1024))
        assert backend.calls["save"] == 2
        assert saved.artifact.size_bytes == 4 * 1024 * 1024
        assert await client.count(workflow_id="wf-l") == 1


@contextlib.asynccontextmanager
async def small_messages(artifact_backend, tmp_path):
    """A client of an artifact server whose messages are at most 256 KiB
    (content at most 100 KiB), over the backend under test."""
    from hivemesh.client import ArtifactClient
    from hivemesh.runtime.settings import ServerSettings
    from hivemesh.services.artifact.server import create_server
    from hivemesh.services.artifact.settings import ArtifactSettings

    settings = ArtifactSettings(
        server=ServerSettings(host="127.0.0.1", port=0, max_message_bytes=256 * 1024),
        data_dir=tmp_path / "artifact", max_content_bytes=100 * 1024)
    running, port = await create_server(settings, artifact_backend)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(running.shutdown, 0)
        yield await stack.enter_async_context(ArtifactClient(f"127.0.0.1:{port}"))


async def test_pages_end_early_rather_than_exceed_the_response_size_limit(
        artifact_backend, tmp_path):
    async with small_messages(artifact_backend, tmp_path) as artifacts:
        for i in range(5):
            await artifacts.save(workflow_id="wf-big", agent_id="a", artifact_type="code",
                                 content=str(i) * (90 * 1024))
        first = await artifacts.list(workflow_id="wf-big")
        assert len(first.artifacts) == 1 and first.next_page_token
        listed = [a.content async for a in artifacts.iter(workflow_id="wf-big")]
        assert [c[0] for c in listed] == ["4", "3", "2", "1", "0"]
        bare = await artifacts.list(workflow_id="wf-big", omit_content=True)
        assert len(bare.artifacts) == 5 and not bare.next_page_token


async def test_nul_characters_are_refused_alike_on_every_backend(artifacts):
    for fields, where in ((dict(content="a\x00b"), "content"),
                          (dict(content="x", task_id="t\x00"), "task_id"),
                          (dict(content="x", metadata={"k": "v\x00"}), "metadata"),
                          (dict(content="x", request_id="r\x00"), "request_id")):
        with pytest.raises(InvalidArgumentError) as err:
            await artifacts.save(**{"workflow_id": "wf-nul", "agent_id": "a",
                                    "artifact_type": "code", **fields})
        assert err.value.field_violations[0] == (where,
                                                 "must not contain NUL (U+0000) characters")
    with pytest.raises(InvalidArgumentError) as err:
        await artifacts.count(workflow_id="wf\x00")
    assert err.value.field_violations[0][0] == "filter.workflow_id"
    assert await artifacts.count(workflow_id="wf-nul") == 0
    saved = await artifacts.save(workflow_id="wf-nul2", agent_id="a", artifact_type="code",
                                 content="x")
    with pytest.raises(InvalidArgumentError) as err:
        await artifacts.delete(saved.artifact.artifact_id, request_id="d\x00")
    assert err.value.field_violations[0][0] == "request_id"
    assert await artifacts.count(workflow_id="wf-nul2") == 1


async def test_content_over_its_limit_is_payload_too_large_up_to_the_message_limit(
        tmp_path):
    """As the contract says: content over the content limit, in a request
    that fits the gRPC message limit, is INVALID_ARGUMENT, reason
    PAYLOAD_TOO_LARGE; a request over the message limit is refused by gRPC
    before the service reads it: RESOURCE_EXHAUSTED, without ErrorInfo."""
    from hivemesh.runtime.settings import ServerSettings
    from hivemesh.services.artifact.backends.memory import MemoryBackend
    from hivemesh.services.artifact.server import create_server

    settings = ArtifactSettings(
        server=ServerSettings(host="127.0.0.1", port=0, max_message_bytes=256 * 1024),
        data_dir=tmp_path / "artifact", max_content_bytes=100 * 1024)
    running, port = await create_server(settings, MemoryBackend())
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_send_message_length", 4 * 1024 * 1024)])
    try:
        stub = ArtifactServiceStub(channel)
        outcomes = []
        for size in (150 * 1024, 300 * 1024):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SaveArtifact(SaveArtifactRequest(
                    request_id=str(uuid.uuid4()), workflow_id="wf", agent_id="a",
                    artifact_type="code", content="x" * size), timeout=10)
            refused = from_rpc_error(err.value)
            outcomes.append((refused.code, refused.reason))
        assert outcomes == [(grpc.StatusCode.INVALID_ARGUMENT, "PAYLOAD_TOO_LARGE"),
                            (grpc.StatusCode.RESOURCE_EXHAUSTED, "")]
    finally:
        await channel.close()
        await running.shutdown(0)


async def test_an_artifact_too_big_to_read_back_is_refused_and_pages_count_metadata(
        artifact_backend, tmp_path):
    async with small_messages(artifact_backend, tmp_path) as artifacts:
        with pytest.raises(InvalidArgumentError) as err:  # content fits, metadata not
            await artifacts.save(workflow_id="wf-meta", agent_id="a", artifact_type="code",
                                 content="x" * (90 * 1024),
                                 metadata={"notes": "y" * (150 * 1024)})
        assert err.value.reason == "PAYLOAD_TOO_LARGE"
        assert await artifacts.count(workflow_id="wf-meta") == 0
        for _ in range(4):
            await artifacts.save(workflow_id="wf-meta", agent_id="a", artifact_type="code",
                                 content="small", metadata={"notes": "z" * (60 * 1024)})
        page = await artifacts.list(workflow_id="wf-meta", omit_content=True)
        assert 1 <= len(page.artifacts) < 4 and page.next_page_token
        assert len([a async for a in artifacts.iter(workflow_id="wf-meta")]) == 4
        # Metadata counts as encoded (a number in a list takes 11 bytes, not
        # its 2 in JSON): two of these exceed one answer.
        for _ in range(2):
            await artifacts.save(workflow_id="wf-numbers", agent_id="a", artifact_type="code",
                                 content="small", metadata={"samples": [1] * 16_000})
        page = await artifacts.list(workflow_id="wf-numbers")
        assert len(page.artifacts) == 1 and page.next_page_token
        assert len([a async for a in artifacts.iter(workflow_id="wf-numbers")]) == 2


async def test_content_over_its_limit_is_named_even_when_it_would_not_fit_an_answer(
        artifact_backend, tmp_path):
    """Content above max_content_bytes is refused on `content`, with that
    limit, however large it is (not blamed on metadata it does not have)."""
    async with small_messages(artifact_backend, tmp_path) as artifacts:
        with pytest.raises(InvalidArgumentError) as err:
            await artifacts.save(workflow_id="wf-huge", agent_id="a", artifact_type="code",
                                 content="x" * (200 * 1024))
        assert err.value.reason == "PAYLOAD_TOO_LARGE"
        assert err.value.field_violations[0][0] == "content"
        assert err.value.metadata["limit_bytes"] == str(100 * 1024)
        assert await artifacts.count(workflow_id="wf-huge") == 0


async def test_a_failing_sqlite_read_is_unavailable(tmp_path):
    """A read SQLite cannot do (a failing disk) is BackendUnavailable, as a
    failed write is, not an unexpected error."""
    import sqlite3

    from hivemesh.services.artifact.backends.base import BackendUnavailable
    from hivemesh.services.artifact.backends.sqlite import SqliteBackend

    class FailingReader:
        def execute(self, *args):
            raise sqlite3.OperationalError("disk I/O error")

    backend = SqliteBackend(tmp_path)
    reader, backend.db.reader = backend.db.reader, FailingReader()
    try:
        for read in (lambda: backend.get("art-x"), lambda: backend.count(Filter()),
                     lambda: backend.list(Filter(), 10, None, True)):
            with pytest.raises(BackendUnavailable):
                await read()
    finally:
        backend.db.reader = reader
        await backend.close()


async def test_replicas_starting_at_once_on_a_new_postgres_schema_all_open():
    """Several replicas opening the same new schema at the same moment all
    start (creating the schema races like creating its tables)."""
    from conftest import POSTGRES_DSN, fresh_postgres_schema

    from hivemesh.services.artifact.backends.postgres import PostgresBackend

    for _ in range(5):
        async with fresh_postgres_schema() as schema:
            opened = await asyncio.gather(
                *[PostgresBackend.open(POSTGRES_DSN, schema, max_size=2) for _ in range(8)],
                return_exceptions=True)
            for backend in opened:
                if not isinstance(backend, BaseException):
                    await backend.close()
            assert not [b for b in opened if isinstance(b, BaseException)]


async def test_a_read_only_postgres_node_is_unavailable_not_an_internal_error():
    """A standby, or a primary during a failover, refuses writes as a
    read-only transaction: a passing state of the database, answered as an
    outage the client retries (BackendUnavailable: UNAVAILABLE), at start-up
    and on a save alike; reads still answer."""
    from conftest import POSTGRES_DSN, fresh_postgres_schema

    from hivemesh.services.artifact.backends.base import (
        ArtifactRecord, BackendUnavailable, Filter)
    from hivemesh.services.artifact.backends.postgres import PostgresBackend

    read_only = POSTGRES_DSN + ("&" if "?" in POSTGRES_DSN else "?") + \
        "options=-c%20default_transaction_read_only%3Don"
    async with fresh_postgres_schema() as schema:
        with pytest.raises(BackendUnavailable):
            await PostgresBackend.open(read_only, schema, max_size=1)
        backend = await PostgresBackend.open(POSTGRES_DSN, schema, min_size=1, max_size=1)
        try:
            async with backend._pool.connection() as conn:  # the node turns read-only
                await conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            record = ArtifactRecord(
                artifact_id="art-1", workflow_id="wf", task_id="", agent_id="a",
                artifact_type="code", content="x", metadata_json="{}", create_time_us=1,
                size_bytes=1, sha256="0" * 64)
            with pytest.raises(BackendUnavailable):
                await backend.save(record, "req-1", "fp")
            assert await backend.count(Filter(workflow_id="wf")) == 0
        finally:
            await backend.close()


# -- answers to request ids are kept for the request TTL, then forgotten ----

TTL_S = 60
TTL_US = TTL_S * 1_000_000


class FakeClock:
    """Microseconds since the epoch, moved by the test. It starts in 2096,
    far ahead of the wall clock at which the server's own sweeper forgets
    answers, so that sweeper never forgets one a test has timed."""

    def __init__(self) -> None:
        self.now = 4_000_000_000_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def clocked(request, tmp_path, artifact_settings):
    """(client, backend, clock): a server over each backend whose request
    records are timed by ``clock`` and kept for TTL_S."""
    from hivemesh.client import ArtifactClient
    from hivemesh.services.artifact.server import create_server

    from conftest import open_artifact_backend

    clock = FakeClock()
    async with open_artifact_backend(request.param, tmp_path, request_ttl_s=TTL_S,
                                     clock=clock) as backend:
        running, port = await create_server(artifact_settings, backend)
        try:
            async with ArtifactClient(f"127.0.0.1:{port}") as client:
                yield client, backend, clock
        finally:
            await running.shutdown(0)


async def _save(client, request_id: str, content: str = "x"):
    return await client.save(workflow_id="wf-ttl", agent_id="a", artifact_type="code",
                             content=content, request_id=request_id)


async def test_within_the_request_ttl_an_answer_is_kept_and_replayed(clocked):
    client, backend, clock = clocked
    saved_rid, deleted_rid = str(uuid.uuid4()), str(uuid.uuid4())
    first = await _save(client, saved_rid)
    doomed = await _save(client, str(uuid.uuid4()), "doomed")
    assert await client.delete(doomed.artifact.artifact_id, request_id=deleted_rid) is True
    clock.now += TTL_US  # a TTL old: not yet past it
    assert await backend.prune(clock.now, 100) == 0
    again = await _save(client, saved_rid)
    assert again.replayed and again.artifact == first.artifact
    assert await client.delete(doomed.artifact.artifact_id, request_id=deleted_rid) is True
    with pytest.raises(AlreadyExistsError):
        await _save(client, saved_rid, "another request")
    assert await client.count(workflow_id="wf-ttl") == 1


async def test_past_the_request_ttl_an_answer_is_forgotten_and_a_retry_is_a_new_request(
        clocked):
    client, backend, clock = clocked
    saved_rid, deleted_rid = str(uuid.uuid4()), str(uuid.uuid4())
    first = await _save(client, saved_rid)
    doomed = await _save(client, str(uuid.uuid4()), "doomed")
    assert await client.delete(doomed.artifact.artifact_id, request_id=deleted_rid) is True
    clock.now += TTL_US + 1
    assert await backend.prune(clock.now, 100) == 3  # two saves and a delete
    assert await backend.prune(clock.now, 100) == 0
    again = await _save(client, saved_rid)
    assert not again.replayed and again.artifact.artifact_id != first.artifact.artifact_id
    # The artifact of the first answer is untouched.
    assert await client.get(first.artifact.artifact_id) == first.artifact
    assert await client.count(workflow_id="wf-ttl") == 2
    # The delete, asked again, is answered afresh: nothing left to delete.
    assert await client.delete(doomed.artifact.artifact_id, request_id=deleted_rid) is False
    # The new answers are kept for a TTL of their own.
    assert (await _save(client, saved_rid)).artifact == again.artifact
    assert await client.delete(doomed.artifact.artifact_id, request_id=deleted_rid) is False


async def test_past_the_request_ttl_a_retry_is_new_even_before_its_answer_is_forgotten(
        clocked):
    client, _, clock = clocked
    rid = str(uuid.uuid4())
    first = await _save(client, rid)
    clock.now += TTL_US + 1
    # Not a conflict any more: another request may take the id.
    other = await _save(client, rid, "another request")
    assert not other.replayed and other.artifact.content == "another request"
    assert await client.get(first.artifact.artifact_id) == first.artifact
    assert (await _save(client, rid, "another request")).replayed


async def test_answers_are_forgotten_in_bounded_batches_and_artifacts_stay(clocked):
    client, backend, clock = clocked
    saved = [(await _save(client, str(uuid.uuid4()), str(i))).artifact for i in range(5)]
    clock.now += TTL_US // 2
    recent = (await _save(client, str(uuid.uuid4()), "recent")).artifact
    clock.now += TTL_US // 2 + 1  # the five are past the TTL, the recent one is not
    assert [await backend.prune(clock.now, 2) for _ in range(4)] == [2, 2, 1, 0]
    assert [await client.get(a.artifact_id) for a in saved + [recent]] == saved + [recent]


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgres"])
async def test_the_backend_a_server_opens_keeps_answers_for_the_configured_ttl(kind, tmp_path):
    from conftest import POSTGRES_DSN, fresh_postgres_schema

    from hivemesh.services.artifact.server import open_backend

    async with contextlib.AsyncExitStack() as stack:
        options = {}
        if kind == "postgres":
            options = {"postgres_dsn": POSTGRES_DSN,
                       "postgres_schema": await stack.enter_async_context(
                           fresh_postgres_schema())}
        backend = await open_backend(ArtifactSettings(backend=kind, data_dir=tmp_path,
                                                      request_ttl_s=5, **options))
        stack.push_async_callback(backend.close)
        assert backend.request_ttl_us == 5_000_000


# A table as the version before request records were timed created it.
_OLD_SCHEMA = """
CREATE TABLE {p}artifacts (
    artifact_id TEXT PRIMARY KEY, workflow_id TEXT NOT NULL, task_id TEXT NOT NULL,
    agent_id TEXT NOT NULL, artifact_type TEXT NOT NULL, content TEXT NOT NULL,
    metadata_json {json} NOT NULL, create_time_us BIGINT NOT NULL,
    size_bytes BIGINT NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE {p}artifact_requests (
    request_id  TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    artifact_id TEXT NOT NULL);
"""
_OLD_ARTIFACT = ("art-00000000-0000-4000-8000-000000000001", "wf-old", "", "a", "code", "old",
                 "{}", 1_600_000_000_000_000, 3, hashlib.sha256(b"old").hexdigest())
_OLD_REQUESTS = [("rid-save", "fp-save", _OLD_ARTIFACT[0]), ("rid-delete", "fp-delete", "")]


@contextlib.asynccontextmanager
async def _old_sqlite(tmp_path):
    """A directory holding an artifact file of the previous version, and
    how to open a backend on it."""
    import sqlite3

    from hivemesh.services.artifact.backends.sqlite import SqliteBackend

    data_dir = tmp_path / "old"
    data_dir.mkdir()
    with contextlib.closing(sqlite3.connect(data_dir / "artifacts.sqlite3")) as conn:
        conn.executescript(_OLD_SCHEMA.format(p="", json="TEXT"))
        conn.execute("INSERT INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _OLD_ARTIFACT)
        conn.executemany("INSERT INTO artifact_requests VALUES (?, ?, ?)", _OLD_REQUESTS)
        conn.commit()

    async def open_backend(clock):
        return SqliteBackend(data_dir, request_ttl_s=TTL_S, clock=clock)

    yield open_backend


async def _write_as_the_previous_version(schema: str, *, tables: bool = False,
                                         requests=_OLD_REQUESTS) -> None:
    """Into a PostgreSQL schema, as the previous version wrote: its tables
    (with ``tables``, then the old artifact too) and ``requests``."""
    import psycopg
    from conftest import POSTGRES_DSN

    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
        if tables:
            await conn.execute(f'CREATE SCHEMA "{schema}"')
            await conn.execute(_OLD_SCHEMA.format(p=f'"{schema}".', json="JSONB"))
            await conn.execute(f'INSERT INTO "{schema}".artifacts VALUES '
                               "(%s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s)", _OLD_ARTIFACT)
        async with conn.cursor() as cur:
            await cur.executemany(f'INSERT INTO "{schema}".artifact_requests '
                                  "(request_id, fingerprint, artifact_id) VALUES (%s, %s, %s)",
                                  requests)


@contextlib.asynccontextmanager
async def _old_postgres(tmp_path):
    """A schema holding the tables of the previous version, and how to open
    a backend on it."""
    from conftest import POSTGRES_DSN, fresh_postgres_schema

    from hivemesh.services.artifact.backends.postgres import PostgresBackend

    async with fresh_postgres_schema() as schema:
        await _write_as_the_previous_version(schema, tables=True)

        async def open_backend(clock):
            return await PostgresBackend.open(POSTGRES_DSN, schema, request_ttl_s=TTL_S,
                                              clock=clock)

        yield open_backend


@pytest.mark.parametrize("old_storage", [_old_sqlite, _old_postgres], ids=["sqlite", "postgres"])
async def test_storage_of_the_previous_version_keeps_its_answers_for_a_ttl_from_the_upgrade(
        old_storage, tmp_path):
    from hivemesh.services.artifact.backends.base import ArtifactRecord

    clock = FakeClock()
    upgraded_at = clock.now
    old = ArtifactRecord(*_OLD_ARTIFACT)
    retry = dataclasses.replace(old, artifact_id=f"art-{uuid.uuid4()}")
    async with old_storage(tmp_path) as open_backend:
        backend = await open_backend(clock)
        try:
            # Every answer is still there, and a retry of it replays.
            assert await backend.save(retry, "rid-save", "fp-save") == (old, True)
            assert await backend.delete("art-gone", "rid-delete", "fp-delete") is False
            clock.now = upgraded_at + TTL_US
            assert await backend.prune(clock.now, 100) == 0
            assert await backend.save(retry, "rid-save", "fp-save") == (old, True)
        finally:
            await backend.close()
        # Opened again later, the answers keep the time of the upgrade.
        backend = await open_backend(clock)
        try:
            assert await backend.save(retry, "rid-save", "fp-save") == (old, True)
            # A TTL after the upgrade they are forgotten; the artifact is not.
            clock.now += 1
            assert await backend.prune(clock.now, 100) == 2
            assert await backend.get(old.artifact_id) == old
            assert await backend.save(retry, "rid-save", "fp-save") == (retry, False)
            assert await backend.count(Filter()) == 2
        finally:
            await backend.close()


async def test_a_replica_of_the_previous_version_still_records_answers_once_upgraded():
    """Replicas sharing one PostgreSQL schema are upgraded one by one: one
    of the previous version, which writes no time, must still be able to
    record an answer that the upgraded ones replay."""
    from conftest import POSTGRES_DSN, fresh_postgres_schema

    from hivemesh.services.artifact.backends.base import ArtifactRecord
    from hivemesh.services.artifact.backends.postgres import PostgresBackend

    old = ArtifactRecord(*_OLD_ARTIFACT)
    async with fresh_postgres_schema() as schema:
        await _write_as_the_previous_version(schema, tables=True)
        backend = await PostgresBackend.open(POSTGRES_DSN, schema, request_ttl_s=TTL_S)
        try:
            await _write_as_the_previous_version(
                schema, requests=[("rid-later", "fp-later", old.artifact_id)])
            retry = dataclasses.replace(old, artifact_id=f"art-{uuid.uuid4()}")
            assert await backend.save(retry, "rid-later", "fp-later") == (old, True)
            assert await backend.prune(now_us(), 100) == 0
        finally:
            await backend.close()


class _StuckPrune:
    """A memory backend whose prune waits and swallows its cancellation, as
    a client library waiting on its database can."""

    def __init__(self) -> None:
        from hivemesh.services.artifact.backends.memory import MemoryBackend

        self.inner = MemoryBackend()
        self.entered = asyncio.Event()
        self.limits: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def prune(self, now_us: int, limit: int) -> int:
        self.limits.append(limit)
        self.entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass
        return 0


async def test_the_server_sweeps_request_records_and_its_sweeper_stops_on_shutdown(
        artifact_settings, monkeypatch):
    from hivemesh.services.artifact import server

    monkeypatch.setattr(server, "_SWEEP_INTERVAL_S", 0.001)
    backend = _StuckPrune()
    running, _ = await server.create_server(artifact_settings, backend)
    try:
        await asyncio.wait_for(backend.entered.wait(), 30)
        assert backend.limits == [server._PRUNE_BATCH]
        sweepers = [t for t in asyncio.all_tasks() if t.get_name() == "hivemesh.artifact.sweeper"]
        assert len(sweepers) == 1 and not sweepers[0].done()
    finally:
        await asyncio.wait_for(running.shutdown(0), 30)
    assert sweepers[0].done()
    assert backend.limits == [server._PRUNE_BATCH]
