"""Splitting memory items into chunks.

A chunk is at most ``size`` characters. Text is cut at paragraph breaks
where it can, else at sentence ends (those of Devanagari and Arabic script,
and the full-width ones of Chinese and Japanese, which no space follows,
too), else between words, and only a
single word longer than a chunk is cut inside. With an overlap, each chunk after
the first starts with the last (up to) ``overlap`` characters of the one
before, taken from a word boundary (or a full-width sentence end), so a
sentence cut in two is still found whole in one of them.
"""

from __future__ import annotations

import re

# Boundaries from the strongest to the weakest; a separator stays with the
# text before it, so the pieces concatenate back into the original.
_BOUNDARIES = (
    re.compile(r"\n[ \t\r]*\n\s*"),        # paragraph: a blank line (LF or CRLF)
    # sentence: a mark (an ellipsis, and the marks of Devanagari and Arabic
    # script too) and its closing quotes or brackets, then a space, or none
    # after the full-width marks of scripts written without spaces
    re.compile(r"(?<=[.!?;:…।॥؟۔؛])[\"')\]”’»]*\s+|(?<=[。！？；：｡])[\"')\]”’»」』）】〕〗〙〛]*\s*"),
    re.compile(r"\s+"),                    # word
)
_SPACE = re.compile(r"\s")
# Where an overlap may start: after a space, or after a full-width sentence
# end (and its closing brackets), which no space follows.
_START = re.compile(r"\s|(?<=[。！？；：｡])[」』）】〕〗〙〛\"')\]”’»]*")


def _pieces(text: str, limit: int, size: int, level: int = 0) -> list[str]:
    """``text`` cut into pieces of at most ``limit`` characters, at the
    strongest boundary that makes them fit; a single word longer than that
    stays whole if it fits in ``size``, else is cut in parts of ``size``."""
    if len(text) <= limit:
        return [text]
    if level == len(_BOUNDARIES):
        return [text[i:i + size] for i in range(0, len(text), size)]
    pieces: list[str] = []
    start = 0
    for match in _BOUNDARIES[level].finditer(text):
        if match.end() > start:
            pieces.extend(_pieces(text[start:match.end()], limit, size, level + 1))
            start = match.end()
    if start < len(text):
        pieces.extend(_pieces(text[start:], limit, size, level + 1))
    return pieces


def _tail(text: str, overlap: int) -> str:
    """The last ``overlap`` characters of ``text`` or fewer, starting at a
    word or a sentence."""
    if overlap <= 0:
        return ""
    if len(text) <= overlap:
        return text
    tail = text[-overlap:]
    if _SPACE.match(text[-overlap - 1]):
        return tail
    start = _START.search(text, len(text) - overlap)
    return text[start.end():] if start else ""


def chunk_text(text: str, size: int, overlap: int = 0) -> list[str]:
    """Chunks of ``text`` (whitespace-trimmed, none empty), in order."""
    if size < 1:
        raise ValueError("chunk size must be at least 1")
    if not 0 <= overlap < size:
        raise ValueError("chunk overlap must be at least 0 and smaller than the chunk size")
    chunks: list[str] = []
    current = ""
    # Pieces leave room for the overlap that may precede them in a chunk,
    # but for a long word, before which the overlap gives way.
    for piece in _pieces(text, size - overlap, size):
        if current.strip() and len(current) + len(piece) > size:
            chunks.append(current)
            current = _tail(current, min(overlap, size - len(piece))).lstrip() + piece
        else:
            current += piece
    if current.strip():
        chunks.append(current)
    return [c.strip() for c in chunks]
