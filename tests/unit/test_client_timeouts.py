"""The Python clients' call deadlines: each method's timeout from the
service config that ships with its contract, unless the caller says."""

from __future__ import annotations

import datetime as dt

from hivemesh.client import ArtifactClient, InformationClient
from hivemesh.client.memory import MemoryClient
from hivemesh.artifact.v1 import Artifact, GetArtifactResponse
from hivemesh.information.v1 import (
    GetBudgetResponse, GetMetricsResponse, ListModelPricesResponse)
from hivemesh.memory.v1 import AddMemoriesResponse, SearchMemoriesResponse


class _Stub:
    """Answers every call at once and records the timeout it was given."""

    def __init__(self, answers: dict) -> None:
        self.answers = answers
        self.timeouts: dict[str, float | None] = {}

    def __getattr__(self, name: str):
        async def method(request, timeout=None, metadata=None):
            self.timeouts[name] = timeout
            return self.answers[name]
        return method


async def test_a_call_gets_its_methods_timeout_from_the_service_config():
    # memory: 15 s for every method, 60 s for AddMemories (a batch is embedded)
    async with MemoryClient("127.0.0.1:1") as memory:
        memory._stub = stub = _Stub({"AddMemories": AddMemoriesResponse(),
                                     "SearchMemories": SearchMemoriesResponse()})
        await memory.add(["a"] * 1000)
        await memory.search("q")
        assert stub.timeouts == {"AddMemories": 60.0, "SearchMemories": 15.0}


async def test_information_calls_get_their_methods_timeouts():
    # information: 5 s for every method, 30 s for GetMetrics
    async with InformationClient("127.0.0.1:1") as info:
        info._stub = stub = _Stub({"GetMetrics": GetMetricsResponse(),
                                   "GetBudget": GetBudgetResponse(),
                                   "ListModelPrices": ListModelPricesResponse()})
        await info.metrics(dt.datetime(2026, 1, 1))
        await info.get_budget("b")
        await info.list_prices()
        assert stub.timeouts == {"GetMetrics": 30.0, "GetBudget": 5.0, "ListModelPrices": 5.0}


async def test_the_clients_and_the_calls_own_timeouts_win():
    async with ArtifactClient("127.0.0.1:1", timeout=2.5) as artifacts:
        artifacts._stub = stub = _Stub({"GetArtifact": GetArtifactResponse(
            artifact=Artifact(artifact_id="a"))})
        await artifacts.get("a")
        assert stub.timeouts["GetArtifact"] == 2.5
        await artifacts.get("a", timeout=None)
        assert stub.timeouts["GetArtifact"] is None
    async with ArtifactClient("127.0.0.1:1") as artifacts:
        artifacts._stub = stub = _Stub({"GetArtifact": GetArtifactResponse()})
        await artifacts.get("a", timeout=7)
        assert stub.timeouts["GetArtifact"] == 7
        await artifacts.get("a")
        assert stub.timeouts["GetArtifact"] == 10.0


async def test_no_timeout_and_longer_timeouts_are_not_capped_by_the_service_config(
        monkeypatch, tmp_path):
    # The deadline a call asks for is its deadline: the channel's service
    # config must not cut it shorter (here its timeout is far below the
    # backend's latency).
    import json

    from hivemesh.client import channel as channel_module
    from hivemesh.runtime.settings import ServerSettings
    from hivemesh.services.artifact.backends.memory import MemoryBackend
    from hivemesh.services.artifact.fake import FaultyBackend
    from hivemesh.services.artifact.server import create_server
    from hivemesh.services.artifact.settings import ArtifactSettings

    contract = channel_module.service_config

    def short_config(api: str) -> str:
        config = json.loads(contract(api))
        for method_config in config["methodConfig"]:
            method_config["timeout"] = "0.01s"
        return json.dumps(config)

    monkeypatch.setattr(channel_module, "service_config", short_config)
    backend = FaultyBackend(MemoryBackend())
    backend.latency_s = 0.3
    running, port = await create_server(ArtifactSettings(
        server=ServerSettings(host="127.0.0.1", port=0, grace_period_s=0), data_dir=tmp_path),
        backend)
    try:
        async with ArtifactClient(f"127.0.0.1:{port}", timeout=None) as artifacts:
            assert await artifacts.count() == 0
            assert await artifacts.count(timeout=30) == 0
    finally:
        await running.shutdown(0)


def test_a_method_whose_own_config_gives_no_timeout_has_none():
    # A method's own entry replaces the service's, timeout included: these
    # long-lived streams get no deadline from the service config.
    from hivemesh.client.channel import method_timeout

    assert method_timeout("information", "WatchAlerts") is None
    assert method_timeout("orchestrator", "SubscribeEvents") is None
    assert method_timeout("information", "GetMetrics") == 30.0
    assert method_timeout("information", "Reserve") == 5.0


def test_a_service_wide_timeout_is_that_of_the_methods_own_service():
    # The orchestrator's config gives OrchestratorService 10 s and ToolService
    # 60 s, each in an entry naming only its service.
    from hivemesh.client.channel import method_timeout

    assert method_timeout("orchestrator", "ExecuteTool") == 60.0
    assert method_timeout("orchestrator", "ListTools") == 60.0
    assert method_timeout("orchestrator", "GetAgent") == 10.0
    assert method_timeout("orchestrator", "RunAgent") == 600.0
    service = "hivemesh.orchestrator.v1.ToolService"
    assert method_timeout("orchestrator", "ExecuteTool", service) == 60.0
    assert method_timeout("orchestrator", "NoSuchMethod") is None


def test_a_channel_reconnects_within_ten_seconds_of_a_provider_coming_back():
    """gRPC's reconnect backoff grows to 120 s by default: a provider back
    after a long outage would stay unreached for up to two minutes."""
    from unittest import mock

    from hivemesh.client import channel as channels
    with mock.patch.object(channels.grpc.aio, "insecure_channel") as make:
        channels.insecure_channel("127.0.0.1:1", "artifact")
    options = dict(make.call_args.kwargs["options"])
    assert options["grpc.max_reconnect_backoff_ms"] == 10_000


def test_a_tls_channel_has_the_plaintext_channels_options(tmp_path):
    """One function builds the options: a TLS channel gets the same service
    config, retries, message limits and reconnect backoff, plus the server
    name override when one is given."""
    from unittest import mock

    from fakes.tls import make_pki

    from hivemesh.client import channel as channels
    ca = make_pki(tmp_path).ca  # a real bundle: the channel checks it when it opens
    with mock.patch.object(channels.grpc.aio, "insecure_channel") as plain, \
            mock.patch.object(channels.grpc.aio, "secure_channel") as secure, \
            mock.patch.object(channels.grpc, "ssl_channel_credentials") as credentials:
        channels.insecure_channel("127.0.0.1:1", "memory", retries=False)
        channels.secure_channel("127.0.0.1:1", "memory",
                                channels.ChannelTls(ca_file=ca, server_name="memory.test"),
                                retries=False)
    plain_options = plain.call_args.kwargs["options"]
    secure_options = secure.call_args.kwargs["options"]
    assert secure_options == [*plain_options, ("grpc.ssl_target_name_override", "memory.test")]
    assert credentials.call_args.kwargs["root_certificates"] == ca.read_bytes()
