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
        async def Embed(self, request, timeout=None):
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
