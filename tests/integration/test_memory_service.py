"""The memory service end to end over gRPC: adding, searching (dense,
keyword, hybrid, filters), get/delete/count/forget, history, namespace
isolation, idempotency, errors with their status codes and fields, the
embedder check at start-up, and durability across ``kill -9``."""

from __future__ import annotations

import asyncio

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from conftest import LOCAL_REDIS, REDIS_URL, RedisTarget, drop_redis_prefix, on_redis
from google.protobuf.timestamp_pb2 import Timestamp

from hivemesh.client import (
    AlreadyExistsError, InvalidArgumentError, MemoryClient, ResourceExhaustedError,
    UnavailableError)
from hivemesh.client.memory import any_of, equals, in_range, in_time_range, memory_item, message
from hivemesh.common.v1 import RequestContext
from hivemesh.memory.v1 import (
    Condition, Filter, MemoryServiceStub, NumericRange, SearchMemoriesRequest, SearchMode,
    TimeRange)
from hivemesh.runtime.redis import open_redis
from hivemesh.runtime.settings import ServerSettings
from hivemesh.services.memory.server import create_server, open_backend
from hivemesh.services.memory.settings import MemorySettings

DENSE, KEYWORD, HYBRID = (SearchMode.SEARCH_MODE_DENSE, SearchMode.SEARCH_MODE_KEYWORD,
                          SearchMode.SEARCH_MODE_HYBRID)
NOTES = [
    ("Foxes are quick animals that hunt small prey at night.", "zoo/fox.md",
     {"kind": "note", "priority": 1, "reviewed": True, "due": "2024-03-01T00:00:00Z"}),
    ("The lazy dog sleeps in the warm sun all afternoon.", "zoo/dog.md",
     {"kind": "note", "priority": 2, "reviewed": False, "due": "2024-06-01T00:00:00Z"}),
    ("Qdrant keeps vectors and payloads and answers filtered searches.", "docs/qdrant.md",
     {"kind": "doc", "priority": 3, "reviewed": True, "due": "2024-09-01T00:00:00Z"}),
]


def memory_settings(data_dir: Path, **overrides) -> MemorySettings:
    return MemorySettings(server=ServerSettings(host="127.0.0.1", port=0, grace_period_s=1),
                          data_dir=data_dir, embedding_dimensions=256, **overrides)


@contextlib.asynccontextmanager
async def serve(settings: MemorySettings):
    backend = await open_backend(settings)
    running, port = await create_server(settings, backend)
    try:
        async with MemoryClient(f"127.0.0.1:{port}") as client:
            yield client
    finally:
        await running.shutdown(0)
        await backend.close()


@contextlib.asynccontextmanager
async def redis_prefix(target: RedisTarget = LOCAL_REDIS):
    """A unique key prefix on ``target`` (the local Redis by default), its
    keys dropped afterwards (skips when Redis is absent, except in CI)."""
    prefix = f"hmtest:{uuid.uuid4().hex}:"
    client = await on_redis(target, lambda url: open_redis(url, cluster=target.cluster))
    try:
        yield prefix
    finally:
        await drop_redis_prefix(client, target.key_prefix(prefix))
        await client.aclose()


@pytest.fixture(params=["edge", "qdrant", "qdrant-redis-ledger"])
async def memory(request, tmp_path):
    extra = {"store": "qdrant", "qdrant_location": ":memory:"} \
        if request.param.startswith("qdrant") else {}
    async with contextlib.AsyncExitStack() as stack:
        if request.param.endswith("redis-ledger"):
            extra.update(ledger="redis", redis_url=REDIS_URL,
                         redis_prefix=await stack.enter_async_context(redis_prefix()))
        yield await stack.enter_async_context(
            serve(memory_settings(tmp_path, history_retention=5, **extra)))


async def add_notes(memory: MemoryClient, namespace: str = "zoo", **kwargs):
    return await memory.add([memory_item(text, source_id=src, metadata=meta)
                             for text, src, meta in NOTES], namespace=namespace, **kwargs)


def violations(err) -> dict[str, str]:
    return dict(err.value.field_violations)


# -- adding and reading -----------------------------------------------------
async def test_add_then_get_returns_text_metadata_and_lineage(memory):
    ctx = RequestContext(tenant_id="Acme", workflow_id="wf-1", task_id="t-1", agent_id="coder")
    added = await memory.add([memory_item(
        "Remember the deploy checklist.", source_id="chk", metadata={"team": "ops", "n": 2},
        lineage={"generation_id": "gen-9", "agent_id": "reviewer"})], context=ctx)
    assert (added.namespace, added.item_count, added.chunk_count) == ("acme", 1, 1)
    assert added.embedding_model == "hashing-256" and added.embedding_usage.prompt_tokens > 0
    [chunk_id] = added.items[0].chunk_ids
    got = await memory.get([chunk_id, str(uuid.uuid4()), "not-a-uuid"], context=ctx)
    assert list(got.missing_ids)[1:] == ["not-a-uuid"] and len(got.missing_ids) == 2
    [chunk] = got.chunks
    assert (chunk.chunk_id, chunk.namespace, chunk.text, chunk.source_id) == (
        chunk_id, "acme", "Remember the deploy checklist.", "chk")
    assert (chunk.chunk_index, chunk.chunk_count) == (0, 1)
    assert dict(chunk.metadata) == {"team": "ops", "n": 2.0}
    # Lineage fields the item leaves empty come from the request context.
    assert (chunk.lineage.workflow_id, chunk.lineage.task_id, chunk.lineage.agent_id,
            chunk.lineage.generation_id) == ("wf-1", "t-1", "reviewer", "gen-9")
    assert chunk.create_time.seconds > 0


async def test_long_content_is_chunked_with_overlap(memory):
    text = "\n\n".join(f"Paragraph {i} talks about topic {i}. It has two sentences."
                       for i in range(12))
    added = await memory.add([text], namespace="long", chunk_size_chars=120,
                             chunk_overlap_chars=30)
    ids = list(added.items[0].chunk_ids)
    assert added.chunk_count == len(ids) > 4
    chunks = (await memory.get(ids, namespace="long")).chunks
    assert [c.chunk_index for c in chunks] == list(range(len(ids)))
    assert all(c.chunk_count == len(ids) and len(c.text) <= 120 for c in chunks)
    assert "Paragraph 11" in chunks[-1].text


