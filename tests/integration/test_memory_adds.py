"""What AddMemories stores, driven on the servicer itself so that tests can
hold a request at a chosen step: requests that share a request_id, items
that share their text, and the counts the answer reports."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest
from google.protobuf import struct_pb2

from hivemesh.common.v1 import ErrorReason, RequestContext
from hivemesh.memory.v1 import (
    AddMemoriesRequest, Condition, CountMemoriesRequest, Filter, GetMemoriesRequest, Lineage,
    MemoryItem)
from hivemesh.runtime.errors import ServiceError
from hivemesh.runtime.settings import ServerSettings
from hivemesh.services.memory.server import open_backend
from hivemesh.services.memory.servicer import MemoryServicer
from hivemesh.services.memory.settings import MemorySettings


class GatedEmbedder:
    """Embeds with ``inner`` once ``gate`` is open; ``entered`` is set by
    the first call, ``calls`` counts them."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.model, self.dimensions = inner.model, inner.dimensions
        self.max_input, self.input_unit = inner.max_input, inner.input_unit
        self.input_length = inner.input_length
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()
        self.calls = 0

    async def embed(self, texts, **kwargs):
        self.calls += 1
        self.entered.set()
        await self.gate.wait()
        return await self.inner.embed(texts, **kwargs)


@contextlib.asynccontextmanager
async def memory_servicer(tmp_path):
    settings = MemorySettings(server=ServerSettings(port=0), data_dir=tmp_path,
                              embedding_dimensions=64)
    backend = await open_backend(settings)
    embedder = GatedEmbedder(backend.embedder)
    try:
        yield MemoryServicer(backend.store, embedder, backend.ledger), embedder
    finally:
        await backend.close()


def add(items, request_id: str | None = None, namespace: str = "adds") -> AddMemoriesRequest:
    return AddMemoriesRequest(request_id=request_id or str(uuid.uuid4()), namespace=namespace,
                              items=items)


async def stored(servicer, ids) -> dict[str, str]:
    got = await servicer.GetMemories(GetMemoriesRequest(namespace="adds", chunk_ids=ids), None)
    return {c.chunk_id: c.text for c in got.chunks}


async def count(servicer) -> int:
    return (await servicer.CountMemories(CountMemoriesRequest(namespace="adds"), None)).count


async def test_concurrent_requests_under_one_request_id_write_only_the_first(tmp_path):
    async with memory_servicer(tmp_path) as (servicer, embedder):
        old = await servicer.AddMemories(add([
            MemoryItem(content=f"Old text of source {i}.", source_id=f"s{i}")
            for i in range(4)]), None)
        old_ids = [item.chunk_ids[0] for item in old.items]
        request_id = str(uuid.uuid4())
        variants = [add([MemoryItem(content=f"New text of source {i}.", source_id=f"s{i}",
                                    replace_source=True)], request_id) for i in range(4)]
        embedder.gate.clear()
        embedder.calls = 0
        # The variants, then a retry of the first, all while the first embeds.
        calls = [asyncio.ensure_future(servicer.AddMemories(r, None))
                 for r in (*variants, variants[0])]
        await embedder.entered.wait()
        for _ in range(10):  # every other call runs as far as it can
            await asyncio.sleep(0)
        embedder.gate.set()
        results = await asyncio.gather(*calls, return_exceptions=True)

        first, *conflicts, retry = results
        assert not first.replayed and retry.replayed
        assert list(retry.items[0].chunk_ids) == list(first.items[0].chunk_ids)
        assert all(isinstance(c, ServiceError) and
                   c.reason == ErrorReason.ERROR_REASON_IDEMPOTENCY_CONFLICT for c in conflicts)
        assert embedder.calls == 1
        # Only the first request wrote: it replaced its own source, the
        # others' sources keep their old text and nothing new was stored.
        new_ids = [first.items[0].chunk_ids[0]]
        assert await stored(servicer, old_ids + new_ids) == {
            **{old_ids[i]: f"Old text of source {i}." for i in (1, 2, 3)},
            new_ids[0]: "New text of source 0."}
        assert await count(servicer) == 4


