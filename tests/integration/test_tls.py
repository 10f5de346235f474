"""Optional TLS and mutual TLS of the runtime's servers and the client's
channels, with throwaway certificates made by the test (tests/fakes/tls.py)
and servers on 127.0.0.1, port 0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from fakes.mesh import mesh
from fakes.serve import serve_refused
from fakes.tls import Pki, make_pki
from google.protobuf import empty_pb2, wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hivemesh.cli.processes import start_service
from hivemesh.client import ArtifactClient, ChannelTls, UnavailableError, secure_channel
from hivemesh.client import channel as channel_module
from hivemesh.client.channel import RenewingChannel, open_channel
from hivemesh.client.errors import PermissionDeniedError, from_rpc_error
from hivemesh.client.memory import MemoryClient
from hivemesh.common.v1 import RequestContext
from hivemesh.orchestrator.v1 import (
    AgentDefinition, MemoryConfig, RegisterAgentRequest, RunAgentRequest)
from hivemesh.runtime.settings import ServerSettings
from hivemesh.services.artifact.backends.memory import MemoryBackend
from hivemesh.services.artifact.server import create_server
from hivemesh.services.artifact.servicer import SERVICE_NAME
from hivemesh.services.artifact.settings import ArtifactSettings

@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _serve(**server):
    settings = ArtifactSettings(server=ServerSettings(port=0, grace_period_s=0, **server),
                                backend="memory")
    running, port = await create_server(settings, MemoryBackend())
    return running, f"127.0.0.1:{port}"


@pytest.fixture
async def tls_server(pki):
    running, address = await _serve(tls_cert_file=pki.server.cert, tls_key_file=pki.server.key)
    yield address
    await running.shutdown(0)


@pytest.fixture
async def mtls_server(pki):
    running, address = await _serve(tls_cert_file=pki.server.cert, tls_key_file=pki.server.key,
                                    tls_client_ca_file=pki.ca)
    yield address
    await running.shutdown(0)


async def _save_and_get(client: ArtifactClient) -> str:
    saved = await client.save(workflow_id="wf-tls", agent_id="coder", artifact_type="code",
                              content="print('over TLS')")
    got = await client.get(saved.artifact.artifact_id)
    return got.content


async def test_a_tls_client_calls_a_tls_service_and_its_health(pki, tls_server):
    async with ArtifactClient(tls_server, tls=ChannelTls(ca_file=pki.ca)) as client:
        assert await _save_and_get(client) == "print('over TLS')"
    channel = secure_channel(tls_server, "artifact", ChannelTls(ca_file=pki.ca))
    async with channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service),
                                        timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert SERVICE_NAME in names


async def test_the_server_name_can_be_overridden(pki, tls_server):
    # The certificate names localhost, hivemesh.test and 127.0.0.1: a name
    # it lacks is refused, one it has (other than the target's) is accepted.
    port = tls_server.rsplit(":", 1)[1]
    wrong = ChannelTls(ca_file=pki.ca, server_name="elsewhere.test")
    async with ArtifactClient(tls_server, tls=wrong) as client:
        with pytest.raises(UnavailableError):
            await client.count(timeout=3)
    right = ChannelTls(ca_file=pki.ca, server_name="hivemesh.test")
    async with ArtifactClient(f"127.0.0.1:{port}", tls=right) as client:
        await client.count()


async def test_a_plaintext_client_is_refused_by_a_tls_service(tls_server):
    async with ArtifactClient(tls_server) as client:
        with pytest.raises(UnavailableError):
            await client.count(timeout=3)


async def test_a_client_trusting_another_ca_refuses_the_server(pki, tls_server):
    async with ArtifactClient(tls_server, tls=ChannelTls(ca_file=pki.other_ca)) as client:
        with pytest.raises(UnavailableError):
            await client.count(timeout=3)


async def test_mutual_tls_needs_a_client_certificate_signed_by_the_ca(pki, mtls_server):
    without = ChannelTls(ca_file=pki.ca)
    async with ArtifactClient(mtls_server, tls=without) as client:
        with pytest.raises(UnavailableError):
            await client.count(timeout=3)
    stranger = ChannelTls(ca_file=pki.ca, cert_file=pki.stranger.cert,
                          key_file=pki.stranger.key)
    async with ArtifactClient(mtls_server, tls=stranger) as client:
        with pytest.raises(UnavailableError):
            await client.count(timeout=3)
    signed = ChannelTls(ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key)
    async with ArtifactClient(mtls_server, tls=signed) as client:
        assert await _save_and_get(client) == "print('over TLS')"
    async with secure_channel(mtls_server, "artifact", signed) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_plaintext_service_stays_plaintext(pki):
    running, address = await _serve()
    try:
        async with ArtifactClient(address) as client:
            assert await client.count() == 0
        async with ArtifactClient(address, tls=ChannelTls(ca_file=pki.ca)) as client:
            with pytest.raises(UnavailableError):
                await client.count(timeout=3)
    finally:
        await running.shutdown(0)


async def test_the_orchestrator_runs_an_agent_through_mutual_tls_providers(pki, tmp_path):
    """Every server of the mesh requires a client certificate: the
    orchestrator reaches the LLM, memory, information and artifact services
    with its own, and the memory service embeds through the LLM service
    with its own."""
    client = ChannelTls(ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key)
    async with mesh(tmp_path, tls=pki) as m:
        agent = AgentDefinition(name="coder", model="main", output_artifact_type="code",
                                memory=MemoryConfig(enabled=True, write_back=True,
                                                    namespace="acme"))
        await m.orchestrator.RegisterAgent(
            RegisterAgentRequest(request_id=str(uuid.uuid4()), agent=agent), timeout=20)
        request = dict(agent="coder", input="Implement a function that adds two numbers",
                       context=RequestContext(tenant_id="acme"))
        first = (await m.orchestrator.RunAgent(
            RunAgentRequest(request_id=str(uuid.uuid4()), **request), timeout=30)).result
        assert first.output.startswith("def solve") and first.model == "main"
        assert not first.degraded
        (saved,) = first.artifact_ids
        async with ArtifactClient(m.addresses["artifact"], tls=client) as artifacts:
            assert (await artifacts.get(saved)).content == first.output
        async with MemoryClient(m.addresses["memory"], tls=client) as memory:
            assert await memory.count(namespace="acme") > 0
        # The second run recalls what the first wrote back (embedded over TLS).
        second = (await m.orchestrator.RunAgent(
            RunAgentRequest(request_id=str(uuid.uuid4()), **request), timeout=30)).result
        assert second.memories_recalled > 0 and not second.degraded
        # Without a client certificate the providers refuse the caller.
        async with ArtifactClient(m.addresses["artifact"],
                                  tls=ChannelTls(ca_file=pki.ca)) as artifacts:
            with pytest.raises(UnavailableError):
                await artifacts.count(timeout=3)


async def test_client_tls_options_are_checked(pki, tmp_path):
    with pytest.raises(ValueError, match="both or neither"):
        ChannelTls(ca_file=pki.ca, cert_file=pki.client.cert)
    with pytest.raises(ValueError, match="cannot read the CA file"):
        ChannelTls(ca_file=tmp_path / "missing.pem").credentials()
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
        with pytest.raises(ValueError, match="tls goes with target"):
            ArtifactClient(channel=channel, tls=ChannelTls(ca_file=pki.ca))


async def test_serve_announces_a_tls_service_as_before(pki, tmp_path):
    env = {"HIVEMESH_ARTIFACT_SERVER__TLS_CERT_FILE": str(pki.server.cert),
           "HIVEMESH_ARTIFACT_SERVER__TLS_KEY_FILE": str(pki.server.key),
           "HIVEMESH_ARTIFACT_SERVER__TLS_CLIENT_CA_FILE": str(pki.ca)}
    proc = start_service("artifact", data_dir=tmp_path, env=env, log_path=tmp_path / "log")
    try:
        assert proc.address.startswith("127.0.0.1:")  # from `listening on HOST:PORT`
        tls = ChannelTls(ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key)
        async with ArtifactClient(proc.address, tls=tls) as client:
            assert await client.count() == 0
        async with ArtifactClient(proc.address) as client:
            with pytest.raises(UnavailableError):
                await client.count(timeout=3)
    finally:
        assert proc.stop() == 0
    # gRPC's own lines (a refused handshake) are not JSON.
    logs = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()
            if line.startswith("{")]
    assert [entry["tls"] for entry in logs if entry["msg"] == "serving"] == ["mutual"]


_CERT = "HIVEMESH_ARTIFACT_SERVER__TLS_CERT_FILE"
_KEY = "HIVEMESH_ARTIFACT_SERVER__TLS_KEY_FILE"
_CLIENT_CA = "HIVEMESH_ARTIFACT_SERVER__TLS_CLIENT_CA_FILE"


def _malformed_ca(pki: Pki):
    path = pki.ca.parent / "malformed-ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    return path


@pytest.mark.parametrize(("files", "message"), [
    ({_CERT: "server.cert"}, "tls_cert_file and tls_key_file go together"),
    ({_KEY: "server.key"}, "tls_cert_file and tls_key_file go together"),
    ({_CERT: "server.cert", _KEY: "missing.key"},
     "server.tls_key_file: Value error, cannot read {dir}/missing.key: No such file"),
    ({_CERT: "server.cert", _KEY: "client.key"},
     "the private key {dir}/client.key is not the key of the certificate {dir}/server.crt"),
    ({_CERT: "server.key", _KEY: "server.key"},
     "server.tls_cert_file: Value error, {dir}/server.key holds no PEM certificate"),
    ({_CERT: "server.cert", _KEY: "server.key", _CLIENT_CA: "server.key"},
     "server.tls_client_ca_file: Value error, {dir}/server.key holds no PEM certificate"),
    ({_CLIENT_CA: "ca"}, "tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file"),
    # PEM markers around something that is no certificate: gRPC would
    # refuse it only at bind (exit 1, blaming the certificate or key)
    ({_CERT: "server.cert", _KEY: "server.key", _CLIENT_CA: "malformed.ca"},
     "server.tls_client_ca_file: Value error, {dir}/malformed-ca.pem holds a malformed PEM "
     "certificate"),
])
def test_bad_tls_settings_are_invalid_settings(pki, tmp_path, files, message):
    """serve exits 2, as on any invalid setting, naming the setting and the
    file, never a key's contents."""
    paths = {"server.cert": pki.server.cert, "server.key": pki.server.key,
             "client.key": pki.client.key, "ca": pki.ca,
             "missing.key": pki.ca.parent / "missing.key",
             "malformed.ca": _malformed_ca(pki)}
    env = {name: str(paths[file]) for name, file in files.items()}
    result = serve_refused("artifact", "--port", "0", "--data-dir", str(tmp_path / "data"),
                           env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert "invalid artifact settings:" in result.stderr
    assert message.format(dir=pki.ca.parent) in result.stderr
    assert "PRIVATE KEY" not in result.stderr and "Traceback" not in result.stderr


def test_bad_provider_tls_settings_are_invalid_settings(pki, tmp_path):
    env = {"HIVEMESH_ORCHESTRATOR_PROVIDER_TLS__CERT_FILE": str(pki.client.cert),
           "HIVEMESH_ORCHESTRATOR_PROVIDER_TLS__KEY_FILE": str(pki.client.key)}
    result = serve_refused("orchestrator", "--port", "0", "--data-dir", str(tmp_path), env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert ("invalid orchestrator settings:\n  provider_tls: Value error, TLS toward the "
            "services needs ca_file") in result.stderr
    env = {"HIVEMESH_MEMORY_LLM_TLS__CA_FILE": str(pki.client.key)}
    result = serve_refused("memory", "--port", "0", "--data-dir", str(tmp_path), env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert f"llm_tls.ca_file: Value error, {pki.client.key} holds no PEM certificate" \
        in result.stderr


def test_a_malformed_ca_bundle_of_the_channels_is_an_invalid_setting(pki):
    """Accepted, it would start the service and fail every call to the
    providers (gRPC cannot make a handshake of it)."""
    from pydantic import ValidationError

    from hivemesh.runtime.settings import ChannelTlsSettings
    with pytest.raises(ValidationError, match="malformed-ca.pem holds a malformed PEM certificate"):
        ChannelTlsSettings(ca_file=_malformed_ca(pki))


async def test_a_key_grpc_refuses_at_bind_is_said_to_be_tls(pki):
    """The settings' check runs on Python's TLS library, gRPC binds with its
    own: a key the second refuses fails the bind, which must not read as a
    port problem only (serve reports it as a start-up failure, exit 1)."""
    from hivemesh.runtime.server import start_server
    settings = ServerSettings.model_construct(**{
        **ServerSettings(port=0).model_dump(),
        "tls_cert_file": pki.server.cert, "tls_key_file": pki.client.key})  # unchecked
    with pytest.raises(OSError, match=r"could not bind 127\.0\.0\.1:0 \(or gRPC refused the "
                                      r"TLS certificate or key\)"):
        await start_server(settings, domain="hivemesh.test", services=[])


# -- hivemesh health: the probe that speaks TLS ----------------------------

async def _health(capsys, *argv: str) -> tuple[int, str]:
    """(exit code, what it printed: stdout, else stderr)."""
    import asyncio

    from hivemesh.cli.main import main
    code = await asyncio.to_thread(main, ["health", *argv])
    printed = capsys.readouterr()
    return code, (printed.out or printed.err).strip()


async def test_the_health_command_probes_plaintext_tls_and_mutual_tls_services(
        pki, tls_server, mtls_server, capsys):
    running, plain = await _serve()
    try:
        assert await _health(capsys, plain) == (0, "SERVING")
        assert await _health(capsys, plain, "--service", SERVICE_NAME) == (0, "SERVING")
        code, out = await _health(capsys, plain, "--service", "no.such.Service")
        assert code == 1 and out.startswith("NOT_FOUND")
        await running.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await _health(capsys, plain, "--service", SERVICE_NAME) == (1, "NOT_SERVING")
    finally:
        await running.shutdown(0)
    code, out = await _health(capsys, plain, "--timeout", "0.5")  # nothing listens now
    assert code == 1 and out.startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED"))

    assert await _health(capsys, tls_server, "--tls-ca", str(pki.ca)) == (0, "SERVING")
    code, _ = await _health(capsys, tls_server, "--timeout", "1")  # plaintext to a TLS port
    assert code == 1
    code, _ = await _health(capsys, tls_server, "--tls-ca", str(pki.other_ca), "--timeout", "1")
    assert code == 1
    assert await _health(capsys, mtls_server, "--tls-ca", str(pki.ca), "--tls-cert",
                         str(pki.client.cert), "--tls-key", str(pki.client.key)) == (0, "SERVING")
    code, _ = await _health(capsys, mtls_server, "--tls-ca", str(pki.ca), "--timeout", "1")
    assert code == 1  # no client certificate


async def test_the_health_command_refuses_bad_tls_arguments(pki, capsys):
    code, said = await _health(capsys, "127.0.0.1:1", "--tls-cert", str(pki.client.cert))
    assert code == 2 and "go together" in said
    code, said = await _health(capsys, "127.0.0.1:1", "--tls-ca", "/nonexistent/ca.pem")
    assert code == 2 and "/nonexistent/ca.pem" in said
    # Files that are there but make no usable set: refused before any call.
    code, said = await _health(capsys, "127.0.0.1:1", "--tls-ca", str(pki.client.key))
    assert code == 2 and "no PEM certificate" in said
    code, said = await _health(capsys, "127.0.0.1:1", "--tls-ca", str(pki.ca),
                               "--tls-cert", str(pki.client.cert),
                               "--tls-key", str(pki.server.key))
    assert code == 2 and "invalid TLS arguments" in said
    for timeout in ("inf", "nan", "0"):
        code, said = await _health(capsys, "127.0.0.1:1", "--timeout", timeout)
        assert code == 2 and "--timeout" in said


async def test_the_orchestrator_reaches_remote_tool_servers_over_mutual_tls(pki, tmp_path):
    import json

    from hivemesh.orchestrator.v1 import (
        ExecuteToolResponse, ListToolsResponse, ToolDefinition, ToolServiceServicer,
        add_ToolServiceServicer_to_server)
    from hivemesh.runtime.settings import ChannelTlsSettings
    from hivemesh.services.llm.backends.base import ToolCall

    class Weather(ToolServiceServicer):
        async def ListTools(self, request, context):
            return ListToolsResponse(tools=[ToolDefinition(name="weather", description="sky")])

        async def ExecuteTool(self, request, context):
            return ExecuteToolResponse(result=json.dumps({"sky": "clear"}))

    server = grpc.aio.server()
    add_ToolServiceServicer_to_server(Weather(), server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(pki.server.key.read_bytes(), pki.server.cert.read_bytes())],
        root_certificates=pki.ca.read_bytes(), require_client_auth=True))
    await server.start()
    try:
        async with mesh(tmp_path, tool_servers={"wx": f"127.0.0.1:{port}"},
                        tool_tls=ChannelTlsSettings(ca_file=pki.ca, cert_file=pki.client.cert,
                                                    key_file=pki.client.key)) as m:
            await m.orchestrator.RegisterAgent(RegisterAgentRequest(
                request_id=str(uuid.uuid4()), agent=AgentDefinition(
                    name="forecaster", model="main", allowed_tools=["weather"])), timeout=20)
            m.primary.queue_response(tool_calls=(ToolCall("a", "weather", "{}"),))
            m.primary.queue_response("clear")
            result = (await m.orchestrator.RunAgent(RunAgentRequest(
                request_id=str(uuid.uuid4()), agent="forecaster", input="sky?",
                context=RequestContext(tenant_id="acme")), timeout=30)).result
            assert json.loads(result.tool_calls[0].result) == {"sky": "clear"}
            assert not result.degraded
    finally:
        await server.stop(0)


async def test_a_renewed_certificate_serves_new_connections_without_a_restart(tmp_path):
    """The server's certificate files replaced (as cert-manager renews a
    Secret): new connections get the new certificate. Files that do not
    form a usable set yet (a certificate without its key) are waited out,
    the current certificate staying."""
    first, renewed = make_pki(tmp_path / "first"), make_pki(tmp_path / "renewed")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "tls.crt", live / "tls.key"
    cert.write_bytes(first.server.cert.read_bytes())
    key.write_bytes(first.server.key.read_bytes())
    running, address = await _serve(tls_cert_file=cert, tls_key_file=key)

    async def serving(ca) -> bool:
        async with ArtifactClient(address, tls=ChannelTls(ca_file=ca)) as client:
            try:
                await client.count(timeout=3)
            except UnavailableError:
                return False
            return True
    try:
        assert await serving(first.ca) and not await serving(renewed.ca)
        cert.write_bytes(renewed.server.cert.read_bytes())  # the key not yet
        assert await serving(first.ca) and not await serving(renewed.ca)
        key.write_bytes(renewed.server.key.read_bytes())
        assert await serving(renewed.ca) and not await serving(first.ca)
    finally:
        await running.shutdown(0)


# -- mutual TLS by name: tls_client_names ------------------------------------

ORCHESTRATOR_DNS = "orchestrator.hivemesh.svc"
ORCHESTRATOR_SPIFFE = "spiffe://hivemesh.test/ns/hivemesh/sa/orchestrator"


@pytest.fixture
async def named_server(pki):
    """Mutual TLS serving only clients named like the orchestrator."""
    running, address = await _serve(
        tls_cert_file=pki.server.cert, tls_key_file=pki.server.key, tls_client_ca_file=pki.ca,
        tls_client_names=[ORCHESTRATOR_DNS, ORCHESTRATOR_SPIFFE])
    yield address
    await running.shutdown(0)


def _client_tls(pki: Pki, pair) -> ChannelTls:
    return ChannelTls(ca_file=pki.ca, cert_file=pair.cert, key_file=pair.key)


async def _refuses_other_names(pki: Pki, address: str) -> bool:
    """Whether the server at ``address`` refuses a certificate from its CA
    carrying none of its names (common name ``client``, no alt names)."""
    async with ArtifactClient(address, tls=_client_tls(pki, pki.client)) as artifacts:
        try:
            await artifacts.count()
        except PermissionDeniedError:
            return True
    return False


@pytest.mark.parametrize("names", [
    {"dns": [ORCHESTRATOR_DNS]},
    {"uris": [ORCHESTRATOR_SPIFFE]},
    # Among others, in either kind of alt name.
    {"dns": ["other.hivemesh.svc", ORCHESTRATOR_DNS]},
    {"uris": ["spiffe://hivemesh.test/ns/hivemesh/sa/other", ORCHESTRATOR_SPIFFE]},
], ids=["dns", "uri", "dns among others", "uri among others"])
async def test_a_client_whose_certificate_carries_an_accepted_name_is_served(
        pki, named_server, names):
    client = pki.named_client("orchestrator", **names)
    async with ArtifactClient(named_server, tls=_client_tls(pki, client)) as artifacts:
        assert await _save_and_get(artifacts) == "print('over TLS')"
    assert await _refuses_other_names(pki, named_server)


async def test_the_common_name_counts_as_a_name(pki):
    running, address = await _serve(
        tls_cert_file=pki.server.cert, tls_key_file=pki.server.key, tls_client_ca_file=pki.ca,
        tls_client_names=["orchestrator"])
    try:
        # Its common name, with no alt names at all.
        client = pki.named_client("orchestrator")
        async with ArtifactClient(address, tls=_client_tls(pki, client)) as artifacts:
            assert await artifacts.count() == 0
        assert await _refuses_other_names(pki, address)
    finally:
        await running.shutdown(0)


@pytest.mark.parametrize(("names", "listed"), [
    ({"dns": ["memory.hivemesh.svc"]}, "memory.hivemesh.svc, memory"),
    ({"uris": ["spiffe://hivemesh.test/ns/hivemesh/sa/memory"]},
     "spiffe://hivemesh.test/ns/hivemesh/sa/memory, memory"),
    # An accepted name as a part of another does not count.
    ({"dns": [f"x.{ORCHESTRATOR_DNS}"], "uris": [f"{ORCHESTRATOR_SPIFFE}/x"]},
     f"x.{ORCHESTRATOR_DNS}, {ORCHESTRATOR_SPIFFE}/x, memory"),
], ids=["dns", "uri", "longer names"])
async def test_a_client_carrying_other_names_is_refused_with_the_names_it_carries(
        pki, named_server, names, listed):
    refused = pki.named_client("memory", **names)
    async with ArtifactClient(named_server, tls=_client_tls(pki, refused)) as artifacts:
        with pytest.raises(PermissionDeniedError) as caught:
            await artifacts.save(workflow_id="wf-tls", agent_id="coder", artifact_type="code",
                                 content="not saved")
    error = caught.value
    assert (error.reason, error.domain) == ("CLIENT_NOT_ALLOWED", "hivemesh.artifact")
    assert error.metadata == {"client_names": listed}
    assert listed in str(error)
    # Refused before the handler: nothing was saved.
    allowed = pki.named_client("orchestrator", dns=[ORCHESTRATOR_DNS])
    async with ArtifactClient(named_server, tls=_client_tls(pki, allowed)) as artifacts:
        assert await artifacts.count() == 0


async def test_a_certificate_without_names_is_refused_but_still_probes_health(
        pki, named_server):
    """Health checking and reflection are exempt from the names (the CA
    still checked): a probe may present the pod's own certificate."""
    tls = _client_tls(pki, pki.client)  # common name "client", no alt names
    async with ArtifactClient(named_server, tls=tls) as artifacts:
        with pytest.raises(PermissionDeniedError) as caught:
            await artifacts.count()
    assert caught.value.metadata == {"client_names": "client"}
    async with secure_channel(named_server, "artifact", tls) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert SERVICE_NAME in names


class _Countdown(grpc.GenericRpcHandler):
    """A server-streaming method, /hivemesh.test.Countdown/Run, that counts
    the calls its handler got."""

    METHOD = "/hivemesh.test.Countdown/Run"

    def __init__(self) -> None:
        self.calls = 0

    def service(self, handler_call_details):
        if handler_call_details.method != self.METHOD:
            return None
        return grpc.unary_stream_rpc_method_handler(
            self._run, request_deserializer=empty_pb2.Empty.FromString,
            response_serializer=wrappers_pb2.StringValue.SerializeToString)

    async def _run(self, request, context):
        self.calls += 1
        for step in ("3", "2", "1"):
            yield wrappers_pb2.StringValue(value=step)


async def test_a_streaming_call_is_checked_too_before_its_handler_runs(pki):
    from hivemesh.runtime.server import ServiceBinding, start_server
    countdown = _Countdown()
    settings = ServerSettings(port=0, tls_cert_file=pki.server.cert, tls_key_file=pki.server.key,
                              tls_client_ca_file=pki.ca, tls_client_names=[ORCHESTRATOR_DNS])
    running = await start_server(settings, domain="hivemesh.test", services=[ServiceBinding(
        "hivemesh.test.Countdown", lambda servicer, server: server.add_generic_rpc_handlers(
            (servicer,)), countdown)])

    async def run(pair) -> list[str]:
        async with grpc.aio.secure_channel(f"127.0.0.1:{running.port}",
                                           _client_tls(pki, pair).credentials()) as channel:
            steps = channel.unary_stream(
                countdown.METHOD, request_serializer=empty_pb2.Empty.SerializeToString,
                response_deserializer=wrappers_pb2.StringValue.FromString)
            return [step.value async for step in steps(empty_pb2.Empty(), timeout=5)]
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await run(pki.named_client("memory", dns=["memory.hivemesh.svc"]))
        error = from_rpc_error(caught.value)
        assert isinstance(error, PermissionDeniedError)
        assert (error.reason, error.domain) == ("CLIENT_NOT_ALLOWED", "hivemesh.test")
        assert error.metadata == {"client_names": "memory.hivemesh.svc, memory"}
        assert countdown.calls == 0
        assert await run(pki.named_client("orchestrator", dns=[ORCHESTRATOR_DNS])) == [
            "3", "2", "1"]
        assert countdown.calls == 1
    finally:
        await running.shutdown(0)


_CLIENT_NAMES = "HIVEMESH_ARTIFACT_SERVER__TLS_CLIENT_NAMES"


def test_client_names_are_read_from_the_environment_as_json(pki, monkeypatch):
    monkeypatch.setenv(_CERT, str(pki.server.cert))
    monkeypatch.setenv(_KEY, str(pki.server.key))
    monkeypatch.setenv(_CLIENT_CA, str(pki.ca))
    monkeypatch.setenv(_CLIENT_NAMES, json.dumps([ORCHESTRATOR_DNS, ORCHESTRATOR_SPIFFE]))
    assert ArtifactSettings().server.tls_client_names == [ORCHESTRATOR_DNS, ORCHESTRATOR_SPIFFE]


@pytest.mark.parametrize(("mutual", "names", "message"), [
    (False, f'["{ORCHESTRATOR_DNS}"]',
     "tls_client_names needs tls_client_ca_file (mutual TLS)"),
    (True, '["orchestrator", ""]', "server.tls_client_names: Value error, '' is not a name"),
    (True, '[" orchestrator"]', "server.tls_client_names: Value error, ' orchestrator' is not"),
    # Not JSON: refused as any JSON setting that does not parse is.
    (True, "orchestrator", 'error parsing value for field "server"'),
])
def test_bad_client_names_are_invalid_settings(pki, tmp_path, mutual, names, message):
    env = {_CERT: str(pki.server.cert), _KEY: str(pki.server.key), _CLIENT_NAMES: names}
    if mutual:
        env[_CLIENT_CA] = str(pki.ca)
    result = serve_refused("artifact", "--port", "0", "--data-dir", str(tmp_path / "data"),
                           env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert "invalid artifact settings:" in result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


# -- client certificates renewed without a restart -------------------------

class _Issuers(health_pb2_grpc.HealthServicer):
    """Health that answers a call only when the client's certificate on its
    connection was issued by an accepted CA (a server that trusts the new CA
    alone once rotated), whichever connection the call came on."""

    def __init__(self, *accepted: str) -> None:
        self.accepted = set(accepted)

    async def Check(self, request, context):
        pem = context.auth_context()["x509_pem_cert"][0]
        issuer = x509.load_pem_x509_certificate(pem).issuer.get_attributes_for_oid(
            NameOID.COMMON_NAME)[0].value
        if issuer not in self.accepted:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"client certificate issued by {issuer}")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Watch(self, request, context):
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        await asyncio.Event().wait()  # open until the client or the server ends it


@contextlib.asynccontextmanager
async def _issuers_server(pki: Pki, *accepted: str):
    """A mutual TLS server trusting both CAs of ``pki``; its servicer says
    which issuers it answers."""
    servicer = _Issuers(*accepted)
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(pki.server.key.read_bytes(), pki.server.cert.read_bytes())],
        root_certificates=pki.ca.read_bytes() + pki.other_ca.read_bytes(),
        require_client_auth=True))
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def _replace_file(path: Path, *sources: Path) -> None:
    """``path`` swapped at once for a copy of ``sources`` (several: a
    bundle), as the kubelet swaps a Secret's files."""
    staged = path.with_name(f".{path.name}.new")
    staged.write_bytes(b"".join(source.read_bytes() for source in sources))
    os.replace(staged, path)


