"""The embedded store: the Qdrant engine in-process (``qdrant-edge-py``), one
on-disk shard under the data directory.

Every update goes through the shard's write-ahead log before ``update``
returns, so an acknowledged write survives ``kill -9``; segments are flushed
on close. The log is memory-mapped and the engine never syncs it while it
runs, so a power loss could drop acknowledged updates: with ``sync_writes``
(the service's ``full`` durability, its default) each update is answered only
after the log's segments are fsynced, one fsync for all the updates applied
before it began (group commit).

Engine calls run inline, on the event loop's thread: the binding holds the
interpreter lock for the whole of a call (a search, an upsert, a count), so
a pool of threads would run nothing in parallel with it, neither other
engine calls nor the loop, and would only add a hop to a thread and back
(a tenth of a millisecond or more, more than a short call itself).

The engine builds its HNSW index only when asked (``optimize()``), and the
binding holds the interpreter lock while it does, which would freeze the
whole service for seconds. So the index is built when the store opens,
before the service takes traffic; points added since are searched exactly
(brute force) until the next start. A Qdrant server indexes in the
background instead: use it for large, write-heavy collections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy
import qdrant_edge as q

from hivemesh.services.memory.store.base import (
    DATETIME_INDEXES, DENSE, KEYWORD_INDEXES, NAMESPACE, SPARSE, AnyOf, ChunkPoint,
    CollectionInfo, Condition, Equals, Found, MemoryStore, Mode, NumberRange, Refusal, Search,
    SparseVector, StoreRefused, StoreUnavailable, at_least, check_vectors, typed,
    vectors_refused)

log = logging.getLogger("hivemesh.memory.edge")
T = TypeVar("T")

# The engine raises a bare Exception whose text starts with the kind of its
# error (Qdrant's own error names). What each kind means for a call, besides
# vectors that do not fit the shard (``vectors_refused``):
# - the request as the engine got it;
_INVALID = ("wrong input", "bad request", "bad input", "validation error",
            "payload type does not match", "unable to infer type")
# - the engine could not do it now (a retry may succeed);
_TRANSIENT = ("timeout error", "operation cancelled", "service runtime error: shard is not")
# anything else (storage, memory, its own failure) is the engine failing the
# call: Refusal.FAILED, with its text, which names no secret.


def engine_failure(exc: Exception, where: str) -> StoreRefused | StoreUnavailable | None:
    """What an error the engine raised means for the call; None for an
    error that is not the engine's (a bug here stays a bug)."""
    if type(exc) is not Exception and not isinstance(exc, ValueError):
        return None
    text = str(exc)
    lowered = text.lower()
    kind = text.split(":", 1)[0].strip()[:60] if ":" in text else type(exc).__name__
    mismatch = vectors_refused(where, text, status=kind)
    if mismatch is not None:
        return mismatch
    if isinstance(exc, ValueError) or lowered.startswith(_INVALID):
        return StoreRefused(Refusal.INVALID,
                            f"the embedded engine refused the request as invalid ({text})",
                            status=kind)
    if lowered.startswith(_TRANSIENT):
        return StoreUnavailable(f"the embedded engine at {where} could not answer: {text}")
    return StoreRefused(Refusal.FAILED, f"the embedded engine at {where} failed the call "
                        f"({text})", status=kind)


