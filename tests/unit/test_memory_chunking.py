"""Chunking: sizes, boundaries, overlap, and nothing lost."""

from __future__ import annotations

import re

import pytest

from hivemesh.services.memory.chunking import chunk_text

PARAGRAPHS = ("Agents remember what they did. The memory service keeps it.\n\n"
              "Chunks are embedded one by one! Each keeps its lineage.\n\n"
              "Search finds them again: dense, keyword or hybrid?")


def _words(text: str) -> list[str]:
    return re.findall(r"\S+", text)


def test_short_text_is_one_chunk_trimmed():
    assert chunk_text("  hello world \n", 100, 10) == ["hello world"]


@pytest.mark.parametrize("size,overlap", [(20, 0), (40, 10), (64, 16), (120, 0), (500, 100)])
def test_chunks_fit_and_lose_no_word(size, overlap):
    text = PARAGRAPHS * 5
    chunks = chunk_text(text, size, overlap)
    assert all(0 < len(c) <= size for c in chunks)
    if overlap == 0:
        assert _words(" ".join(chunks)) == _words(text)
    else:
        # Every word of the text appears, in order, once the overlaps are removed.
        assert set(_words(text)) <= set(_words(" ".join(chunks)))


def test_cuts_at_paragraphs_when_they_fit():
    chunks = chunk_text(PARAGRAPHS, 70, 0)
    assert chunks == [p.strip() for p in PARAGRAPHS.split("\n\n")]



@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_blank_line_is_a_paragraph_break_whatever_the_line_ends(newline):
    # Windows files and e-mail end lines with CRLF; a heading has no full stop.
    text = f"Release notes{newline}{newline}The memory service keeps lineage for every chunk"
    assert chunk_text(text, 60, 0) == ["Release notes",
                                       "The memory service keeps lineage for every chunk"]

def test_cuts_at_sentences_before_words():
    text = "First sentence is here. Second sentence follows it. Third one ends."
    chunks = chunk_text(text, 30, 0)
    assert chunks == ["First sentence is here.", "Second sentence follows it.",
                      "Third one ends."]



def test_cuts_at_sentences_of_scripts_written_without_spaces():
    # Japanese and Chinese end sentences with full-width marks and put no
    # space after them: there, not inside a word, is where to cut.
    text = "記憶サービスはテキストを分割します。各チャンクは埋め込まれます。検索で再び見つかります！"
    assert chunk_text(text, 30, 0) == ["記憶サービスはテキストを分割します。",
                                       "各チャンクは埋め込まれます。検索で再び見つかります！"]
    assert chunk_text("你好。「他说。」再见！好吗？", 5, 0) == ["你好。", "「他说。」", "再见！", "好吗？"]
    # A sentence closed by a curly quote ends there too.
    assert chunk_text("He said “Stop.” Then he left.", 20, 0) == ["He said “Stop.”",
                                                                 "Then he left."]

@pytest.mark.parametrize("sentence", [
    "यह एक छोटा वाक्य है।",      # Hindi: the danda
    "هل هذه جملة قصيرة؟",        # Arabic: the question mark
    "یہ ایک چھوٹا جملہ ہے۔",      # Urdu: the full stop
    "It went on and on…",          # an ellipsis
])
def test_cuts_at_the_sentence_ends_of_other_scripts(sentence):
    text = " ".join(f"{n} {sentence}" for n in range(12))
    chunks = chunk_text(text, 3 * len(sentence), 0)
    assert len(chunks) > 1
    assert all(c.endswith(sentence[-1]) for c in chunks), chunks


def test_long_word_is_cut_inside_only_when_it_must():
    chunks = chunk_text("a " + "x" * 25 + " b", 10, 0)
    assert all(len(c) <= 10 for c in chunks)
    assert "".join(chunks).replace(" ", "") == "a" + "x" * 25 + "b"


@pytest.mark.parametrize("before", ["", "short words first, ", "y" * 40 + " abcdefghijklmno "])
def test_a_word_that_fits_a_chunk_is_never_cut_even_with_an_overlap(before):
    """The overlap before a word gives way to it (it is "up to" the overlap):
    a word no longer than a chunk stays whole."""
    word = "x" * 95
    chunks = chunk_text(before + word + " after it", 100, 20)
    assert all(len(c) <= 100 for c in chunks)
    assert any(word in c for c in chunks), chunks
    # A word longer than a chunk is cut in chunk-sized parts.
    assert chunk_text("x" * 250, 100, 20) == ["x" * 100, "x" * 100, "x" * 50]


def test_overlap_repeats_the_end_of_the_previous_chunk_from_a_word():
    text = " ".join(f"word{i}" for i in range(60))
    chunks = chunk_text(text, 60, 20)
    assert len(chunks) > 2
    for before, after in zip(chunks, chunks[1:], strict=False):
        shared = max((k for k in range(1, 21) if before.endswith(after[:k])), default=0)
        assert shared > 0, (before, after)
        assert before[-shared - 1] == " " and after[shared] == " "  # whole words


def test_overlap_in_scripts_written_without_spaces_starts_after_a_sentence_end():
    # Chinese and Japanese put no space between words or after a sentence:
    # the overlap starts where a sentence does, rather than not at all.
    text = "".join(f"第{i}句话很短。" for i in range(20))
    chunks = chunk_text(text, 30, 10)
    assert len(chunks) > 2 and all(len(c) <= 30 for c in chunks)
    for before, after in zip(chunks, chunks[1:], strict=False):
        shared = max((k for k in range(1, 11) if before.endswith(after[:k])), default=0)
        assert shared > 0, (before, after)
        assert before[-shared - 1] == "。" and after[shared - 1] == "。"


def test_no_overlap_shares_nothing():
    text = " ".join(f"word{i}" for i in range(60))
    chunks = chunk_text(text, 60, 0)
    assert sum(len(_words(c)) for c in chunks) == 60


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        chunk_text("x", 10, 10)
    with pytest.raises(ValueError):
        chunk_text("x", 0, 0)
