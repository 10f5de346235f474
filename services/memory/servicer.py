"""gRPC servicer of hivemesh.memory.v1.MemoryService over any store and
embedder.

Adding memories: every item is chunked, the chunks are embedded (dense) and
keyword-encoded (BM25), and upserted in batches. A chunk's id is a UUIDv5
of (namespace, source_id, a digest of the content, the chunking, the
metadata and the lineage, chunk index): a retried add writes the very same
points again, so it can neither duplicate chunks nor leave stray ones, even
when the first attempt died half-way; the same text added with other
metadata or lineage is another memory and never overwrites the first. The
answer is recorded by request_id only after every batch is acknowledged, so
nothing half-written is ever reported as stored. Requests under one
request_id take turns, each looking the id up first: a retry replays the
first answer and a different request conflicts before either writes a
chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from hivemesh.common.v1 import ErrorReason, Usage
from hivemesh.memory.v1 import (
    AddedItem, AddMemoriesResponse, CountMemoriesResponse, DeleteMemoriesResponse,
    ForgetNamespaceResponse, GetHistoryResponse, GetMemoriesResponse, MemoryChunk,
    MemoryServiceServicer, SearchMemoriesResponse, SearchMode)
from hivemesh.runtime import errors
from hivemesh.runtime.resilience import fingerprint
from hivemesh.runtime.settings import RESPONSE_MARGIN_BYTES
from hivemesh.runtime.wellknown import now_us, timestamp
from hivemesh.services.memory.chunking import chunk_text
from hivemesh.services.memory.embedders import (
    Embedder, EmbedderRateLimited, EmbedderUnavailable, EmbeddingRejected, EmbedTooLarge)
from hivemesh.services.memory.filters import (
    metadata_to_payload, payload_to_metadata, to_conditions)
from hivemesh.services.memory.keywords import KeywordEncoder
from hivemesh.services.memory.ledger import IdempotencyConflict, Ledger, LedgerUnavailable
from hivemesh.services.memory.namespaces import resolve_namespace
from hivemesh.services.memory.store.base import (
    LINEAGE_FIELDS, ChunkPoint, Equals, MemoryStore, Mode, NumberRange, Refusal, Search,
    StoreRefused, StoreUnavailable)

DOMAIN = "hivemesh.memory"
SERVICE_NAME = "hivemesh.memory.v1.MemoryService"
DEFAULT_HISTORY_MESSAGES = 50
# The UUIDv5 namespace of chunk ids.
_CHUNK_IDS = uuid.UUID("6f1c1d5e-3b8a-5e57-9b39-0d7b6f0e2a41")
# What an AddMemories answer costs per chunk (a chunk id: a 36-character
# UUID with its tag and length), per item (an AddedItem's tag, length, index
# and replaced_chunk_count, at their largest) and besides (counts, usage).
_CHUNK_ID_BYTES = 38
_ADDED_ITEM_BYTES = 24
_ADD_ANSWER_BYTES = 64
_MODES = {SearchMode.SEARCH_MODE_UNSPECIFIED: Mode.DENSE, SearchMode.SEARCH_MODE_DENSE: Mode.DENSE,
          SearchMode.SEARCH_MODE_KEYWORD: Mode.KEYWORD,
          SearchMode.SEARCH_MODE_HYBRID: Mode.HYBRID}
_MODE_NAMES = {Mode.DENSE: SearchMode.SEARCH_MODE_DENSE,
               Mode.KEYWORD: SearchMode.SEARCH_MODE_KEYWORD,
               Mode.HYBRID: SearchMode.SEARCH_MODE_HYBRID}


@dataclass(frozen=True)
class Limits:
    chunk_size_chars: int = 2000
    chunk_overlap_chars: int = 200
    max_chunk_chars: int = 32000
    max_chunks_per_request: int = 20000
    upsert_batch_size: int = 256
    hybrid_prefetch: int = 100
    rrf_k: int = 60
    embed_timeout_s: float = 30.0
    # Text one history answer may carry (half the message limit).
    history_bytes: int = 8 * 1024 * 1024
    # Largest GetMemories or SearchMemories answer (the message limit less
    # the margin for the rest of the message).
    answer_bytes: int = 16 * 1024 * 1024 - RESPONSE_MARGIN_BYTES


def chunk_id(namespace: str, source_id: str, item_key: str, index: int) -> str:
    return str(uuid.uuid5(_CHUNK_IDS, f"{namespace}\n{source_id}\n{item_key}\n{index}"))


def _valid_ids(ids: Sequence[str]) -> list[str]:
    """The ids that are UUIDs, normalised; others cannot exist."""
    valid = []
    for i in ids:
        with contextlib.suppress(ValueError):
            valid.append(str(uuid.UUID(i)))
    return valid


def fill_chunk(chunk: MemoryChunk, chunk_id_: str, payload: dict[str, Any]) -> MemoryChunk:
    """Writes a stored point into ``chunk`` (a field of the response being
    built: filling it in place spares a copy per result)."""
    chunk.chunk_id = chunk_id_
    chunk.namespace = payload.get("namespace", "")
    chunk.text = payload.get("text", "")
    chunk.source_id = payload.get("source_id", "")
    chunk.chunk_index = payload.get("chunk_index", 0)
    chunk.chunk_count = payload.get("chunk_count", 0)
    lineage = payload.get("lineage")
    if lineage:
        for field, value in lineage.items():
            if value and field in LINEAGE_FIELDS:
                setattr(chunk.lineage, field, value)
    created = payload.get("create_time_us")
    if created is not None:
        chunk.create_time.FromMicroseconds(created)
    payload_to_metadata(payload.get("metadata"), chunk.metadata)
    return chunk


# The status and reason of each way the store refuses a call. A collection
# that is gone or holds other vectors, a server that is locked or too old, and
# credentials it refuses are the service's state, not the request's: the
# caller can only wait for an operator (FAILED_PRECONDITION, not retried).
_REFUSALS = {
    Refusal.INVALID: (grpc.StatusCode.INVALID_ARGUMENT, ErrorReason.ERROR_REASON_UPSTREAM_ERROR),
    Refusal.PRECONDITION: (grpc.StatusCode.FAILED_PRECONDITION,
                           ErrorReason.ERROR_REASON_UPSTREAM_ERROR),
    Refusal.CREDENTIALS: (grpc.StatusCode.FAILED_PRECONDITION,
                          ErrorReason.ERROR_REASON_UPSTREAM_AUTH_FAILED),
    Refusal.RATE_LIMITED: (grpc.StatusCode.RESOURCE_EXHAUSTED,
                           ErrorReason.ERROR_REASON_RATE_LIMITED),
    Refusal.FAILED: (grpc.StatusCode.INTERNAL, ErrorReason.ERROR_REASON_UPSTREAM_ERROR),
}


def _refused(exc: StoreRefused) -> errors.ServiceError:
    code, reason = _REFUSALS[exc.refusal]
    metadata = {"backend": "memory store", "store_status": exc.status}
    details = []
    if exc.refusal is Refusal.RATE_LIMITED:
        wait = exc.retry_after_s if exc.retry_after_s is not None else 1.0
        metadata["retry_after_s"] = f"{wait:.3f}"
        details.append(errors.retry_info(wait))
    return errors.ServiceError(code, reason, str(exc), metadata, details)


def _rate_limited(exc: EmbedderRateLimited) -> errors.ServiceError:
    """The LLM service's rate limit, passed on with its delay (else 1 s), as
    the store's own rate limit is."""
    wait = exc.retry_after_s if exc.retry_after_s is not None else 1.0
    return errors.ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, ErrorReason.ERROR_REASON_RATE_LIMITED, str(exc),
        {"backend": "embedding model", "retry_after_s": f"{wait:.3f}"},
        [errors.retry_info(wait)])