def _live_tls(directory: Path, pki: Pki) -> ChannelTls:
    """A client's TLS files in ``directory``, its certificate the CA's
    client one."""
    directory.mkdir(exist_ok=True)
    tls = ChannelTls(ca_file=directory / "ca.crt", cert_file=directory / "tls.crt",
                     key_file=directory / "tls.key")
    _replace_file(tls.ca_file, pki.ca)
    _install(tls, pki.client)
    return tls


def _install(tls: ChannelTls, pair) -> None:
    _replace_file(tls.key_file, pair.key)
    _replace_file(tls.cert_file, pair.cert)


async def _serving(health) -> bool:
    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    return answer.status == health_pb2.HealthCheckResponse.SERVING


class _Counting(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self) -> None:
        self.calls = 0

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        self.calls += 1
        return await continuation(client_call_details, request)


@pytest.fixture
def every_call_looks(monkeypatch):
    """Channels look at their certificate files before every call."""
    monkeypatch.setattr(channel_module, "CERTIFICATE_CHECK_INTERVAL_S", 0.0)


async def test_a_renewed_client_certificate_is_presented_by_the_same_stub(
        pki, tmp_path, every_call_looks):
    tls = _live_tls(tmp_path / "live", pki)
    counting = _Counting()
    async with _issuers_server(pki, "test-ca") as (servicer, address):
        async with secure_channel(address, "artifact", tls, interceptors=[counting]) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await asyncio.wait_for(channel.channel_ready(), 10)
            assert await _serving(health)
            servicer.accepted = {"other-ca"}  # the server trusts the new CA only
            _install(tls, pki.stranger)  # a certificate of the new CA, with its key
            assert await _serving(health)
            assert counting.calls == 2  # the interceptors go with the new channel
            # The state is the new channel's (the old one closes, its calls over).
            assert channel.get_state() == grpc.ChannelConnectivity.READY


