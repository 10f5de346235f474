"""The hashing embedder: deterministic, normalised, similar texts closer."""

from __future__ import annotations

import math

from hivemesh.services.memory.embedders import HashingEmbedder
from hivemesh.services.memory.keywords import KeywordEncoder


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


async def test_hashing_embedder_is_deterministic_and_normalised():
    e = HashingEmbedder(384)
    assert (e.model, e.dimensions) == ("hashing-384", 384)
    first = await e.embed(["the fox jumps over the dog", "qdrant stores vectors"])
    again = await e.embed(["the fox jumps over the dog", "qdrant stores vectors"])
    assert first.vectors == again.vectors
    assert all(len(v) == 384 and math.isclose(_cos(v, v), 1.0) for v in first.vectors)
    assert first.tokens > 0


async def test_similar_texts_are_closer_than_unrelated_ones():
    e = HashingEmbedder(384)
    a, b, c = (await e.embed(["the quick brown fox jumps", "a quick brown fox jumped",
                              "invoices are due at month end"], query=True)).vectors
    assert _cos(a, b) > _cos(a, c)


def test_keyword_vectors_stem_and_drop_stop_words():
    kw = KeywordEncoder()
    assert kw.query("the of and") is None
    doc = kw.document("running runners run")
    query = kw.query("run")
    assert query is not None and set(query.indices) <= set(doc.indices)


async def test_an_llm_answer_with_another_number_of_vectors_is_rejected():
    """One vector per text or the answer is refused (as one with vectors of
    another size is), never zipped against the texts."""
    import grpc
    import pytest

    from hivemesh.llm.v1 import EmbedResponse, Embedding
    from hivemesh.services.memory.embedders import EmbeddingRejected, LlmServiceEmbedder

    class OneVector:
        async def Embed(self, request, timeout=None, metadata=None):
            return EmbedResponse(embeddings=[Embedding(index=0, values=[1.0, 0.0])],
                                 dimensions=2)

    channel = grpc.aio.insecure_channel("127.0.0.1:1")
    try:
        embedder = LlmServiceEmbedder(channel, model="llm:m", alias="m", dimensions=2)
        embedder._stub = OneVector()
        with pytest.raises(EmbeddingRejected):
            await embedder.embed(["one", "two"])
    finally:
        await channel.close()


class _Recording:
    """An LLM service stub that answers every Embed with one vector of
    ``dimensions`` per text and keeps the requests."""

    def __init__(self, dimensions: int, fail=None) -> None:
        self.dimensions = dimensions
        self.requests = []
        self.fail = fail

    async def Embed(self, request, timeout=None, metadata=None):
        from hivemesh.llm.v1 import EmbedResponse, Embedding
        self.requests.append(request)
        if self.fail is not None:
            raise self.fail
        return EmbedResponse(embeddings=[Embedding(index=i, values=[1.0] * self.dimensions)
                                         for i in range(len(request.texts))],
                             dimensions=self.dimensions, model="m", upstream_model="u")


def _embedder(channel, stub, dimensions: int, **kwargs):
    from hivemesh.services.memory.embedders import LlmServiceEmbedder
    embedder = LlmServiceEmbedder(channel, model="llm:m", alias="m", dimensions=dimensions,
                                  **kwargs)
    embedder._stub = stub
    return embedder


async def test_batches_are_cut_by_bytes_as_well_as_by_count():
    """Texts that would make one Embed call over the byte budget go in
    several calls, each within it, in order; a text over the budget by
    itself goes alone. No call ever asks for ``dimensions``."""
    import grpc

    stub = _Recording(2)
    channel = grpc.aio.insecure_channel("127.0.0.1:1")
    try:
        embedder = _embedder(channel, stub, 2, batch_size=100, batch_bytes=10_000)
        texts = ["記" * 1000 for _ in range(10)] + ["x" * 20_000] + ["short"] * 3
        result = await embedder.embed(texts)
        assert len(result.vectors) == len(texts)
        sent = [list(r.texts) for r in stub.requests]
        assert [t for batch in sent for t in batch] == texts
        assert all(sum(len(t.encode()) for t in batch) <= 10_000
                   for batch in sent if len(batch) > 1)
        assert ["x" * 20_000] in sent
        assert len(sent) > 3
        assert all(r.dimensions == 0 for r in stub.requests)
    finally:
        await channel.close()