@contextlib.contextmanager
def _backend_errors() -> Iterator[None]:
    try:
        yield
    except StoreUnavailable as exc:
        raise errors.unavailable("memory store", str(exc), retry_after_s=1.0) from exc
    except StoreRefused as exc:
        raise _refused(exc) from exc
    except EmbedderUnavailable as exc:
        raise errors.unavailable("embedding model", str(exc), retry_after_s=1.0) from exc
    except EmbedderRateLimited as exc:
        raise _rate_limited(exc) from exc
    except EmbedTooLarge as exc:
        # Not a passing outage: the same call fails the same way again.
        raise errors.ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  ErrorReason.ERROR_REASON_PAYLOAD_TOO_LARGE, str(exc),
                                  {"backend": "embedding model"}, retry=False) from exc
    except EmbeddingRejected as exc:
        raise errors.ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                  ErrorReason.ERROR_REASON_UPSTREAM_ERROR, str(exc),
                                  {"backend": "embedding model"}) from exc
    except IdempotencyConflict as exc:
        raise errors.idempotency_conflict(str(exc)) from None
    except LedgerUnavailable as exc:
        raise errors.unavailable("memory ledger", str(exc), retry_after_s=1.0) from exc


def _item_key(content: str, size: int, overlap: int, whole: bool,
              metadata: dict[str, Any], lineage: dict[str, str]) -> str:
    """Digest of what an item's chunks keep besides their namespace and
    source: the content and the chunking (which decide the texts), the
    metadata and the lineage. Items that differ in any of them are distinct
    memories; an item with neither metadata nor lineage keeps the key it
    had before they counted."""
    key = hashlib.sha256(f"{size}/{overlap}/{int(whole)}\n{content}".encode()).hexdigest()
    lineage = {f: v for f, v in lineage.items() if v}
    if not metadata and not lineage:
        return key
    extra = json.dumps([metadata, lineage], sort_keys=True, ensure_ascii=False,
                       separators=(",", ":"))
    return hashlib.sha256(f"{key}\n{extra}".encode()).hexdigest()