async def test_a_half_written_client_certificate_keeps_the_current_one(
        pki, tmp_path, every_call_looks, caplog):
    tls = _live_tls(tmp_path / "live", pki)
    async with _issuers_server(pki, "test-ca") as (servicer, address):
        async with secure_channel(address, "artifact", tls) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert await _serving(health)
            _replace_file(tls.cert_file, pki.stranger.cert)  # its key not yet
            with caplog.at_level(logging.WARNING, logger="hivemesh.client"):
                for _ in range(3):
                    assert await _serving(health)  # on the current certificate
            warnings = [r for r in caplog.records
                        if r.name == "hivemesh.client" and r.levelno == logging.WARNING]
            assert len(warnings) == 1, warnings  # once per change
            assert "do not form a usable set" in warnings[0].getMessage()
            assert "is not the key of the certificate" in warnings[0].problem
            servicer.accepted = {"other-ca"}
            _replace_file(tls.key_file, pki.stranger.key)
            assert await _serving(health)


async def _until_shut_down(channel: grpc.aio.Channel) -> bool:
    for _ in range(100):
        if channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN:
            return True
        await asyncio.sleep(0.05)
    return False


async def _renewed_under_a_watch(channel, tls, pki):
    """(health stub, watch, first channel): a health Watch in flight on the
    channel's first underlying channel, then the client certificate renewed
    and a call served (on the new one)."""
    health = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest())
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    first = channel.current()
    _install(tls, pki.stranger)
    assert await _serving(health)
    return health, watch, first


