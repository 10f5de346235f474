"""On a Redis Cluster a backend's key prefix is a hash tag, so that every key
a script or a transaction touches hashes to one slot."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from hivemesh.runtime.redis import cluster_prefix
from hivemesh.services.information.settings import InformationSettings
from hivemesh.services.memory.settings import MemorySettings
from hivemesh.services.orchestrator.settings import OrchestratorSettings


@pytest.mark.parametrize("prefix, tagged", [
    ("hivemesh:info:", "{hivemesh:info:}"),
    ("hivemesh:memory:", "{hivemesh:memory:}"),
    ("{hivemesh:orch}:", "{hivemesh:orch}:"),      # a tag of its own is kept
    ("team-a:{orch}:", "team-a:{orch}:"),
    ("a}{b}:", "a}{b}:"),                         # Redis's rule: the first '{' and its '}'
])
def test_a_prefix_becomes_a_hash_tag(prefix, tagged):
    assert cluster_prefix(prefix) == tagged


@pytest.mark.parametrize("prefix", ["hivemesh:info:", "{hivemesh:orch}:", "a}{b}:"])
def test_every_key_under_a_tagged_prefix_is_in_one_slot(prefix):
    tagged = cluster_prefix(prefix)
    # Rests that hold braces of their own (ids come from callers).
    rests = ["budget:b1", "ctr:b1:0", "scope:acme||", "req:{x}", "res:}{", "{", "}", ""]
    assert len({key_slot(f"{tagged}{rest}".encode()) for rest in rests}) == 1


@pytest.mark.parametrize("prefix", ["hivemesh{:", "hivemesh}:", "{}hivemesh:", "a{}b{"])
def test_a_prefix_with_braces_but_no_tag_is_refused(prefix):
    with pytest.raises(ValueError, match="has braces but no hash tag"):
        cluster_prefix(prefix)


@pytest.mark.parametrize("make", [
    lambda **kw: InformationSettings(backend="redis", redis_url="redis://h:1/0", **kw),
    lambda **kw: MemorySettings(ledger="redis", redis_url="redis://h:1/0", **kw),
    lambda **kw: OrchestratorSettings(state_backend="redis", redis_url="redis://h:1/0", **kw),
], ids=["information", "memory", "orchestrator"])
def test_each_service_refuses_a_prefix_that_cannot_be_a_tag_on_a_cluster(make):
    assert make(redis_cluster=True).redis_cluster
    assert make(redis_prefix="odd{:").redis_prefix == "odd{:"  # fine on a single Redis
    with pytest.raises(ValueError, match="has braces but no hash tag"):
        make(redis_cluster=True, redis_prefix="odd{:")