async def test_retried_add_replays_and_never_duplicates(memory):
    rid = str(uuid.uuid4())
    first = await add_notes(memory, request_id=rid)
    again = await add_notes(memory, request_id=rid)
    assert again.replayed and not first.replayed
    assert [list(i.chunk_ids) for i in again.items] == [list(i.chunk_ids) for i in first.items]
    assert again.embedding_usage.prompt_tokens == 0
    # The same content under a new request id lands on the same chunk ids.
    third = await add_notes(memory)
    assert not third.replayed and third.items[0].chunk_ids == first.items[0].chunk_ids
    assert await memory.count(namespace="zoo") == 3
    with pytest.raises(AlreadyExistsError) as err:
        await memory.add(["something else"], namespace="zoo", request_id=rid)
    assert err.value.reason == "IDEMPOTENCY_CONFLICT"


async def test_replace_source_swaps_a_changed_source(memory):
    old = "First version. " * 30
    new = "Second version, shorter."
    await memory.add([memory_item(old, source_id="readme")], namespace="src",
                     chunk_size_chars=100, no_overlap=True)
    before = await memory.count(namespace="src", where={"source_id": "readme"})
    assert before > 2
    added = await memory.add([memory_item(new, source_id="readme", replace_source=True)],
                             namespace="src")
    assert added.items[0].replaced_chunk_count == before
    assert await memory.count(namespace="src", where={"source_id": "readme"}) == 1
    hits = await memory.search("version", mode="keyword", namespace="src")
    assert [h.chunk.text for h in hits.results] == [new]


async def test_replace_source_keeps_every_chunk_of_its_own_request(memory):
    """Items of one request sharing a source (replacing it or not) are all
    stored; only what was stored before the request is replaced."""
    await memory.add([memory_item("The old text.", source_id="doc")], namespace="src")
    added = await memory.add([
        memory_item("Part one of the new text.", source_id="doc"),
        memory_item("Part two of the new text.", source_id="doc", replace_source=True),
        memory_item("Part three of the new text.", source_id="doc", replace_source=True),
    ], namespace="src")
    assert [i.replaced_chunk_count for i in added.items] == [0, 1, 0]
    ids = [i for item in added.items for i in item.chunk_ids]
    got = await memory.get(ids, namespace="src")
    assert not got.missing_ids and len(got.chunks) == 3
    assert await memory.count(namespace="src", where={"source_id": "doc"}) == 3


async def test_concurrent_replacements_of_a_source_never_leave_it_empty(memory):
    for round_ in range(5):
        await asyncio.gather(*(memory.add(
            [memory_item(f"Version {round_}.{n} of the text.", source_id="doc",
                         replace_source=True)], namespace="race") for n in range(4)))
        assert await memory.count(namespace="race", where={"source_id": "doc"}) >= 1


# -- searching --------------------------------------------------------------
@pytest.mark.parametrize("mode,query,expected", [
    ("dense", "quick foxes hunt at night", "zoo/fox.md"),
    ("keyword", "sleeping dogs", "zoo/dog.md"),
    ("hybrid", "vectors and payloads", "docs/qdrant.md"),
])
async def test_each_mode_finds_the_right_note(memory, mode, query, expected):
    await add_notes(memory)
    response = await memory.search(query, mode=mode, namespace="zoo", limit=3)
    assert response.mode == {"dense": DENSE, "keyword": KEYWORD, "hybrid": HYBRID}[mode]
    assert response.namespace == "zoo"
    top = response.results[0]
    assert top.chunk.source_id == expected and top.score > 0
    assert top.chunk.text and top.chunk.metadata["kind"] in ("note", "doc")


async def test_keyword_and_hybrid_with_only_stop_words(memory):
    await add_notes(memory)
    keyword = await memory.search("the and of", mode="keyword", namespace="zoo")
    assert keyword.mode == KEYWORD and not keyword.results
    hybrid = await memory.search("the and of", mode="hybrid", namespace="zoo")
    assert hybrid.mode == DENSE  # nothing to match by keyword: dense alone


async def test_search_limit_and_score_threshold(memory):
    await add_notes(memory)
    everything = await memory.search("quick foxes", namespace="zoo", limit=10)
    assert len(everything.results) == 3
    assert len((await memory.search("quick foxes", namespace="zoo", limit=1)).results) == 1
    cut = everything.results[0].score - 1e-6
    kept = await memory.search("quick foxes", namespace="zoo", score_threshold=cut)
    assert [r.chunk.chunk_id for r in kept.results] == [everything.results[0].chunk.chunk_id]


@pytest.mark.parametrize("where,expected", [
    ({"metadata.kind": "note"}, {"zoo/fox.md", "zoo/dog.md"}),
    ({"metadata.priority": 3}, {"docs/qdrant.md"}),
    ({"metadata.reviewed": False}, {"zoo/dog.md"}),
    ({"source_id": ["zoo/dog.md", "docs/qdrant.md"]}, {"zoo/dog.md", "docs/qdrant.md"}),
    ([in_range("metadata.priority", gt=1)], {"zoo/dog.md", "docs/qdrant.md"}),
    ([in_time_range("metadata.due", lt=__import__("datetime").datetime(2024, 7, 1))],
     {"zoo/fox.md", "zoo/dog.md"}),
    ([any_of("metadata.kind", ["doc"]), equals("metadata.reviewed", True)], {"docs/qdrant.md"}),
])
async def test_metadata_filters(memory, where, expected):
    await add_notes(memory)
    for mode in ("dense", "keyword", "hybrid"):
        hits = await memory.search("foxes dogs vectors", mode=mode, namespace="zoo",
                                   where=where)
        assert {h.chunk.source_id for h in hits.results} <= expected
    dense = await memory.search("anything", namespace="zoo", where=where)
    assert {h.chunk.source_id for h in dense.results} == expected
    assert await memory.count(namespace="zoo", where=where) == len(expected)


async def test_create_time_filter(memory):
    import datetime as dt
    await add_notes(memory)
    now = dt.datetime.now(dt.UTC)
    assert await memory.count(namespace="zoo", where=[
        in_time_range(gte=now - dt.timedelta(minutes=5))]) == 3
    assert await memory.count(namespace="zoo", where=[
        in_time_range(gte=now + dt.timedelta(minutes=5))]) == 0