async def test_a_replaced_channel_closes_once_its_calls_in_flight_end(
        pki, tmp_path, every_call_looks):
    tls = _live_tls(tmp_path / "live", pki)
    async with _issuers_server(pki, "test-ca", "other-ca") as (_, address):
        async with secure_channel(address, "artifact", tls) as channel:
            health, watch, first = await _renewed_under_a_watch(channel, tls, pki)
            assert channel.current() is not first
            assert not watch.done()  # in flight on the replaced channel, not cut
            assert first.get_state() != grpc.ChannelConnectivity.SHUTDOWN
            watch.cancel()
            assert await _until_shut_down(first)


async def test_a_replaced_channel_closes_after_its_grace_period(
        pki, tmp_path, every_call_looks, monkeypatch):
    monkeypatch.setattr(channel_module, "REPLACED_CHANNEL_GRACE_S", 0.0)
    tls = _live_tls(tmp_path / "live", pki)
    async with _issuers_server(pki, "test-ca", "other-ca") as (_, address):
        async with secure_channel(address, "artifact", tls) as channel:
            health, watch, first = await _renewed_under_a_watch(channel, tls, pki)
            assert await watch.code() == grpc.StatusCode.CANCELLED  # it outlived the grace
            assert await _until_shut_down(first)
            assert await _serving(health)


