import json
import logging
import subprocess
import sys

import pytest
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


@pytest.mark.parametrize(("text", "secret"), [
    # Exception messages of HTTP clients and SDKs, with the request's headers
    ("401 for headers {'Authorization': 'Bearer abc123def456'}", "abc123def456"),
    ("Authorization: Bearer eyJhbGciOi.J9.sig-nature", "eyJhbGciOi"),
    ("authorization=Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
    ("x-api-key: qdrant-key-123 rejected", "qdrant-key-123"),
    ("X-Goog-Api-Key: AIzaSyA-0123456789abcdefghijklmnopqrstu", "AIzaSyA-0123456789"),
    ("api-key: azurekey0987", "azurekey0987"),
    # query strings
    ("GET https://api.example.com/v1/models?api_key=k3y-in-url&limit=5", "k3y-in-url"),
    ("GET /search?apikey=abcd1234", "abcd1234"),
    ("redirect to /cb?code=1&access_token=at-777xyz#state", "at-777xyz"),
    ("wss://stream.example.com/?token=t0k3n", "t0k3n"),
    ("POST /oauth?client_secret=shh-its-a-secret", "shh-its-a-secret"),
    # JSON-ish text and reprs
    ('{"api_key": "json-key-1", "model": "gpt-4o"}', "json-key-1"),
    ("{'apiKey': 'camel-key-2'}", "camel-key-2"),
    ('body {"accessToken":"camel-token-3"}', "camel-token-3"),
    ('config {"secret": "s3 cr3t with spaces"}', "cr3t"),
    ("OPENAI_API_KEY=envkey999 was given", "envkey999"),
    ("HIVEMESH_MEMORY_QDRANT_API_KEY: mounted4567", "mounted4567"),
    ("token = spaced-out-7", "spaced-out-7"),
    ("SECRET='quoted value'", "quoted value"),
    # provider key shapes, wherever they are
    ("Incorrect API key provided: sk-proj-AbC123xyz987", "sk-proj-AbC123xyz987"),
    ("key sk-ant-api03-Zz9_yy8-XX7 is invalid", "sk-ant-api03-Zz9_yy8-XX7"),
    ("(sk-abcdef0123456789)", "sk-abcdef0123456789"),
    ("url ...?key=AIzaSyB0123456789abcdefghijklmnopqrstuv", "AIzaSyB0123456789"),
    # after the word token and a space, a value shaped like a key, a quoted
    # one, or one after a scheme; right after = or :, any value
    ("token: sk-abc123def456ghi", "abc123def456ghi"),
    ("token: t0k3nvalue expired", "t0k3nvalue"),
    ("Token: abcDefGhi rejected", "abcDefGhi"),
    ("token: ghp_plainletters", "ghp_plainletters"),
    ('token: "plainword"', "plainword"),
    ("{'token': 'plainword'}", "plainword"),
    ("token: Bearer plainword", "plainword"),
    ("token=plainword", "plainword"),
    ("token:plainword", "plainword"),
    # a word or number long enough to be a key, even a plain one
    ("token: 9876543210123456", "9876543210123456"),
    ("token: abcdefghijklmnopqrstuvwx expired", "abcdefghijklmnopqrstuvwx"),
    # names that are not the word token alone are never prose
    ("access_token: plainword", "plainword"),
    ("X-Auth-Token: plainword", "plainword"),
    ("authToken: plainword", "plainword"),
    ("password: hunter", "hunter"),
    ("api_key: 12345678", "12345678"),
])
def test_credentials_in_free_text_are_redacted(text, secret):
    hidden = redact(text)
    assert secret not in hidden, hidden
    assert "[REDACTED]" in hidden


def test_redaction_keeps_the_name_of_what_it_hides():
    assert redact("GET /v1/models?api_key=abc&limit=5") == (
        "GET /v1/models?api_key=[REDACTED]&limit=5")
    assert redact('{"api_key": "abc", "model": "m"}') == '{"api_key": "[REDACTED]", "model": "m"}'
    assert redact("Authorization: Bearer abc.def") == "Authorization: Bearer [REDACTED]"
    assert redact("sent Bearer ABCdef123456 upstream") == "sent Bearer [REDACTED] upstream"
    assert redact("refused (token=abc), retrying") == "refused (token=[REDACTED]), retrying"
    assert redact("password=p,w; next") == "password=[REDACTED]; next"


@pytest.mark.parametrize("text", [
    "token budget exceeded for tenant acme",
    "tokens=123 prompt_tokens=100 completion_tokens=23",
    "max_tokens=4096 is above the model's limit",
    '{"max_tokens": 512, "total_tokens": 40, "tokens": 7}',
    "maxTokens: 256, inputTokens: 12",
    "MAX_TOKENS=100",
    "token_count=12 api_key_env=OPENAI_API_KEY",
    "the request has no token",
    "a bearer token is required",
    "Bearer authentication failed",
    "the upstream wants Bearer authentication.",
    "task-0123456789abcdef finished; disk-usage-threshold reached",
    "ask-the-reviewer-agent says risk-assessment done",
    "secrets_dir=/var/run/secrets/hivemesh",
    "http://host:8080/path?limit=5&page_token_hint=x",
    "rate limit: 200000 tokens per minute",
    # the word token, then a word or a number: prose about model tokens
    "token: limit reached",
    "max token: 10",
    "Token: expired, refreshing",
    "token = none left; max token: 4,096 of 8192",
])
def test_redaction_leaves_ordinary_text_alone(text):
    assert redact(text) == text


def test_structured_fields_named_like_counts_stay_and_secret_names_go():
    entry = _format("generated", max_tokens=512, prompt_tokens=10, tokens=3,
                    access_token="at-1", openai_api_key="k-2", client_secret="s-3",
                    apiKey="k-4", token="t-5", authorization="Basic x")
    assert (entry["max_tokens"], entry["prompt_tokens"], entry["tokens"]) == (512, 10, 3)
    for key in ("access_token", "openai_api_key", "client_secret", "apiKey", "token",
                "authorization"):
        assert entry[key] == "[REDACTED]", key


CREDENTIAL_NAMES = ["api_key", "x-api-key", "OPENAI_API_KEY", "apiKey", "access_token",
                    "authToken", "client_secret", "secret_key", "aws_secret_access_key",
                    "secretAccessKey", "PGPASSWORD", "db_passwd", "postgres_dsn",
                    "Authorization"]
# A credential word not last: a credential as a field, a key or a pair
# (api_key_2 holds a key, and so may api_key_env for all a log can tell);
# in free text only a name ending with such a word is one.
FIELD_ONLY_NAMES = ["api_key_2", "OPENAI_API_KEY_BACKUP", "password_old", "dsn_primary",
                    "token_count", "api_key_env", "page_token_hint"]
OTHER_NAMES = ["tokens", "max_tokens", "secrets_dir", "tokenizer", "passwordless",
               "AWS_ACCESS_KEY_ID"]


@pytest.mark.parametrize("name", CREDENTIAL_NAMES + FIELD_ONLY_NAMES + OTHER_NAMES)
def test_a_name_is_a_credential_alike_as_a_field_a_key_a_pair_and_in_text(name):
    """A name whose last word is a credential word (the word password also
    glued to what it is for) is one everywhere; one with such a word
    elsewhere is one as a field, a mapping key and a pair."""
    secret = "value-9f8e7d6c"
    hidden = name in CREDENTIAL_NAMES
    entry = _format("m", **{name: secret}, mapping={name: secret}, pairs=[(name, secret)])
    fields = [entry[name], entry["mapping"][name], entry["pairs"][0][1]]
    texts = [redact(f"{name}={secret}"), redact(f"{name}: {secret}"),
             redact(f"{{'{name}': '{secret}'}}"), redact(f"[('{name}', '{secret}')]")]
    assert [secret not in field for field in fields] == [hidden or name in FIELD_ONLY_NAMES] * 3
    assert [secret not in text for text in texts] == [hidden] * 4, texts


def test_grpc_metadata_logged_as_pairs_hides_the_credentials_values():
    import grpc
    metadata = grpc.aio.Metadata(("x-api-key", "plainsecretvalue"),
                                 ("authorization", "Bearer abcdefghij"),
                                 ("user-agent", "grpc-python"))
    entry = _format("called", metadata=metadata, sent=[("x-api-key", "plainsecretvalue")])
    assert entry["metadata"] == [["x-api-key", "[REDACTED]"], ["authorization", "[REDACTED]"],
                                 ["user-agent", "grpc-python"]]
    assert entry["sent"] == [["x-api-key", "[REDACTED]"]]
    text = redact(f"called with {metadata}")
    assert "plainsecretvalue" not in text and "abcdefghij" not in text
    assert "('user-agent', 'grpc-python')" in text
    assert redact("('x-api-key', b'raw\\'bytes')") == "('x-api-key', b'[REDACTED]')"


def test_a_long_name_is_looked_at_in_one_pass():
    """Names are runs of letters, digits, _ and -: each is looked at once,
    however long, and however many credential words it holds."""
    code = ("from hivemesh.runtime.logs import redact; "
            "redact('secret_' * 200_000 + 'x: 1'); redact('a' * 1_000_000 + 'password'); "
            "redact('(\"' + 'token_' * 200_000 + '\", 1)'); redact('aA' * 500_000)")
    subprocess.run([sys.executable, "-c", code], timeout=120, check=True)


def _strict_json(text: str) -> dict:
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_a_field_json_cannot_hold_as_is_still_gives_a_json_line():
    """A mapping with keys that are not text, a NaN or an infinity: the line
    is still written, and is JSON a strict parser reads."""
    record = logging.LogRecord("hivemesh.test", logging.INFO, __file__, 1, "counted", (), None)
    record.by_pair = {("a", "b"): 1}
    record.ratio = float("nan")
    record.ceiling = [float("inf")]
    entry = _strict_json(JsonFormatter("artifact").format(record))
    assert entry["msg"] == "counted"
    assert entry["by_pair"] == {"('a', 'b')": 1}
    assert entry["ratio"] == "nan" and entry["ceiling"] == ["inf"]


def test_a_field_that_is_no_text_is_redacted_as_text():
    class Endpoint:
        def __str__(self):
            return "https://user:hunter2@api.example.com/v1"

    entry = _format("calling", endpoint=Endpoint(), urls=["postgresql://u:hunter2@db/x"])
    assert "hunter2" not in json.dumps(entry)


def test_a_credential_inside_a_structured_field_is_redacted_by_its_name():
    entry = _format("calling", headers={"Authorization": "Basic dXNlcjpodW50ZXIy",
                                        "x-api-key": "k-1", "max_tokens": 7},
                    backends=[{"name": "openai", "api_key": "k-2"}])
    assert entry["headers"] == {"Authorization": "[REDACTED]", "x-api-key": "[REDACTED]",
                                "max_tokens": 7}
    assert entry["backends"] == [{"name": "openai", "api_key": "[REDACTED]"}]


def test_a_long_run_of_letters_is_redacted_in_one_pass():
    """A log line quoting a base64 blob (an upstream's error body, say):
    the URL pattern, tried at each letter of the run, scanned the rest of it
    each time (a 40 KB run held the event loop for seconds, a megabyte for
    hours). Redacted in a child process, stopped if it has not finished."""
    code = "from hivemesh.runtime.logs import redact; redact('A' * 1_000_000)"
    subprocess.run([sys.executable, "-c", code], timeout=120, check=True)


def test_prose_after_the_word_token_is_told_apart_in_one_pass():
    """Telling prose from a secret after ``token:`` looks at each value
    once: a long value, or many such values, cost time linear in the line."""
    code = ("from hivemesh.runtime.logs import redact; "
            "redact('token: ' + 'a' * 1_000_000); redact('token: ' + 'a-' * 500_000); "
            "redact('max token: 10 ' * 100_000); redact('token: ' * 200_000)")
    subprocess.run([sys.executable, "-c", code], timeout=120, check=True)


@pytest.fixture
def known_secrets(monkeypatch):
    """The registry of configured secrets, emptied after the test."""
    from hivemesh.runtime import logs
    monkeypatch.setattr(logs, "_known", set())
    monkeypatch.setattr(logs, "_known_pattern", None)
    return logs


def test_configured_secrets_are_hidden_wherever_a_library_quotes_them(known_secrets,
                                                                       monkeypatch):
    """A DSN's password with a space slips past every pattern (libpq quotes
    it alone in its parse error): the service's own secret settings are
    hidden by value, the URL's password apart from the URL, a keyword DSN's
    too; values too short to tell from words are left out."""
    from hivemesh.services.artifact.settings import ArtifactSettings
    from hivemesh.services.information.settings import InformationSettings
    monkeypatch.setenv("HIVEMESH_ARTIFACT_BACKEND", "postgres")
    monkeypatch.setenv("HIVEMESH_ARTIFACT_POSTGRES_DSN",
                       "postgresql://app:Super Secret1@db:5432/hivemesh")
    monkeypatch.setenv("HIVEMESH_INFORMATION_BACKEND", "redis")
    monkeypatch.setenv("HIVEMESH_INFORMATION_REDIS_URL", "redis://:p%40ss%20word9@cache:6379/0")
    before = 'error connecting: unexpected spaces found in "Super Secret1"'
    assert "Super Secret1" in redact(before)  # no pattern catches it
    for settings in (ArtifactSettings(), InformationSettings()):
        known_secrets.hide_values(known_secrets.secret_values(settings))
    assert redact(before) == 'error connecting: unexpected spaces found in "[REDACTED]"'
    assert "p@ss word9" not in redact("AUTH failed for 'p@ss word9'")
    known_secrets.hide_values(["host=db user=app password='Other Pass7' dbname=x", "abc"])
    assert redact("bad password 'Other Pass7'") == "bad password '[REDACTED]'"
    assert redact("abc def") == "abc def"


def test_every_word_of_a_keyword_dsn_s_unquoted_password_is_hidden(known_secrets):
    """Unquoted, a password with spaces does not parse, and libpq's error
    quotes the word after the first: every word of it is a secret, up to
    the next key=value word."""
    known_secrets.hide_values(
        ["host=127.0.0.1 port=1 user=u password=correct horsebattery staple dbname=hivemesh"])
    assert redact('error connecting: missing "=" after "horsebattery" in connection info '
                  'string') == ('error connecting: missing "=" after "[REDACTED]" in '
                                'connection info string')
    assert redact("correct horsebattery staple") == "[REDACTED]"
    assert redact("staple") == "[REDACTED]"
    assert redact("hivemesh on 127.0.0.1") == "hivemesh on 127.0.0.1"  # the next word's


def test_an_llm_key_of_any_shape_is_hidden_once_read(known_secrets, monkeypatch):
    from hivemesh.services.llm.settings import BackendSettings
    monkeypatch.setenv("UPSTREAM_KEY", "plainkeywithnoshape")
    backend = BackendSettings(type="openai", api_key_env="UPSTREAM_KEY")
    assert redact("rejected plainkeywithnoshape") == "rejected plainkeywithnoshape"
    assert backend.api_key() == "plainkeywithnoshape"
    assert redact("rejected plainkeywithnoshape") == "rejected [REDACTED]"
