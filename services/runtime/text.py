"""Model-free text measures shared by services: a token estimate and a
deterministic hashing embedding (the LLM mock backend embeds with it, and
the memory service uses it when no embedding model is configured)."""

from __future__ import annotations

import hashlib
import math
import re

_WORD = re.compile(r"\w+")


def estimate_tokens(text: str) -> int:
    """A model-independent estimate: about four characters per token for
    ASCII text, one per other character (CJK, emoji and the like take one or
    more tokens each in real tokenizers: never underestimated four times)."""
    if not text:
        return 0
    if text.isascii():
        return max(1, (len(text) + 3) // 4)
    other = sum(1 for c in text if ord(c) > 127)
    return max(1, (len(text) - other + 3) // 4 + other)


def hashing_embedding(text: str, dimensions: int) -> list[float]:
    """Deterministic feature-hashing embedding: words and word bigrams hashed
    into signed buckets, L2-normalised. Similar texts get similar vectors."""
    words = _WORD.findall(text.lower())
    buckets: dict[int, float] = {}
    for feature in words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]:
        digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
        bucket = int.from_bytes(digest[:4], "little") % dimensions
        buckets[bucket] = buckets.get(bucket, 0.0) + (1.0 if digest[4] & 1 else -1.0)
    # Only the touched buckets are non-zero: normalise those alone.
    norm = math.sqrt(sum(v * v for v in buckets.values())) or 1.0
    vector = [0.0] * dimensions
    for bucket, value in buckets.items():
        vector[bucket] = value / norm
    return vector
