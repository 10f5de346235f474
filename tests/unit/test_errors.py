"""Server-side error building and client-side translation agree."""

import grpc
from grpc_status import rpc_status

from hivemesh.client import errors as client_errors
from hivemesh.runtime import errors


class _FakeRpcError(grpc.RpcError):
    def __init__(self, status):
        self._status = rpc_status.to_status(status)

    def code(self):
        return self._status.code

    def details(self):
        return self._status.details

    def trailing_metadata(self):
        return self._status.trailing_metadata


def test_invalid_argument_round_trips_with_field_violations():
    error = errors.invalid_argument([("workflow_id", "must not be empty"),
                                     ("messages[2].content", "too long")])
    translated = client_errors.from_rpc_error(_FakeRpcError(error.to_status("hivemesh.test")))
    assert isinstance(translated, client_errors.InvalidArgumentError)
    assert translated.reason == "INVALID_REQUEST"
    assert translated.domain == "hivemesh.test"
    assert translated.field_violations == [("workflow_id", "must not be empty"),
                                           ("messages[2].content", "too long")]
    assert "workflow_id: must not be empty" in str(translated)


def test_unavailable_carries_retry_delay_and_exactly_one_error_info():
    status = errors.unavailable("storage", "connection refused", retry_after_s=1.5)\
        .to_status("hivemesh.test")
    infos = [d for d in status.details if d.TypeName() == "google.rpc.ErrorInfo"]
    assert len(infos) == 1
    translated = client_errors.from_rpc_error(_FakeRpcError(status))
    assert isinstance(translated, client_errors.UnavailableError)
    assert translated.reason == "BACKEND_UNAVAILABLE"
    assert translated.metadata == {"backend": "storage"}
    assert translated.retry_delay.total_seconds() == 1.5


def test_every_status_code_maps_to_a_typed_exception():
    for code in grpc.StatusCode:
        if code is grpc.StatusCode.OK:
            continue
        error = errors.ServiceError(code, "INTERNAL", "x")
        translated = client_errors.from_rpc_error(_FakeRpcError(error.to_status("d")))
        assert translated.code is code
        assert isinstance(translated, client_errors.HivemeshError)


def test_a_retry_delay_beyond_what_a_duration_holds_is_the_longest_one():
    """An upstream's Retry-After can say anything (``inf``, ``1e400``):
    RetryInfo carries the longest valid Duration, not an OverflowError that
    turns the answer into INTERNAL; a negative or NaN delay is no delay."""
    longest = 315_576_000_000  # google.protobuf.Duration's range, in seconds
    for seconds in (float("inf"), 1e300, 1e12):
        assert errors.retry_info(seconds).retry_delay.seconds == longest
    for seconds in (-1.0, float("nan")):
        delay = errors.retry_info(seconds).retry_delay
        assert (delay.seconds, delay.nanos) == (0, 0)
    assert errors.retry_info(1.5).retry_delay.ToNanoseconds() == 1_500_000_000


def test_a_message_holding_a_lone_surrogate_still_makes_a_status():
    """Text from JSON (``"\\ud800"``) or a file name decoded with
    surrogateescape can hold a lone surrogate, which UTF-8 cannot encode:
    the status carries a replacement instead of failing to be built (the
    caller would get UNKNOWN, quoting the encoding error)."""
    error = errors.ServiceError(grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE",
                                "upstream said \ud800 no", {"body": "\udcff"})
    status = error.to_status("hivemesh.test")
    status.SerializeToString()
    assert status.message == "upstream said ? no"
    translated = client_errors.from_rpc_error(_FakeRpcError(status))
    assert translated.metadata == {"body": "?"}


def _reasons_written_in_the_code() -> list[tuple[str, int, str]]:
    """(file, line, reason) of every reason the services' code writes as
    text: a string given to ServiceError (second argument or ``reason=``)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    found = []
    for path in [*root.glob("services/**/*.py"), *root.glob("orchestrator/**/*.py")]:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and getattr(
                    node.func, "attr", getattr(node.func, "id", "")) == "ServiceError"):
                continue
            texts = node.args[1:2] + [k.value for k in node.keywords if k.arg == "reason"]
            found += [(path.name, t.lineno, t.value) for t in texts
                      if isinstance(t, ast.Constant) and isinstance(t.value, str)]
    return found


def test_every_reason_the_services_write_is_one_of_the_contract():
    """ErrorInfo.reason is a hivemesh.common.v1.ErrorReason name, as the
    contract says, also where the code writes it as text: a client switching
    on the reasons it knows never meets one the contract does not name."""
    from hivemesh.common.v1 import ErrorReason
    known = {name.removeprefix("ERROR_REASON_") for name in ErrorReason.keys()}
    written = _reasons_written_in_the_code()
    assert written, "the scan found no reason written as text at all"
    assert [w for w in written if w[2] not in known] == []