async def test_batches_are_cut_so_the_answer_fits_too():
    """Wide vectors make a big answer: a batch holds no more texts than the
    budget has room for their vectors."""
    import grpc

    stub = _Recording(1024)
    channel = grpc.aio.insecure_channel("127.0.0.1:1")
    try:
        embedder = _embedder(channel, stub, 1024, batch_size=256, batch_bytes=64 * 1024)
        await embedder.embed(["t"] * 100)
        assert all(len(r.texts) * 1024 * 4 <= 64 * 1024 for r in stub.requests)
        assert sum(len(r.texts) for r in stub.requests) == 100
    finally:
        await channel.close()


def _rpc_error(code, details: str, *status_details):
    import grpc
    from google.protobuf import any_pb2
    from google.rpc import status_pb2
    packed = []
    for detail in status_details:
        any_msg = any_pb2.Any()
        any_msg.Pack(detail)
        packed.append(any_msg)
    trailing = grpc.aio.Metadata()
    if packed:
        trailing.add("grpc-status-details-bin", status_pb2.Status(
            code=code.value[0], message=details, details=packed).SerializeToString())
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


async def test_the_llm_rate_limit_keeps_its_reason_and_delay():
    import grpc
    import pytest
    from google.protobuf import duration_pb2
    from google.rpc import error_details_pb2

    from hivemesh.services.memory.embedders import EmbedderRateLimited

    limited = _rpc_error(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "every backend of the chain is over its rate limit",
        error_details_pb2.ErrorInfo(reason="RATE_LIMITED", domain="hivemesh.llm"),
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=42, nanos=5)))
    channel = grpc.aio.insecure_channel("127.0.0.1:1")
    try:
        embedder = _embedder(channel, _Recording(2, fail=limited), 2)
        with pytest.raises(EmbedderRateLimited) as err:
            await embedder.embed(["x"])
        assert err.value.retry_after_s == pytest.approx(42.0)
    finally:
        await channel.close()


async def test_a_message_over_the_size_limit_is_not_a_passing_outage():
    """gRPC's own RESOURCE_EXHAUSTED (no ErrorInfo) for a message over the
    limit: the same call fails alike, so it is no EmbedderUnavailable."""
    import grpc
    import pytest

    from hivemesh.services.memory.embedders import EmbedderUnavailable, EmbedTooLarge

    too_large = _rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           "CLIENT: Sent message larger than max (22651786 vs. 16777216)")
    channel = grpc.aio.insecure_channel("127.0.0.1:1")
    try:
        embedder = _embedder(channel, _Recording(2, fail=too_large), 2)
        with pytest.raises(EmbedTooLarge) as err:
            await embedder.embed(["x"])
        assert not isinstance(err.value, EmbedderUnavailable)
        assert "Sent message larger than max" in str(err.value)
    finally:
        await channel.close()


async def test_vectors_of_another_upstream_model_than_at_start_up_are_refused():
    """The LLM service restarted with the alias on another model while the
    memory service ran: its vectors cannot be compared with the
    collection's, so none is stored or searched with."""
    import grpc
    import pytest

    from hivemesh.services.memory.embedders import EmbeddingRejected

    stub = _Recording(2)  # answers upstream_model "u"
    channel = grpc.aio.insecure_channel("127.0.0.1:1")
    try:
        same = _embedder(channel, stub, 2, upstream_model="u")
        assert len((await same.embed(["x"])).vectors) == 1
        moved = _embedder(channel, stub, 2, upstream_model="t")
        with pytest.raises(EmbeddingRejected, match="now routes to the upstream model 'u'"):
            await moved.embed(["x"])
    finally:
        await channel.close()
