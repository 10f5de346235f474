"""The memory stores' congruence suite: the embedded Qdrant engine
(qdrant-edge) and a Qdrant server through qdrant-client (its local mode
here; a real Qdrant container where a Docker engine is reachable) run the
same scenarios and must give the same answers."""

from __future__ import annotations

import contextlib
import random
import uuid
from pathlib import Path

import pytest
from conftest import docker_reachable

from hivemesh.runtime.text import hashing_embedding
from hivemesh.services.memory.keywords import KeywordEncoder
from hivemesh.services.memory.store.base import (
    AnyOf, ChunkPoint, EmbedderMismatch, Equals, Mode, NumberRange, Search, TimeRange)

DIMS = 256
KW = KeywordEncoder()
DOCS = [
    ("a", "Foxes are quick animals that hunt at night.", {"kind": "note", "n": 1, "ok": True,
                                                          "authors": [{"name": "ann"}]}),
    ("a", "The lazy dog sleeps in the warm sun all day.", {"kind": "note", "n": 2, "ok": False,
                                                           "tags": ["pets", "sun"]}),
    ("a", "Qdrant stores vectors and payloads for search.", {"kind": "doc", "n": 3, "ok": True,
                                                             "authors": [{"name": "bob"},
                                                                         {"name": "ann"}]}),
    ("a", "Invoices are due at the end of the month.", {"kind": "doc", "n": 4, "ok": False}),
    ("a", "A fox and a dog became good friends in a long story of the old forest.", {"kind": "story", "n": 5, "ok": True}),
    ("b", "Foxes foxes foxes: tenant b writes about foxes too.", {"kind": "note", "n": 1,
                                                                 "ok": True}),
]


def _point(i: int, namespace: str, text: str, metadata: dict) -> ChunkPoint:
    return ChunkPoint(str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{i}")),
                      hashing_embedding(text, DIMS), KW.document(text), {
                          "namespace": namespace, "text": text, "source_id": f"src-{i % 3}",
                          "chunk_index": 0, "chunk_count": 1, "metadata": metadata,
                          "lineage": {"workflow_id": f"wf-{i % 2}", "agent_id": "coder"},
                          "create_time": f"2024-01-0{i + 1}T12:00:00.000000Z",
                          "create_time_us": 0})


POINTS = [_point(i, ns, text, meta) for i, (ns, text, meta) in enumerate(DOCS)]
A_IDS = [p.id for p in POINTS if p.payload["namespace"] == "a"]


@contextlib.asynccontextmanager
async def open_store(kind: str, tmp_path: Path, model: str = "hashing-256", dims: int = DIMS,
                     url: str | None = None, grpc_port: int = 6334):
    if kind == "edge":
        from hivemesh.services.memory.store.edge import EdgeStore
        store = EdgeStore.open(tmp_path / "edge", "test", model, dims)
    else:
        from hivemesh.services.memory.store.qdrant import QdrantStore
        store = (await QdrantStore.open("test", model, dims, url=url, grpc_port=grpc_port)
                 if url else
                 await QdrantStore.open("test", model, dims, path=str(tmp_path / "qdrant")))
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(params=["edge", "qdrant-local"])
async def store(request, tmp_path):
    async with open_store(request.param, tmp_path) as s:
        await s.upsert(POINTS)
        yield s


def _query(text: str, mode: Mode, limit: int = 10, **kwargs) -> Search:
    return Search(mode, limit, dense=hashing_embedding(text, DIMS), sparse=KW.query(text),
                  **kwargs)


async def test_get_sees_only_its_namespace(store):
    found = await store.get("a", [POINTS[0].id, POINTS[5].id, str(uuid.uuid4())])
    assert [f.id for f in found] == [POINTS[0].id]
    assert found[0].payload["text"] == DOCS[0][1]
    assert found[0].payload["metadata"] == DOCS[0][2]
    assert await store.get("b", [POINTS[0].id]) == []


