"""The memory service embedding through the LLM service, against a fake
OpenAI-compatible upstream or the mock backend: what it asks the model for,
what the collection records of the model, and what its callers are told
when the LLM service is over its rate limit or a call is too large."""

from __future__ import annotations

import contextlib
import json

import pytest
from test_memory_service import memory_settings, serve

from hivemesh.client import ResourceExhaustedError
from hivemesh.runtime.settings import ServerSettings
from hivemesh.services.memory.server import open_backend
from hivemesh.services.memory.store.base import EmbedderMismatch

DIMS = 16


@contextlib.asynccontextmanager
async def llm_service(settings):
    from hivemesh.services.llm.server import Backends
    from hivemesh.services.llm.server import create_server as create_llm_server

    backends = Backends(settings)
    running, port = await create_llm_server(settings, backends)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await running.shutdown(0)
        await backends.close()


def routed_to(base_url: str, upstream_model: str, **server):
    """An LLM service whose embedding alias ``embed`` is ``upstream_model``
    at the OpenAI-compatible server ``base_url``."""
    from hivemesh.services.llm.settings import BackendSettings, LlmSettings, ModelSettings
    return LlmSettings(
        server=ServerSettings(host="127.0.0.1", port=0, grace_period_s=1, **server),
        backends={"up": BackendSettings(type="openai_compatible", base_url=base_url,
                                        max_attempts=1)},
        models=[ModelSettings(alias="chat", backend="up", upstream_model="c", default=True),
                ModelSettings(alias="embed", kind="embedding", backend="up",
                              upstream_model=upstream_model, default=True)])


def store_settings(kind: str, tmp_path) -> dict:
    return {"store": "qdrant", "qdrant_location": str(tmp_path / "qdrant")} \
        if kind == "qdrant-local" else {}


async def test_a_model_that_refuses_dimensions_serves_adds_and_searches(tmp_path):
    """text-embedding-ada-002 (and many OpenAI-compatible servers) refuse
    the ``dimensions`` parameter: the start-up call and every later one ask
    alike, without it, so what starts also adds and searches."""
    from fakes.openai_server import FakeOpenAI

    async with FakeOpenAI(embedding_dimensions=DIMS,
                          fixed_size_models=("text-embedding-ada",)) as upstream, \
            llm_service(routed_to(upstream.base_url, "text-embedding-ada-002")) as llm:
        async with serve(memory_settings(tmp_path, llm_address=llm)) as memory:
            added = await memory.add(["the quarterly invoice is due on friday"],
                                     namespace="t")
            assert added.embedding_model == "llm:embed"
            hits = await memory.search("the quarterly invoice is due on friday",
                                       namespace="t", mode="dense")
            assert hits.results[0].chunk.text == "the quarterly invoice is due on friday"
        sent = [r.body for r in upstream.requests]
        assert len(sent) == 3  # start-up, add, search
        assert all("dimensions" not in body for body in sent)
        assert {frozenset(body) for body in sent} == {frozenset(sent[0])}


async def test_an_embedding_alias_the_llm_service_refuses_stops_start_up_naming_it(tmp_path):
    from hivemesh.services.memory.embedders import EmbeddingRejected

    async with llm_service(routed_to("http://127.0.0.1:9/v1", "m")) as llm:
        with pytest.raises(EmbeddingRejected, match="refused to embed with 'nonesuch'.*"
                                                     "HIVEMESH_MEMORY_EMBEDDING_MODEL"):
            await open_backend(memory_settings(tmp_path, llm_address=llm,
                                               embedding_model="nonesuch"))


@pytest.mark.parametrize("kind", ["edge", "qdrant-local"])
async def test_an_alias_routed_to_another_model_is_refused_at_start_up(tmp_path, kind):
    """The collection records the upstream model behind the alias: routing
    the alias to another model of the same size (whose vectors cannot be
    compared with the stored ones) stops the service at start-up."""
    from fakes.openai_server import FakeOpenAI

    settings = memory_settings(tmp_path, **store_settings(kind, tmp_path))
    async with FakeOpenAI(embedding_dimensions=DIMS) as upstream:
        async with llm_service(routed_to(upstream.base_url, "text-embedding-3-small")) as llm:
            settings = settings.model_copy(update={"llm_address": llm})
            async with serve(settings) as memory:
                await memory.add(["stored by the first model"], namespace="t")
        async with llm_service(routed_to(upstream.base_url, "text-embedding-ada-002")) as llm:
            with pytest.raises(EmbedderMismatch, match=(
                    r"model 'llm:embed' made by the upstream model 'text-embedding-3-small', "
                    r"but that alias now routes to 'text-embedding-ada-002'")):
                await open_backend(settings.model_copy(update={"llm_address": llm}))
        async with llm_service(routed_to(upstream.base_url, "text-embedding-3-small")) as llm:
            async with serve(settings.model_copy(update={"llm_address": llm})) as memory:
                assert await memory.count(namespace="t") == 1


