"""The service as its own process: the CLI contract, SIGTERM, ``kill -9``
durability on SQLite, and spans exported over OTLP to a real receiver."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from concurrent import futures

import grpc
import pytest
from fakes.serve import serve_refused
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from hivemesh.cli.processes import start_service
from hivemesh.client import ArtifactClient



def test_serve_prints_its_address_first_and_stops_cleanly_on_sigterm(tmp_path):
    proc = start_service("artifact", data_dir=tmp_path / "data", log_path=tmp_path / "log")
    try:
        host, port = proc.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        saved = asyncio.run(_save_some(proc.address, 1))
        assert saved
    finally:
        code = proc.stop()
    assert code == 0
    log = (tmp_path / "log").read_text()
    assert '"msg": "shutting down"' in log


@pytest.mark.parametrize("service", ["llm", "artifact"])
def test_sigterm_right_after_the_address_line_is_a_graceful_shutdown(tmp_path, service):
    """Once the address is printed, a SIGTERM is handled (not the default
    action that kills the process)."""
    proc = start_service(service, data_dir=tmp_path / "data", log_path=tmp_path / "log")
    assert proc.stop() == 0
    assert '"msg": "shutting down"' in (tmp_path / "log").read_text()


def test_sigint_is_the_same_graceful_shutdown_and_exits_0(tmp_path):
    """Ctrl-C on ``serve`` stops it as SIGTERM does: a graceful shutdown is
    a success, not an interrupted command (130)."""
    import signal
    proc = start_service("artifact", data_dir=tmp_path / "data", log_path=tmp_path / "log")
    try:
        proc.process.send_signal(signal.SIGINT)
        code = proc.process.wait(timeout=30)
    finally:
        proc.stop()
    assert code == 0
    assert '"msg": "shutting down"' in (tmp_path / "log").read_text()


def test_signals_after_the_first_change_nothing_to_the_end_of_the_process(tmp_path):
    """Once shutting down, further SIGTERMs are ignored to the process's
    end, through the teardown after the shutdown too: it still exits 0."""
    import signal
    proc = start_service("artifact", data_dir=tmp_path / "data", log_path=tmp_path / "log",
                         env={"HIVEMESH_ARTIFACT_SERVER__DRAIN_DELAY_S": "0.3"})
    try:
        proc.process.send_signal(signal.SIGTERM)
        while proc.process.poll() is None:
            time.sleep(0.02)
            with contextlib.suppress(ProcessLookupError):
                proc.process.send_signal(signal.SIGTERM)
        code = proc.process.wait(timeout=30)
    finally:
        proc.stop()
    assert code == 0


@pytest.mark.parametrize(("setting", "loop"), [(None, "uvloop"), ("asyncio", "asyncio")])
def test_a_service_runs_on_uvloop_unless_told_otherwise(tmp_path, monkeypatch, setting, loop):
    monkeypatch.delenv("HIVEMESH_EVENT_LOOP", raising=False)
    proc = start_service("artifact", data_dir=tmp_path / "data", log_path=tmp_path / "log",
                         env=None if setting is None else {"HIVEMESH_EVENT_LOOP": setting})
    try:
        assert asyncio.run(_save_some(proc.address, 3))
    finally:
        code = proc.stop()
    assert code == 0
    served = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()
              if '"msg": "serving"' in line]
    assert [(s["event_loop"], s["port"]) for s in served] == [
        (loop, int(proc.address.rsplit(":", 1)[1]))]


@pytest.mark.parametrize("setting", ["trio", "", " "])
def test_an_unknown_event_loop_is_a_clear_message(tmp_path, setting):
    """Set but empty is that value, as for every setting (the README), not
    the default: an invalid setting too."""
    result = serve_refused("artifact", "--port", "0", "--data-dir", str(tmp_path),
                           env={"HIVEMESH_EVENT_LOOP": setting})
    # An invalid setting, as the README lists it with the others: exit 2.
    assert result.returncode == 2 and result.stdout == ""
    assert (f"invalid artifact settings:\n  HIVEMESH_EVENT_LOOP={setting.strip()!r}: "
            "choose one of uvloop, asyncio") in result.stderr
    assert "Traceback" not in result.stderr and "never awaited" not in result.stderr


def test_bad_settings_fail_at_boot_with_a_clear_message(tmp_path):
    env = {**os.environ, "HIVEMESH_ARTIFACT_BACKEND": "postgres"}
    result = serve_refused("artifact", "--port", "0", env=env)
    assert result.returncode != 0
    assert "HIVEMESH_ARTIFACT_POSTGRES_DSN is required" in result.stderr
    assert result.stdout == ""
    # The message never echoes what was given: settings may hold secrets.
    env = {**os.environ, "HIVEMESH_MEMORY_STORE": "qdrant",
           "HIVEMESH_MEMORY_QDRANT_API_KEY": "qdrant-secret-key-123"}
    result = serve_refused("memory", "--port", "0", env=env)
    assert result.returncode == 2 and "QDRANT_URL" in result.stderr
    assert "qdrant-secret" not in result.stderr + result.stdout


@pytest.mark.parametrize(("service", "env", "message"), [
    ("artifact", {"HIVEMESH_ARTIFACT_BACKEND": "postgres"},
     "HIVEMESH_ARTIFACT_POSTGRES_DSN is required"),
    ("information", {"HIVEMESH_INFORMATION_BACKEND": "redis"},
     "HIVEMESH_INFORMATION_REDIS_URL is required"),
    ("information", {"HIVEMESH_INFORMATION_UNKNOWN_MODEL": "default"},
     "needs HIVEMESH_INFORMATION_DEFAULT_PRICE"),
    ("orchestrator", {"HIVEMESH_ORCHESTRATOR_STATE_BACKEND": "redis"},
     "HIVEMESH_ORCHESTRATOR_REDIS_URL is required"),
])
def test_a_missing_required_setting_is_an_invalid_setting(tmp_path, service, env, message):
    # The README: serve exits 2 on invalid settings, 1 when the service
    # cannot start; a backend chosen without its address is the former.
    result = serve_refused(service, "--port", "0", "--data-dir", str(tmp_path), env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert f"invalid {service} settings:" in result.stderr and message in result.stderr


@pytest.mark.parametrize("setting", ["MAX_MESSAGE_BYTES", "KEEPALIVE_TIME_MS",
                                     "KEEPALIVE_TIMEOUT_MS", "MIN_PING_INTERVAL_MS"])
def test_a_server_setting_beyond_what_grpc_takes_is_an_invalid_setting(tmp_path, setting):
    """gRPC takes these as C ints: a larger value is refused with the other
    settings (exit 2, named), not left to fail the server's creation."""
    variable = f"HIVEMESH_ARTIFACT_SERVER__{setting}"
    result = serve_refused("artifact", "--port", "0", "--data-dir", str(tmp_path),
                           env={variable: str(2**31)})
    assert result.returncode == 2 and result.stdout == ""
    assert (f"invalid artifact settings:\n  server.{setting.lower()}: Input should be less "
            f"than or equal to {2**31 - 1}") in result.stderr
    assert "Traceback" not in result.stderr