# Characters of an add prepared (split and keyword-encoded) on the event
# loop's thread; a larger add is prepared in a worker thread.
PREPARE_INLINE_CHARS = 16 * 1024

class MemoryServicer(MemoryServiceServicer):
    def __init__(self, store: MemoryStore, embedder: Embedder, ledger: Ledger,
                 limits: Limits = Limits()) -> None:
        self.store = store
        self.embedder = embedder
        self.ledger = ledger
        self.limits = limits
        self.keywords = KeywordEncoder()

    def _timeout(self, context) -> float:
        remaining = context.time_remaining() if context is not None else None
        # With no deadline from the caller, time_remaining is huge: clamp it.
        return max(0.001, min(remaining or self.limits.embed_timeout_s,
                              self.limits.embed_timeout_s))

    async def _once(self, method: str, request, namespace: str, response_type, work,
                    replayed=lambda response: response):
        """Runs ``work`` unless this request_id has an answer already. The
        requests of one request_id take turns and look it up before they
        write: a retry gets the first answer (through ``replayed``) and a
        different request conflicts, neither having touched the store."""
        fp = fingerprint(request)
        with _backend_errors():
            async with self.ledger.one_at_a_time(method, namespace, request.request_id):
                first = await self.ledger.replay(method, namespace, request.request_id, fp)
                if first is not None:
                    return replayed(response_type.FromString(first))
                response = await work()
                stored, twin = await self.ledger.remember(
                    method, namespace, request.request_id, fp, response.SerializeToString())
        return replayed(response_type.FromString(stored)) if twin else response

    # -- adding --------------------------------------------------------------
    def _chunking(self, options) -> tuple[int, int, bool]:
        size = options.chunk_size_chars or self.limits.chunk_size_chars
        if options.no_overlap or options.whole_item:
            overlap = 0
        elif options.chunk_overlap_chars:
            overlap = options.chunk_overlap_chars
        elif options.chunk_size_chars:
            # The default overlap, at most half a chunk size of the request's own.
            overlap = min(self.limits.chunk_overlap_chars, size // 2)
        else:
            overlap = self.limits.chunk_overlap_chars
        if overlap >= size:
            raise errors.invalid_argument([("chunking.chunk_overlap_chars",
                                            f"must be smaller than the chunk size ({size})")])
        if size > self.limits.max_chunk_chars and not options.whole_item:
            raise _too_large("chunking.chunk_size_chars", size, self.limits.max_chunk_chars,
                             "characters for one chunk")
        return size, overlap, options.whole_item

    def _split(self, request, size: int, overlap: int, whole: bool) -> list[list[str]]:
        bad: list[tuple[str, str]] = []
        chunks: list[list[str]] = []
        for i, item in enumerate(request.items):
            if not item.content.strip():
                bad.append((f"items[{i}].content", "must contain text, not only whitespace"))
            if item.replace_source and not item.source_id:
                bad.append((f"items[{i}].replace_source", "needs items[].source_id"))
        if bad:
            raise errors.invalid_argument(bad)
        if not whole:
            # Each chunk holds at most ``size`` of an item's non-blank
            # characters: a request bound to exceed the limits is refused
            # before splitting begins.
            least = [-(-len("".join(item.content.split())) // size) for item in request.items]
            self._check_chunk_count(sum(least))
            self._check_answer_size(request, least)
        for i, item in enumerate(request.items):
            if whole:
                text = item.content.strip()
                self._check_whole(f"items[{i}].content", text)
                chunks.append([text])
            else:
                chunks.append(chunk_text(item.content, size, overlap))
        self._check_chunk_count(sum(len(c) for c in chunks))
        self._check_answer_size(request, [len(c) for c in chunks])
        return chunks

    def _check_whole(self, field: str, text: str) -> None:
        """A whole item is one chunk: refused when longer than the largest
        chunk, or than the embedding model takes in (which would embed only
        its beginning)."""
        if len(text) > self.limits.max_chunk_chars:
            raise _too_large(field, len(text), self.limits.max_chunk_chars,
                             "characters for one chunk (whole_item)")
        most = self.embedder.max_input
        if most is not None:
            length = self.embedder.input_length(text)
            if length > most:
                raise _too_large(field, length, most,
                                 f"{self.embedder.input_unit} for one chunk (whole_item: "
                                 "the embedding model's input limit)")

    def _check_chunk_count(self, total: int) -> None:
        if total > self.limits.max_chunks_per_request:
            raise _too_large("items", total, self.limits.max_chunks_per_request,
                             "chunks in one request; send fewer or larger items")

    def _check_answer_size(self, request, chunk_counts: Sequence[int]) -> None:
        """Refuses an add whose answer (a chunk id per chunk) a message
        could not carry, before anything is stored: stored, it could never
        be answered, nor replayed to a retry."""
        size = (sum(chunk_counts) * _CHUNK_ID_BYTES + len(chunk_counts) * _ADDED_ITEM_BYTES
                + len(request.namespace.encode()) + len(self.embedder.model.encode())
                + _ADD_ANSWER_BYTES)
        self._fits(size, "send fewer chunks per call (fewer items, or larger chunks)")

    def _prepare(self, request, namespace: str, size: int, overlap: int, whole: bool,
                 created_us: int) -> tuple[dict[str, ChunkPoint], list[AddedItem]]:
        """The request's chunks (by id, without their dense vectors) and the
        answer's items. Pure computation, run in a worker thread: splitting
        and keyword-encoding megabytes of text would hold the event loop
        for seconds."""
        texts = self._split(request, size, overlap, whole)
        created = timestamp(created_us).ToJsonString()
        ctx = request.context
        # By id: items identical to one another share their chunks, stored once.
        points: dict[str, ChunkPoint] = {}
        added: list[AddedItem] = []
        for index, (item, chunks) in enumerate(zip(request.items, texts, strict=True)):
            lineage = {f: getattr(item.lineage, f) for f in LINEAGE_FIELDS}
            for f in ("workflow_id", "task_id", "agent_id"):
                lineage[f] = lineage[f] or getattr(ctx, f)
            metadata = metadata_to_payload(item.metadata, f"items[{index}].metadata")
            key = _item_key(item.content, size, overlap, whole, metadata, lineage)
            ids = [chunk_id(namespace, item.source_id, key, n) for n in range(len(chunks))]
            added.append(AddedItem(index=index, chunk_ids=ids))
            for n, text in enumerate(chunks):
                if ids[n] not in points:
                    points[ids[n]] = ChunkPoint(ids[n], (), self.keywords.document(text), {
                        "namespace": namespace, "text": text, "source_id": item.source_id,
                        "chunk_index": n, "chunk_count": len(chunks), "metadata": metadata,
                        "lineage": lineage, "create_time": created,
                        "create_time_us": created_us})
        return points, added

    async def AddMemories(self, request, context):
        namespace = resolve_namespace(request.namespace, request.context)
        size, overlap, whole = self._chunking(request.chunking)
        add = functools.partial(self._add, request, context, namespace, size, overlap, whole)
        return await self._once("AddMemories", request, namespace, AddMemoriesResponse, add,
                                replayed=_replayed)

    async def _add(self, request, context, namespace: str, size: int, overlap: int,
                   whole: bool) -> AddMemoriesResponse:
        created_us = now_us()
        prepare = functools.partial(self._prepare, request, namespace, size, overlap, whole,
                                    created_us)
        # A small add is prepared inline: the hop to a thread and back would
        # cost it more than the work (an agent's write-back is a few KiB).
        small = sum(len(item.content) for item in request.items) <= PREPARE_INLINE_CHARS
        points, added = prepare() if small else await asyncio.to_thread(prepare)
        tokens = await self._embed_and_upsert(list(points.values()), self._timeout(context))
        # The source's chunks stored before this request go (deleted after
        # the new ones are stored, so a failure never leaves the source
        # empty). Chunks of this request, or of a later one replacing the
        # same source concurrently, are newer and stay.
        this_request = list(points)
        for item, result in zip(request.items, added, strict=True):
            if item.replace_source:
                result.replaced_chunk_count = await self.store.delete(
                    namespace, conditions=[Equals("source_id", item.source_id),
                                           NumberRange("create_time_us", lt=created_us)],
                    keep_ids=this_request)
        return AddMemoriesResponse(
            items=added, item_count=len(added), chunk_count=len(points), namespace=namespace,
            embedding_model=self.embedder.model,
            embedding_usage=Usage(prompt_tokens=tokens, total_tokens=tokens))

    async def _embed_and_upsert(self, points: list[ChunkPoint], timeout_s: float) -> int:
        """Embeds and upserts batch by batch, embedding the next batch while
        the store writes the current one. Returns the tokens embedded."""
        size = self.limits.upsert_batch_size
        batches = [points[i:i + size] for i in range(0, len(points), size)]
        tokens = 0
        writing: asyncio.Task | None = None
        try:
            for batch in batches:
                embedded = await self.embedder.embed([p.payload["text"] for p in batch],
                                                     timeout_s=timeout_s)
                tokens += embedded.tokens
                ready = [ChunkPoint(p.id, v, p.sparse, p.payload)
                         for p, v in zip(batch, embedded.vectors, strict=True)]
                if writing is not None:
                    await writing
                writing = asyncio.create_task(self.store.upsert(ready))
            if writing is not None:
                await writing
        except BaseException:
            if writing is not None and not writing.done():
                writing.cancel()
                with contextlib.suppress(BaseException):
                    await writing
            raise
        return tokens

    # -- reading -------------------------------------------------------------
    async def GetMemories(self, request, context):
        namespace = resolve_namespace(request.namespace, request.context)
        wanted = _valid_ids(request.chunk_ids)
        with _backend_errors():
            found = await self.store.get(namespace, wanted) if wanted else []
        by_id = {f.id: f for f in found}
        response = GetMemoriesResponse()
        size = 0
        for raw in request.chunk_ids:
            normal = _valid_ids([raw])
            hit = by_id.get(normal[0]) if normal else None
            if hit is None:
                response.missing_ids.append(raw)
            else:
                # Counted as it grows: a doomed answer stops being built early.
                size += fill_chunk(response.chunks.add(), hit.id, hit.payload).ByteSize()
                self._fits(size, "ask for fewer chunk_ids per call")
        self._fits(response.ByteSize(), "ask for fewer chunk_ids per call")
        return response

    def _fits(self, size: int, advice: str) -> None:
        """Refuses an answer of ``size`` bytes that a message cannot carry."""
        limit = self.limits.answer_bytes
        if size > limit:
            raise errors.ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, ErrorReason.ERROR_REASON_PAYLOAD_TOO_LARGE,
                f"the answer is over {limit:,} bytes, more than one message may carry; "
                f"{advice}", {"size_bytes": str(size), "limit_bytes": str(limit)})

    async def SearchMemories(self, request, context):
        namespace = resolve_namespace(request.namespace, request.context)
        if not request.query.strip():
            raise errors.invalid_argument([("query", "must contain text, not only whitespace")])
        conditions = to_conditions(request.filter)
        mode = _MODES[request.mode]
        sparse = self.keywords.query(request.query) if mode is not Mode.DENSE else None
        if sparse is None and mode is Mode.KEYWORD:
            # Only stop words: no keyword can match.
            return SearchMemoriesResponse(mode=_MODE_NAMES[mode], namespace=namespace)
        if sparse is None and mode is Mode.HYBRID:
            mode = Mode.DENSE
        with _backend_errors():
            dense = None
            if mode is not Mode.KEYWORD:
                dense = (await self.embedder.embed([request.query], query=True,
                                                   timeout_s=self._timeout(context))).vectors[0]
            threshold = request.score_threshold if request.HasField("score_threshold") else None
            hits = await self.store.search(namespace, Search(
                mode=mode, limit=request.limit, dense=dense, sparse=sparse,
                conditions=conditions, score_threshold=threshold,
                prefetch_limit=max(self.limits.hybrid_prefetch, request.limit),
                rrf_k=self.limits.rrf_k))
        response = SearchMemoriesResponse(mode=_MODE_NAMES[mode], namespace=namespace)
        for hit in hits:
            result = response.results.add(score=hit.score)
            fill_chunk(result.chunk, hit.id, hit.payload)
        self._fits(response.ByteSize(), "ask for fewer results (limit)")
        return response

    async def CountMemories(self, request, context):
        namespace = resolve_namespace(request.namespace, request.context)
        conditions = to_conditions(request.filter)
        with _backend_errors():
            return CountMemoriesResponse(count=await self.store.count(namespace, conditions))

    # -- deleting ------------------------------------------------------------
    async def DeleteMemories(self, request, context):
        namespace = resolve_namespace(request.namespace, request.context)
        if request.WhichOneof("target") == "filter":
            conditions = to_conditions(request.filter, "filter")

            async def work():
                return DeleteMemoriesResponse(
                    deleted_count=await self.store.delete(namespace, conditions=conditions))
        else:
            ids = _valid_ids(request.ids.chunk_ids)

            async def work():
                deleted = await self.store.delete(namespace, ids=ids) if ids else 0
                return DeleteMemoriesResponse(deleted_count=deleted)
        return await self._once("DeleteMemories", request, namespace,
                                DeleteMemoriesResponse, work)

    async def ForgetNamespace(self, request, context):
        namespace = request.namespace

        async def work():
            chunks = await self.store.delete(namespace)
            sessions = await self.ledger.forget(namespace)
            return ForgetNamespaceResponse(deleted_chunk_count=chunks,
                                           deleted_session_count=sessions)
        return await self._once("ForgetNamespace", request, namespace,
                                ForgetNamespaceResponse, work)

    # -- conversation history ------------------------------------------------
    async def AppendHistory(self, request, context):
        namespace = resolve_namespace(request.namespace, request.context)
        with _backend_errors():
            return await self.ledger.append(namespace, request.session_id, request.messages,
                                            request.request_id, _history_fingerprint(request))

    async def GetHistory(self, request, context):
        namespace = resolve_namespace(request.namespace, request.context)
        with _backend_errors():
            messages, total, truncated, stored = await self.ledger.history(
                namespace, request.session_id, request.token_budget,
                request.max_messages or DEFAULT_HISTORY_MESSAGES, self.limits.history_bytes)
        return GetHistoryResponse(messages=messages, total_tokens=total, truncated=truncated,
                                  session_message_count=stored)


def _history_fingerprint(request) -> str:
    """What an AppendHistory asks for: its messages' ids and creation times
    are assigned by the service and ignored, so a retry that stamps them
    anew is still the same request."""
    probe = type(request)()
    probe.CopyFrom(request)
    for message in probe.messages:
        message.ClearField("message_id")
        message.ClearField("create_time")
    return fingerprint(probe)


def _replayed(response: AddMemoriesResponse) -> AddMemoriesResponse:
    response.replayed = True
    response.embedding_usage.Clear()
    return response


def _too_large(field: str, size: int, limit: int, what: str) -> errors.ServiceError:
    return errors.ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT, ErrorReason.ERROR_REASON_PAYLOAD_TOO_LARGE,
        f"{field}: {size} {what.split(';')[0]} is over the limit of {limit}",
        {"size": str(size), "limit": str(limit)},
        [errors.bad_request([(field, f"at most {limit} {what}")])])