async def test_time_bounds_finer_than_a_microsecond_keep_their_meaning(memory):
    """Stored times have microseconds; a bound a nanosecond after a chunk's
    create_time is after it, not on it."""
    added = await memory.add(["A note stored at some microsecond."], namespace="ns-time")
    [chunk] = (await memory.get(added.items[0].chunk_ids, namespace="ns-time")).chunks
    just_after = Timestamp(seconds=chunk.create_time.seconds,
                           nanos=chunk.create_time.nanos + 1)

    def within(**bound) -> Filter:
        return Filter(conditions=[Condition(key="create_time", time_range=TimeRange(**bound))])
    assert await memory.count(namespace="ns-time", where=within(gte=just_after)) == 0
    assert await memory.count(namespace="ns-time", where=within(lt=just_after)) == 1
    assert await memory.count(namespace="ns-time", where=within(gt=just_after)) == 0
    assert await memory.count(namespace="ns-time", where=within(lte=just_after)) == 1

# -- deleting and namespaces ------------------------------------------------
async def test_delete_by_ids_and_by_filter(memory):
    added = await add_notes(memory)
    fox_id = added.items[0].chunk_ids[0]
    assert await memory.delete([fox_id, str(uuid.uuid4()), "junk"], namespace="zoo") == 1
    assert (await memory.get([fox_id], namespace="zoo")).missing_ids == [fox_id]
    assert await memory.delete(where={"metadata.kind": "doc"}, namespace="zoo") == 1
    assert await memory.count(namespace="zoo") == 1
    rid = str(uuid.uuid4())
    assert await memory.delete(where={"metadata.kind": "note"}, namespace="zoo",
                               request_id=rid) == 1
    # The retry answers as the first time did.
    assert await memory.delete(where={"metadata.kind": "note"}, namespace="zoo",
                               request_id=rid) == 1
    assert await memory.count(namespace="zoo") == 0


async def test_namespaces_never_see_each_other(memory):
    a = RequestContext(tenant_id="tenant-a")
    b = RequestContext(tenant_id="tenant-b")
    added_a = await memory.add(["Tenant A secret: the launch code is alpha."], context=a)
    await memory.add(["Tenant B note about launch plans."], context=b)
    secret = added_a.items[0].chunk_ids[0]
    for mode in ("dense", "keyword", "hybrid"):
        hits = await memory.search("launch code alpha", mode=mode, context=b)
        assert hits.namespace == "tenant-b"
        assert all(h.chunk.namespace == "tenant-b" for h in hits.results)
        assert secret not in {h.chunk.chunk_id for h in hits.results}
    assert (await memory.get([secret], context=b)).missing_ids == [secret]
    assert await memory.delete([secret], context=b) == 0
    assert await memory.count(context=a) == 1 and await memory.count(context=b) == 1
    # An explicit namespace wins over the tenant.
    assert await memory.count(namespace="tenant-a", context=b) == 1


async def test_tenants_whose_id_cannot_be_a_namespace_get_one_of_their_own(memory):
    added = await memory.add(["A note of the underscore team."],
                             context=RequestContext(tenant_id="_Team"))
    namespace = added.namespace
    assert namespace.startswith("tenant-") and namespace != "_team"
    assert await memory.count(context=RequestContext(tenant_id="_team")) == 1
    for other in (".team", "-team", "team"):
        assert await memory.count(context=RequestContext(tenant_id=other)) == 0
    # The derived namespace is a namespace like any other.
    assert await memory.count(namespace=namespace) == 1
    assert (await memory.forget(namespace)).deleted_chunk_count == 1


async def test_request_ids_are_scoped_by_namespace(memory):
    request_id = str(uuid.uuid4())
    first = await memory.add(["A note in one namespace."], namespace="one",
                             request_id=request_id)
    other = await memory.add(["Another note elsewhere."], namespace="two",
                             request_id=request_id)
    assert not first.replayed and not other.replayed
    assert await memory.count(namespace="two") == 1
    with pytest.raises(AlreadyExistsError) as err:  # reused in one namespace: a conflict
        await memory.add(["Something else."], namespace="one", request_id=request_id)
    assert err.value.metadata["request_id"] == request_id


async def test_forget_namespace_deletes_chunks_and_sessions(memory):
    await add_notes(memory, namespace="gone")
    await add_notes(memory, namespace="kept")
    await memory.append_history("s1", [("user", "hi")], namespace="gone")
    await memory.append_history("s2", [("user", "hi")], namespace="gone")
    await memory.append_history("s1", [("user", "hi")], namespace="kept")
    rid = str(uuid.uuid4())
    forgot = await memory.forget("gone", request_id=rid)
    assert (forgot.deleted_chunk_count, forgot.deleted_session_count) == (3, 2)
    assert (await memory.forget("gone", request_id=rid)) == forgot
    assert await memory.count(namespace="gone") == 0
    assert (await memory.get_history("s1", namespace="gone")).session_message_count == 0
    assert await memory.count(namespace="kept") == 3
    assert (await memory.get_history("s1", namespace="kept")).session_message_count == 1
    again = await memory.forget("never-used")
    assert (again.deleted_chunk_count, again.deleted_session_count) == (0, 0)


async def test_after_a_forget_the_namespaces_requests_run_again(memory):
    """ForgetNamespace drops the answers to the namespace's adds, deletes and
    appends: the same requests sent again (a re-import under the same ids)
    store, delete and append again instead of replaying answers about data
    that is gone. Its own answer stays, for its retries; other namespaces
    keep theirs."""
    add_id, delete_id, append_id, forget_id = (str(uuid.uuid4()) for _ in range(4))

    async def send(namespace: str):
        added = await memory.add(["Foxes hunt at night.", "Dogs sleep in the sun."],
                                 namespace=namespace, request_id=add_id)
        deleted = await memory.delete([added.items[1].chunk_ids[0]], namespace=namespace,
                                      request_id=delete_id)
        appended = await memory.append_history("s", [("user", "hi")], namespace=namespace,
                                               request_id=append_id)
        return added, deleted, appended

    for namespace in ("gone", "kept"):
        added, deleted, appended = await send(namespace)
        assert not added.replayed and deleted == 1 and not appended.replayed
    forgot = await memory.forget("gone", request_id=forget_id)
    added, deleted, appended = await send("gone")
    assert not added.replayed and deleted == 1 and not appended.replayed
    assert await memory.count(namespace="gone") == 1
    assert (await memory.get_history("s", namespace="gone")).session_message_count == 1
    assert await memory.forget("gone", request_id=forget_id) == forgot  # replayed
    assert await memory.count(namespace="gone") == 1
    added, _, appended = await send("kept")
    assert added.replayed and appended.replayed


