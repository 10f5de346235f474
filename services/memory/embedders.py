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

from hivemesh.runtime.text import estimate_tokens, hashing_embedding

if TYPE_CHECKING:
    from hivemesh.services.memory.minilm import MiniLM


class EmbedderUnavailable(ConnectionError):
    """The embedding model could not be reached; nothing was embedded."""


class EmbeddingRejected(ValueError):
    """The embedding model refused the input (too long, malformed)."""


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    tokens: int


class Embedder(Protocol):
    # Recorded with the collection; a collection refuses another model.
    model: str
    dimensions: int

    async def embed(self, texts: Sequence[str], *, query: bool = False,
                    timeout_s: float | None = None) -> Embeddings:
        """One vector per text, in order."""
        ...

    async def close(self) -> None:
        ...


class HashingEmbedder:
    """Deterministic feature hashing of words and word pairs (see
    :func:`hivemesh.runtime.text.hashing_embedding`): similar texts get
    similar vectors, and the same text always the same vector."""

    def __init__(self, dimensions: int = 384) -> None:
        self.dimensions = dimensions
        self.model = f"hashing-{dimensions}"

    async def embed(self, texts: Sequence[str], *, query: bool = False,
                    timeout_s: float | None = None) -> Embeddings:
        return Embeddings([hashing_embedding(t, self.dimensions) for t in texts],
                          sum(estimate_tokens(t) for t in texts))

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
        self.dimensions = model.dimensions

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
# "this input is wrong".
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
                        grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED})


class LlmServiceEmbedder:
    """Embeds through ``hivemesh.llm.v1.LlmService/Embed``.

    Build it with :meth:`open`, which asks the LLM service once for the
    model's dimension (and the alias it resolves to), so a collection made
    with another model is refused at start-up, not at the first add.
    """

    def __init__(self, channel: grpc.aio.Channel, *, model: str, alias: str,
                 dimensions: int, batch_size: int = 256, timeout_s: float = 30.0) -> None:
        from hivemesh.llm.v1 import LlmServiceStub
        self._channel = channel
        self._stub = LlmServiceStub(channel)
        self._alias = alias
        self.model = model
        self.dimensions = dimensions
        self.batch_size = batch_size
        self.timeout_s = timeout_s

    @classmethod
    async def open(cls, address: str, *, alias: str = "", dimensions: int = 0,
                   batch_size: int = 256, timeout_s: float = 30.0,
                   channel_retries: bool = True, tls=None) -> LlmServiceEmbedder:
        """``tls``: a ChannelTls for a TLS channel, else plaintext."""
        from hivemesh.client.channel import open_channel
        channel = open_channel(address, "llm", tls, retries=channel_retries)
        embedder = cls(channel, model=alias, alias=alias, dimensions=dimensions,
                       batch_size=batch_size, timeout_s=timeout_s)
        try:
            response = await embedder._call(["dimension probe"], query=False,
                                            timeout_s=timeout_s)
        except BaseException:
            await channel.close()
            raise
        # The collection records the alias the service resolved, so two
        # configurations naming the same model by default agree.
        embedder.model = f"llm:{response.model or alias}"
        embedder.dimensions = response.dimensions or len(response.embeddings[0].values)
        return embedder

    async def _call(self, texts: Sequence[str], *, query: bool, timeout_s: float | None):
        from hivemesh.llm.v1 import EmbedInputType, EmbedRequest
        request = EmbedRequest(
            request_id=str(uuid.uuid4()), model=self._alias, texts=list(texts),
            dimensions=self.dimensions,
            input_type=(EmbedInputType.EMBED_INPUT_TYPE_QUERY if query
                        else EmbedInputType.EMBED_INPUT_TYPE_DOCUMENT))
        try:
            return await self._stub.Embed(request, timeout=timeout_s or self.timeout_s)
        except grpc.aio.AioRpcError as err:
            if err.code() in _TRANSIENT:
                raise EmbedderUnavailable(f"LLM service Embed: {err.code().name}: "
                                          f"{err.details()}") from err
            raise EmbeddingRejected(f"LLM service Embed: {err.code().name}: "
                                    f"{err.details()}") from err

    async def embed(self, texts: Sequence[str], *, query: bool = False,
                    timeout_s: float | None = None) -> Embeddings:
        batches = [texts[i:i + self.batch_size] for i in range(0, len(texts), self.batch_size)]
        responses = await asyncio.gather(*(self._call(b, query=query, timeout_s=timeout_s)
                                           for b in batches))
        vectors: list[list[float]] = []
        tokens = 0
        for response in responses:
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