async def test_closing_a_renewing_channel_closes_the_replaced_one_too(
        pki, tmp_path, every_call_looks):
    tls = _live_tls(tmp_path / "live", pki)
    async with _issuers_server(pki, "test-ca", "other-ca") as (_, address):
        channel = secure_channel(address, "artifact", tls)
        health, watch, first = await _renewed_under_a_watch(channel, tls, pki)
        second = channel.current()
        assert second is not first
        await channel.close()
        assert await watch.code() == grpc.StatusCode.CANCELLED
        assert first.get_state() == grpc.ChannelConnectivity.SHUTDOWN
        assert second.get_state() == grpc.ChannelConnectivity.SHUTDOWN
        with pytest.raises(grpc.aio.UsageError):
            await health.Check(health_pb2.HealthCheckRequest(), timeout=5)


async def test_the_certificate_files_are_looked_at_once_per_interval(pki, tmp_path):
    tls = _live_tls(tmp_path / "live", pki)
    now = 0.0
    opened: list[grpc.aio.Channel] = []

    def open_with(credentials):
        opened.append(grpc.aio.secure_channel("127.0.0.1:1", credentials))
        return opened[-1]
    channel = RenewingChannel("127.0.0.1:1", tls, open_with, check_interval_s=10.0,
                              clock=lambda: now)
    try:
        _install(tls, pki.stranger)
        now = 9.9
        assert channel.current() is opened[0] and len(opened) == 1
        now = 10.0
        assert channel.current() is opened[1]
        now = 30.0
        assert channel.current() is opened[1] and len(opened) == 2  # nothing changed since
    finally:
        await channel.close()