# -- conversation history ---------------------------------------------------
async def test_history_fits_the_token_budget_newest_first(memory):
    appended = await memory.append_history("chat", [
        message("system", "You are helpful.", token_count=10),
        message("user", "Question one?", token_count=5),
        message("assistant", "Answer one.", token_count=7),
        message("user", "Question two?", token_count=6)], namespace="h")
    assert len(appended.message_ids) == 4 and appended.session_message_count == 4
    got = await memory.get_history("chat", token_budget=14, namespace="h")
    assert [m.content for m in got.messages] == ["Answer one.", "Question two?"]
    assert (got.total_tokens, got.truncated, got.session_message_count) == (13, True, 4)
    everything = await memory.get_history("chat", namespace="h")
    assert [m.role for m in everything.messages][0] == 1 and not everything.truncated
    assert [m.message_id for m in everything.messages] == list(appended.message_ids)
    assert (await memory.get_history("chat", max_messages=1, namespace="h")).messages[0] \
        .content == "Question two?"
    assert (await memory.get_history("other", namespace="h")).session_message_count == 0


async def test_history_counts_the_session_in_the_snapshot_its_messages_come_from(tmp_path):
    """An append that commits while the SQLite ledger reads a session must
    show in both the messages and the count, or in neither."""
    import sqlite3

    from hivemesh.memory.v1 import HistoryMessage, MessageRole
    from hivemesh.services.memory.ledger import Ledger

    ledger = Ledger(tmp_path)
    try:
        first = [HistoryMessage(role=MessageRole.MESSAGE_ROLE_USER, content="one")]
        await ledger.append("h", "s", first, "r1", "fp1")
        reader, path = ledger.db.reader, tmp_path / "memory" / "ledger.sqlite3"

        class AppendAfterFirstRead:
            """The ledger's reader, with another append committed right after
            its first statement (as the writer thread may)."""
            statements = 0

            def execute(self, *args):
                cursor = reader.execute(*args)
                self.statements += 1
                if self.statements == 1:
                    with contextlib.closing(sqlite3.connect(path)) as other, other:
                        other.execute("INSERT INTO messages VALUES "
                                      "('h', 's', 99, 'm-99', 2, 'two', 1, '', 0)")
                return cursor
        ledger.db.reader = AppendAfterFirstRead()
        messages, _, truncated, stored = await ledger.history("h", "s", 0, 50)
        assert stored == len(messages) and not truncated
    finally:
        ledger.db.reader = reader
        await ledger.close()

async def test_history_appends_alone_do_not_keep_request_answers_past_their_ttl(
        tmp_path, monkeypatch):
    """Answers to request ids are kept for request_ttl_s, also in a ledger
    that only ever sees AppendHistory (the SQLite ledger dropped old
    answers only when another method recorded one)."""
    from hivemesh.memory.v1 import HistoryMessage, MessageRole
    from hivemesh.services.memory import ledger as ledger_module
    from hivemesh.services.memory.ledger import Ledger

    clock = [1_000_000_000]
    monkeypatch.setattr(ledger_module, "now_us", lambda: clock[0])
    ledger = Ledger(tmp_path, request_ttl_s=60)
    try:
        said = [HistoryMessage(role=MessageRole.MESSAGE_ROLE_USER, content="hi")]
        first = await ledger.append("h", "s", said, "r1", "fp")
        clock[0] += 61_000_000
        await ledger.append("h", "s", said, "r2", "fp")
        (kept,) = ledger.db.reader.execute("SELECT count(*) FROM requests").fetchone()
        assert kept == 1
        # Past its TTL the id is new again, as in the Redis ledger.
        again = await ledger.append("h", "s", said, "r1", "fp")
        assert not again.replayed and again.message_ids != first.message_ids
    finally:
        await ledger.close()

async def test_an_answer_past_its_ttl_is_neither_replayed_nor_a_conflict(
        tmp_path, monkeypatch):
    """A request id whose answer is older than request_ttl_s is new again
    (as in the Redis ledger), also when nothing was written since."""
    from hivemesh.services.memory import ledger as ledger_module
    from hivemesh.services.memory.ledger import Ledger

    clock = [1_000_000_000]
    monkeypatch.setattr(ledger_module, "now_us", lambda: clock[0])
    ledger = Ledger(tmp_path, request_ttl_s=60)
    try:
        await ledger.remember("DeleteMemories", "ns", "r1", "fp", b"first")
        assert await ledger.replay("DeleteMemories", "ns", "r1", "fp") == b"first"
        clock[0] += 61_000_000
        assert await ledger.replay("DeleteMemories", "ns", "r1", "fp") is None
        assert await ledger.replay("DeleteMemories", "ns", "r1", "other") is None
    finally:
        await ledger.close()


async def test_answers_are_recorded_with_the_longest_request_ttl(tmp_path):
    """The longest request TTL the settings take still fits the ledger's
    times (a far longer one made every recorded write fail)."""
    from hivemesh.runtime.settings import MAX_RETENTION_S

    async with serve(memory_settings(tmp_path, request_ttl_s=MAX_RETENTION_S)) as memory:
        rid = str(uuid.uuid4())
        first = await memory.add(["kept for years"], namespace="ttl", request_id=rid)
        assert (await memory.add(["kept for years"], namespace="ttl", request_id=rid)).replayed
        assert not first.replayed
        await memory.append_history("s", [("user", "hi")], namespace="ttl", request_id=rid)


async def test_history_estimates_tokens_and_keeps_the_retention_limit(memory):
    await memory.append_history("s", [("user", "x" * 40)], namespace="h")
    [m] = (await memory.get_history("s", namespace="h")).messages
    assert m.token_count == 10  # estimated: about four characters per token
    await memory.append_history("s", [("user", f"m{i}") for i in range(7)], namespace="h")
    got = await memory.get_history("s", namespace="h")
    assert got.session_message_count == 5  # the fixture keeps five per session
    assert [m.content for m in got.messages] == [f"m{i}" for i in range(2, 7)]


async def test_history_answers_stay_within_the_message_limit(tmp_path):
    settings = memory_settings(tmp_path)
    settings.server.max_message_bytes = 256 * 1024  # a history answer carries 128 KiB
    async with serve(settings) as memory:
        for i in range(5):
            await memory.append_history("big", [message("user", str(i) * (50 * 1024))],
                                        namespace="h")
        got = await memory.get_history("big", namespace="h")
        assert got.truncated and got.session_message_count == 5
        assert [m.content[0] for m in got.messages] == ["3", "4"]  # the newest that fit


