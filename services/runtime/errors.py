"""The one place that builds errors: a google.rpc.Status with exactly one
ErrorInfo (reason, domain, metadata) plus optional BadRequest / RetryInfo /
QuotaFailure details (AIP-193).

Handlers raise :class:`ServiceError`; the error middleware turns it into the
status the client sees. Anything else that escapes a handler becomes INTERNAL
with reason INTERNAL and no internals in the message.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import error_details_pb2, status_pb2

from hivemesh.common.v1 import ErrorReason
from hivemesh.runtime import telemetry

_PREFIX = "ERROR_REASON_"


def reason_name(reason: int | str) -> str:
    """ErrorReason value -> the ErrorInfo.reason string ("NOT_FOUND")."""
    if isinstance(reason, str):
        return reason.removeprefix(_PREFIX)
    return ErrorReason.Name(reason).removeprefix(_PREFIX)


@dataclass
class ServiceError(Exception):
    """An error a handler means to return to the client."""

    code: grpc.StatusCode
    reason: int | str
    message: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    details: list[message.Message] = field(default_factory=list)
    # False: the client must not retry the call automatically even if its
    # retry policy covers the code (the failure comes from a dependency this
    # service already retried; a retry of the whole call would multiply them).
    retry: bool = True

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def to_status(self, domain: str) -> status_pb2.Status:
        """The status, its message and metadata values cut short to fit the
        trailers (``MAX_MESSAGE_BYTES``, ``MAX_METADATA_VALUE_BYTES``)."""
        info = error_details_pb2.ErrorInfo(
            reason=reason_name(self.reason),
            domain=domain,
            metadata={k: _cut(str(v), MAX_METADATA_VALUE_BYTES)
                      for k, v in self.metadata.items()},
        )
        packed = []
        for detail in [info, *self.details]:
            any_msg = any_pb2.Any()
            any_msg.Pack(detail)
            packed.append(any_msg)
        return status_pb2.Status(code=self.code.value[0],
                                 message=_cut_message(self.message), details=packed)


# The status travels in trailers, twice (grpc-message, percent-encoded, and
# grpc-status-details-bin, in base64), and gRPC clients refuse trailers over
# 16 KiB, and some of those over 8 KiB: an error quoting a long id or
# upstream answer would reach the client as RESOURCE_EXHAUSTED. Longer texts
# are cut: the message where grpc-message would exceed MAX_MESSAGE_BYTES
# (a byte of non-ASCII text takes three there), the others at these many
# bytes of UTF-8.
MAX_MESSAGE_BYTES = 1024
MAX_METADATA_VALUE_BYTES = 256
MAX_VIOLATION_TEXT_BYTES = 128


def _cut(text: str, limit: int) -> str:
    # A lone surrogate (from JSON's "\ud800", or a name decoded with
    # surrogateescape) cannot be encoded: it becomes "?".
    data = text.encode(errors="replace")
    if len(data) <= limit:
        return data.decode()
    return data[:limit - 3].decode(errors="ignore") + "..."


def _cut_message(text: str) -> str:
    text = text.encode(errors="replace").decode()
    size = 0
    end = 0
    for i, char in enumerate(text):
        # grpc-message percent-encodes every byte but printable ASCII and %
        size += 1 if " " <= char <= "~" and char != "%" else 3 * len(char.encode())
        if size <= MAX_MESSAGE_BYTES - 3:
            end = i + 1
        elif size > MAX_MESSAGE_BYTES:
            return text[:end] + "..."
    return text


def bad_request(violations: Iterable[tuple[str, str]]) -> error_details_pb2.BadRequest:
    """A BadRequest detail listing (field, description) pairs, each text cut
    at ``MAX_VIOLATION_TEXT_BYTES`` (a field path names map keys, however
    long the request made them)."""
    return error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(
            field=_cut(f, MAX_VIOLATION_TEXT_BYTES),
            description=_cut(d, MAX_VIOLATION_TEXT_BYTES)) for f, d in violations
    ])


# Violations an error lists: the status travels in trailers, which gRPC
# refuses over 16 KiB (and may over 8 KiB); ErrorInfo counts them all.
MAX_LISTED_VIOLATIONS = 10


def invalid_argument(violations: Iterable[tuple[str, str]], message: str | None = None,
                     reason: int = ErrorReason.ERROR_REASON_INVALID_REQUEST) -> ServiceError:
    """INVALID_ARGUMENT with a BadRequest listing (field, description) pairs,
    the first ``MAX_LISTED_VIOLATIONS`` of them."""
    violations = list(violations)
    listed = violations[:MAX_LISTED_VIOLATIONS]
    bad = bad_request(listed)
    if message is None:
        message = "; ".join(f"{f}: {d}" for f, d in listed) or "invalid request"
        if len(violations) > len(listed):
            message += f"; and {len(violations) - len(listed)} more"
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, reason, message,
                        {"violations": str(len(violations))}, [bad])


def not_found(kind: str, ident: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, ErrorReason.ERROR_REASON_NOT_FOUND,
                        f"{kind} {ident!r} not found", {"resource_type": kind, "resource_id": ident})


def unavailable(what: str, cause: str, retry_after_s: float | None = None) -> ServiceError:
    details: list[message.Message] = []
    if retry_after_s is not None:
        details.append(retry_info(retry_after_s))
    return ServiceError(grpc.StatusCode.UNAVAILABLE, ErrorReason.ERROR_REASON_BACKEND_UNAVAILABLE,
                        f"{what} is unavailable: {cause}", {"backend": what}, details)


def idempotency_conflict(request_id: str, what: str = "request") -> ServiceError:
    """A request_id reused with a different request (AIP-155)."""
    return ServiceError(grpc.StatusCode.ALREADY_EXISTS,
                        ErrorReason.ERROR_REASON_IDEMPOTENCY_CONFLICT,
                        f"request_id was already used for a different {what}",
                        {"request_id": request_id})


def internal() -> ServiceError:
    """INTERNAL, naming what the service's log line of the defect carries
    too (the message and the ErrorInfo metadata): the call's ``trace_id``,
    else its ``call_id`` (telemetry.log_id), so an operator can go from the
    error to the traceback. Outside any call, a fresh ``error_id``."""
    found = telemetry.log_id() or ("error_id", uuid.uuid4().hex)
    key, value = found
    return ServiceError(grpc.StatusCode.INTERNAL, ErrorReason.ERROR_REASON_INTERNAL,
                        f"internal error; see the service log for {key} {value}", {key: value})


def client_not_allowed(presented: Sequence[str]) -> ServiceError:
    """PERMISSION_DENIED: the client certificate, from a trusted CA, carries
    none of the accepted names; ``presented``, the names it does carry.

    Not UNAUTHENTICATED: the handshake has authenticated the client (its
    certificate chains to a trusted CA and names who it is); that client is
    only not one this service serves, and another try with the same
    certificate would fail the same way."""
    listed = ", ".join(presented) or "none"
    return ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                        ErrorReason.ERROR_REASON_CLIENT_NOT_ALLOWED,
                        f"the client certificate carries none of the names this service "
                        f"accepts (it carries: {listed})",
                        {"client_names": listed})


def shutting_down() -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, ErrorReason.ERROR_REASON_SHUTTING_DOWN,
                        "the service is shutting down; retry on another replica")


# The longest google.protobuf.Duration, in seconds (about 10,000 years).
_MAX_DURATION_S = 315_576_000_000


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    """RetryInfo of ``seconds``, within what a Duration holds: an
    upstream's Retry-After may be anything (``inf``, ``1e400``)."""
    seconds = min(seconds, _MAX_DURATION_S) if seconds > 0 else 0.0  # (NaN: 0)
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


# Codes that mean the server (not the caller) is at fault; used by tracing to
# decide whether a server span is an error (OpenTelemetry RPC conventions).
SERVER_FAULT_CODES = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})