@pytest.mark.parametrize("mode", list(Mode))
async def test_search_stays_in_its_namespace(store, mode):
    hits = await store.search("a", _query("foxes", mode))
    assert hits and {h.id for h in hits} <= set(A_IDS)
    assert all(h.payload["namespace"] == "a" for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


async def test_keyword_search_ranks_by_bm25_within_the_namespace(store):
    hits = await store.search("a", _query("fox", Mode.KEYWORD))
    # Both fox documents match ("foxes" stems to "fox"); no other does.
    assert {h.id for h in hits} == {POINTS[0].id, POINTS[4].id}
    assert all(h.score > 0 for h in hits)


async def test_keyword_scores_ignore_other_namespaces(tmp_path, store):
    before = [(h.id, round(h.score, 5)) for h in await store.search(
        "a", _query("fox", Mode.KEYWORD))]
    await store.upsert([_point(100 + i, "c", "fox fox fox", {}) for i in range(20)])
    after = [(h.id, round(h.score, 5)) for h in await store.search(
        "a", _query("fox", Mode.KEYWORD))]
    assert after == before


async def test_dense_scores_are_cosine_similarities(store):
    [hit] = await store.search("a", _query(DOCS[2][1], Mode.DENSE, limit=1))
    assert hit.id == POINTS[2].id and hit.score == pytest.approx(1.0, abs=1e-4)


async def test_hybrid_fuses_by_reciprocal_rank(store):
    hits = await store.search("a", _query("fox dog friends", Mode.HYBRID, rrf_k=60))
    assert hits[0].id == POINTS[4].id  # first in both lists
    assert hits[0].score == pytest.approx(2 / 60, rel=1e-3)
    assert all(0 < h.score <= 2 / 60 + 1e-6 for h in hits)


async def test_score_threshold_leaves_out_weaker_results(store):
    everything = await store.search("a", _query("fox dog", Mode.DENSE))
    cut = (everything[0].score + everything[-1].score) / 2
    kept = await store.search("a", _query("fox dog", Mode.DENSE, score_threshold=cut))
    assert kept and len(kept) < len(everything)
    assert all(h.score >= cut for h in kept)


@pytest.mark.parametrize("mode", list(Mode))
async def test_a_result_scoring_exactly_the_threshold_is_kept(store, mode):
    """The contract leaves out results scoring below the threshold: one
    scoring exactly it stays, in every mode alike."""
    everything = await store.search("a", _query("fox dog friends", mode))
    assert len(everything) > 1
    for hit in everything:
        kept = await store.search("a", _query("fox dog friends", mode,
                                              score_threshold=hit.score))
        assert hit.id in {k.id for k in kept}
        assert all(k.score >= hit.score for k in kept)

@pytest.mark.parametrize("conditions,expected", [
    ([Equals("metadata.kind", "note")], {0, 1}),
    ([Equals("metadata.n", 3)], {2}),
    ([Equals("metadata.ok", True)], {0, 2, 4}),
    ([Equals("metadata.ok", False)], {1, 3}),
    ([AnyOf("metadata.kind", ("doc", "story"))], {2, 3, 4}),
    ([NumberRange("metadata.n", gte=2, lt=4)], {1, 2}),
    ([NumberRange("metadata.n", gt=4)], {4}),
    ([TimeRange("create_time", gte="2024-01-03T00:00:00Z", lte="2024-01-04T23:00:00Z")],
     {2, 3}),
    ([Equals("lineage.workflow_id", "wf-0"), Equals("metadata.kind", "doc")], {2}),
    ([Equals("source_id", "src-1")], {1, 4}),
    # Objects inside a list: "[]" reaches into them; a plain path does not.
    ([Equals("metadata.authors[].name", "ann")], {0, 2}),
    ([Equals("metadata.authors[].name", "bob")], {2}),
    ([Equals("metadata.authors.name", "ann")], set()),
    # A list of plain values matches when one of them does, with "[]" or not.
    ([Equals("metadata.tags", "sun")], {1}),
    ([Equals("metadata.tags[]", "pets")], {1}),
    ([NumberRange("source_id", gte=0)], set()),  # wrong type for the key: no match
    ([NumberRange("create_time", gte=0)], set()),  # nor on the indexed time field
    ([NumberRange("create_time", lt=2e15), Equals("source_id", "src-1")], set()),
])
async def test_filters_select_the_same_points(store, conditions, expected):
    ids = {POINTS[i].id for i in expected}
    assert await store.count("a", conditions) == len(expected)
    hits = await store.search("a", _query("anything at all", Mode.DENSE, conditions=conditions))
    assert {h.id for h in hits} == ids


async def test_delete_by_ids_only_touches_its_namespace(store):
    assert await store.delete("b", ids=[POINTS[0].id]) == 0
    assert await store.delete("a", ids=[POINTS[0].id, POINTS[5].id]) == 1
    assert await store.count("a") == 4 and await store.count("b") == 1


async def test_delete_by_filter_can_keep_some(store):
    deleted = await store.delete("a", conditions=[Equals("metadata.kind", "note")],
                                 keep_ids=[POINTS[0].id])
    assert deleted == 1
    assert await store.count("a", [Equals("metadata.kind", "note")]) == 1
    assert await store.delete("a") == 4
    assert await store.count("a") == 0 and await store.count("b") == 1


async def test_upsert_of_the_same_ids_replaces(store):
    changed = _point(0, "a", "Completely different words now.", {"kind": "changed"})
    await store.upsert([changed])
    assert await store.count("a") == 5
    [found] = await store.get("a", [changed.id])
    assert found.payload["metadata"] == {"kind": "changed"}


@pytest.mark.parametrize("kind", ["edge", "qdrant-local"])
async def test_reopening_keeps_data_and_refuses_another_embedder(kind, tmp_path):
    async with open_store(kind, tmp_path) as s:
        await s.upsert(POINTS)
    async with open_store(kind, tmp_path) as s:
        assert await s.count("a") == 5
        assert s.info.embedding_model == "hashing-256"
    with pytest.raises(EmbedderMismatch, match="hashing-256.*other-model"):
        async with open_store(kind, tmp_path, model="other-model"):
            pass
    with pytest.raises(EmbedderMismatch, match="32 dimensions"):
        async with open_store(kind, tmp_path, dims=32):
            pass


def make_collection_without_bm25(kind: str, tmp_path: Path, sparse: str | None = None,
                                 idf: bool = False) -> None:
    """A collection of the store ``kind`` where ``open_store`` looks, made
    as by hand or by an older version: the dense vector and the recorded
    embedder right, a point in it, and as sparse vector only ``sparse``
    (with the IDF modifier when ``idf``), if any."""
    import json

    point = POINTS[0]
    if kind == "edge":
        import qdrant_edge as q

        root = tmp_path / "edge" / "memory" / "test"
        root.mkdir(parents=True)
        (root / "collection.json").write_text(json.dumps(
            {"embedding_model": "hashing-256", "dimensions": DIMS}))
        modifier = {"modifier": q.Modifier.Idf} if idf else {}
        shard = q.EdgeShard.create(str(root / "shard"), q.EdgeConfig(
            vectors={"dense": q.EdgeVectorParams(size=DIMS, distance=q.Distance.Cosine)},
            sparse_vectors={sparse: q.EdgeSparseVectorParams(**modifier)} if sparse else {}))
        shard.update(q.UpdateOperation.upsert_points([q.Point(
            uuid.UUID(point.id), {"dense": list(point.dense)}, point.payload)]))
        shard.flush()
        shard.close()
        return
    from qdrant_client import QdrantClient, models

    client = QdrantClient(path=str(tmp_path / "qdrant"))
    client.create_collection(
        "test", vectors_config={"dense": models.VectorParams(size=DIMS,
                                                             distance=models.Distance.COSINE)},
        sparse_vectors_config={sparse: models.SparseVectorParams(
            modifier=models.Modifier.IDF if idf else None)} if sparse else None,
        metadata={"embedding_model": "hashing-256", "dimensions": DIMS})
    client.upsert("test", [models.PointStruct(id=point.id, vector={"dense": list(point.dense)},
                                              payload=point.payload)])
    client.close()


@pytest.mark.parametrize("kind", ["edge", "qdrant-local"])
@pytest.mark.parametrize(("sparse", "idf", "words"), [
    (None, False, "has no sparse vector 'bm25', which keyword and hybrid search need"),
    ("keywords", True, "has no sparse vector 'bm25', which keyword and hybrid search need"),
    ("bm25", False, "has the sparse vector 'bm25' without the IDF modifier")])
async def test_a_collection_without_the_keyword_vector_is_refused_at_opening(
        kind, sparse, idf, words, tmp_path):
    """A collection made by hand or by an older version without the bm25
    sparse vector (or with it but no IDF) would open and then fail, or
    score wrongly, every keyword and hybrid search: opening refuses it,
    naming the collection and the vector, as it refuses another embedder."""
    from hivemesh.services.memory.store.base import VectorsMismatch

    make_collection_without_bm25(kind, tmp_path, sparse, idf)
    with pytest.raises(VectorsMismatch, match=r"the memory collection at .*test.* " + words):
        async with open_store(kind, tmp_path):
            pass


async def test_the_embedded_engine_searches_with_the_threads_it_is_given(tmp_path):
    """search_threads reaches the engine, and a reopened shard takes the
    new value (the engine records its configuration with the shard)."""
    import json

    from hivemesh.services.memory.store.edge import EdgeStore

    config = tmp_path / "edge" / "memory" / "test" / "shard" / "edge_config.json"
    for threads in (2, 1):
        store = EdgeStore.open(tmp_path / "edge", "test", "hashing-256", DIMS,
                               search_threads=threads)
        try:
            await store.upsert(POINTS)
            assert json.loads(config.read_text())["max_search_threads"] == threads
            assert len(await store.search("a", Search(Mode.KEYWORD, 3,
                                                      sparse=KW.query("fox")))) > 0
        finally:
            await store.close()


def _random_vector(rng: random.Random) -> list[float]:
    return [rng.gauss(0, 1) for _ in range(DIMS)]


async def _scenario(store) -> list:
    """Random dense vectors here: texts sharing no word would all score 0
    with the hashing embedder, and equal scores have no defined order."""
    rng = random.Random(7)
    await store.upsert([ChunkPoint(p.id, _random_vector(rng), p.sparse, p.payload)
                        for p in POINTS])
    out: list = []
    for mode in Mode:
        for text in ("fox", "dog sleeps", "vectors search", "month invoices"):
            hits = await store.search("a", Search(mode, 3, dense=_random_vector(rng),
                                                  sparse=KW.query(text)))
            # Equal scores have no defined order: compare them sorted by id.
            out.append((mode.value, text, sorted(((round(h.score, 4), h.id) for h in hits),
                                                 key=lambda x: (-x[0], x[1]))))
    out.append(await store.count("a", [Equals("metadata.ok", True)]))
    out.append(await store.delete("a", conditions=[NumberRange("metadata.n", lte=2)]))
    out.append(sorted(f.id for f in await store.get("a", A_IDS)))
    return out


async def test_both_stores_give_the_same_answers(tmp_path):
    async with open_store("edge", tmp_path) as edge, \
            open_store("qdrant-local", tmp_path) as local:
        assert await _scenario(edge) == await _scenario(local)


@pytest.mark.skipif(not docker_reachable(), reason="no Docker engine reachable")
async def test_a_qdrant_server_gives_the_same_answers(tmp_path):
    from testcontainers.community.qdrant import QdrantContainer

    with QdrantContainer("qdrant/qdrant:latest") as qdrant:
        url = f"http://{qdrant.get_container_host_ip()}:{qdrant.exposed_rest_port}"
        async with open_store("edge", tmp_path) as edge, \
                open_store("qdrant", tmp_path, url=url,
                           grpc_port=int(qdrant.exposed_grpc_port)) as server:
            assert await _scenario(edge) == await _scenario(server)


@pytest.fixture
def synced(monkeypatch):
    """Records the files the embedded store fsyncs and its sync rounds."""
    from hivemesh.services.memory.store import edge

    record = {"files": [], "rounds": 0}
    fsync, segments = edge._fsync, edge._WalSync._fsync_segments

    def counted_fsync(path):
        record["files"].append(Path(path))
        fsync(path)

    def counted_round(self):
        record["rounds"] += 1
        segments(self)
    monkeypatch.setattr(edge, "_fsync", counted_fsync)
    monkeypatch.setattr(edge._WalSync, "_fsync_segments", counted_round)
    return record


async def test_the_embedded_engine_answers_an_update_once_its_log_is_on_disk(tmp_path, synced):
    """The engine's write-ahead log is memory-mapped and never synced while
    it runs: an update is answered only after the store fsynced it."""
    async with open_store("edge", tmp_path) as store:
        await store.upsert(POINTS[:1])
        wal = [f for f in synced["files"] if f.parent.name == "wal"]
        assert any(f.name.startswith("open-") for f in wal)
        assert synced["rounds"] == 1
        await store.delete("a", ids=[POINTS[0].id])
        assert synced["rounds"] == 2
        await store.search("a", _query("fox", Mode.HYBRID))
        await store.get("a", A_IDS)
        assert synced["rounds"] == 2  # reads sync nothing


async def test_concurrent_updates_share_log_syncs(tmp_path, synced):
    import asyncio
    async with open_store("edge", tmp_path) as store:
        await asyncio.gather(*(store.upsert([p]) for p in POINTS))
        assert 1 <= synced["rounds"] <= 2  # one running, one for those that came meanwhile
        assert len(await store.get("a", A_IDS)) == len(A_IDS)


async def test_without_sync_writes_the_log_is_left_to_the_engine(tmp_path, synced):
    from hivemesh.services.memory.store.edge import EdgeStore
    store = EdgeStore.open(tmp_path / "edge", "test", "hashing-256", DIMS, sync_writes=False)
    try:
        await store.upsert(POINTS)
        await store.delete("a", ids=[POINTS[0].id])
        assert synced["rounds"] == 0
    finally:
        await store.close()


async def test_a_failing_log_sync_is_reported_unavailable(tmp_path, monkeypatch):
    from hivemesh.services.memory.store import edge
    from hivemesh.services.memory.store.base import StoreUnavailable

    async with open_store("edge", tmp_path) as store:
        def failing(path):
            raise OSError(5, "Input/output error")
        monkeypatch.setattr(edge, "_fsync", failing)
        with pytest.raises(StoreUnavailable, match="syncing"):
            await store.upsert(POINTS[:1])
        monkeypatch.undo()
        await store.upsert(POINTS[:1])  # the next sync succeeds and covers it
        assert [f.id for f in await store.get("a", [POINTS[0].id])] == [POINTS[0].id]


async def test_a_segment_renamed_during_the_sync_is_synced_under_its_new_name(
        tmp_path, monkeypatch):
    from hivemesh.services.memory.store import edge

    fsync, synced, renamed = edge._fsync, [], []

    def racing(path):
        path = Path(path)
        if path.name.startswith("open-") and not renamed:
            # The engine closes the segment between the listing and the fsync.
            renamed.append((path, path.rename(path.with_name("closed-99"))))
            raise FileNotFoundError(2, "No such file or directory", str(path))
        synced.append(path.name)
        fsync(path)
    async with open_store("edge", tmp_path) as store:
        monkeypatch.setattr(edge, "_fsync", racing)
        await store.upsert(POINTS[:1])
        monkeypatch.undo()
        original, moved = renamed[0]
        moved.rename(original)  # back, for the engine
    assert "closed-99" in synced


async def test_an_update_waiting_for_its_sync_when_the_store_closes_is_unavailable(
        tmp_path, monkeypatch):
    import asyncio
    import threading

    from hivemesh.services.memory.store import edge
    from hivemesh.services.memory.store.base import StoreUnavailable

    store = edge.EdgeStore.open(tmp_path / "edge", "test", "hashing-256", DIMS)
    await store.upsert(POINTS[:1])
    gate = threading.Event()
    segments = edge._WalSync._fsync_segments

    def slow(self):
        gate.wait(10)
        segments(self)
    monkeypatch.setattr(edge._WalSync, "_fsync_segments", slow)
    first = asyncio.create_task(store.upsert(POINTS[1:2]))  # its sync is held at the gate
    await asyncio.sleep(0.05)
    second = asyncio.create_task(store.upsert(POINTS[2:3]))  # waits for the next sync
    await asyncio.sleep(0.05)
    threading.Timer(0.2, gate.set).start()
    await store.close()  # waits for the sync under way
    await first
    with pytest.raises(StoreUnavailable):
        await second


class _IndexRecordingServer:
    """qdrant-client's local mode standing in for a Qdrant server: it
    answers as local mode does, and keeps the payload indexes asked for and
    reports them in the collection's ``payload_schema`` as a server does
    (local mode builds none)."""

    def __init__(self, client) -> None:
        self.client = client
        self.indexes: dict[str, object] = {}
        self.asked: list[str] = []

    def __getattr__(self, name):
        return getattr(self.client, name)

    async def create_payload_index(self, collection, field, schema=None, **kwargs):
        from qdrant_client import models
        self.asked.append(field)
        self.indexes[field] = schema
        return models.UpdateResult(operation_id=0, status=models.UpdateStatus.COMPLETED)

    async def get_collection(self, collection):
        from qdrant_client import models
        info = await self.client.get_collection(collection)
        schema = {}
        for field, kind in self.indexes.items():
            data_type = (models.PayloadSchemaType.KEYWORD
                         if isinstance(kind, models.KeywordIndexParams) else kind)
            schema[field] = models.PayloadIndexInfo(data_type=data_type, points=0)
        return info.model_copy(update={"payload_schema": schema})


async def test_a_server_collection_gets_its_payload_indexes_even_if_made_without_them(
        monkeypatch):
    """A replica that created the collection and stopped before its payload
    indexes leaves it without them: the next replica to open it creates the
    missing ones (keyword for the namespace, source and lineage; datetime
    for create_time), and none that is there already."""
    from qdrant_client import AsyncQdrantClient, models

    from hivemesh.services.memory.store import qdrant
    from hivemesh.services.memory.store.base import DENSE, SPARSE

    local = AsyncQdrantClient(location=":memory:")
    await local.create_collection(
        "test", vectors_config={DENSE: models.VectorParams(size=DIMS,
                                                           distance=models.Distance.COSINE)},
        sparse_vectors_config={SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)},
        metadata={"embedding_model": "hashing-256", "dimensions": DIMS})
    server = _IndexRecordingServer(local)
    monkeypatch.setattr(qdrant, "AsyncQdrantClient", lambda **kwargs: server)
    monkeypatch.setattr(server, "close", lambda: _nothing())
    store = await qdrant.QdrantStore.open("test", "hashing-256", DIMS, url="http://qdrant:6333")
    await store.close()
    keyword = ["source_id", *(f"lineage.{f}" for f in ("workflow_id", "task_id", "agent_id",
                                                       "generation_id", "artifact_id"))]
    assert sorted(server.indexes) == sorted(["namespace", "create_time", *keyword])
    assert server.indexes["namespace"].is_tenant
    assert all(server.indexes[k] == models.PayloadSchemaType.KEYWORD for k in keyword)
    assert server.indexes["create_time"] == models.PayloadSchemaType.DATETIME
    asked = len(server.asked)
    store = await qdrant.QdrantStore.open("test", "hashing-256", DIMS, url="http://qdrant:6333")
    await store.close()
    assert len(server.asked) == asked  # all there: none asked for again
    await local.close()


