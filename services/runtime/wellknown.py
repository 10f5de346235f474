"""Building protobuf well-known types from the integers services keep
(microseconds since the epoch, durations in seconds or microseconds)."""

from __future__ import annotations

import time

from google.protobuf import duration_pb2, timestamp_pb2


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