@contextlib.contextmanager
def _opening(data_dir: Path, shard_path: Path) -> Iterator[None]:
    """Turns the engine's failure to open a shard into a start-up error that
    says what happened: the data directory in use by another process (its
    write-ahead log is locked), an OSError; any other, a ValueError naming
    the shard."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        if type(exc) is not Exception and not isinstance(exc, ValueError):
            raise  # not the engine's: a bug here stays a bug
        said = str(exc)
        if "WouldBlock" in said or "locked" in said.lower():
            raise OSError(f"the memory data directory {data_dir} is in use by another "
                          f"process (another memory service?): {said}") from exc
        raise ValueError(f"the embedded engine could not open the shard {shard_path}: "
                         f"{said}") from exc


def _condition(c: Condition):
    if isinstance(c, Equals):
        # The binding reads a Python bool as the integer 1 or 0 (and then
        # matches no boolean); numpy's bool is read as a boolean.
        value = numpy.bool_(c.value) if isinstance(c.value, bool) else c.value
        return q.FieldCondition(key=c.key, match=q.MatchValue(value))
    if isinstance(c, AnyOf):
        return q.FieldCondition(key=c.key, match=q.MatchAny(list(c.values)))
    if isinstance(c, NumberRange):
        return q.FieldCondition(key=c.key, range=q.RangeFloat(gte=c.gte, gt=c.gt, lte=c.lte,
                                                              lt=c.lt))
    return q.FieldCondition(key=c.key, range=q.RangeDateTime(gte=c.gte, gt=c.gt, lte=c.lte,
                                                             lt=c.lt))


def _filter(namespace: str, conditions: Sequence[Condition] = (), ids: Sequence[str] | None = None,
            keep_ids: Sequence[str] = ()) -> q.Filter:
    must = [q.FieldCondition(key=NAMESPACE, match=q.MatchValue(namespace)),
            *(_condition(c) for c in typed(conditions))]
    if ids is not None:
        must.append(q.HasIdCondition({uuid.UUID(i) for i in ids}))
    must_not = [q.HasIdCondition({uuid.UUID(i) for i in keep_ids})] if keep_ids else None
    return q.Filter(must=must, must_not=must_not)


def _sparse(v: SparseVector) -> q.SparseVector:
    return q.SparseVector(list(v.indices), list(v.values))


class EdgeStore(MemoryStore):
    """Open with :meth:`open`; ``close`` flushes and releases the shard."""

    def __init__(self, shard: q.EdgeShard, root: Path, info: CollectionInfo, *,
                 sync_writes: bool = True) -> None:
        self.shard = shard
        self.root = root
        self.info = info
        self._closed = False
        self._wal = _WalSync(root / "shard" / "wal") if sync_writes else None

    @classmethod
    def open(cls, data_dir: Path, collection: str, model: str, dimensions: int, *,
             build_index: bool = True, search_threads: int = 1, upstream_model: str = "",
             **kwargs) -> EdgeStore:
        """Opens (or creates) the shard; with ``build_index`` the HNSW index
        of points added since the last start is built now (this blocks).
        ``sync_writes`` (default on): updates are answered once on disk.
        ``search_threads``: the engine's threads for one search (1: on the
        calling thread; measured faster than handing it to two threads on a
        two-core machine, for dense and hybrid searches alike)."""
        root = Path(data_dir) / "memory" / collection
        shard_path = root / "shard"
        meta_path = root / "collection.json"
        wanted = CollectionInfo(model, dimensions, upstream_model)
        if meta_path.exists():
            recorded = CollectionInfo.of(json.loads(meta_path.read_text()))
            if recorded.check(wanted, str(root)):
                _write_durably(meta_path, json.dumps(wanted.record()))
        else:
            root.mkdir(parents=True, exist_ok=True)
            _write_durably(meta_path, json.dumps(wanted.record()))
        config = q.EdgeConfig(
            vectors={DENSE: q.EdgeVectorParams(size=dimensions, distance=q.Distance.Cosine)},
            sparse_vectors={SPARSE: q.EdgeSparseVectorParams(modifier=q.Modifier.Idf)},
            max_search_threads=search_threads)
        engine_config = shard_path / "edge_config.json"
        if engine_config.exists():
            # The engine refuses a shard without the service's vectors only
            # with an error that names neither the collection nor a way out.
            _check_shard_vectors(engine_config, str(root))
            with _opening(Path(data_dir), shard_path):
                shard = q.EdgeShard.load(str(shard_path), config)
            if build_index and shard.optimize():
                shard.flush()
                log.info("built the memory index", extra={"points": shard.info().points_count})
        else:
            with _opening(Path(data_dir), shard_path):
                shard = q.EdgeShard.create(str(shard_path), config)
            shard.update(q.UpdateOperation.create_field_index(
                NAMESPACE, q.KeywordIndexParams(is_tenant=True)))
            for key in KEYWORD_INDEXES:
                shard.update(q.UpdateOperation.create_field_index(key,
                                                                  q.PayloadSchemaType.Keyword))
            for key in DATETIME_INDEXES:
                shard.update(q.UpdateOperation.create_field_index(key,
                                                                  q.PayloadSchemaType.Datetime))
            shard.flush()
        return cls(shard, root, wanted, **kwargs)

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise StoreUnavailable("the memory store is closed")
        try:
            return fn()
        except OSError as exc:
            raise StoreUnavailable(f"the embedded engine failed: {exc}") from exc
        except Exception as exc:
            failure = engine_failure(exc, str(self.root))
            if failure is None:
                raise
            raise failure from exc

    async def _update(self, fn: Callable[[], T]) -> T:
        """Runs an update; with ``sync_writes`` returns once it is on disk."""
        result = await self._run(fn)
        if self._wal is not None:
            try:
                await self._wal.durable()
            except OSError as exc:
                raise StoreUnavailable(f"syncing the embedded engine's log failed: {exc}") \
                    from exc
        return result

    async def upsert(self, points: Sequence[ChunkPoint]) -> None:
        def write() -> None:
            self.shard.update(q.UpdateOperation.upsert_points([
                q.Point(uuid.UUID(p.id), {DENSE: list(p.dense), SPARSE: _sparse(p.sparse)},
                        p.payload) for p in points]))
        await self._update(write)

    async def get(self, namespace: str, ids: Sequence[str]) -> list[Found]:
        records = await self._run(lambda: self.shard.retrieve(
            [uuid.UUID(i) for i in ids], with_payload=True, with_vector=False))
        return [Found(str(r.id), r.payload) for r in records
                if r.payload and r.payload.get(NAMESPACE) == namespace]

    async def search(self, namespace: str, search: Search) -> list[Found]:
        flt = _filter(namespace, search.conditions)
        # Keyword statistics (IDF) come from the namespace alone: another
        # tenant's documents never change this tenant's scores.
        idf = (q.SearchParams(idf=q.IdfParams(corpus=_filter(namespace)))
               if search.mode is not Mode.DENSE else None)
        dense = q.Query.Nearest(list(search.dense), using=DENSE) if search.dense else None
        sparse = (q.Query.Nearest(_sparse(search.sparse), using=SPARSE)
                  if search.sparse else None)
        if search.mode is Mode.HYBRID:
            request = q.QueryRequest(
                limit=search.limit, filter=flt, with_payload=True,
                query=q.Fusion.Rrf(k=search.rrf_k),
                prefetches=[q.Prefetch(limit=search.prefetch_limit, query=dense, filter=flt),
                            q.Prefetch(limit=search.prefetch_limit, query=sparse, filter=flt,
                                       params=idf)])
        else:
            keyword = search.mode is Mode.KEYWORD
            request = q.QueryRequest(
                limit=search.limit, filter=flt, with_payload=True,
                query=sparse if keyword else dense,
                params=idf if keyword else None)
        points = await self._run(lambda: self.shard.query(request))
        return at_least([Found(str(p.id), p.payload or {}, p.score) for p in points],
                        search.score_threshold)

    async def count(self, namespace: str, conditions: Sequence[Condition] = ()) -> int:
        request = q.CountRequest(exact=True, filter=_filter(namespace, conditions))
        return await self._run(lambda: self.shard.count(request))

    async def delete(self, namespace: str, *, ids: Sequence[str] | None = None,
                     conditions: Sequence[Condition] = (),
                     keep_ids: Sequence[str] = ()) -> int:
        flt = _filter(namespace, conditions, ids, keep_ids)

        def run() -> int:
            matched = self.shard.count(q.CountRequest(exact=True, filter=flt))
            if matched:
                self.shard.update(q.UpdateOperation.delete_points_by_filter(flt))
            return matched
        return await self._update(run)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._wal is not None:
            self._wal.close()
        self.shard.flush()
        self.shard.close()


# Listings of the log's segments one sync may take (see _fsync_segments).
_WAL_LISTINGS = 5


class _WalSync:
    """fsyncs the shard's write-ahead log for the updates applied so far.

    ``durable()`` is awaited after an update was applied and returns once an
    fsync that began after it has finished: updates that arrive while one
    fsync runs share the next one. The log is a directory of segments, the
    one being written and spare ones (``open-N``) and full ones (``closed-N``,
    renamed from ``open-N`` when full): every open segment is synced, a
    closed one once, and the directory when its entries changed.
    """

    def __init__(self, wal_dir: Path) -> None:
        self._dir = wal_dir
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qdrant-edge-wal")
        self._applied = 0  # updates applied (counted when they ask to be durable)
        self._synced = 0  # of those, how many are on disk
        self._running: asyncio.Task | None = None
        self._closed_synced: set[str] = set()
        self._names: frozenset[str] = frozenset()

    async def durable(self) -> None:
        self._applied += 1
        mine = self._applied
        while self._synced < mine:
            if self._running is None:
                self._running = asyncio.get_running_loop().create_task(
                    self._sync(covers=self._applied))
                self._running.add_done_callback(_retrieve)
            # A caller that goes away does not stop the sync others wait for.
            await asyncio.shield(self._running)

    async def _sync(self, covers: int) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._fsync_segments)
            self._synced = max(self._synced, covers)
        except RuntimeError as exc:  # the store closed under the update
            raise OSError(f"the store is closed: {exc}") from None
        finally:
            self._running = None

    def _fsync_segments(self) -> None:
        # The engine renames a full segment while this runs: a name that
        # vanished between the listing and the fsync is found again, as a
        # closed segment, by the next listing.
        for _ in range(_WAL_LISTINGS):
            with os.scandir(self._dir) as entries:
                names = frozenset(e.name for e in entries
                                  if e.name.startswith(("open-", "closed-")))
            vanished = False
            for name in sorted(names):
                if name in self._closed_synced:
                    continue
                try:
                    _fsync(self._dir / name)
                except FileNotFoundError:
                    vanished = True
                    continue
                if name.startswith("closed-"):
                    self._closed_synced.add(name)
            if names != self._names:
                _fsync(self._dir)
                self._names = names
            self._closed_synced &= names
            if not vanished:
                return
        raise OSError(f"the write-ahead log in {self._dir} kept changing while it was synced")

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def _check_shard_vectors(engine_config: Path, where: str) -> None:
    """Raises VectorsMismatch unless the shard's recorded configuration
    (``{"vectors": {...}, "sparse_vectors": {"bm25": {"modifier": "idf"}}}``)
    has the vectors the service needs."""
    recorded = json.loads(engine_config.read_text())
    sparse = (recorded.get("sparse_vectors") or {}).get(SPARSE)
    check_vectors(where, dense=DENSE in (recorded.get("vectors") or {}),
                  sparse=sparse is not None,
                  sparse_idf=str((sparse or {}).get("modifier", "")).lower() == "idf")


def _retrieve(task: asyncio.Task) -> None:
    # The callers awaiting the sync get its error; none may be left.
    if not task.cancelled():
        task.exception()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)