async def test_only_tls_channels_that_name_files_look_at_them(pki):
    channels = [open_channel("127.0.0.1:1", "artifact"),
                open_channel("127.0.0.1:1", "artifact", ChannelTls()),
                open_channel("127.0.0.1:1", "artifact", ChannelTls(server_name="hivemesh.test")),
                open_channel("127.0.0.1:1", "artifact", ChannelTls(ca_file=pki.ca)),
                open_channel("127.0.0.1:1", "artifact", ChannelTls(
                    ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key))]
    try:
        assert ([isinstance(c, RenewingChannel) for c in channels]
                == [False, False, False, True, True])
    finally:
        for channel in channels:
            await channel.close()


# -- CA bundles renewed without a restart -------------------------------------

class _Serving(health_pb2_grpc.HealthServicer):
    async def Check(self, request, context):
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def _health_server(pair, port: int = 0) -> tuple[grpc.aio.Server, int]:
    """A started TLS server of health on 127.0.0.1 presenting ``pair``, on
    ``port`` (0: one the OS picks), and its port."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(_Serving(), server)
    bound = server.add_secure_port(f"127.0.0.1:{port}", grpc.ssl_server_credentials(
        [(pair.key.read_bytes(), pair.cert.read_bytes())]))
    await server.start()
    return server, bound


async def _serving_once_ready(health) -> bool:
    """A health check that waits (bounded) for the channel to connect, as
    after the server restarted."""
    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=15,
                                wait_for_ready=True)
    return answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_server_reissued_under_a_new_ca_is_reached_by_the_same_stub(
        pki, tmp_path, every_call_looks):
    ca_file = tmp_path / "ca.crt"
    _replace_file(ca_file, pki.ca)
    server, port = await _health_server(pki.server)
    channel = secure_channel(f"127.0.0.1:{port}", "artifact", ChannelTls(ca_file=ca_file))
    try:
        health = health_pb2_grpc.HealthStub(channel)
        assert await _serving(health)
        _replace_file(ca_file, pki.ca, pki.other_ca)  # the trust bundle gains the new CA
        assert await _serving(health)
        await server.stop(0)  # restarted on a certificate of the new CA
        server, _ = await _health_server(pki.other_server, port)
        assert await _serving_once_ready(health)
        _replace_file(ca_file, pki.other_ca)  # and loses the old one
        assert await _serving(health)
    finally:
        await channel.close()
        await server.stop(0)


async def test_a_malformed_ca_bundle_keeps_the_current_channel(
        pki, tmp_path, tls_server, every_call_looks, caplog):
    ca_file = tmp_path / "ca.crt"
    _replace_file(ca_file, pki.ca)
    async with secure_channel(tls_server, "artifact", ChannelTls(ca_file=ca_file)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert await _serving(health)
        first = channel.current()
        cut_short = tmp_path / "cut-short.pem"
        cut_short.write_bytes(pki.ca.read_bytes() + pki.other_ca.read_bytes()[:200])
        _replace_file(ca_file, cut_short)
        with caplog.at_level(logging.WARNING, logger="hivemesh.client"):
            for _ in range(3):
                assert await _serving(health)  # on the current channel
        assert channel.current() is first
        warnings = [r for r in caplog.records
                    if r.name == "hivemesh.client" and r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings  # once per change
        assert "do not form a usable set" in warnings[0].getMessage()
        assert "holds a malformed PEM certificate" in warnings[0].problem
        _replace_file(ca_file, pki.ca, pki.other_ca)  # the bundle written whole
        assert await _serving(health)
        assert channel.current() is not first


async def test_a_client_given_tls_files_that_cannot_work_says_which_at_once(pki, tmp_path):
    """A CA file holding no certificate, or a key of another certificate:
    the client's channel refuses them when it opens, naming the file, as
    the services' settings do (not every call later, UNAVAILABLE with a
    handshake error that names nothing)."""
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="ca.pem"):
        async with ArtifactClient("127.0.0.1:1", tls=ChannelTls(ca_file=bad)):
            pass
    with pytest.raises(ValueError, match="not the key"):
        async with ArtifactClient("127.0.0.1:1", tls=ChannelTls(
                ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.stranger.key)):
            pass
