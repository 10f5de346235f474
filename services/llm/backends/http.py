"""What the HTTP backends share: HTTP status to error kind, Retry-After
parsing, which values are credentials to redact, and how a failure of the
transport (timeout, refused or broken connection) becomes a BackendError."""

from __future__ import annotations

import datetime
import email.utils
import time
from collections.abc import Mapping
from typing import Any

import httpx2

from hivemesh.services.llm.backends.base import BackendError, ErrorKind

MAX_MESSAGE_CHARS = 500


def error_kind(status: int | None, error_type: str | None, texts: tuple[str | None, ...],
               context_patterns: tuple[str, ...],
               type_kinds: Mapping[str, ErrorKind]) -> ErrorKind:
    """The kind of an upstream error from its HTTP status, its error type
    and its message. Errors without an HTTP error status (inside a stream)
    are classified by their type."""
    text = " ".join(p for p in (error_type, *texts) if p).lower()
    if status == 529 or error_type == "overloaded_error":
        return ErrorKind.OVERLOADED
    if (status is None or 400 <= status < 500) and any(p in text for p in context_patterns):
        return ErrorKind.CONTEXT_TOO_LONG
    if status is None or status < 400:
        return type_kinds.get(error_type or "", ErrorKind.UNAVAILABLE)
    # 402: the account cannot pay (credits, billing): this backend refuses,
    # another may answer, as for 403.
    by_status = {401: ErrorKind.AUTHENTICATION, 402: ErrorKind.PERMISSION,
                 403: ErrorKind.PERMISSION,
                 404: ErrorKind.NOT_FOUND, 408: ErrorKind.TIMEOUT, 429: ErrorKind.RATE_LIMITED}
    if status in by_status:
        return by_status[status]
    return ErrorKind.UNAVAILABLE if status >= 500 else ErrorKind.BAD_REQUEST


def error_field(value: Any) -> str | None:
    """A field of an upstream's error object as text, None when empty
    (OpenRouter's ``code`` is the HTTP status, a number)."""
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else str(value)


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """``retry-after-ms``, else ``retry-after`` in seconds or as an HTTP date."""
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # An HTTP date is GMT, also in the asctime form, which names no zone
        # (a naive datetime would be read as local time).
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - time.time())


def connection_failure(exc: BaseException) -> str | None:
    """The name of the error behind ``exc`` when the upstream could not be
    reached at all (refused, reset, no route), else None. The SDKs' aiohttp
    transport reports a refused connection as a connect *timeout*; the
    socket error underneath tells the truth."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and not isinstance(current, TimeoutError):
            return type(current).__name__
        current = current.__cause__ or current.__context__
    return None


def secrets(api_key: str, headers: Mapping[str, str] | None) -> tuple[str, ...]:
    """The key and every header value that looks like a credential."""
    values = [api_key] + [v for k, v in (headers or {}).items()
                          if any(w in k.lower() for w in ("key", "auth", "token", "secret"))]
    return tuple(v for v in values if v and len(v) >= 4)


class UpstreamErrors:
    """Mixin of the HTTP backends: error mapping, redaction and stream-error
    wrapping. Subclasses set ``name``, ``_secrets`` and their SDK's
    ``_timeout_errors`` and ``_connection_errors``, and implement
    ``_map_api_error`` for the answers of the API itself."""

    name: str
    _secrets: tuple[str, ...]
    _timeout_errors: tuple[type[BaseException], ...] = ()
    _connection_errors: tuple[type[BaseException], ...] = ()

    def _map_api_error(self, exc: BaseException) -> BackendError | None:
        """The API's error answer in ``exc`` as a BackendError; None when
        ``exc`` is no such answer."""
        raise NotImplementedError

    def _map_error(self, exc: BaseException, timeout_s: float) -> BackendError:
        """Every failure of an upstream call as a BackendError."""
        if isinstance(exc, BackendError):
            return exc
        refused = connection_failure(exc)
        if refused is not None:
            return BackendError(ErrorKind.UNAVAILABLE,
                                f"{self.name}: could not reach the upstream ({refused})")
        if isinstance(exc, (TimeoutError, httpx2.TimeoutException, *self._timeout_errors)):
            return BackendError(ErrorKind.TIMEOUT,
                                f"{self.name}: no answer from the upstream within {timeout_s:g} s")
        if isinstance(exc, self._connection_errors):
            cause = type(exc.__cause__).__name__ if exc.__cause__ else "connection error"
            return BackendError(ErrorKind.UNAVAILABLE,
                                f"{self.name}: could not reach the upstream ({cause})")
        answer = self._map_api_error(exc)
        if answer is not None:
            return answer
        if isinstance(exc, httpx2.HTTPError):
            return BackendError(
                ErrorKind.UNAVAILABLE,
                f"{self.name}: the upstream connection failed ({type(exc).__name__})")
        return BackendError(ErrorKind.UNAVAILABLE,
                            f"{self.name}: unexpected {type(exc).__name__} from the upstream: "
                            f"{self._redact(str(exc))}")

    def _stream_error(self, exc: BaseException, timeout_s: float, yielded: bool) -> BackendError:
        """After the first event, every failure is a cut stream."""
        error = self._map_error(exc, timeout_s)
        if not yielded or error.kind is ErrorKind.STREAM_CUT:
            return error
        return BackendError(ErrorKind.STREAM_CUT,
                            f"{self.name}: the stream broke after it started ({error.message})",
                            status=error.status, retry_after_s=error.retry_after_s)

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text[:MAX_MESSAGE_CHARS]
