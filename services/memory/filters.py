"""From the contract's Filter to store conditions, and item metadata to and
from the payload. The contract's protovalidate rules have checked the keys
already; what they cannot express (a range with no bound, or with bounds
that exclude everything) is refused here with the field that is wrong."""

from __future__ import annotations

import contextlib
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from hivemesh.memory.v1 import Filter
from hivemesh.runtime import errors
from hivemesh.runtime.wellknown import rfc3339, struct_dict
from hivemesh.services.memory.store.base import (
    AnyOf, Condition, Equals, NumberRange, TimeRange)

def _bounds(msg, names: tuple[str, ...]) -> dict[str, Any]:
    return {n: getattr(msg, n) for n in names if msg.HasField(n)}


def _empty_range(lower: tuple[Any, bool] | None, upper: tuple[Any, bool] | None) -> bool:
    """True when no value can lie between the bounds ((value, inclusive))."""
    if lower is None or upper is None:
        return False
    (lo, lo_incl), (hi, hi_incl) = lower, upper
    return lo > hi or (lo == hi and not (lo_incl and hi_incl))


def _lower(b: dict[str, Any]) -> tuple[Any, bool] | None:
    """The tighter lower bound as (value, inclusive); at equal values the
    exclusive one is tighter."""
    bounds = [(b[k], k == "gte") for k in ("gte", "gt") if k in b]
    return max(bounds, key=lambda x: (x[0], not x[1])) if bounds else None


def _upper(b: dict[str, Any]) -> tuple[Any, bool] | None:
    bounds = [(b[k], k == "lte") for k in ("lte", "lt") if k in b]
    return min(bounds, key=lambda x: (x[0], x[1])) if bounds else None


def _time_bound(key: str, name: str, ts: timestamp_pb2.Timestamp, field: str) -> str:
    """A time bound in RFC 3339. The engines compare times to the
    microsecond: they drop the digits of a bound finer than that, which
    moves it earlier. So a ``gte`` or ``lt`` bound inside a microsecond is
    rounded up to the next instead, where it means the same for every time
    stored to the microsecond or coarser (create_time, and the metadata
    times of most writers); ``gt`` and ``lte`` lose nothing by the cut."""
    text = rfc3339(ts, field)
    finer = ts.nanos % 1000
    if name in ("gte", "lt") and finer:
        up = timestamp_pb2.Timestamp()
        with contextlib.suppress(ValueError):  # past year 9999: no stored time is there
            up.FromNanoseconds(ts.ToNanoseconds() + 1000 - finer)
            text = up.ToJsonString()
    return text


def to_conditions(flt: Filter, field: str = "filter") -> list[Condition]:
    out: list[Condition] = []
    bad: list[tuple[str, str]] = []
    for i, c in enumerate(flt.conditions):
        where = f"{field}.conditions[{i}]"
        which = c.WhichOneof("match")
        if which == "equals_string":
            out.append(Equals(c.key, c.equals_string))
        elif which == "equals_int":
            out.append(Equals(c.key, c.equals_int))
        elif which == "equals_bool":
            out.append(Equals(c.key, c.equals_bool))
        elif which == "any_of":
            out.append(AnyOf(c.key, tuple(c.any_of.values)))
        elif which in ("range", "time_range"):
            msg = getattr(c, which)
            b = _bounds(msg, ("gte", "gt", "lte", "lt"))
            if not b:
                bad.append((f"{where}.{which}", "set at least one of gte, gt, lte, lt"))
                continue
            if which == "time_range":
                b = {k: (v.seconds, v.nanos) for k, v in b.items()}
            if _empty_range(_lower(b), _upper(b)):
                bad.append((f"{where}.{which}", "the lower bound is above the upper bound; "
                                                "nothing can match"))
                continue
            if which == "range":
                out.append(NumberRange(c.key, **_bounds(msg, ("gte", "gt", "lte", "lt"))))
            else:
                out.append(TimeRange(c.key, **{
                    k: _time_bound(c.key, k, getattr(msg, k), f"{where}.{which}.{k}")
                    for k in b}))
        else:
            bad.append((where, "set one match (equals_*, any_of, range or time_range)"))
    if bad:
        raise errors.invalid_argument(bad)
    return out


def metadata_to_payload(metadata: struct_pb2.Struct, field: str) -> dict[str, Any]:
    """An item's metadata as payload; ``field`` names it in errors."""
    return struct_dict(metadata, field)


def payload_to_metadata(value: dict[str, Any] | None, into: struct_pb2.Struct) -> None:
    if value:
        into.update(value)
