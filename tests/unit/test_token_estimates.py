"""The model-independent token estimate budgets rely on when a caller gives
no count: never several times under what a tokenizer would count."""

from hivemesh.runtime.text import estimate_tokens


def test_ascii_text_counts_about_four_characters_a_token():
    assert estimate_tokens("") == 0
    assert estimate_tokens("a") == 1
    assert estimate_tokens("x" * 400) == 100


def test_other_scripts_and_emoji_count_a_token_a_character():
    assert estimate_tokens("漢字" * 100) == 200
    assert estimate_tokens("🙂" * 100) == 100
    assert estimate_tokens("abcd漢") == 2