def test_a_postgres_dsn_that_does_not_parse_is_named_never_quoted(tmp_path):
    """A password with an unquoted space: libpq's parse error quotes its
    second word. Refused as an invalid setting naming the variable, before
    any connection is tried, and no word of the password reaches the
    output."""
    result = serve_refused("artifact", "--port", "0", env={
        "HIVEMESH_ARTIFACT_BACKEND": "postgres",
        "HIVEMESH_ARTIFACT_POSTGRES_DSN": "host=127.0.0.1 port=1 user=u "
                                          "password=correct horsebattery staple dbname=x"})
    assert result.returncode == 2 and result.stdout == ""
    assert ("invalid artifact settings:\n  HIVEMESH_ARTIFACT_POSTGRES_DSN is not a PostgreSQL "
            "connection string") in result.stderr
    for word in ("correct", "horsebattery", "staple"):
        assert word not in result.stderr


def test_a_padded_host_flag_is_refused_like_the_setting(tmp_path):
    result = serve_refused("artifact", "--host", " 127.0.0.1", "--port", "0",
                           "--data-dir", str(tmp_path))
    assert result.returncode == 2 and result.stdout == ""
    assert "invalid artifact settings:\n  host: Value error, ' 127.0.0.1' is not an address" \
        in result.stderr


