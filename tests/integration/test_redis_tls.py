"""The Redis backends over TLS: a ``rediss://`` URL whose query names the CA
bundle, and the client certificate and key where Redis requires one
(``tls-auth-clients yes``), to a single Redis and to a Redis Cluster whose
nodes speak TLS only (the client learns the other nodes from the first one
and reaches them over TLS too). Without the client certificate, or with a
CA that did not sign the server's, opening the backend fails with the
Redis unreachable error, naming the URL without its query or password."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import drop_redis_prefix
from fakes.tls import Pki, make_pki
from redis_cluster import RedisTls, cluster_tools, redis_cluster, single_redis
from test_information_store import budget, commit_op, hold, reserve_op
from test_redis_cluster import expect_every_node_reached

from hivemesh.llm.v1 import GenerateResponse
from hivemesh.memory.v1 import HistoryMessage, MessageRole
from hivemesh.orchestrator.v1 import AgentDefinition
from hivemesh.runtime.redis import RedisUnavailable, open_redis
from hivemesh.runtime.redis_records import RedisRequestRecords
from hivemesh.services.information.store.redis import RedisStore
from hivemesh.services.llm.server import records_unavailable
from hivemesh.services.memory.redis_ledger import RedisLedger
from hivemesh.services.orchestrator.redis_state import RedisAgents, RedisState


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls(pki) -> RedisTls:
    node = pki.peer("redis-node")
    return RedisTls(pki.ca, node.cert, node.key, pki.client.cert, pki.client.key)


def _tools() -> tuple[str, str]:
    tools = cluster_tools()
    if tools is None:
        pytest.skip("redis-server and redis-cli are needed to start a Redis over TLS")
    return tools


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, tls) -> Iterator[str]:
    with redis_cluster(tmp_path_factory.mktemp("tls-cluster"), *_tools(), tls=tls) as url:
        yield url


@pytest.fixture(scope="module")
def tls_single(tmp_path_factory, tls) -> Iterator[str]:
    with single_redis(tmp_path_factory.mktemp("tls-single"), *_tools(), tls=tls) as url:
        yield url


@pytest.fixture(params=["single", "cluster"])
def target(request) -> tuple[str, bool]:
    """(URL, whether it is a cluster): each scenario on both."""
    cluster = request.param == "cluster"
    return request.getfixturevalue("tls_cluster" if cluster else "tls_single"), cluster


def _prefix() -> str:
    return f"hmtest:{uuid.uuid4().hex}:"


async def test_the_information_store_over_tls(target):
    url, cluster = target
    store = await RedisStore.open(url, prefix=_prefix(), cluster=cluster)
    try:
        b = budget("b1", micros=1000)
        await store.create_budget(b, "req-create", "fp")
        reserved = await store.reserve(reserve_op([hold(b)], 300))
        await store.settle(commit_op(reserved.reservation_id, 250))
        (counter,) = await store.counters([("b1", 0)])
        assert (counter.spent_micros, counter.reserved_micros) == (250, 0)
    finally:
        await drop_redis_prefix(store.client, store.prefix)
        await store.close()


async def test_the_memory_ledger_over_tls(target):
    url, cluster = target
    ledger = await RedisLedger.open(url, _prefix(), cluster=cluster)
    try:
        hello = HistoryMessage(role=MessageRole.MESSAGE_ROLE_USER, content="hello")
        await ledger.append("ns", "chat", [hello], "req-1", "fp")
        messages = (await ledger.history("ns", "chat", 10_000, 100))[0]
        assert [m.content for m in messages] == ["hello"]
    finally:
        await drop_redis_prefix(ledger.client, ledger.prefix)
        await ledger.close()


async def test_the_orchestrator_state_over_tls(target):
    url, cluster = target
    state = await RedisState.open(url, prefix=_prefix(), cluster=cluster)
    try:
        agents = RedisAgents(state)
        await agents.register(AgentDefinition(name="coder", model="m"), False)
        assert (await agents.get("coder")).model == "m"
    finally:
        await drop_redis_prefix(state.client, state.prefix)
        await state.close()


async def test_the_llm_records_over_tls(target):
    url, cluster = target
    records = await RedisRequestRecords.open(
        url, _prefix(), 60, lease_s=60, cluster=cluster,
        unavailable=records_unavailable)

    async def run():
        return GenerateResponse(model="m")
    try:
        assert (await records.once("llm", "req-1", "fp", run, GenerateResponse))[1] is False
        assert (await records.once("llm", "req-1", "fp", run, GenerateResponse))[1] is True
    finally:
        await drop_redis_prefix(records.scripts.client, records.prefix)
        await records.close()


async def test_a_cluster_over_tls_is_reached_on_every_node_over_tls(tls_cluster):
    await expect_every_node_reached(tls_cluster, "HiredisPackingSSLConnection")


def _without_client_certificate(url: str) -> str:
    return url.split("&ssl_certfile=")[0]


def _with_ca(url: str, ca: Path) -> str:
    base, _, rest = url.partition("?ssl_ca_certs=")
    return f"{base}?ssl_ca_certs={ca}&{rest.partition('&')[2]}"


@pytest.mark.parametrize("change", ["no client certificate", "another CA"])
async def test_a_tls_redis_that_refuses_the_client_is_unreachable(target, pki, change):
    url, cluster = target
    bad = (_without_client_certificate(url) if change == "no client certificate"
           else _with_ca(url, pki.other_ca))
    with pytest.raises(RedisUnavailable) as refused:
        await open_redis(bad, cluster=cluster, socket_connect_timeout=5)
    message = str(refused.value)
    assert bad.partition("?")[0] in message
    assert "ssl_" not in message  # the URL is named without its query
