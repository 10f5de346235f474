"""Typed exceptions for hivemesh RPC failures.

gRPC errors are translated once, at the client boundary, by
:func:`from_rpc_error`; each exception exposes the status code, the
ErrorInfo reason/domain/metadata and the other details (BadRequest field
violations, RetryInfo's delay, QuotaFailure violations), and chains the
original ``grpc.RpcError`` as its cause.
"""

from __future__ import annotations

from datetime import timedelta

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


class HivemeshError(Exception):
    """Base of every error a hivemesh client raises for a failed RPC.

    ``field_violations``: (field, description) of each BadRequest field
    violation (INVALID_ARGUMENT); ``retry_delay``: RetryInfo's delay, when the
    service asks for a pause; ``quota_violations``: (subject, description)
    of each QuotaFailure violation (RESOURCE_EXHAUSTED, such as a budget
    that cannot hold a reservation: subject ``budget:<budget_id>``)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, reason: str = "",
                 domain: str = "", metadata: dict[str, str] | None = None,
                 field_violations: list[tuple[str, str]] | None = None,
                 retry_delay: timedelta | None = None,
                 quota_violations: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = metadata or {}
        self.field_violations = field_violations or []
        self.retry_delay = retry_delay
        self.quota_violations = quota_violations or []

    def __str__(self) -> str:
        tag = f"{self.code.name}" + (f"/{self.reason}" if self.reason else "")
        return f"[{tag}] {self.message}"


class InvalidArgumentError(HivemeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(HivemeshError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(HivemeshError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(HivemeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRangeError(HivemeshError):
    code = grpc.StatusCode.OUT_OF_RANGE


class PermissionDeniedError(HivemeshError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(HivemeshError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhaustedError(HivemeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(HivemeshError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(HivemeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(HivemeshError):
    code = grpc.StatusCode.CANCELLED


class AbortedError(HivemeshError):
    code = grpc.StatusCode.ABORTED


class UnimplementedError(HivemeshError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(HivemeshError):
    code = grpc.StatusCode.INTERNAL


class UnknownError(HivemeshError):
    code = grpc.StatusCode.UNKNOWN


_BY_CODE: dict[grpc.StatusCode, type[HivemeshError]] = {
    cls.code: cls for cls in (
        InvalidArgumentError, NotFoundError, AlreadyExistsError, FailedPreconditionError,
        OutOfRangeError, PermissionDeniedError, UnauthenticatedError, ResourceExhaustedError,
        UnavailableError, DeadlineExceededError, CancelledError, AbortedError,
        UnimplementedError, InternalError, UnknownError)
}
_BY_CODE[grpc.StatusCode.DATA_LOSS] = InternalError


def _status_from(err: grpc.RpcError) -> status_pb2.Status | None:
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == _DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    return None


def from_rpc_error(err: grpc.RpcError) -> HivemeshError:
    """Translate a gRPC error into the matching HivemeshError subclass."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (err.details() if hasattr(err, "details") else None) or str(code.name)
    return _build(code, message, _status_from(err))


def from_status(status: status_pb2.Status) -> HivemeshError:
    """The error a ``google.rpc.Status`` describes (such as the one a stream's
    FAILED ``StreamEnd`` carries)."""
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code),
                grpc.StatusCode.UNKNOWN)
    return _build(code, status.message or code.name, status)


def _build(code: grpc.StatusCode, message: str,
           status: status_pb2.Status | None) -> HivemeshError:
    kwargs: dict = {}
    if status is not None:
        violations: list[tuple[str, str]] = []
        quota: list[tuple[str, str]] = []
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                kwargs.update(reason=info.reason, domain=info.domain,
                              metadata=dict(info.metadata))
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                kwargs["retry_delay"] = info.retry_delay.ToTimedelta()
            elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                failure = error_details_pb2.QuotaFailure()
                detail.Unpack(failure)
                quota += [(v.subject, v.description) for v in failure.violations]
        kwargs["field_violations"] = violations
        kwargs["quota_violations"] = quota
    cls = _BY_CODE.get(code, HivemeshError)
    return cls(message, code=code, **kwargs)