@pytest.mark.parametrize("port", ["70000", "-5"])
def test_a_port_flag_out_of_range_is_refused_like_the_setting(tmp_path, port):
    """--port gets the checks HIVEMESH_<SERVICE>_SERVER__PORT gets: gRPC
    would otherwise bind the port modulo 65536 (70000 serves on 4464)."""
    result = serve_refused("artifact", "--port", port, "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "invalid artifact settings" in result.stderr and "port" in result.stderr
    assert result.stdout == ""


def test_a_secrets_directory_set_but_missing_is_an_invalid_setting(tmp_path):
    """A secret volume that is not mounted must not start a service that
    quietly lacks its keys: HIVEMESH_SECRETS_DIR names a directory that
    has to be there, like any path a setting names (exit 2)."""
    missing = tmp_path / "not-mounted"
    env = {**os.environ, "HIVEMESH_SECRETS_DIR": str(missing)}
    result = serve_refused("memory", "--port", "0", "--data-dir", str(tmp_path / "data"),
                           env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert (f"invalid memory settings:\n  HIVEMESH_SECRETS_DIR={missing} does not exist"
            in result.stderr)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("service", "variable", "path", "problem"), [
    ("llm", "HIVEMESH_LLM_CONFIG_FILE", "absent.json", "does not exist"),
    ("llm", "HIVEMESH_LLM_CONFIG_FILE", ".", "is not a file"),
    ("orchestrator", "HIVEMESH_ORCHESTRATOR_AGENTS_DIR", "absent", "does not exist"),
])
def test_a_path_setting_naming_nothing_is_an_invalid_setting(tmp_path, service, variable,
                                                             path, problem):
    """A file or directory a setting names that is not there is an invalid
    setting (exit 2), the message naming the setting and the path."""
    named = tmp_path / path
    result = serve_refused(service, "--port", "0", "--data-dir", str(tmp_path / "data"),
                           env={variable: str(named)})
    assert result.returncode == 2 and result.stdout == ""
    assert f"invalid {service} settings:" in result.stderr
    assert f"{variable}={named} {problem}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("service", "variable", "field"), [
    ("orchestrator", "HIVEMESH_ORCHESTRATOR_AGENTS_DIR", "agents_dir"),
    ("llm", "HIVEMESH_LLM_CONFIG_FILE", "config_file"),
    ("artifact", "HIVEMESH_ARTIFACT_SERVER__TLS_CLIENT_CA_FILE", "server.tls_client_ca_file"),
])
def test_a_path_setting_set_but_empty_is_an_invalid_setting(tmp_path, service, variable, field):
    """Set but empty is that value (the README): a path that names nothing,
    not ".", the working directory, which an empty string becomes as a
    path (the orchestrator would load its agents from there)."""
    result = serve_refused(service, "--port", "0", "--data-dir", str(tmp_path / "data"),
                           env={variable: ""}, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert (f"invalid {service} settings:\n  {field}: Value error, is empty: give a path or "
            "leave the setting unset") in result.stderr
    assert "Traceback" not in result.stderr


def test_a_backend_key_file_that_is_not_there_is_an_invalid_setting(tmp_path):
    """A backend's api_key_file is a path setting too: missing, it is told
    with the settings (exit 2, naming it), not as a bare "No such file"
    once the service is starting."""
    missing = tmp_path / "not-mounted" / "openai-key"
    env = {**os.environ,
           "HIVEMESH_LLM_BACKENDS": json.dumps(
               {"primary": {"type": "openai", "api_key_file": str(missing)}}),
           "HIVEMESH_LLM_MODELS": json.dumps(
               [{"alias": "main", "backend": "primary", "upstream_model": "gpt-4o"}])}
    result = serve_refused("llm", "--port", "0", env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert "invalid llm settings:" in result.stderr
    assert f"api_key_file={missing} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("text", [
    "name = \n",  # not TOML
    'name = "ok"\nmodel = "main"\nallowed_tools = ["no-such-tool"]\n'])  # an unknown tool
