"""Keyword (BM25) vectors: the engine's own tokenizer, stemmer and stop
words (``qdrant_edge.Bm25``), computed here so both stores index the same
sparse vectors. A document vector holds term-frequency weights; the engine
multiplies in the inverse document frequency at query time."""

from __future__ import annotations

import qdrant_edge

from hivemesh.services.memory.store.base import SparseVector


class KeywordEncoder:
    def __init__(self, language: str = "english") -> None:
        self._bm25 = qdrant_edge.Bm25(qdrant_edge.Bm25Config(language=language))

    def document(self, text: str) -> SparseVector:
        v = self._bm25.embed_document(text)
        return SparseVector(v.indices, v.values)

    def query(self, text: str) -> SparseVector | None:
        """None when the query has no keyword at all (only stop words)."""
        v = self._bm25.embed_query(text)
        return SparseVector(v.indices, v.values) if v.indices else None
