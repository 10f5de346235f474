"""Page tokens: a key of the expected shape, for the request it was issued
for; anything else is INVALID_ARGUMENT on page_token."""

from __future__ import annotations

import pytest

from hivemesh.runtime import errors, paging


def test_a_token_gives_back_its_key():
    digest = paging.digest("budgets", "acme")
    assert paging.decode(paging.encode(["b-1"], digest), digest, (str,)) == ["b-1"]
    assert paging.decode(paging.encode([17, "art-1"], digest), digest, (int, str)) == [
        17, "art-1"]


@pytest.mark.parametrize("key", [[], ["a", "b"], [1], [True], [None], [["x"]]])
def test_a_key_of_another_shape_is_malformed(key):
    digest = paging.digest("x")
    with pytest.raises(errors.ServiceError) as err:
        paging.decode(paging.encode(key, digest), digest, (str,))
    assert err.value.message == "page_token: page_token is malformed"


def test_a_token_of_another_request_or_no_token_at_all_is_refused():
    token = paging.encode(["a"], paging.digest("one"))
    with pytest.raises(errors.ServiceError, match="different request"):
        paging.decode(token, paging.digest("two"), (str,))
    for garbage in ("!!!", "bm90IGpzb24", paging.encode(["a"], "d")[:-3]):
        with pytest.raises(errors.ServiceError):
            paging.decode(garbage, "d", (str,))


def test_a_token_nesting_arrays_deeper_than_python_recurses_is_malformed():
    """A doctored token of nested arrays, within the 2048 characters some
    page_token fields allow, is the caller's error, not INTERNAL."""
    import base64

    token = base64.urlsafe_b64encode(b"[" * 1500).decode().rstrip("=")
    assert len(token) <= 2048
    with pytest.raises(errors.ServiceError) as err:
        paging.decode(token, "d", (str,))
    assert err.value.message == "page_token: page_token is malformed"
