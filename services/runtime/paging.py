"""Page tokens: an opaque encoding of the last key of a page together with a
digest of the request's filters, so a token only works with the request it
was issued for (AIP-158)."""

from __future__ import annotations

import base64
import hashlib
import json

from hivemesh.runtime import errors


def digest(*filters: object) -> str:
    """A short digest of what a listing was filtered by."""
    return hashlib.sha256(json.dumps(filters, sort_keys=True, default=str).encode()
                          ).hexdigest()[:16]


def encode(key: list, filters_digest: str) -> str:
    # UTF-8 rather than escapes: a key of non-ASCII text stays short.
    raw = json.dumps([key, filters_digest], ensure_ascii=False, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


_INT64 = 2 ** 63


def _storable(value: object) -> bool:
    """Whether every store can compare a key value: a 64-bit integer, or
    text UTF-8 can encode with no NUL (which PostgreSQL text cannot hold).
    Tokens are not signed; a doctored one must fail here, not in a store."""
    if isinstance(value, int):
        return -_INT64 <= value < _INT64
    if isinstance(value, str):
        if "\x00" in value:
            return False
        try:
            value.encode()
        except UnicodeEncodeError:
            return False
    return True


def decode(token: str, filters_digest: str, shape: tuple[type, ...]) -> list:
    """The key of a token, one value of each type of ``shape``;
    INVALID_ARGUMENT on ``page_token`` if the token is malformed or was
    issued for other filters."""
    try:
        key, seen = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not isinstance(key, list) or len(key) != len(shape) or not all(
                isinstance(v, t) and not isinstance(v, bool) and _storable(v)
                for v, t in zip(key, shape)):
            raise ValueError("bad token")
    except (ValueError, TypeError, RecursionError):  # (arrays nested past the stack)
        raise errors.invalid_argument([("page_token", "page_token is malformed")]) from None
    if seen != filters_digest:
        raise errors.invalid_argument(
            [("page_token", "page_token was issued for a different request")])
    return key