async def test_answers_too_large_for_a_message_fail_with_payload_too_large(tmp_path):
    settings = memory_settings(tmp_path)
    settings.server.max_message_bytes = 256 * 1024  # an answer carries up to 192 KiB
    async with serve(settings) as memory:
        long = [f"{n} " + "lorem ipsum " * 2665 for n in range(8)]  # about 32,000 characters
        added = await memory.add(long, namespace="big", whole_item=True)
        ids = [item.chunk_ids[0] for item in added.items]
        assert len((await memory.get(ids[:4], namespace="big")).chunks) == 4
        for call in (lambda: memory.get([ids[0]] * 7, namespace="big"),
                     lambda: memory.get(ids, namespace="big"),
                     lambda: memory.search("lorem ipsum", mode="keyword", namespace="big",
                                           limit=8)):
            with pytest.raises(ResourceExhaustedError) as err:
                await call()
            assert err.value.reason == "PAYLOAD_TOO_LARGE"
            assert err.value.metadata["limit_bytes"] == str(192 * 1024)
            assert int(err.value.metadata["size_bytes"]) > 192 * 1024
        assert len((await memory.search("lorem ipsum", namespace="big", limit=4)).results) == 4


async def test_retried_append_appends_once(memory):
    rid = str(uuid.uuid4())
    first = await memory.append_history("s", [("user", "once")], namespace="h", request_id=rid)
    again = await memory.append_history("s", [("user", "once")], namespace="h", request_id=rid)
    assert again.replayed and again.message_ids == first.message_ids
    assert (await memory.get_history("s", namespace="h")).session_message_count == 1
    with pytest.raises(AlreadyExistsError):
        await memory.append_history("s", [("user", "twice")], namespace="h", request_id=rid)


async def test_a_retried_append_may_stamp_the_fields_the_service_assigns(memory):
    """message_id and create_time are assigned by the service and ignored in
    AppendHistory: a retry that differs only in them is the same request."""
    from hivemesh.memory.v1 import AppendHistoryRequest, HistoryMessage, MessageRole

    stub = MemoryServiceStub(memory.channel)

    def attempt(n: int) -> AppendHistoryRequest:
        return AppendHistoryRequest(
            request_id="h-1", namespace="h", session_id="s", messages=[HistoryMessage(
                role=MessageRole.MESSAGE_ROLE_USER, content="hello", message_id=f"local-{n}",
                create_time=Timestamp(seconds=1_700_000_000 + n))])
    first = await stub.AppendHistory(attempt(1))
    again = await stub.AppendHistory(attempt(2))
    assert again.replayed and again.message_ids == first.message_ids
    assert (await memory.get_history("s", namespace="h")).session_message_count == 1


