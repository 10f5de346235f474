"""Dense embeddings behind one small interface.

- :class:`HashingEmbedder` needs nothing (no model, no key, no network):
  the default when no LLM service is configured, and what tests use.
- :class:`LlmServiceEmbedder` calls the LLM service's ``Embed`` RPC, so the
  memory service embeds with whatever model the LLM service routes to
  (OpenAI-compatible embedding models in production, the mock otherwise).
- :class:`LocalEmbedder` runs all-MiniLM-L6-v2 in-process with numpy (see
  :mod:`hivemesh.services.memory.minilm`), from a package that ships its
  weights: real semantic vectors with no service, key or download.

Keyword (BM25) vectors are not embeddings in this sense: the store computes
them and they need no model at all.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from hivemesh.client.base import trace_metadata
from hivemesh.runtime.telemetry import child_span
from hivemesh.runtime.text import estimate_tokens, hashing_embedding

if TYPE_CHECKING:
    from hivemesh.services.memory.minilm import MiniLM

_tracer = trace.get_tracer("hivemesh.memory")


class EmbedderUnavailable(ConnectionError):
    """The embedding model could not be reached; nothing was embedded."""


class EmbeddingRejected(ValueError):
    """The embedding model refused the input (too long, malformed)."""


class EmbedderRateLimited(ConnectionError):
    """The embedding model is over its rate limit; nothing was embedded.
    ``retry_after_s``: when to come back, as the LLM service said (None
    when it did not say)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EmbedTooLarge(EmbeddingRejected):
    """An Embed call (its texts, or its vectors) exceeded the gRPC message
    limit between the services: the same call fails the same way again."""


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    tokens: int


class Embedder(Protocol):
    # Recorded with the collection; a collection refuses another model.
    model: str
    dimensions: int
    # The model behind ``model`` when that is an alias another model may
    # take over ("" when ``model`` names the model itself); recorded too.
    upstream_model: str
    # The longest input the model embeds whole, in ``input_unit`` as
    # :meth:`input_length` counts them; None when the model has no limit of
    # its own below the service's largest chunk (MAX_CHUNK_CHARS, in
    # characters).
    max_input: int | None
    input_unit: str

    def input_length(self, text: str) -> int:
        """The length of ``text`` as the model's input limit counts it."""
        ...

    async def embed(self, texts: Sequence[str], *, query: bool = False,
                    timeout_s: float | None = None) -> Embeddings:
        """One vector per text, in order."""
        ...

    async def close(self) -> None:
        ...


class _CharacterLimit:
    """An embedder whose only input limit is the service's largest chunk,
    in characters."""

    max_input: int | None = None
    input_unit = "characters"

    def input_length(self, text: str) -> int:
        return len(text)


# Characters of one hashing embedder call worked on the event loop's
# thread; a larger call runs in a worker thread (a big add's batch takes
# a tenth of a second or more, which would stall every other call).
HASHING_INLINE_CHARS = 16 * 1024


class HashingEmbedder(_CharacterLimit):
    """Deterministic feature hashing of words and word pairs (see
    :func:`hivemesh.runtime.text.hashing_embedding`): similar texts get
    similar vectors, and the same text always the same vector."""

    def __init__(self, dimensions: int = 384) -> None:
        self.dimensions = dimensions
        self.model = f"hashing-{dimensions}"
        self.upstream_model = ""

    def _embed(self, texts: Sequence[str]) -> Embeddings:
        return Embeddings([hashing_embedding(t, self.dimensions) for t in texts],
                          sum(estimate_tokens(t) for t in texts))

    async def embed(self, texts: Sequence[str], *, query: bool = False,
                    timeout_s: float | None = None) -> Embeddings:
        if sum(len(t) for t in texts) <= HASHING_INLINE_CHARS:
            return self._embed(texts)
        return await asyncio.to_thread(self._embed, texts)

    async def close(self) -> None:
        return None


