"""The one interface of memory stores, and the types it speaks.

Two implementations, both Qdrant: :mod:`.edge` (the engine embedded
in-process, the default) and :mod:`.qdrant` (a Qdrant server or cluster
through qdrant-client; its local mode in tests). The congruence suite runs
the same scenarios on both.

Every read and write takes the namespace as its first argument and the
store adds the namespace condition to every filter itself: no caller can
build a query that reaches into another namespace.

A point is one chunk: a dense vector ``dense``, a keyword (BM25) sparse
vector ``bm25`` whose IDF the engine applies, and a payload::

    namespace, text, source_id, chunk_index, chunk_count, metadata{...},
    lineage{workflow_id, task_id, agent_id, generation_id, artifact_id},
    create_time (RFC 3339), create_time_us
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DENSE = "dense"
SPARSE = "bm25"
NAMESPACE = "namespace"
LINEAGE_FIELDS = ("workflow_id", "task_id", "agent_id", "generation_id", "artifact_id")
# Payload fields with an index: the namespace (the tenant key of every
# query), and the stored fields filters name most.
KEYWORD_INDEXES = ("source_id", *(f"lineage.{f}" for f in LINEAGE_FIELDS))
DATETIME_INDEXES = ("create_time",)


class StoreUnavailable(ConnectionError):
    """The store could not be reached or did not answer; a write that raised
    this may or may not have happened (a retry with the same ids is safe)."""


class Refusal(enum.Enum):
    """Why a store that answered refused a call."""
    # The request as the store got it (a filter, a limit its rules refuse).
    INVALID = "invalid"
    # The collection or the server is not as the service needs it (the
    # collection is gone or holds other vectors, the server is locked or
    # too old): the same call fails until someone changes that.
    PRECONDITION = "precondition"
    # The server refused the service's credentials.
    CREDENTIALS = "credentials"
    # The server's rate limit: the call may succeed after ``retry_after_s``.
    RATE_LIMITED = "rate_limited"
    # The server failed the call itself (its internal error).
    FAILED = "failed"


class StoreRefused(ValueError):
    """The store answered and refused the call; unlike
    :class:`StoreUnavailable` the same call would be refused again (but for
    RATE_LIMITED, once its wait is over). ``status`` is the store's own name
    for the answer (a gRPC code name or an HTTP status). A ValueError, so a
    refusal at start-up is reported as a configuration problem."""

    def __init__(self, refusal: Refusal, message: str, *, status: str,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.status = status
        self.retry_after_s = retry_after_s


# What Qdrant (server and embedded engine alike) says when the vectors the
# service sends do not fit the collection's ("Wrong input: Vector dimension
# error: ...", "Not existing vector name error: bm25"): the collection, not
# the request, is at fault.
_VECTOR_MISMATCH = ("vector dimension error", "vector inserting error",
                    "not existing vector name", "missed vector name",
                    "sparse and regular vectors", "vector params for")


def vectors_refused(where: str, answer: str, *, status: str) -> StoreRefused | None:
    """The refusal for a store's ``answer`` that says the collection at
    ``where`` holds other vectors than the service sends; None for any
    other answer."""
    if not any(p in answer.lower() for p in _VECTOR_MISMATCH):
        return None
    return StoreRefused(Refusal.PRECONDITION,
                        f"the collection at {where} does not take the vectors the service "
                        f"sends ({answer}); it was made or changed outside this service: use "
                        "another collection, or make this one again", status=status)


class EmbedderMismatch(ValueError):
    """The collection was built with another embedding model or dimension."""


class VectorsMismatch(ValueError):
    """The collection lacks a vector the service needs, or has it in
    another form (made by hand, or by an older version)."""


@dataclass(frozen=True)
class SparseVector:
    indices: Sequence[int]
    values: Sequence[float]


@dataclass(frozen=True)
class ChunkPoint:
    id: str
    dense: Sequence[float]
    sparse: SparseVector
    payload: dict[str, Any]


@dataclass(frozen=True)
class Found:
    id: str
    payload: dict[str, Any]
    score: float = 0.0


# -- filter conditions (all must hold) -------------------------------------
@dataclass(frozen=True)
class Equals:
    key: str
    value: str | int | bool


@dataclass(frozen=True)
class AnyOf:
    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class NumberRange:
    key: str
    gte: float | None = None
    gt: float | None = None
    lte: float | None = None
    lt: float | None = None


@dataclass(frozen=True)
class TimeRange:
    """Bounds are RFC 3339 strings."""
    key: str
    gte: str | None = None
    gt: str | None = None
    lte: str | None = None
    lt: str | None = None


Condition = Equals | AnyOf | NumberRange | TimeRange


def typed(conditions: Sequence[Condition]) -> list[Condition]:
    """``conditions`` as the stores send them. A match of the wrong type for
    a field matches nothing; but the embedded engine's datetime index reads
    a numeric range on an indexed time field as microseconds since the epoch
    (qdrant-client's local mode, which has no index, matches nothing): such
    a range goes as one that nothing meets, on every store."""
    return [NumberRange(c.key, gt=0, lt=0)
            if isinstance(c, NumberRange) and c.key in DATETIME_INDEXES else c
            for c in conditions]


class Mode(enum.Enum):
    DENSE = "dense"
    KEYWORD = "keyword"
    HYBRID = "hybrid"


@dataclass(frozen=True)
class Search:
    mode: Mode
    limit: int
    dense: Sequence[float] | None = None
    sparse: SparseVector | None = None
    conditions: Sequence[Condition] = ()
    score_threshold: float | None = None
    # Candidates each side contributes to a hybrid fusion.
    prefetch_limit: int = 100
    # Reciprocal rank fusion constant: a result at rank r (0-based) of one
    # side scores 1 / (rrf_k + r).
    rrf_k: int = 60


def at_least(found: list[Found], threshold: float | None) -> list[Found]:
    """The results (best first) scoring ``threshold`` or more; None keeps
    all. The engines' own threshold leaves out a result scoring exactly it
    in dense and keyword searches but not in fused ones, so the stores apply
    it here: the first ``limit`` results that pass are the best ``limit``
    of those that would."""
    return found if threshold is None else [f for f in found if f.score >= threshold]


@dataclass(frozen=True)
class CollectionInfo:
    """What a collection records about the embeddings it holds."""
    embedding_model: str
    dimensions: int
    # The model behind ``embedding_model`` when that is an alias another
    # model may take over (the LLM service's ``llm:<alias>``); "" when the
    # embedder names its model itself, or the record was written before
    # versions kept it.
    upstream_model: str = ""

    @classmethod
    def of(cls, record: Mapping[str, Any], dimensions: int = 0) -> CollectionInfo:
        """The info a collection's record holds (keys it does not know are
        ignored); ``dimensions`` when the record has none."""
        return cls(str(record.get("embedding_model") or ""),
                   int(record.get("dimensions") or dimensions),
                   str(record.get("upstream_model") or ""))

    def record(self) -> dict[str, Any]:
        """What a collection records (no ``upstream_model`` key when there
        is none, as versions before it wrote)."""
        kept: dict[str, Any] = {"embedding_model": self.embedding_model,
                                "dimensions": self.dimensions}
        if self.upstream_model:
            kept["upstream_model"] = self.upstream_model
        return kept

    def check(self, wanted: CollectionInfo, where: str) -> bool:
        """Raises EmbedderMismatch unless the service (``wanted``) embeds
        with the model this record names. True when the record is to be
        completed with ``wanted``'s upstream model: one written before the
        upstream model was kept gets it on the first start."""
        if (self.embedding_model, self.dimensions) != (wanted.embedding_model,
                                                       wanted.dimensions):
            raise EmbedderMismatch(
                f"the memory collection at {where} holds embeddings of model "
                f"{self.embedding_model!r} ({self.dimensions} dimensions), but the service is "
                f"configured with {wanted.embedding_model!r} ({wanted.dimensions} "
                "dimensions); configure the same embedder, or use another collection or "
                "data directory")
        if not wanted.upstream_model:
            return False
        if not self.upstream_model:
            return True
        if self.upstream_model != wanted.upstream_model:
            raise EmbedderMismatch(
                f"the memory collection at {where} holds embeddings of model "
                f"{self.embedding_model!r} made by the upstream model "
                f"{self.upstream_model!r}, but that alias now routes to "
                f"{wanted.upstream_model!r} (with as many dimensions: their vectors cannot "
                f"be compared all the same); route the alias to {self.upstream_model!r} "
                "again, set HIVEMESH_MEMORY_EMBEDDING_MODEL to an alias of it, or use "
                "another collection or data directory (and add the memories again)")
        return False


def check_vectors(where: str, *, dense: bool, sparse: bool, sparse_idf: bool) -> None:
    """Raises VectorsMismatch unless the collection at ``where`` has the
    named vectors every point gets: ``dense`` (the embeddings) and the
    sparse ``bm25`` (keywords) with the IDF modifier, without which keyword
    and hybrid searches fail, or weigh every word alike, on every call."""
    advice = ("it was made by hand or by another version of the service: use another "
              "collection or data directory, or make this one again")
    if not dense:
        raise VectorsMismatch(
            f"the memory collection at {where} has no dense vector {DENSE!r}, which the "
            f"service stores embeddings in; {advice}")
    if not sparse:
        raise VectorsMismatch(
            f"the memory collection at {where} has no sparse vector {SPARSE!r}, which keyword "
            f"and hybrid search need; {advice}")
    if not sparse_idf:
        raise VectorsMismatch(
            f"the memory collection at {where} has the sparse vector {SPARSE!r} without the "
            f"IDF modifier, which keyword and hybrid search need to weigh rare words; {advice}")


class MemoryStore(abc.ABC):
    """Async interface; implementations keep blocking work off the loop."""

    # The embedding model and dimension the collection was built with.
    info: CollectionInfo

    @abc.abstractmethod
    async def upsert(self, points: Sequence[ChunkPoint]) -> None:
        """Insert or replace; durable (survives a crash) once it returns."""

    @abc.abstractmethod
    async def get(self, namespace: str, ids: Sequence[str]) -> list[Found]:
        """The points of ``namespace`` among ``ids`` (any order)."""

    @abc.abstractmethod
    async def search(self, namespace: str, search: Search) -> list[Found]:
        """Best first."""

    @abc.abstractmethod
    async def count(self, namespace: str, conditions: Sequence[Condition] = ()) -> int:
        ...

    @abc.abstractmethod
    async def delete(self, namespace: str, *, ids: Sequence[str] | None = None,
                     conditions: Sequence[Condition] = (),
                     keep_ids: Sequence[str] = ()) -> int:
        """Deletes the points of ``namespace`` matching ``conditions`` (and
        among ``ids`` when given), except ``keep_ids``; returns how many
        matched just before."""

    @abc.abstractmethod
    async def close(self) -> None:
        ...