async def test_the_same_text_with_other_metadata_or_lineage_is_another_memory(tmp_path):
    def item(kind: str, **lineage) -> MemoryItem:
        metadata = struct_pb2.Struct()
        metadata.update({"kind": kind})
        return MemoryItem(content="Tests pass.", metadata=metadata, lineage=Lineage(**lineage))

    def in_workflow(workflow_id: str) -> CountMemoriesRequest:
        return CountMemoriesRequest(namespace="adds", filter=Filter(conditions=[
            Condition(key="lineage.workflow_id", equals_string=workflow_id)]))

    async with memory_servicer(tmp_path) as (servicer, _):
        note = add([item("note")])
        note.context.CopyFrom(RequestContext(workflow_id="wf-1", agent_id="coder"))
        first = await servicer.AddMemories(note, None)
        verdict = add([item("verdict")])
        verdict.context.CopyFrom(RequestContext(workflow_id="wf-2", agent_id="tester"))
        second = await servicer.AddMemories(verdict, None)
        retagged = await servicer.AddMemories(add([item("note", workflow_id="wf-1",
                                                        agent_id="coder",
                                                        generation_id="gen-7")]), None)
        ids = [r.items[0].chunk_ids[0] for r in (first, second, retagged)]
        assert len(set(ids)) == 3 and await count(servicer) == 3
        got = await servicer.GetMemories(GetMemoriesRequest(namespace="adds", chunk_ids=ids[:1]),
                                         None)
        [chunk] = got.chunks
        assert (chunk.lineage.workflow_id, chunk.lineage.agent_id, chunk.lineage.generation_id,
                dict(chunk.metadata)) == ("wf-1", "coder", "", {"kind": "note"})
        assert (await servicer.CountMemories(in_workflow("wf-1"), None)).count == 2
        # Adding an identical item again writes the same chunk: no duplicate.
        note.request_id = str(uuid.uuid4())
        again = await servicer.AddMemories(note, None)
        assert again.items[0].chunk_ids == first.items[0].chunk_ids and await count(servicer) == 3


async def test_an_item_without_metadata_or_lineage_keeps_its_chunk_id(tmp_path):
    """Ids of plain items are what they were before metadata and lineage
    counted, so such items added again are not stored twice."""
    async with memory_servicer(tmp_path) as (servicer, _):
        added = await servicer.AddMemories(add([MemoryItem(content="A plain note.",
                                                           source_id="notes")]), None)
        assert list(added.items[0].chunk_ids) == ["e681a824-2916-5f66-af3c-46f6f4558a3f"]


async def test_identical_items_of_one_request_are_stored_and_counted_once(tmp_path):
    async with memory_servicer(tmp_path) as (servicer, _):
        twin = MemoryItem(content="Said twice in one request.", source_id="doc")
        added = await servicer.AddMemories(add([
            twin, MemoryItem(content="Said once.", source_id="doc"), twin]), None)
        assert added.item_count == 3 and added.chunk_count == 2 == await count(servicer)
        assert added.items[0].chunk_ids == added.items[2].chunk_ids
        assert set(await stored(servicer, [i for it in added.items for i in it.chunk_ids])) \
            == {added.items[0].chunk_ids[0], added.items[1].chunk_ids[0]}


async def test_a_request_bound_to_exceed_the_chunk_limit_is_refused_before_splitting(
        tmp_path, monkeypatch):
    """Splitting takes about half a second per MiB of small chunks: a
    request that cannot fit the chunk limit, whose items
    hold more non-blank characters than the allowed chunks can, is refused
    before any item is split."""
    import grpc

    from hivemesh.services.memory import servicer as module
    from hivemesh.services.memory.servicer import Limits

    split: list = []
    monkeypatch.setattr(module, "chunk_text", lambda *args: split.append(args) or ["x"])
    async with memory_servicer(tmp_path) as (servicer, embedder):
        servicer = MemoryServicer(servicer.store, embedder, servicer.ledger,
                                  Limits(max_chunks_per_request=10))
        request = add([MemoryItem(content="word " * 100)] * 2)
        request.chunking.chunk_size_chars = 50
        request.chunking.no_overlap = True
        with pytest.raises(ServiceError) as err:
            await servicer.AddMemories(request, None)
        assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.reason == ErrorReason.ERROR_REASON_PAYLOAD_TOO_LARGE
        assert split == [] and await count(servicer) == 0


