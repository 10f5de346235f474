"""The health port (``HIVEMESH_<SVC>_SERVER__HEALTH_PORT``): a plaintext
port serving grpc.health.v1 alone, with the statuses of the service's own
port, for probes that cannot speak TLS. Servers on 127.0.0.1, port 0, with
throwaway certificates (tests/fakes/tls.py)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import pytest
from fakes.serve import serve_refused
from fakes.tls import Pki, make_pki
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hivemesh.artifact.v1 import (
    ArtifactServiceStub, CountArtifactsRequest, add_ArtifactServiceServicer_to_server)
from hivemesh.cli.processes import start_service
from hivemesh.client import ArtifactClient, ChannelTls
from hivemesh.runtime.server import ServiceBinding, start_server
from hivemesh.runtime.settings import ServerSettings
from hivemesh.services.artifact.backends.memory import MemoryBackend
from hivemesh.services.artifact.servicer import DOMAIN, SERVICE_NAME, ArtifactServicer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _start(pki: Pki, *, on_shutdown=(), **server):
    settings = ServerSettings(port=0, health_port=0, grace_period_s=0,
                              tls_cert_file=pki.server.cert, tls_key_file=pki.server.key,
                              **server)
    return await start_server(settings, domain=DOMAIN, on_shutdown=on_shutdown, services=[
        ServiceBinding(SERVICE_NAME, add_ArtifactServiceServicer_to_server,
                       ArtifactServicer(MemoryBackend(), max_content_bytes=1024))])


async def _check(port: int, service: str = "") -> int:
    """The status the health port answers, asked in plaintext as kubelet does."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5)
        return answer.status