async def _nothing() -> None:
    return None


async def test_replicas_starting_together_on_a_server_both_open_the_collection(monkeypatch):
    """Two replicas start at once: both see no collection, one creates it
    and the server refuses the other's create (over gRPC, an RPC error);
    that one opens the collection the first made."""
    import grpc
    from qdrant_client import AsyncQdrantClient

    from hivemesh.services.memory.store import qdrant

    local = AsyncQdrantClient(location=":memory:")
    server = _IndexRecordingServer(local)
    monkeypatch.setattr(qdrant, "AsyncQdrantClient", lambda **kwargs: server)
    monkeypatch.setattr(server, "close", lambda: _nothing())
    first = await qdrant.QdrantStore.open("test", "hashing-256", DIMS, url="http://qdrant:6333")
    await first.upsert(POINTS)

    looked: list[str] = []

    async def looked_before_it_was_made(collection):
        looked.append(collection)
        return len(looked) > 1  # the first look came before the other made it

    async def refused(collection, **kwargs):
        raise grpc.aio.AioRpcError(grpc.StatusCode.ALREADY_EXISTS, grpc.aio.Metadata(),
                                   grpc.aio.Metadata(),
                                   details=f"Collection `{collection}` already exists!")
    monkeypatch.setattr(server, "collection_exists", looked_before_it_was_made)
    monkeypatch.setattr(server, "create_collection", refused)
    second = await qdrant.QdrantStore.open("test", "hashing-256", DIMS, url="http://qdrant:6333")
    assert await second.count("a") == 5
    await first.close()
    await second.close()
    await local.close()