@pytest.mark.parametrize("kind", ["edge", "qdrant-local"])
async def test_a_collection_recorded_without_the_upstream_model_gets_it_at_start_up(
        tmp_path, kind):
    """A collection written by a version that recorded only the alias opens
    as before, records the upstream model it is opened with, and from then
    on refuses another."""
    from hivemesh.services.memory.server import open_store

    settings = memory_settings(tmp_path, **store_settings(kind, tmp_path))
    # What an earlier version recorded: the alias and the size only.
    store = await open_store(settings, "llm:embed", DIMS)
    await store.close()
    if kind == "edge":
        record = tmp_path / "memory" / "memories" / "collection.json"
        assert json.loads(record.read_text()) == {"embedding_model": "llm:embed",
                                                  "dimensions": DIMS}
    store = await open_store(settings, "llm:embed", DIMS, "text-embedding-3-small")
    await store.close()
    if kind == "edge":
        assert json.loads(record.read_text())["upstream_model"] == "text-embedding-3-small"
    with pytest.raises(EmbedderMismatch, match="'text-embedding-ada-002'"):
        await open_store(settings, "llm:embed", DIMS, "text-embedding-ada-002")
    store = await open_store(settings, "llm:embed", DIMS, "text-embedding-3-small")
    await store.close()
    # Embedders that name their model themselves record no upstream model.
    with pytest.raises(EmbedderMismatch, match="'hashing-16'"):
        await open_store(settings, f"hashing-{DIMS}", DIMS)


async def test_the_llm_rate_limit_is_passed_on_with_its_delay(tmp_path):
    """The LLM service over its rate limit answers RESOURCE_EXHAUSTED,
    RATE_LIMITED, with when to come back: the memory service says the same,
    with the LLM service's delay, not a passing outage to retry in 1 s."""
    from hivemesh.services.llm.settings import BackendSettings, LlmSettings

    llm_settings = LlmSettings(
        server=ServerSettings(host="127.0.0.1", port=0, grace_period_s=1),
        backends={"mock": BackendSettings(type="mock", requests_per_minute=1)})
    async with llm_service(llm_settings) as llm:
        # The start-up call takes the minute's one request.
        async with serve(memory_settings(tmp_path, llm_address=llm)) as memory:
            for call in (lambda: memory.add(["rate limited text"], namespace="t"),
                         lambda: memory.search("rate limited", namespace="t", mode="dense")):
                with pytest.raises(ResourceExhaustedError) as err:
                    await call()
                assert err.value.reason == "RATE_LIMITED"
                assert err.value.metadata["backend"] == "embedding model"
                # The limiter's wait for the next of one request a minute.
                assert err.value.retry_delay is not None
                assert err.value.retry_delay.total_seconds() > 1
                assert float(err.value.metadata["retry_after_s"]) == pytest.approx(
                    err.value.retry_delay.total_seconds(), abs=0.001)


async def test_an_embed_call_over_the_message_limit_is_not_called_an_outage(tmp_path):
    """An Embed call the LLM service refuses for its size fails the same
    way however often it is sent: RESOURCE_EXHAUSTED, PAYLOAD_TOO_LARGE,
    with no retry delay, not UNAVAILABLE."""
    from hivemesh.services.llm.settings import LlmSettings

    # The smallest message limit the LLM service takes (128 KiB).
    llm_settings = LlmSettings(server=ServerSettings(host="127.0.0.1", port=0,
                                                     grace_period_s=1,
                                                     max_message_bytes=128 * 1024))
    async with llm_service(llm_settings) as llm:
        async with serve(memory_settings(tmp_path, llm_address=llm)) as memory:
            words = " ".join(f"word{i}" for i in range(40_000))
            with pytest.raises(ResourceExhaustedError) as err:
                await memory.add([words], namespace="t")
            assert err.value.reason == "PAYLOAD_TOO_LARGE"
            assert err.value.retry_delay is None
            assert "HIVEMESH_MEMORY_EMBED_BATCH_SIZE" in err.value.message
            assert await memory.count(namespace="t") == 0
            # A smaller add still goes through.
            await memory.add(["a short note"], namespace="t")
            assert await memory.count(namespace="t") == 1



async def test_a_refusal_by_the_embedding_model_names_the_embedding_model(tmp_path):
    from fakes import Fail
    from fakes.openai_server import FakeOpenAI

    from hivemesh.client import FailedPreconditionError

    async with FakeOpenAI(embedding_dimensions=DIMS) as upstream, \
            llm_service(routed_to(upstream.base_url, "text-embedding-3-small")) as llm:
        async with serve(memory_settings(tmp_path, llm_address=llm)) as memory:
            upstream.enqueue(Fail(status=400, message="input is not valid"))
            with pytest.raises(FailedPreconditionError) as err:
                await memory.add(["refused text"], namespace="t")
            assert err.value.reason == "UPSTREAM_ERROR"
            assert err.value.metadata["backend"] == "embedding model"
            assert "input is not valid" in err.value.message


async def test_the_embed_hop_carries_the_callers_trace_context_and_baggage(tmp_path,
                                                                           monkeypatch):
    """Memory -> LLM Embed is a hop of the request like any other: the
    caller's baggage (its tenant) and trace context reach the LLM service."""
    from opentelemetry import baggage
    from opentelemetry import context as otel_context

    from hivemesh.services.llm.servicer import LlmServicer
    from hivemesh.services.llm.settings import BackendSettings, LlmSettings

    seen: list[dict[str, str]] = []
    embed = LlmServicer.Embed

    async def recorded(self, request, context):
        seen.append(dict(context.invocation_metadata() or ()))
        return await embed(self, request, context)

    monkeypatch.setattr(LlmServicer, "Embed", recorded)
    llm_settings = LlmSettings(
        server=ServerSettings(host="127.0.0.1", port=0, grace_period_s=1),
        backends={"mock": BackendSettings(type="mock")})
    async with llm_service(llm_settings) as llm:
        async with serve(memory_settings(tmp_path, llm_address=llm)) as memory:
            seen.clear()  # the start-up call has no caller
            token = otel_context.attach(baggage.set_baggage("hivemesh.tenant_id", "acme"))
            try:
                await memory.add(["traced text"], namespace="t")
            finally:
                otel_context.detach(token)
    assert seen and all("hivemesh.tenant_id=acme" in m.get("baggage", "") for m in seen)