async def test_splitting_and_keyword_encoding_run_off_the_event_loop(tmp_path, monkeypatch):
    """Splitting and keyword-encoding a large add is seconds of computation:
    it runs in a worker thread, so the service keeps answering meanwhile (a
    small one, inline: the hop would cost it more than the work)."""
    import threading

    from hivemesh.services.memory import servicer as module

    threads: set[str] = set()
    split = module.chunk_text

    def chunk_text(*args):
        threads.add(threading.current_thread().name)
        return split(*args)
    monkeypatch.setattr(module, "chunk_text", chunk_text)
    async with memory_servicer(tmp_path) as (servicer, _):
        encode = servicer.keywords.document

        def document(text):
            threads.add(threading.current_thread().name)
            return encode(text)
        monkeypatch.setattr(servicer.keywords, "document", document)
        await servicer.AddMemories(add([MemoryItem(content="word " * 1000)]), None)
        assert threads == {threading.current_thread().name}  # small: no thread hop
        threads.clear()
        large = "word " * (module.PREPARE_INLINE_CHARS // 5 + 1)
        await servicer.AddMemories(add([MemoryItem(content=large)]), None)
    assert threads and threading.current_thread().name not in threads


async def test_the_configured_default_overlap_is_the_one_used(tmp_path):
    """A request that leaves the chunking to the service gets the service's
    size and overlap, as configured (any overlap below the size is valid)."""
    from hivemesh.memory.v1 import ChunkingOptions
    from hivemesh.services.memory.servicer import Limits

    settings = MemorySettings(server=ServerSettings(port=0), data_dir=tmp_path,
                              embedding_dimensions=64, chunk_size_chars=100,
                              chunk_overlap_chars=60)
    backend = await open_backend(settings)
    try:
        servicer = MemoryServicer(backend.store, backend.embedder, backend.ledger,
                                  Limits(chunk_size_chars=100, chunk_overlap_chars=60))
        text = " ".join(f"w{i:02d}" for i in range(60))
        answer = await servicer.AddMemories(add([MemoryItem(content=text)]), None)
        ids = list(answer.items[0].chunk_ids)
        chunks = [(await stored(servicer, [i]))[i] for i in ids]
        assert len(chunks) > 2
        for before, after in zip(chunks, chunks[1:], strict=False):
            shared = max(k for k in range(len(after) + 1) if before.endswith(after[:k]))
            assert shared > 50, (before, after)
        # Asked for a chunk size of its own, a request still gets an overlap
        # it can have.
        small = add([MemoryItem(content=text)])
        small.chunking.CopyFrom(ChunkingOptions(chunk_size_chars=40))
        assert (await servicer.AddMemories(small, None)).chunk_count > 0
    finally:
        await backend.close()


async def test_a_failing_ledger_database_is_unavailable(tmp_path):
    """A write the SQLite ledger cannot commit (a full or failing disk) is
    UNAVAILABLE, as a Redis ledger outage is, so the call is retried; the
    chunks an add stored meanwhile carry the same ids on the retry."""
    import sqlite3

    import grpc

    from hivemesh.memory.v1 import AppendHistoryRequest, HistoryMessage, MessageRole

    async with memory_servicer(tmp_path) as (servicer, _):
        async def failing(fn):
            raise sqlite3.OperationalError("disk I/O error")
        servicer.ledger.db.write = failing
        history = AppendHistoryRequest(
            request_id="r", namespace="adds", session_id="s",
            messages=[HistoryMessage(role=MessageRole.MESSAGE_ROLE_USER, content="hi")])
        for call in (lambda: servicer.AppendHistory(history, None),
                     lambda: servicer.AddMemories(add([MemoryItem(content="x")]), None)):
            with pytest.raises(ServiceError) as err:
                await call()
            assert err.value.code is grpc.StatusCode.UNAVAILABLE
            assert err.value.reason == ErrorReason.ERROR_REASON_BACKEND_UNAVAILABLE


async def test_a_failing_ledger_read_is_unavailable(tmp_path):
    """Reads of the SQLite ledger (a request's first answer, a session's
    history) that fail are UNAVAILABLE too, like its writes."""
    import sqlite3

    import grpc

    from hivemesh.memory.v1 import ChunkIds, DeleteMemoriesRequest, GetHistoryRequest

    class FailingReader:
        def execute(self, *args):
            raise sqlite3.OperationalError("disk I/O error")

    async with memory_servicer(tmp_path) as (servicer, _):
        reader, servicer.ledger.db.reader = servicer.ledger.db.reader, FailingReader()
        try:
            delete = DeleteMemoriesRequest(request_id="r", namespace="adds",
                                           ids=ChunkIds(chunk_ids=[str(uuid.uuid4())]))
            for call in (lambda: servicer.GetHistory(
                             GetHistoryRequest(namespace="adds", session_id="s"), None),
                         lambda: servicer.DeleteMemories(delete, None)):
                with pytest.raises(ServiceError) as err:
                    await call()
                assert err.value.code is grpc.StatusCode.UNAVAILABLE
        finally:
            servicer.ledger.db.reader = reader