async def test_the_health_port_answers_in_plaintext_for_a_tls_service(pki):
    running = await _start(pki)
    try:
        assert running.health_port not in (None, 0, running.port)
        for service in ("", SERVICE_NAME):
            assert await _check(running.health_port, service) == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _check(running.health_port, "no.such.Service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # The service's own port still speaks TLS only.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _check(running.port)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.shutdown(0)


async def test_the_health_port_serves_nothing_but_health(pki):
    running = await _start(pki)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.health_port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ArtifactServiceStub(channel).CountArtifacts(CountArtifactsRequest(),
                                                                  timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = reflection.ServerReflectionInfo(iter([
                reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                _ = [r async for r in responses]
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # The same methods over the service's port, with TLS, are there.
        async with ArtifactClient(f"127.0.0.1:{running.port}",
                                  tls=ChannelTls(ca_file=pki.ca)) as client:
            assert await client.count() == 0
    finally:
        await running.shutdown(0)


async def test_the_health_port_goes_not_serving_first_at_shutdown_then_stops(pki):
    """What the service's port's health says at shutdown, the health port
    says too: NOT_SERVING while the server drains (here held in a shutdown
    hook, which runs after health turned and before calls are refused),
    then it stops with the server."""
    draining, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        draining.set()
        await release.wait()

    running = await _start(pki, on_shutdown=(hold,))
    port = running.health_port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == SERVING
        shutdown = asyncio.create_task(running.shutdown(grace_s=5))
        try:
            await asyncio.wait_for(draining.wait(), 30)
            for service in ("", SERVICE_NAME):
                assert await _check(port, service) == NOT_SERVING
            assert (await watch.read()).status == NOT_SERVING
        finally:
            release.set()
            await asyncio.wait_for(shutdown, 30)
        # The watch ends with the server instead of holding its shutdown.
        while await watch.read() is not grpc.aio.EOF:
            pass
        assert await watch.code() == grpc.StatusCode.OK
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _check(port)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_without_the_setting_there_is_no_health_port(pki):
    settings = ServerSettings(port=0, grace_period_s=0)
    running = await start_server(settings, domain=DOMAIN, services=[])
    try:
        assert running.health_port is None and running.health_server is None
    finally:
        await running.shutdown(0)


def _serving_line(log: Path, deadline_s: float = 30) -> dict:
    """The start-up log line ``serving``, once written (it follows the
    ``listening on`` line)."""
    give_up = time.monotonic() + deadline_s
    while True:
        for line in log.read_text().splitlines():
            if line.startswith("{") and json.loads(line)["msg"] == "serving":
                return json.loads(line)
        assert time.monotonic() < give_up, f"no serving line in {log.read_text()!r}"
        time.sleep(0.05)


async def test_serve_announces_the_health_port_in_its_log_only(pki, tmp_path):
    env = {"HIVEMESH_ARTIFACT_SERVER__TLS_CERT_FILE": str(pki.server.cert),
           "HIVEMESH_ARTIFACT_SERVER__TLS_KEY_FILE": str(pki.server.key),
           "HIVEMESH_ARTIFACT_SERVER__HEALTH_PORT": "0"}
    log = tmp_path / "log"
    proc = start_service("artifact", data_dir=tmp_path / "data", env=env, log_path=log)
    try:
        host, port = proc.address.rsplit(":", 1)  # from `listening on HOST:PORT`, as before
        assert host == "127.0.0.1"
        serving = _serving_line(log)
        assert serving["port"] == int(port) and serving["tls"] == "tls"
        health_port = serving["health_port"]
        assert health_port not in (0, int(port))
        for service in ("", SERVICE_NAME):
            assert await _check(health_port, service) == SERVING
        async with ArtifactClient(proc.address, tls=ChannelTls(ca_file=pki.ca)) as client:
            assert await client.count() == 0
    finally:
        assert proc.stop() == 0
    with pytest.raises(grpc.aio.AioRpcError):
        await _check(health_port)


def test_a_plaintext_service_logs_no_health_port_unless_set(tmp_path):
    log = tmp_path / "log"
    proc = start_service("artifact", data_dir=tmp_path / "data", log_path=log)
    try:
        assert "health_port" not in _serving_line(log)
    finally:
        assert proc.stop() == 0


@pytest.mark.parametrize("how", ["variables", "flag"])
def test_a_health_port_equal_to_the_port_is_an_invalid_setting(tmp_path, how):
    # Refused with the settings, before anything is bound.
    env = {"HIVEMESH_ARTIFACT_SERVER__HEALTH_PORT": "7001"}
    if how == "variables":
        env["HIVEMESH_ARTIFACT_SERVER__PORT"] = "7001"
        args = ()
    else:
        args = ("--port", "7001")
    result = serve_refused("artifact", *args, "--data-dir", str(tmp_path), env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert "invalid artifact settings:" in result.stderr
    assert "health_port: Value error, is the service's port too (7001" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_health_port_of_its_own_or_zero_is_accepted():
    assert ServerSettings(port=7001, health_port=7002).health_port == 7002
    assert ServerSettings(port=0, health_port=0).health_port == 0
    assert ServerSettings(port=7001).health_port is None
    with pytest.raises(ValueError, match="health_port"):
        ServerSettings(port=7001, health_port=70000)


async def _status_at(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5)
        return answer.status


async def test_the_health_port_binds_its_own_host_while_the_service_s_stays_on_loopback():
    """As in a pod with a sidecar: the service's port on 127.0.0.1 (its
    sidecar alone reaches it), the health port on every address (probes
    come to the pod's address). 127.0.0.2, another loopback address, stands
    for the pod's: the health port answers there, the service's port does
    not."""
    settings = ServerSettings(host="127.0.0.1", port=0, health_host="0.0.0.0", health_port=0,
                              grace_period_s=0)
    running = await start_server(settings, domain=DOMAIN, services=[
        ServiceBinding(SERVICE_NAME, add_ArtifactServiceServicer_to_server,
                       ArtifactServicer(MemoryBackend(), max_content_bytes=1024))])
    try:
        for host in ("127.0.0.1", "127.0.0.2"):
            for service in ("", SERVICE_NAME):
                assert await _status_at(f"{host}:{running.health_port}", service) == SERVING
        assert await _status_at(f"127.0.0.1:{running.port}") == SERVING
        async with ArtifactClient(f"127.0.0.1:{running.port}") as client:
            assert await client.count() == 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _status_at(f"127.0.0.2:{running.port}")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.shutdown(0)


def test_serve_binds_the_health_port_on_the_health_host(tmp_path):
    """The variables through ``serve``: the health port on 0.0.0.0, the
    service's port where --host says (127.0.0.1)."""
    env = {"HIVEMESH_ARTIFACT_SERVER__HEALTH_PORT": "0",
           "HIVEMESH_ARTIFACT_SERVER__HEALTH_HOST": "0.0.0.0"}
    log = tmp_path / "log"
    proc = start_service("artifact", data_dir=tmp_path / "data", env=env, log_path=log)
    try:
        host, port = proc.address.rsplit(":", 1)
        assert host == "127.0.0.1"
        health_port = _serving_line(log)["health_port"]

        async def check() -> None:
            assert await _status_at(f"127.0.0.2:{health_port}") == SERVING
            with pytest.raises(grpc.aio.AioRpcError):
                await _status_at(f"127.0.0.2:{port}")
        asyncio.run(check())
    finally:
        assert proc.stop() == 0


def test_a_health_host_without_a_health_port_is_refused_by_serve(tmp_path):
    env = {"HIVEMESH_ARTIFACT_SERVER__HEALTH_HOST": "0.0.0.0"}
    result = serve_refused("artifact", "--data-dir", str(tmp_path), env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert "health_host needs health_port" in result.stderr
    assert "Traceback" not in result.stderr
