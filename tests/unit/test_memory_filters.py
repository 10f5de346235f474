"""The contract's Filter becomes store conditions; impossible ranges are
refused with the field that is wrong; metadata numbers round-trip; a
request's namespace comes from the request or its tenant."""

from __future__ import annotations

import hashlib
import re

import grpc
import pytest
from buf.validate import validate_pb2
from google.protobuf import struct_pb2, timestamp_pb2

from hivemesh.client.memory import any_of, equals, in_range, to_filter
from hivemesh.memory.v1 import Condition, Filter, GetMemoriesRequest, NumericRange, TimeRange
from hivemesh.runtime.errors import ServiceError
from hivemesh.services.memory.filters import (
    metadata_to_payload, payload_to_metadata, to_conditions)
from hivemesh.services.memory.namespaces import resolve_namespace
from hivemesh.services.memory.store.base import AnyOf, Equals, NumberRange, TimeRange as TR
from hivemesh.common.v1 import RequestContext


def _ts(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


def test_every_match_kind_translates():
    flt = Filter(conditions=[
        equals("metadata.kind", "note"), equals("metadata.n", 3), equals("metadata.ok", True),
        any_of("source_id", ["a", "b"]), in_range("metadata.score", gte=0.5, lt=2),
        Condition(key="create_time", time_range=TimeRange(gte=_ts(0), lt=_ts(86400)))])
    assert to_conditions(flt) == [
        Equals("metadata.kind", "note"), Equals("metadata.n", 3), Equals("metadata.ok", True),
        AnyOf("source_id", ("a", "b")), NumberRange("metadata.score", gte=0.5, lt=2.0),
        TR("create_time", gte="1970-01-01T00:00:00Z", lt="1970-01-02T00:00:00Z")]
    assert isinstance(to_conditions(flt)[2].value, bool)


@pytest.mark.parametrize("key", ["create_time", "metadata.due"])
def test_time_bounds_inside_a_microsecond_mean_what_they_say_to_the_engines(key):
    """The engines compare times to the microsecond, dropping finer digits
    of a bound (which moves it earlier): gte and lt bounds inside one are
    rounded up to the next, for create_time and metadata times alike; the
    largest timestamp the contract allows stays as it is (no error)."""
    half = timestamp_pb2.Timestamp(seconds=86400, nanos=500)
    gte, gt, lte, lt = to_conditions(Filter(conditions=[
        Condition(key=key, time_range=TimeRange(**{name: half}))
        for name in ("gte", "gt", "lte", "lt")]))
    assert (gte.gte, lt.lt) == ("1970-01-02T00:00:00.000001Z",) * 2
    assert (gt.gt, lte.lte) == ("1970-01-02T00:00:00.000000500Z",) * 2
    top = timestamp_pb2.Timestamp(seconds=253402300799, nanos=999_999_999)
    (last,) = to_conditions(Filter(conditions=[Condition(key=key, time_range=TimeRange(
        gte=top))]))
    assert last.gte == "9999-12-31T23:59:59.999999999Z"


@pytest.mark.parametrize("key,valid", [
    ("metadata.authors[].name", True), ("metadata.tags[]", True),
    ("metadata.a[].b[].c", True), ("metadata.[]", False), ("metadata.a[]]", False),
    ("metadata.a[0].b", False), ("source_id[]", False)])
def test_condition_keys_may_reach_into_lists_of_objects(key, valid):
    import protovalidate
    violations = protovalidate.Validator().collect_violations(
        Condition(key=key, equals_string="x"))
    assert (not violations) == valid


def test_mapping_filters_mean_equals_or_any_of():
    assert to_conditions(to_filter({"metadata.k": "v", "source_id": ["x", "y"]})) == [
        Equals("metadata.k", "v"), AnyOf("source_id", ("x", "y"))]


@pytest.mark.parametrize("cond,field", [
    (Condition(key="metadata.n", range=NumericRange()), "filter.conditions[0].range"),
    (Condition(key="metadata.n", range=NumericRange(gte=5, lte=4)),
     "filter.conditions[0].range"),
    (Condition(key="metadata.n", range=NumericRange(gt=4, lte=4)),
     "filter.conditions[0].range"),
    (Condition(key="create_time", time_range=TimeRange()), "filter.conditions[0].time_range"),
    (Condition(key="create_time", time_range=TimeRange(gt=_ts(10), lt=_ts(10))),
     "filter.conditions[0].time_range"),
])
def test_impossible_ranges_are_invalid_argument_with_the_field(cond, field):
    with pytest.raises(ServiceError) as err:
        to_conditions(Filter(conditions=[cond]))
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
    [violation] = err.value.details[0].field_violations
    assert violation.field == field


def test_touching_inclusive_bounds_are_fine():
    [c] = to_conditions(Filter(conditions=[in_range("metadata.n", gte=4, lte=4)]))
    assert c == NumberRange("metadata.n", gte=4.0, lte=4.0)


def test_metadata_integers_become_integers_and_round_trip():
    meta = struct_pb2.Struct()
    meta.update({"n": 3, "x": 1.5, "nested": {"m": 2, "tags": ["a", 4]}, "ok": True})
    payload = metadata_to_payload(meta, "items[0].metadata")
    assert payload == {"n": 3, "x": 1.5, "nested": {"m": 2, "tags": ["a", 4]}, "ok": True}
    assert isinstance(payload["n"], int) and isinstance(payload["nested"]["tags"][1], int)
    back = struct_pb2.Struct()
    payload_to_metadata(payload, back)
    assert back == meta


def test_namespace_comes_from_the_request_or_the_tenant():
    assert resolve_namespace("ns-1", RequestContext(tenant_id="Acme")) == "ns-1"
    assert resolve_namespace("", RequestContext(tenant_id="Acme")) == "acme"
    assert resolve_namespace("", RequestContext()) == "default"


def test_every_tenant_id_has_a_namespace_of_its_own():
    """Tenant ids that cannot be a namespace as they are (they start with
    . _ : or -) get a derived one, valid, distinct per id up to case."""
    pattern = re.compile(GetMemoriesRequest.DESCRIPTOR.fields_by_name["namespace"]
                         .GetOptions().Extensions[validate_pb2.field].string.pattern)
    odd = ["_x", ".x", "-x", ":x", "_" * 128, "-Acme"]
    derived = [resolve_namespace("", RequestContext(tenant_id=t)) for t in odd]
    assert all(pattern.match(ns) and ns for ns in derived)
    assert len(set(derived)) == len(odd)
    assert derived[0] == "tenant-" + hashlib.sha256(b"_x").hexdigest()[:32]
    assert resolve_namespace("", RequestContext(tenant_id="-ACME")) == derived[-1]