async def test_a_server_refusing_the_service_at_start_up_says_why(monkeypatch):
    """Credentials the server refuses are no passing failure and no crash
    without a word: opening fails with a StoreRefused (a ValueError, which
    the command line reports as a configuration problem) naming the server
    and the setting to check."""
    import grpc
    from qdrant_client import AsyncQdrantClient

    from hivemesh.services.memory.store import qdrant
    from hivemesh.services.memory.store.base import Refusal, StoreRefused

    local = AsyncQdrantClient(location=":memory:")
    server = _IndexRecordingServer(local)
    monkeypatch.setattr(qdrant, "AsyncQdrantClient", lambda **kwargs: server)

    async def refused(collection):
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAUTHENTICATED, grpc.aio.Metadata(),
                                   grpc.aio.Metadata(), details="Invalid api-key")
    monkeypatch.setattr(server, "collection_exists", refused)
    with pytest.raises(StoreRefused, match=r"Qdrant at http://qdrant:6333 collection 'test' "
                                           r"refused the service's credentials "
                                           r"\(UNAUTHENTICATED: Invalid api-key\)") as err:
        await qdrant.QdrantStore.open("test", "hashing-256", DIMS, url="http://qdrant:6333")
    assert isinstance(err.value, ValueError) and err.value.refusal is Refusal.CREDENTIALS