# -- errors -----------------------------------------------------------------
async def test_bad_requests_name_the_field(memory):
    cases = [
        (lambda: memory.add([""], namespace="e"), "items[0].content"),
        (lambda: memory.add(["   \n "], namespace="e"), "items[0].content"),
        (lambda: memory.add(["x"], namespace="Bad Namespace"), "namespace"),
        (lambda: memory.add(["x"], namespace="e", chunk_size_chars=100, chunk_overlap_chars=100),
         "chunking.chunk_overlap_chars"),
        (lambda: memory.add([memory_item("x", replace_source=True)], namespace="e"),
         "items[0].replace_source"),
        (lambda: memory.search("q", namespace="e", where=[Condition(key="payload.secret",
                                                            equals_string="x")]),
         "filter.conditions[0].key"),
        (lambda: memory.search("q", namespace="e", where=[Condition(key="metadata.n",
                                                            range=NumericRange())]),
         "filter.conditions[0].range"),
        (lambda: memory.count(namespace="e", where=[in_range("metadata.n", gt=5, lt=1)]),
         "filter.conditions[0].range"),
        (lambda: memory.search("q", namespace="e", limit=0), "limit"),
        (lambda: memory.search(" \n\t ", namespace="e"), "query"),
        (lambda: memory.search("   ", namespace="e", mode="keyword"), "query"),
        (lambda: memory.search("q", namespace="e", where=[Condition(
            key="create_time", time_range=TimeRange(gte=Timestamp(seconds=-99999999999999)))]),
         "filter.conditions[0].time_range.gte"),
        (lambda: memory.count(namespace="e", where=[Condition(
            key="create_time", time_range=TimeRange(lt=Timestamp(seconds=10, nanos=-5)))]),
         "filter.conditions[0].time_range.lt"),
        (lambda: memory.add(["fine", memory_item("x", metadata={"score": float("nan")})],
                            namespace="e"), "items[1].metadata"),
        (lambda: memory.delete(where=Filter(), namespace="e"), "filter"),
        (lambda: memory.append_history("s", [message(0, "no role")], namespace="e"),
         "messages[0].role"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidArgumentError) as err:
            await call()
        assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert field in violations(err), (field, violations(err))


async def test_oversized_requests_are_payload_too_large(tmp_path):
    settings = memory_settings(tmp_path, max_chunk_chars=100, max_chunks_per_request=5,
                               chunk_size_chars=100, chunk_overlap_chars=10)
    async with serve(settings) as memory:
        with pytest.raises(InvalidArgumentError) as err:
            await memory.add(["y" * 101], namespace="e", whole_item=True)
        assert err.value.reason == "PAYLOAD_TOO_LARGE"
        assert "items[0].content" in violations(err)
        with pytest.raises(InvalidArgumentError) as err:
            await memory.add(["word " * 200], namespace="e", chunk_size_chars=100,
                             no_overlap=True)
        assert err.value.reason == "PAYLOAD_TOO_LARGE" and "items" in violations(err)
        assert await memory.count(namespace="e") == 0


async def test_an_add_whose_answer_cannot_fit_a_message_is_refused_before_storing(tmp_path):
    """An add answers a chunk id per chunk: one with more chunks than a
    message can carry ids for is refused with the sizes before anything is
    stored (stored, it could never be answered, nor replayed to a retry)."""
    settings = memory_settings(tmp_path)
    settings.server.max_message_bytes = 256 * 1024  # an answer carries up to 192 KiB
    async with serve(settings) as memory:
        text = " ".join(f"w{i:05d}" for i in range(18_000))  # about 6,000 chunks of 20
        rid = str(uuid.uuid4())
        for _ in range(2):  # a retry is refused alike
            with pytest.raises(ResourceExhaustedError) as err:
                await memory.add([text], namespace="big", chunk_size_chars=20,
                                 no_overlap=True, request_id=rid)
            assert err.value.reason == "PAYLOAD_TOO_LARGE"
            assert err.value.metadata["limit_bytes"] == str(192 * 1024)
            assert int(err.value.metadata["size_bytes"]) > 192 * 1024
        assert await memory.count(namespace="big") == 0
        added = await memory.add([text[:40_000]], namespace="big", chunk_size_chars=20,
                                 no_overlap=True)
        assert added.chunk_count > 1000


async def test_a_chunk_size_above_the_largest_chunk_is_refused(tmp_path):
    """max_chunk_chars is the longest chunk the embedder takes: a request
    asking for longer chunks is refused like a whole item that long."""
    settings = memory_settings(tmp_path, max_chunk_chars=100, chunk_size_chars=80,
                               chunk_overlap_chars=10)
    async with serve(settings) as memory:
        with pytest.raises(InvalidArgumentError) as err:
            await memory.add(["word " * 100], namespace="e", chunk_size_chars=500)
        assert err.value.reason == "PAYLOAD_TOO_LARGE"
        assert "chunking.chunk_size_chars" in violations(err)
        assert await memory.count(namespace="e") == 0
        added = await memory.add(["word " * 100], namespace="e", chunk_size_chars=100)
        got = await memory.get(list(added.items[0].chunk_ids), namespace="e")
        assert all(len(c.text) <= 100 for c in got.chunks)
    with pytest.raises(ValueError, match="max_chunk_chars"):
        memory_settings(tmp_path, max_chunk_chars=100)  # the default chunk size is 2000


async def test_hybrid_scores_stay_within_the_contract_range_for_any_rrf_constant(tmp_path):
    """The contract gives fused scores in 0..1; with an RRF constant of 1 a
    result first on both sides would score 2, so the lowest constant is 2."""
    with pytest.raises(ValueError, match="rrf_k"):
        memory_settings(tmp_path, rrf_k=1)
    async with serve(memory_settings(tmp_path, rrf_k=2)) as memory:
        await add_notes(memory)
        top = (await memory.search(NOTES[0][0], mode="hybrid", namespace="zoo")).results[0]
        assert top.chunk.source_id == NOTES[0][1] and 0 < top.score <= 1


async def test_unspecified_mode_means_dense(memory):
    await add_notes(memory)
    stub = MemoryServiceStub(memory.channel)
    response = await stub.SearchMemories(SearchMemoriesRequest(
        namespace="zoo", query="foxes", limit=2))
    assert response.mode == DENSE and len(response.results) == 2


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_unreachable_qdrant_is_unavailable_and_stores_nothing(tmp_path):
    from qdrant_client import AsyncQdrantClient

    from hivemesh.services.memory.store.qdrant import QdrantStore

    settings = memory_settings(tmp_path, store="qdrant", qdrant_location=":memory:")
    backend = await open_backend(settings)
    working = backend.store
    # The collection exists; then the server goes away.
    port = _closed_port()
    backend.store = QdrantStore(AsyncQdrantClient(url=f"http://127.0.0.1:{port}",
                                                  prefer_grpc=True, grpc_port=port, timeout=2,
                                                  check_compatibility=False),
                                "memories", working.info, "127.0.0.1", local=False)
    running, server_port = await create_server(settings, backend)
    try:
        async with MemoryClient(f"127.0.0.1:{server_port}") as memory:
            rid = str(uuid.uuid4())
            with pytest.raises(UnavailableError) as err:
                await memory.add(["will not be stored"], namespace="u", request_id=rid)
            assert err.value.reason == "BACKEND_UNAVAILABLE"
            with pytest.raises(UnavailableError):
                await memory.search("anything", namespace="u")
            with pytest.raises(UnavailableError):
                await memory.count(namespace="u")
        # Nothing was recorded as done: once the store is back, the retry stores.
        await backend.store.close()
        backend.store = working
        await running.shutdown(0)
        running, server_port = await create_server(settings, backend)
        async with MemoryClient(f"127.0.0.1:{server_port}") as memory:
            retried = await memory.add(["will not be stored"], namespace="u", request_id=rid)
            assert not retried.replayed and await memory.count(namespace="u") == 1
    finally:
        await running.shutdown(0)
        await backend.close()


class _RefusingQdrant:
    """A Qdrant server (qdrant-client's local mode) that answers every call
    from the service with ``error``, as qdrant-client raises it."""

    def __init__(self, client, error: Exception) -> None:
        self.client = client
        self.error = error

    def __getattr__(self, name):
        async def refuse(*args, **kwargs):
            raise self.error
        return refuse

    async def close(self) -> None:
        await self.client.close()


def _rpc_error(code: grpc.StatusCode, details: str, trailers=()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers),
                                details=details)


def _rest_error(status: int, text: str, headers: dict | None = None):
    import json

    import httpx
    from qdrant_client.http.exceptions import UnexpectedResponse
    return UnexpectedResponse(status, "", json.dumps({"status": {"error": text}}).encode(),
                              httpx.Headers(headers or {}))


def _rate_limited_with_wait():
    from qdrant_client.common.client_exceptions import ResourceExhaustedResponse
    return ResourceExhaustedResponse("Rate limiting exceeded: Write rate limit exceeded", 7)


