"""Building protobuf well-known types from the integers services keep
(microseconds since the epoch, durations in seconds or microseconds), and
reading the ones requests carry into plain values, refusing what cannot be
represented with INVALID_ARGUMENT on the request's field."""

from __future__ import annotations

import time
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from hivemesh.runtime import errors


def now_us() -> int:
    return time.time_ns() // 1000


def timestamp(us: int | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp of microseconds since the epoch; None stays None."""
    if us is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(us)
    return ts


def duration_us(us: int) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMicroseconds(us)
    return d


def duration_s(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def struct_dict(value: struct_pb2.Struct, field: str) -> dict[str, Any]:
    """A request's Struct as JSON-like data, with integral numbers as
    integers (a Struct's numbers are all doubles: a JSON schema's
    ``"maxItems": 3`` must not become ``3.0``, nor metadata's ``2`` fail an
    integer match). NaN and infinities, which JSON cannot hold, are refused."""
    if not value.fields:
        return {}
    try:
        return _integral(json_format.MessageToDict(value))
    except (json_format.Error, ValueError):
        raise errors.invalid_argument([(field, "numbers must be finite (NaN and infinities "
                                               "cannot be stored)")]) from None


_INT64 = 2 ** 63


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < _INT64:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def rfc3339(ts: timestamp_pb2.Timestamp, field: str) -> str:
    """A request's Timestamp in RFC 3339; one outside the years 1 to 9999
    (or with nanos out of range) is refused."""
    try:
        return ts.ToJsonString()
    except ValueError:
        raise errors.invalid_argument([(field, "not a valid timestamp (years 1 to 9999, nanos "
                                               "0 to 999,999,999)")]) from None


def timestamp_us(ts: timestamp_pb2.Timestamp, field: str) -> int:
    """A request's Timestamp in microseconds since the epoch, checked as
    :func:`rfc3339` does."""
    rfc3339(ts, field)
    return ts.ToMicroseconds()