class LocalEmbedder:
    """all-MiniLM-L6-v2 in this process: 384 dimensions, inputs truncated to
    256 word pieces. The forward pass runs in a worker thread (numpy's matrix
    products release the interpreter lock), so the event loop keeps serving.

    Build it with :meth:`open`, which raises ``LocalModelMissing`` (a
    ValueError naming the pip command) when the model is not installed.
    """

    def __init__(self, model: MiniLM) -> None:
        from hivemesh.services.memory.minilm import MODEL_NAME
        self._model = model
        self.model = f"local:{MODEL_NAME}"
        self.upstream_model = ""
        self.dimensions = model.dimensions
        # Longer inputs are truncated by the model: a whole item past it is
        # refused rather than embedded by its beginning alone.
        self.max_input: int | None = model.max_tokens
        self.input_unit = "word pieces"

    def input_length(self, text: str) -> int:
        return self._model.count_tokens([text])

    @classmethod
    async def open(cls, *, batch_size: int = 8) -> LocalEmbedder:
        from hivemesh.services.memory.minilm import MiniLM, bundled_model_dir
        folder = bundled_model_dir()
        return cls(await asyncio.to_thread(MiniLM, folder, batch_size=batch_size))

    async def embed(self, texts: Sequence[str], *, query: bool = False,
                    timeout_s: float | None = None) -> Embeddings:
        from hivemesh.services.memory.minilm import DeadlineExceeded
        if not texts:
            return Embeddings([], 0)
        # The worker stops between batches once the deadline has passed.
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            vectors, tokens = await asyncio.to_thread(self._model.encode, list(texts),
                                                      deadline=deadline)
        except DeadlineExceeded as exc:
            raise EmbedderUnavailable(f"local model: {exc}") from exc
        return Embeddings(vectors.tolist(), tokens)

    async def close(self) -> None:
        return None


# Status codes of the LLM service that mean "try again later" rather than
# "this input is wrong". RESOURCE_EXHAUSTED is told apart by its reason:
# the LLM service's rate limit (reason RATE_LIMITED, with RetryInfo), or
# gRPC's own refusal of a message over the size limit (no reason), which
# fails the same way however often it is retried.
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                        grpc.StatusCode.CANCELLED})

# Most bytes of text one Embed call carries, well under the 16 MiB message
# limit of both services (the request also holds the ids and framing), and
# most bytes of vectors one answer is expected to carry.
EMBED_BATCH_BYTES = 4 * 1024 * 1024
# Bytes of one text in the request besides its UTF-8 (tag and length), and
# of one Embedding in the answer besides its floats (tags, index, length).
_TEXT_OVERHEAD = 8
_VECTOR_OVERHEAD = 16


def _status_details(err: grpc.aio.AioRpcError) -> tuple[str, float | None]:
    """The ErrorInfo reason and the RetryInfo delay (in seconds) of a
    hivemesh error, from its ``grpc-status-details-bin`` trailer; ("",
    None) when the error carries none (one made by gRPC itself)."""
    from google.rpc import error_details_pb2, status_pb2
    reason, delay = "", None
    for key, value in err.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # noqa: BLE001 - a malformed trailer says nothing
            return reason, delay
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                delay = retry.retry_delay.ToNanoseconds() / 1e9
    return reason, delay


def _batches(texts: Sequence[str], most: int, most_bytes: int) -> list[Sequence[str]]:
    """``texts`` in order, cut into runs of at most ``most`` texts and at
    most ``most_bytes`` bytes of UTF-8 (a single longer text goes alone)."""
    batches: list[Sequence[str]] = []
    start, size = 0, 0
    for i, text in enumerate(texts):
        length = len(text.encode(errors="surrogatepass")) + _TEXT_OVERHEAD
        if i > start and (i - start >= most or size + length > most_bytes):
            batches.append(texts[start:i])
            start, size = i, 0
        size += length
    if start < len(texts):
        batches.append(texts[start:])
    return batches


