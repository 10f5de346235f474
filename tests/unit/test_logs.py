import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from hivemesh.runtime.middleware import request_id_var
from hivemesh.runtime.logs import JsonFormatter, redact


def _format(record_msg: str, **extra) -> dict:
    record = logging.LogRecord("hivemesh.test", logging.INFO, __file__, 1, record_msg, (), None)
    for k, v in extra.items():
        setattr(record, k, v)
    return json.loads(JsonFormatter("artifact").format(record))


def test_log_line_carries_trace_and_request_id():
    tracer = TracerProvider().get_tracer("t")
    token = request_id_var.set("req-42")
    try:
        with tracer.start_as_current_span("s") as span:
            entry = _format("saved")
    finally:
        request_id_var.reset(token)
    assert entry["msg"] == "saved"
    assert entry["service"] == "artifact"
    assert entry["trace_id"] == f"{span.get_span_context().trace_id:032x}"
    assert entry["request_id"] == "req-42"


def test_secrets_never_reach_a_log_line():
    entry = _format("calling with key sk-abcdef0123456789 and Bearer abcdefghijkl.mnop",
                    api_key="sk-live-123", postgres_dsn="postgresql://u:hunter2@db/x",
                    note="postgresql://user:hunter2@db:5432/app")
    text = json.dumps(entry)
    assert "sk-abcdef0123456789" not in text and "abcdefghijkl" not in text
    assert "sk-live-123" not in text and "hunter2" not in text
    assert entry["api_key"] == "[REDACTED]"
    assert redact("nothing secret here") == "nothing secret here"
    for secret, where in (("pw1", "redis://:pw1@cache:6379/0"), ("pw2", "rediss://u:pw2@cache"),
                          ("pw3", "https://user:pw3@proxy:8443/x"),
                          ("pw4", "host=db password=pw4 dbname=app")):
        assert secret not in redact(f"connecting to {where}")
    assert redact("http://host:8080/path") == "http://host:8080/path"


def test_a_url_password_holding_an_at_sign_is_redacted_whole():
    """URL parsers (redis-py's, libpq's) take the userinfo up to the last
    ``@`` before the host, so an unescaped ``@`` belongs to the password."""
    assert redact("connecting to postgresql://app:p@ss@db:5432/x failed") == (
        "connecting to [REDACTED]db:5432/x failed")
    assert redact("connecting to redis://:s@cr@t@cache:6379/0 failed") == (
        "connecting to [REDACTED]cache:6379/0 failed")
    assert redact("http://host:8080/a@b") == "http://host:8080/a@b"
