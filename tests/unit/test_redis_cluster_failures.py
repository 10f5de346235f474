"""A Redis Cluster client reports some failures (no node answers, a slot no
node serves) as RedisClusterException, which is not a RedisError: the
backends report those as their store being unavailable, as they do for a
single Redis's failures."""

from __future__ import annotations

import pytest
from redis.exceptions import RedisClusterException, SlotNotCoveredError

from hivemesh.runtime.errors import ServiceError
from hivemesh.services.memory.ledger import LedgerUnavailable
from hivemesh.services.memory.redis_ledger import RedisLedger
from hivemesh.services.orchestrator.redis_state import RedisState

FAILURES = [RedisClusterException("Redis Cluster cannot be connected"),
            SlotNotCoveredError("Slot 7902 is not covered by the cluster")]


class DownCluster:
    """A cluster client every command of which fails with ``failure``."""

    def __init__(self, failure: Exception) -> None:
        self.failure = failure

    def register_script(self, _text):
        async def run(**_):
            raise self.failure
        return run

    def __getattr__(self, _name):
        async def command(*_, **__):
            raise self.failure
        return command


@pytest.mark.parametrize("failure", FAILURES, ids=["no-node", "slot-not-covered"])
async def test_the_memory_ledger_is_unavailable(failure):
    ledger = RedisLedger(DownCluster(failure), "{p:}")
    with pytest.raises(LedgerUnavailable, match="Redis failed"):
        await ledger.replay("AddMemories", "ns", "req", "fp")
    with pytest.raises(LedgerUnavailable, match="Redis failed"):
        await ledger.forget("ns")


@pytest.mark.parametrize("failure", FAILURES, ids=["no-node", "slot-not-covered"])
async def test_the_orchestrator_state_is_unavailable(failure):
    state = RedisState(DownCluster(failure), "{p:}")
    with pytest.raises(ServiceError) as caught:
        await state.run("get", "agent")
    assert "orchestrator state store is unavailable" in caught.value.message
