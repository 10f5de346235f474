"""The store for scale: a Qdrant server or cluster through ``qdrant-client``
(gRPC preferred), or qdrant-client's local mode (``location=":memory:"`` or
a ``path``), which the congruence suite runs the same scenarios on.

Writes wait until the server has applied them (``wait=True``) with strong
ordering, so an acknowledged add is in the collection's write-ahead log on
every replica the write went to, and the next read sees it. A server that
cannot be reached raises :class:`StoreUnavailable`; nothing is reported as
stored unless every batch of the request was acknowledged. A server that
answers with a refusal (a request it finds invalid, a collection that is
gone or holds other vectors, credentials it refuses, its rate limit, its own
failure) raises :class:`StoreRefused`, which says which of these it is.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from qdrant_client import AsyncQdrantClient, models
from qdrant_client.common.client_exceptions import ResourceExhaustedResponse
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from hivemesh.services.memory.store.base import (
    DATETIME_INDEXES, DENSE, KEYWORD_INDEXES, NAMESPACE, SPARSE, AnyOf, ChunkPoint,
    CollectionInfo, Condition, Equals, Found, MemoryStore, Mode, NumberRange, Refusal, Search,
    SparseVector, StoreRefused, StoreUnavailable, at_least, check_vectors, typed,
    vectors_refused)

T = TypeVar("T")
# Failures that may pass: the server could not be reached or did not answer
# in time (a retry of the call may succeed).
_TRANSIENT_GRPC = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.ABORTED})
_TRANSIENT_HTTP = frozenset({408, 502, 503, 504})
# The server's refusals, by the gRPC code (or the HTTP status of its REST
# API) it answers with; any other answer is its own failure (Refusal.FAILED).
# Qdrant answers NOT_FOUND for a missing collection: the service made its
# collection at start-up, so that one is gone (the request names none).
_REFUSALS_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: Refusal.INVALID,
    grpc.StatusCode.OUT_OF_RANGE: Refusal.INVALID,
    grpc.StatusCode.NOT_FOUND: Refusal.PRECONDITION,
    grpc.StatusCode.FAILED_PRECONDITION: Refusal.PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED: Refusal.PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED: Refusal.CREDENTIALS,
    grpc.StatusCode.PERMISSION_DENIED: Refusal.CREDENTIALS,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Refusal.RATE_LIMITED,
}
_REFUSALS_HTTP = {400: Refusal.INVALID, 422: Refusal.INVALID, 404: Refusal.PRECONDITION,
                  412: Refusal.PRECONDITION, 501: Refusal.PRECONDITION,
                  401: Refusal.CREDENTIALS, 403: Refusal.CREDENTIALS,
                  429: Refusal.RATE_LIMITED}


def _match(c: Condition) -> models.FieldCondition:
    if isinstance(c, Equals):
        return models.FieldCondition(key=c.key, match=models.MatchValue(value=c.value))
    if isinstance(c, AnyOf):
        return models.FieldCondition(key=c.key, match=models.MatchAny(any=list(c.values)))
    if isinstance(c, NumberRange):
        return models.FieldCondition(key=c.key, range=models.Range(gte=c.gte, gt=c.gt,
                                                                   lte=c.lte, lt=c.lt))
    return models.FieldCondition(key=c.key, range=models.DatetimeRange(gte=c.gte, gt=c.gt,
                                                                       lte=c.lte, lt=c.lt))


def _scope(namespace: str, conditions: Sequence[Condition] = (),
           ids: Sequence[str] | None = None, keep_ids: Sequence[str] = ()) -> models.Filter:
    must: list[Any] = [models.FieldCondition(key=NAMESPACE,
                                             match=models.MatchValue(value=namespace))]
    must += [_match(c) for c in typed(conditions)]
    if ids is not None:
        must.append(models.HasIdCondition(has_id=list(ids)))
    must_not = [models.HasIdCondition(has_id=list(keep_ids))] if keep_ids else None
    return models.Filter(must=must, must_not=must_not)


def _vector(v: SparseVector) -> models.SparseVector:
    return models.SparseVector(indices=list(v.indices), values=list(v.values))


def _retry_after(values: Any) -> float | None:
    """The seconds of a ``retry-after`` among ``values`` (gRPC trailing
    metadata or HTTP headers), when one is there and a number."""
    # HTTP headers are a mapping; gRPC metadata is a collection of pairs.
    items = values.items() if isinstance(values, Mapping) else values or ()
    for key, value in items:
        if str(key).lower() == "retry-after":
            try:
                return max(0.0, float(value))
            except (TypeError, ValueError):
                return None
    return None


def _http_details(exc: UnexpectedResponse) -> str:
    """The error text of a REST answer (``{"status": {"error": ...}}``), or
    its start."""
    try:
        return str(exc.structured()["status"]["error"])
    except (ValueError, KeyError, TypeError):
        return exc.content[:200].decode(errors="replace") or exc.reason_phrase


class QdrantStore(MemoryStore):
    """Open with :meth:`open` (it creates the collection and its payload
    indexes when missing, and checks its vectors and recorded embedder
    otherwise)."""

    def __init__(self, client: AsyncQdrantClient, collection: str, info: CollectionInfo,
                 where: str, local: bool) -> None:
        self.client = client
        self.local = local
        self.collection = collection
        self.info = info
        self.where = where

    @classmethod
    async def open(cls, collection: str, model: str, dimensions: int, *,
                   url: str | None = None, location: str | None = None,
                   path: str | None = None, api_key: str | None = None,
                   grpc_port: int = 6334, timeout_s: int = 10,
                   upstream_model: str = "") -> QdrantStore:
        if url is not None:
            client = AsyncQdrantClient(url=url, prefer_grpc=True, grpc_port=grpc_port,
                                       api_key=api_key, timeout=timeout_s,
                                       check_compatibility=False)
            where = f"{url.split('@')[-1]} collection {collection!r}"
        else:
            client = AsyncQdrantClient(location=location, path=path)
            where = f"qdrant-client local mode ({path or location}) collection {collection!r}"
        store = cls(client, collection, CollectionInfo(model, dimensions, upstream_model), where,
                    url is None)
        try:
            await store._guard(store._ensure_collection())
        except BaseException:
            await client.close()
            raise
        return store

    async def _ensure_collection(self) -> None:
        if not await self.client.collection_exists(self.collection):
            try:
                await self.client.create_collection(
                    self.collection, vectors_config={DENSE: models.VectorParams(
                        size=self.info.dimensions, distance=models.Distance.COSINE)},
                    sparse_vectors_config={SPARSE: models.SparseVectorParams(
                        modifier=models.Modifier.IDF)},
                    metadata=self.info.record())
            except Exception:
                # Another replica created it meanwhile (the server refuses
                # this one's create, over REST or gRPC alike): open that.
                if not await self.client.collection_exists(self.collection):
                    raise
        collection = await self.client.get_collection(self.collection)
        if self._check_recorded(collection.config):
            # Recorded by a version that kept no upstream model: this
            # start records it, and checks again the record that results
            # (another replica may have recorded its own meanwhile).
            await self.client.update_collection(self.collection,
                                                metadata=self.info.record())
            collection = await self.client.get_collection(self.collection)
            self._check_recorded(collection.config)
        if not self.local:  # local mode has no payload indexes
            # Made here whenever one is missing, not only with the
            # collection: a replica that stopped between the two left none.
            await self._create_indexes(collection.payload_schema or {})

    async def _create_indexes(self, present: dict[str, models.PayloadIndexInfo]) -> None:
        c = self.collection
        wanted: list[tuple[str, Any, models.PayloadSchemaType]] = [
            (NAMESPACE, models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD,
                                                  is_tenant=True),
             models.PayloadSchemaType.KEYWORD),
            *((key, models.PayloadSchemaType.KEYWORD, models.PayloadSchemaType.KEYWORD)
              for key in KEYWORD_INDEXES),
            *((key, models.PayloadSchemaType.DATETIME, models.PayloadSchemaType.DATETIME)
              for key in DATETIME_INDEXES)]
        for key, schema, kind in wanted:
            if key not in present or present[key].data_type != kind:
                await self.client.create_payload_index(c, key, schema, wait=True)

    def _check_recorded(self, config: models.CollectionConfig) -> bool:
        """Raises unless the collection takes this service's vectors; True
        when its record lacks the upstream model (see CollectionInfo.check)."""
        metadata = config.metadata or {}
        vectors = config.params.vectors
        dense = vectors.get(DENSE) if isinstance(vectors, dict) else None
        sparse = (config.params.sparse_vectors or {}).get(SPARSE)
        check_vectors(self.where, dense=dense is not None, sparse=sparse is not None,
                      sparse_idf=sparse is not None and sparse.modifier == models.Modifier.IDF)
        recorded = CollectionInfo.of(metadata, dense.size if dense else 0)
        return recorded.check(self.info, self.where)

    async def _guard(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except Exception as exc:
            failure = self._failure(exc)
            if failure is None:
                raise
            raise failure from exc

    def _failure(self, exc: Exception) -> StoreUnavailable | StoreRefused | None:
        """What a failed call to the server means; None for an error that
        is not the server's (a bug here, or local mode's own errors)."""
        retry_after: float | None = None
        if isinstance(exc, ResourceExhaustedResponse):
            # qdrant-client's own error for a rate limit that names its wait.
            status, details, refusal = "RESOURCE_EXHAUSTED", str(exc), Refusal.RATE_LIMITED
            retry_after = float(exc.retry_after_s)
        elif isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
            code = exc.code()
            status, details = code.name, exc.details() or ""
            if code in _TRANSIENT_GRPC:
                return StoreUnavailable(f"Qdrant at {self.where}: {status}: {details}")
            refusal = _REFUSALS_GRPC.get(code, Refusal.FAILED)
            if refusal is Refusal.RATE_LIMITED and "larger than max" in details:
                # gRPC's own refusal of a message over its size limit (either
                # side's): no wait makes the same request fit.
                refusal = Refusal.INVALID
            if refusal is Refusal.RATE_LIMITED:
                retry_after = _retry_after(exc.trailing_metadata())
        elif isinstance(exc, UnexpectedResponse):
            if exc.status_code in _TRANSIENT_HTTP:
                return StoreUnavailable(f"Qdrant at {self.where}: {exc}")
            status, details = f"HTTP {exc.status_code}", _http_details(exc)
            refusal = _REFUSALS_HTTP.get(exc.status_code or 0, Refusal.FAILED)
            if refusal is Refusal.RATE_LIMITED:
                retry_after = _retry_after(exc.headers)
        elif isinstance(exc, ResponseHandlingException | ConnectionError | TimeoutError):
            return StoreUnavailable(f"Qdrant at {self.where}: {exc}")
        else:
            return None
        answer = f"{status}: {details}"
        mismatch = (vectors_refused(self.where, answer, status=status)
                    if refusal is Refusal.INVALID else None)
        if mismatch is not None:
            return mismatch
        if refusal is Refusal.INVALID:
            message = f"Qdrant at {self.where} refused the request as invalid ({answer})"
        elif refusal is Refusal.PRECONDITION and status in ("NOT_FOUND", "HTTP 404"):
            message = (f"Qdrant at {self.where} no longer has the collection ({answer}); it "
                       "was deleted while the service ran: restart the service to make it "
                       "again")
        elif refusal is Refusal.PRECONDITION:
            message = f"Qdrant at {self.where} cannot serve the request as it is ({answer})"
        elif refusal is Refusal.CREDENTIALS:
            message = (f"Qdrant at {self.where} refused the service's credentials ({answer}); "
                       "check HIVEMESH_MEMORY_QDRANT_API_KEY")
        elif refusal is Refusal.RATE_LIMITED:
            message = f"Qdrant at {self.where} is over its rate limit ({answer})"
            if retry_after is not None:
                message += f"; retry after {retry_after:g} s"
        else:
            message = f"Qdrant at {self.where} failed the call ({answer})"
        return StoreRefused(refusal, message, status=status, retry_after_s=retry_after)

    async def upsert(self, points: Sequence[ChunkPoint]) -> None:
        await self._guard(self.client.upsert(
            self.collection, wait=True, ordering=models.WriteOrdering.STRONG,
            points=[models.PointStruct(id=p.id, payload=p.payload, vector={
                DENSE: list(p.dense), SPARSE: _vector(p.sparse)}) for p in points]))

    async def get(self, namespace: str, ids: Sequence[str]) -> list[Found]:
        records = await self._guard(self.client.retrieve(
            self.collection, ids=list(ids), with_payload=True, with_vectors=False))
        return [Found(str(uuid.UUID(str(r.id))), r.payload) for r in records
                if r.payload and r.payload.get(NAMESPACE) == namespace]

    async def search(self, namespace: str, search: Search) -> list[Found]:
        flt = _scope(namespace, search.conditions)
        # Keyword statistics (IDF) from the namespace alone, as in the
        # embedded store.
        idf = models.SearchParams(idf=models.IdfCorpusParams(corpus=_scope(namespace)))
        dense = list(search.dense) if search.dense else None
        sparse = _vector(search.sparse) if search.sparse else None
        if search.mode is Mode.HYBRID:
            kwargs: dict[str, Any] = dict(
                query=models.RrfQuery(rrf=models.Rrf(k=search.rrf_k)),
                prefetch=[models.Prefetch(query=dense, using=DENSE, filter=flt,
                                          limit=search.prefetch_limit),
                          models.Prefetch(query=sparse, using=SPARSE, filter=flt,
                                          limit=search.prefetch_limit, params=idf)])
        elif search.mode is Mode.KEYWORD:
            kwargs = dict(query=sparse, using=SPARSE, search_params=idf)
        else:
            kwargs = dict(query=dense, using=DENSE)
        response = await self._guard(self.client.query_points(
            self.collection, query_filter=flt, limit=search.limit, with_payload=True,
            **kwargs))
        return at_least([Found(str(uuid.UUID(str(p.id))), p.payload or {}, p.score)
                         for p in response.points], search.score_threshold)

    async def count(self, namespace: str, conditions: Sequence[Condition] = ()) -> int:
        result = await self._guard(self.client.count(
            self.collection, count_filter=_scope(namespace, conditions), exact=True))
        return result.count

    async def delete(self, namespace: str, *, ids: Sequence[str] | None = None,
                     conditions: Sequence[Condition] = (),
                     keep_ids: Sequence[str] = ()) -> int:
        flt = _scope(namespace, conditions, ids, keep_ids)
        matched = (await self._guard(self.client.count(self.collection, count_filter=flt,
                                                       exact=True))).count
        if matched:
            await self._guard(self.client.delete(
                self.collection, points_selector=models.FilterSelector(filter=flt), wait=True,
                ordering=models.WriteOrdering.STRONG))
        return matched

    async def close(self) -> None:
        await self.client.close()