class LlmServiceEmbedder(_CharacterLimit):
    """Embeds through ``hivemesh.llm.v1.LlmService/Embed``.

    Build it with :meth:`open`, which asks the LLM service once for an
    embedding, exactly as every later call asks (the model's own size: no
    ``dimensions`` is ever sent, as many models refuse it), and learns the
    model's dimension, the alias it resolves to and the upstream model behind
    that alias, so a collection made with another model is refused at
    start-up, not at the first add.
    """

    def __init__(self, channel: grpc.aio.Channel, *, model: str, alias: str,
                 dimensions: int, batch_size: int = 256, timeout_s: float = 30.0,
                 upstream_model: str = "", batch_bytes: int = EMBED_BATCH_BYTES) -> None:
        from hivemesh.llm.v1 import LlmServiceStub
        self._channel = channel
        self._stub = LlmServiceStub(channel)
        self._alias = alias
        self.model = model
        self.upstream_model = upstream_model
        self.dimensions = dimensions
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self.timeout_s = timeout_s

    @classmethod
    async def open(cls, address: str, *, alias: str = "", batch_size: int = 256,
                   timeout_s: float = 30.0, channel_retries: bool = True,
                   tls=None) -> LlmServiceEmbedder:
        """``tls``: a ChannelTls for a TLS channel, else plaintext. Raises
        EmbeddingRejected naming the alias when the LLM service refuses to
        embed with it, EmbedderUnavailable (a ConnectionError) when it
        cannot be reached."""
        from hivemesh.client.channel import open_channel
        channel = open_channel(address, "llm", tls, retries=channel_retries)
        embedder = cls(channel, model=alias, alias=alias, dimensions=0,
                       batch_size=batch_size, timeout_s=timeout_s)
        named = repr(alias) if alias else "the LLM service's default embedding alias"
        try:
            response = await embedder._call(["dimension probe"], query=False,
                                            timeout_s=timeout_s)
        except EmbeddingRejected as exc:
            await channel.close()
            raise EmbeddingRejected(
                f"the LLM service at {address} refused to embed with {named} (the memory "
                f"service asks for the model's own vector size, without `dimensions`): "
                f"{exc}; set HIVEMESH_MEMORY_EMBEDDING_MODEL to an embedding alias it "
                "serves, or fix that alias in the LLM service's configuration") from exc
        except BaseException:
            await channel.close()
            raise
        # The collection records the alias the service resolved, so two
        # configurations naming the same model by default agree, and the
        # upstream model behind it, so an alias moved to another model is
        # caught.
        embedder.model = f"llm:{response.model or alias}"
        embedder.upstream_model = response.upstream_model
        embedder.dimensions = response.dimensions or len(response.embeddings[0].values)
        return embedder

    async def _call(self, texts: Sequence[str], *, query: bool, timeout_s: float | None):
        from hivemesh.llm.v1 import EmbedInputType, EmbedRequest
        # No ``dimensions``: the start-up call asked the same way, and a
        # model that refuses the parameter (text-embedding-ada-002, many
        # OpenAI-compatible servers) would fail every later call.
        request = EmbedRequest(
            request_id=str(uuid.uuid4()), model=self._alias, texts=list(texts),
            input_type=(EmbedInputType.EMBED_INPUT_TYPE_QUERY if query
                        else EmbedInputType.EMBED_INPUT_TYPE_DOCUMENT))
        try:
            # A hop of the request's trace (and its baggage: the tenant).
            with child_span(_tracer, "hivemesh.llm.v1.LlmService/Embed", kind=SpanKind.CLIENT,
                            attributes={"rpc.system": "grpc",
                                        "rpc.service": "hivemesh.llm.v1.LlmService",
                                        "rpc.method": "Embed",
                                        "gen_ai.operation.name": "embeddings",
                                        "gen_ai.request.model": self._alias}):
                return await self._stub.Embed(request, timeout=timeout_s or self.timeout_s,
                                              metadata=trace_metadata())
        except grpc.aio.AioRpcError as err:
            code = err.code()
            said = f"LLM service Embed: {code.name}: {err.details()}"
            if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                reason, delay = _status_details(err)
                if reason == "RATE_LIMITED":
                    raise EmbedderRateLimited(said, delay) from err
                raise EmbedTooLarge(
                    f"{said} (a batch of {len(texts)} texts; set "
                    "HIVEMESH_MEMORY_EMBED_BATCH_SIZE lower, or the LLM service's "
                    "HIVEMESH_LLM_SERVER__MAX_MESSAGE_BYTES higher)") from err
            if code in _TRANSIENT:
                raise EmbedderUnavailable(said) from err
            raise EmbeddingRejected(said) from err

    def _split(self, texts: Sequence[str]) -> list[Sequence[str]]:
        """Batches of at most ``batch_size`` texts whose request and answer
        each stay within ``batch_bytes``."""
        most = self.batch_size
        if self.dimensions:
            most = max(1, min(most, self.batch_bytes // (4 * self.dimensions
                                                         + _VECTOR_OVERHEAD)))
        return _batches(texts, most, self.batch_bytes)

    async def embed(self, texts: Sequence[str], *, query: bool = False,
                    timeout_s: float | None = None) -> Embeddings:
        batches = self._split(texts)
        responses = await asyncio.gather(*(self._call(b, query=query, timeout_s=timeout_s)
                                           for b in batches))
        vectors: list[list[float]] = []
        tokens = 0
        for response in responses:
            if self.upstream_model and response.upstream_model not in ("",
                                                                       self.upstream_model):
                # The alias was routed to another model since start-up (the
                # LLM service restarted with another configuration): its
                # vectors cannot be compared with the collection's.
                raise EmbeddingRejected(
                    f"the LLM service's alias {self.model.removeprefix('llm:')!r} now "
                    f"routes to the upstream model {response.upstream_model!r}, but the "
                    f"collection holds vectors of {self.upstream_model!r}; route the alias "
                    "back, or restart the memory service on another collection")
            ordered = sorted(response.embeddings, key=lambda e: e.index)
            vectors.extend(list(e.values) for e in ordered)
            tokens += response.usage.prompt_tokens
        if len(vectors) != len(texts):
            raise EmbeddingRejected(f"the LLM service returned {len(vectors)} vectors for "
                                    f"{len(texts)} texts")
        if any(len(v) != self.dimensions for v in vectors):
            raise EmbeddingRejected(f"the LLM service returned vectors of another size than "
                                    f"{self.dimensions}")
        return Embeddings(vectors, tokens)

    async def close(self) -> None:
        await self._channel.close()
