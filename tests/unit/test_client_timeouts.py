"""The Python clients' call deadlines: each method's timeout from the
service config that ships with its contract, unless the caller says."""

from __future__ import annotations

from hivemesh.client import ArtifactClient
from hivemesh.client.memory import MemoryClient
from hivemesh.artifact.v1 import Artifact, GetArtifactResponse
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