# (what the server answers, the status, reason and words of the service's error)
_REFUSALS = [
    (lambda: _rpc_error(grpc.StatusCode.INVALID_ARGUMENT,
                        'Bad request: Index required but not found for "metadata.kind"'),
     grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_ERROR", "refused the request as invalid"),
    (lambda: _rpc_error(grpc.StatusCode.INVALID_ARGUMENT,
                        "Wrong input: Vector dimension error: expected dim: 384, got 256"),
     grpc.StatusCode.FAILED_PRECONDITION, "UPSTREAM_ERROR", "does not take the vectors"),
    (lambda: _rpc_error(grpc.StatusCode.INVALID_ARGUMENT,
                        "Wrong input: Not existing vector name error: bm25"),
     grpc.StatusCode.FAILED_PRECONDITION, "UPSTREAM_ERROR", "does not take the vectors"),
    (lambda: _rpc_error(grpc.StatusCode.NOT_FOUND,
                        "Not found: Collection `memories` doesn't exist!"),
     grpc.StatusCode.FAILED_PRECONDITION, "UPSTREAM_ERROR", "restart the service"),
    (lambda: _rpc_error(grpc.StatusCode.FAILED_PRECONDITION,
                        "Storage locked: write operations are forbidden"),
     grpc.StatusCode.FAILED_PRECONDITION, "UPSTREAM_ERROR", "cannot serve the request"),
    (lambda: _rpc_error(grpc.StatusCode.UNAUTHENTICATED, "Invalid api-key"),
     grpc.StatusCode.FAILED_PRECONDITION, "UPSTREAM_AUTH_FAILED", "QDRANT_API_KEY"),
    (lambda: _rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "Rate limiting exceeded: Read rate limit exceeded"),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED", "over its rate limit"),
    (lambda: _rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "Rate limiting exceeded",
                        [("retry-after", "3")]),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED", "retry after 3 s"),
    (_rate_limited_with_wait,
     grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED", "retry after 7 s"),
    # A message over gRPC's size limit is no rate limit: never worth a retry.
    (lambda: _rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "Received message larger than max (70000000 vs. 67108864)"),
     grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_ERROR", "larger than max"),
    (lambda: _rpc_error(grpc.StatusCode.INTERNAL,
                        "Service internal error: No space left on device"),
     grpc.StatusCode.INTERNAL, "UPSTREAM_ERROR", "No space left on device"),
    (lambda: _rest_error(400, "Wrong input: Vector dimension error: expected dim: 384, got 256"),
     grpc.StatusCode.FAILED_PRECONDITION, "UPSTREAM_ERROR", "HTTP 400"),
    (lambda: _rest_error(400, "Bad request: Limit exceeded 100 > 10 for \"limit\""),
     grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_ERROR", "Limit exceeded"),
    (lambda: _rest_error(404, "Not found: Collection `memories` doesn't exist!"),
     grpc.StatusCode.FAILED_PRECONDITION, "UPSTREAM_ERROR", "restart the service"),
    (lambda: _rest_error(429, "Rate limiting exceeded", {"Retry-After": "3"}),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED", "retry after 3 s"),
    # Still transient: the client's retry policy retries these.
    (lambda: _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
     grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE", "DEADLINE_EXCEEDED"),
    (lambda: _rest_error(503, "Service Unavailable"),
     grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE", "503"),
    (lambda: _rest_error(408, "Timeout: Operation 'search' timed out after 10s"),
     grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE", "408"),
]


async def _every_call_fails(memory, rid: str, code, reason: str, words: str) -> list:
    """Adds (under ``rid``), searches and counts, each failing with
    ``code``, ``reason`` and ``words``; returns their errors."""
    from hivemesh.client.errors import HivemeshError

    calls = [lambda: memory.add(["refused"], namespace="u", request_id=rid),
             lambda: memory.search("refused", namespace="u", mode="hybrid"),
             lambda: memory.count(namespace="u", where={"metadata.kind": "note"})]
    failures = []
    for call in calls:
        with pytest.raises(HivemeshError) as err:
            await call()
        assert err.value.code == code, err.value
        assert err.value.reason == reason, err.value
        assert err.value.domain == "hivemesh.memory"
        assert words in err.value.message
        failures.append(err.value)
    return failures


@pytest.mark.parametrize(("error", "code", "reason", "words"), _REFUSALS)
async def test_a_qdrant_server_refusing_a_call_is_answered_with_the_matching_status(
        tmp_path, error, code, reason, words):
    """A Qdrant server's answer that is not a passing failure is no
    UNKNOWN or INTERNAL error without a word: the request the server finds
    invalid is INVALID_ARGUMENT; a collection that is gone or does not take
    the service's vectors, a locked server and refused credentials are
    FAILED_PRECONDITION; its rate limit is RESOURCE_EXHAUSTED with the wait;
    its own failure INTERNAL; each with the server's words and ErrorInfo.
    Nothing is recorded for replay."""
    settings = memory_settings(tmp_path, store="qdrant", qdrant_location=":memory:")
    backend = await open_backend(settings)
    server = backend.store.inner
    local = server.client
    server.client = _RefusingQdrant(local, error())
    running, port = await create_server(settings, backend)
    try:
        async with MemoryClient(f"127.0.0.1:{port}") as memory:
            rid = str(uuid.uuid4())
            for err in await _every_call_fails(memory, rid, code, reason, words):
                assert err.metadata["backend"] == "memory store"
                assert "Qdrant at " in err.message or "collection at " in err.message
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    # The server's wait, else a second.
                    wait = float(words.split()[-2]) if words.startswith("retry") else 1.0
                    assert float(err.metadata["retry_after_s"]) == wait
                    assert err.retry_delay.total_seconds() == wait
        server.client = local
        async with MemoryClient(f"127.0.0.1:{port}") as memory:
            retried = await memory.add(["refused"], namespace="u", request_id=rid)
            assert not retried.replayed and await memory.count(namespace="u") == 1
    finally:
        await running.shutdown(0)
        await backend.close()


class _FailingShard:
    """The embedded engine's shard, failing every call with ``error`` as the
    binding raises it (a bare Exception naming the engine's kind of error,
    or a ValueError)."""

    def __init__(self, shard, error: Exception) -> None:
        self.shard = shard
        self.error = error

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise self.error
        return fail


# (what the engine raises, the status, reason and words of the service's error)
_ENGINE_FAILURES = [
    (Exception("Vector dimension error: expected dim: 384, got 256"),
     grpc.StatusCode.FAILED_PRECONDITION, "UPSTREAM_ERROR", "does not take the vectors"),
    (Exception("Wrong input: Not existing vector name error: bm25"),
     grpc.StatusCode.FAILED_PRECONDITION, "UPSTREAM_ERROR", "does not take the vectors"),
    (Exception("Bad request: Index required but not found"),
     grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_ERROR", "refused the request as invalid"),
    (ValueError("failed to parse date-time: input contains invalid characters"),
     grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_ERROR", "failed to parse date-time"),
    (Exception("Service internal error: No space left on device"),
     grpc.StatusCode.INTERNAL, "UPSTREAM_ERROR", "No space left on device"),
    (Exception("Inconsistent storage: segment 3 is missing"),
     grpc.StatusCode.INTERNAL, "UPSTREAM_ERROR", "segment 3 is missing"),
    (Exception("Timeout error: the update timed out"),
     grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE", "timed out"),
    (Exception("Service runtime error: Shard is not initialized"),
     grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE", "not initialized"),
    # Not the engine's: a bug stays a bug, with no internals in the answer.
    (AttributeError("'NoneType' object has no attribute 'points'"),
     grpc.StatusCode.INTERNAL, "INTERNAL", ""),
]


@pytest.mark.parametrize(("error", "code", "reason", "words"), _ENGINE_FAILURES)
async def test_the_embedded_engine_failing_a_call_is_answered_with_the_matching_status(
        tmp_path, error, code, reason, words):
    """The embedded engine's errors are told apart as a Qdrant server's
    are: a shard that does not take the service's vectors is
    FAILED_PRECONDITION, a request it refuses INVALID_ARGUMENT, a call it
    could not do now UNAVAILABLE, its own failure (storage, disk) INTERNAL
    with its words; each with ErrorInfo. Nothing is recorded for replay."""
    settings = memory_settings(tmp_path)
    backend = await open_backend(settings)
    engine = backend.store.inner
    shard = engine.shard
    running, port = await create_server(settings, backend)
    try:
        async with MemoryClient(f"127.0.0.1:{port}") as memory:
            engine.shard = _FailingShard(shard, error)
            rid = str(uuid.uuid4())
            for err in await _every_call_fails(memory, rid, code, reason, words):
                if reason != "INTERNAL":
                    assert err.metadata["backend"] == "memory store"
                else:
                    assert str(error) not in err.message
            engine.shard = shard
            retried = await memory.add(["refused"], namespace="u", request_id=rid)
            assert not retried.replayed and await memory.count(namespace="u") == 1
    finally:
        engine.shard = shard
        await running.shutdown(0)
        await backend.close()


async def test_unreachable_qdrant_at_start_up_fails_clearly(tmp_path):
    from hivemesh.services.memory.store.base import StoreUnavailable
    port = _closed_port()
    settings = memory_settings(tmp_path, store="qdrant",
                               qdrant_url=f"http://127.0.0.1:{port}", qdrant_grpc_port=port,
                               qdrant_timeout_s=2)
    with pytest.raises(StoreUnavailable, match=r"Qdrant at http://127.0.0.1:\d+ .*: UNAVAILABLE: "):
        await open_backend(settings)


# -- the LLM service's embeddings -------------------------------------------
async def test_embeddings_from_the_llm_service(tmp_path):
    from hivemesh.services.llm.server import Backends
    from hivemesh.services.llm.server import create_server as create_llm_server
    from hivemesh.services.llm.settings import LlmSettings

    llm_settings = LlmSettings(server=ServerSettings(port=0, grace_period_s=1))
    llm_backends = Backends(llm_settings)
    llm, llm_port = await create_llm_server(llm_settings, llm_backends)
    try:
        settings = memory_settings(tmp_path, llm_address=f"127.0.0.1:{llm_port}")
        async with serve(settings) as memory:
            added = await add_notes(memory)
            assert added.embedding_model.startswith("llm:")
            assert added.embedding_usage.prompt_tokens > 0
            hits = await memory.search("quick foxes hunt at night", namespace="zoo")
            assert hits.results[0].chunk.source_id == "zoo/fox.md"
        # The collection now holds the LLM model's vectors: the hashing
        # embedder is refused at start-up.
        from hivemesh.services.memory.store.base import EmbedderMismatch
        with pytest.raises(EmbedderMismatch, match="llm:"):
            await open_backend(memory_settings(tmp_path, embedder="hashing"))
    finally:
        await llm.shutdown(0)
        await llm_backends.close()


# -- processes: start-up checks and kill -9 ----------------------------------
def _serve_memory(data_dir: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hivemesh.cli.main", "serve", "memory", "--port", "0",
         "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60,
        env={**os.environ, **env})


async def test_another_embedder_is_refused_at_start_up(tmp_path):
    async with serve(memory_settings(tmp_path)) as memory:
        await memory.add(["made with 256 dimensions"], namespace="x")
    result = _serve_memory(tmp_path, HIVEMESH_MEMORY_EMBEDDING_DIMENSIONS="64")
    assert result.returncode == 1
    assert "listening" not in result.stdout
    assert "'hashing-256' (256 dimensions)" in result.stderr
    assert "'hashing-64' (64 dimensions)" in result.stderr


async def test_a_data_directory_in_use_is_refused_at_start_up_in_one_line(tmp_path):
    """The embedded engine locks its shard: a second service on the same
    data directory stops with a line naming the directory, no traceback."""
    async with serve(memory_settings(tmp_path)) as memory:
        await memory.add(["the first service holds this directory"], namespace="x")
        result = _serve_memory(tmp_path, HIVEMESH_MEMORY_EMBEDDING_DIMENSIONS="256")
    assert result.returncode == 1 and "listening" not in result.stdout
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("memory could not start: ")
    assert f"the memory data directory {tmp_path} is in use by another process" in line


@pytest.mark.parametrize("kind", ["edge", "qdrant-local"])
async def test_a_collection_without_the_keyword_vector_is_refused_at_start_up(tmp_path, kind):
    """A collection made by hand or by an older version without the bm25
    sparse vector: the service does not start (where it would start and fail
    every keyword and hybrid search), and says what is missing where."""
    from test_memory_store import make_collection_without_bm25

    make_collection_without_bm25(kind, tmp_path)
    env = {"HIVEMESH_MEMORY_COLLECTION": "test", "HIVEMESH_MEMORY_EMBEDDING_DIMENSIONS": "256"}
    if kind == "qdrant-local":
        env.update(HIVEMESH_MEMORY_STORE="qdrant",
                   HIVEMESH_MEMORY_QDRANT_LOCATION=str(tmp_path / "qdrant"))
    result = _serve_memory(tmp_path / "edge", **env)
    assert result.returncode == 1
    assert "listening" not in result.stdout
    assert "memory could not start: the memory collection at " in result.stderr
    assert "has no sparse vector 'bm25', which keyword and hybrid search need" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("synchronous", ["full", "normal"])
async def test_acknowledged_memories_survive_kill_9(tmp_path, synchronous):
    from hivemesh.cli.processes import start_service

    env = {"HIVEMESH_MEMORY_EMBEDDING_DIMENSIONS": "256",
           "HIVEMESH_MEMORY_SQLITE_SYNCHRONOUS": synchronous}
    proc = start_service("memory", data_dir=tmp_path, env=env)
    try:
        async with MemoryClient(proc.address) as memory:
            added = await add_notes(memory)
            await memory.append_history("s", [("user", "remember me")], namespace="zoo")
    finally:
        proc.kill()
    proc = start_service("memory", data_dir=tmp_path, env=env)
    try:
        async with MemoryClient(proc.address) as memory:
            ids = [i.chunk_ids[0] for i in added.items]
            got = await memory.get(ids, namespace="zoo")
            assert [c.chunk_id for c in got.chunks] == ids and not got.missing_ids
            hits = await memory.search("sleeping dogs", mode="hybrid", namespace="zoo")
            assert hits.results[0].chunk.source_id == "zoo/dog.md"
            history = await memory.get_history("s", namespace="zoo")
            assert [m.content for m in history.messages] == ["remember me"]
    finally:
        assert proc.stop() == 0