def test_a_bad_agent_file_found_at_start_up_is_a_start_up_failure(tmp_path, text):
    """The directory is there, so the setting is valid; what cannot be read
    in it, or names what does not exist, stops start-up (exit 1) with the
    file's path."""
    folder = tmp_path / "agents"
    folder.mkdir()
    (folder / "bad.toml").write_text(text)
    result = serve_refused("orchestrator", "--port", "0", "--data-dir", str(tmp_path / "data"),
                           env={"HIVEMESH_ORCHESTRATOR_AGENTS_DIR": str(folder)})
    assert result.returncode == 1 and result.stdout == ""
    assert "orchestrator could not start:" in result.stderr and "bad.toml" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("service", "file"), [
    ("artifact", "artifacts.sqlite3"), ("information", "information.sqlite3"),
    ("memory", "memory/ledger.sqlite3"), ("orchestrator", "requests.sqlite3"),
    ("llm", "requests.sqlite3")])
def test_a_database_file_that_is_no_database_is_a_start_up_failure_naming_it(
        tmp_path, service, file):
    """A damaged or foreign file where the service keeps its SQLite data
    stops start-up (exit 1) with the file's path and what to do, not a
    traceback; the file is left as it was."""
    damaged = tmp_path / "data" / file
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a database, but somebody's data" * 200)
    result = serve_refused(service, "--port", "0", "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 1 and result.stdout == ""
    assert f"{service} could not start: {damaged} is not a usable SQLite database" \
        in result.stderr
    assert "move it aside" in result.stderr and "Traceback" not in result.stderr
    assert damaged.read_bytes() == b"not a database, but somebody's data" * 200


def test_a_directory_where_the_database_file_belongs_is_a_start_up_failure_naming_it(
        tmp_path):
    """SQLite cannot open it (nor a locked or read-only file): exit 1 with the
    path and SQLite's words, not a traceback."""
    blocked = tmp_path / "data" / "artifacts.sqlite3"
    blocked.mkdir(parents=True)
    result = serve_refused("artifact", "--port", "0", "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 1 and result.stdout == ""
    assert f"artifact could not start: {blocked}: SQLite could not open it" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_already_taken_is_a_clear_message(tmp_path):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve_refused("artifact", "--port", str(port), "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert f"artifact could not start: could not bind 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_ipv6_host_binds_and_is_announced_as_a_dialable_address(tmp_path):
    """An IPv6 literal needs brackets both to bind and in the address line:
    ``::1:0`` is not ``[::1]:0``."""
    proc = start_service("artifact", host="::1", data_dir=tmp_path / "data",
                         log_path=tmp_path / "log")
    try:
        assert proc.address.startswith("[::1]:")
        assert asyncio.run(_save_some(proc.address, 1))
    finally:
        assert proc.stop() == 0


async def _save_some(address: str, n: int) -> list[str]:
    async with ArtifactClient(address) as client:
        results = await asyncio.gather(*[
            client.save(workflow_id="wf-durable", agent_id="a", artifact_type="code",
                        content=f"artifact {i}", metadata={"i": i}) for i in range(n)])
    return [r.artifact.artifact_id for r in results]


async def _get_all(address: str, ids: list[str]) -> tuple[list[str], int]:
    async with ArtifactClient(address) as client:
        got = [(await client.get(i)).artifact_id for i in ids]
        return got, await client.count(workflow_id="wf-durable")


@pytest.mark.parametrize("synchronous", ["full", "normal"])
def test_acknowledged_saves_survive_kill_9(tmp_path, synchronous):
    data = tmp_path / "data"
    proc = start_service("artifact", data_dir=data,
                         env={"HIVEMESH_ARTIFACT_SQLITE_SYNCHRONOUS": synchronous})
    try:
        acked = asyncio.run(_save_some(proc.address, 64))
    finally:
        proc.kill()  # SIGKILL right after the last acknowledgement: no shutdown at all
    assert len(acked) == 64
    again = start_service("artifact", data_dir=data)
    try:
        got, count = asyncio.run(_get_all(again.address, acked))
    finally:
        again.stop()
    assert got == acked
    assert count == 64


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_reach_an_otlp_receiver_in_the_callers_trace(tmp_path):
    receiver = _Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    proc = start_service("artifact", data_dir=tmp_path / "data", env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    })
    try:
        async def call():
            async with grpc.aio.insecure_channel(proc.address) as channel:
                from hivemesh.artifact.v1 import ArtifactServiceStub, CountArtifactsRequest
                await ArtifactServiceStub(channel).CountArtifacts(
                    CountArtifactsRequest(), timeout=5,
                    metadata=(("traceparent", f"00-{trace_id}-{parent}-01"),))
        asyncio.run(call())
        deadline = time.monotonic() + 10
        while not receiver.requests and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.stop()
        server.stop(0)
    spans = [(rs, span) for req in receiver.requests for rs in req.resource_spans
             for ss in rs.scope_spans for span in ss.spans]
    assert spans, "no span was exported"
    rs, span = spans[0]
    assert span.trace_id.hex() == trace_id
    assert span.parent_span_id.hex() == parent
    assert span.name == "hivemesh.artifact.v1.ArtifactService/CountArtifacts"
    service_names = [a.value.string_value for a in rs.resource.attributes
                     if a.key == "service.name"]
    assert service_names == ["hivemesh-artifact"]


@pytest.mark.parametrize(("files", "message"), [
    ({"HIVEMESH_ORCHESTRATOR_TOOL_SERVERS": '{"search": '}, "tool_servers"),
    ({"HIVEMESH_ORCHESTRATOR_PADDING": "x" * (17 * 2**20)}, "is above"),
    ({"HIVEMESH_ORCHESTRATOR_STATE_BACKEND": b"\xff\xfe"}, "HIVEMESH_ORCHESTRATOR_STATE_BACKEND"),
])
def test_a_bad_file_of_the_secrets_directory_is_an_invalid_setting(tmp_path, files, message):
    """A JSON setting that does not parse, a file that is not text, or a
    directory too large to be read, given in the secrets directory: an
    invalid setting (exit 2), as the same value in the environment would
    be."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name, text in files.items():
        if isinstance(text, bytes):
            (secrets / name).write_bytes(text)
        else:
            (secrets / name).write_text(text)
    env = {**os.environ, "HIVEMESH_SECRETS_DIR": str(secrets)}
    result = serve_refused("orchestrator", "--port", "0", env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert "invalid orchestrator settings:" in result.stderr and message in result.stderr
    assert f"the secrets directory {secrets}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("variable", "value"), [
    ("HIVEMESH_ORCHESTRATOR_TOOL_SERVERS", '{"search": '),
    ("HIVEMESH_ORCHESTRATOR_SERVER__TLS_CLIENT_NAMES", "orchestrator.hivemesh.svc")])
def test_a_json_setting_that_does_not_parse_is_an_invalid_setting_naming_it(
        tmp_path, variable, value):
    env = {**os.environ, variable: value}
    result = serve_refused("orchestrator", "--port", "0", env=env)
    assert result.returncode == 2 and f"{variable} is not JSON" in result.stderr
    assert value not in result.stderr and "Traceback" not in result.stderr
    # The same value from the secrets directory, read as the variable is.
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / variable).write_text(value)
    result = serve_refused("orchestrator", "--port", "0",
                           env={**os.environ, "HIVEMESH_SECRETS_DIR": str(secrets)})
    assert result.returncode == 2
    assert f"{variable} in {secrets} is not JSON" in result.stderr
    assert value not in result.stderr and "Traceback" not in result.stderr
