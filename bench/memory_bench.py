"""Memory service benchmark: ingest throughput and search latency on
100,000 chunks of 384-dimensional vectors (hashing embedder), through the
service, next to the same queries on the embedded engine called in-process
and a bare gRPC round trip (a health check on the same server), all in one
run.

    python bench/memory_bench.py [--chunks N] [--queries Q] [--repeat R]

Steps: the service (its own process; this one is the load generator)
ingests the chunks with AddMemories (256 one-chunk items per request, two
requests in flight); the shard's HNSW index is then built; the service is
restarted on the same data and answers dense and hybrid searches (c=1),
while a copy of the shard, opened in this process, answers the same queries
(vectors computed beforehand) straight from the engine, in interleaved
rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Result, median_of, run  # noqa: E402

from hivemesh.cli.processes import start_service  # noqa: E402
from hivemesh.memory.v1 import (  # noqa: E402
    AddMemoriesRequest, ChunkingOptions, MemoryItem, MemoryServiceStub, SearchMemoriesRequest,
    SearchMode)
from hivemesh.runtime.text import hashing_embedding  # noqa: E402
from hivemesh.services.memory.keywords import KeywordEncoder  # noqa: E402
from hivemesh.services.memory.store.base import Mode, Search  # noqa: E402
from hivemesh.services.memory.store.edge import EdgeStore  # noqa: E402

DIMS = 384
NAMESPACE = "bench"
BATCH = 256
ENV = {"HIVEMESH_MEMORY_EMBEDDING_DIMENSIONS": str(DIMS),
       "HIVEMESH_MEMORY_SERVER__LOG_LEVEL": "WARNING"}


def corpus(n: int, seed: int = 1) -> list[str]:
    """Sentences of 20 to 40 words over a 5,000-word vocabulary (Zipf-like)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    return [" ".join(rng.choices(vocab, weights, k=rng.randint(20, 40))) + "."
            for _ in range(n)]


async def ingest(address: str, texts: list[str]) -> tuple[float, int]:
    """Chunks per second through AddMemories, two requests in flight."""
    async with grpc.aio.insecure_channel(address) as channel:
        memory = MemoryServiceStub(channel)
        batches = [texts[i:i + BATCH] for i in range(0, len(texts), BATCH)]
        pending = iter(batches)
        stored = 0

        async def worker() -> None:
            nonlocal stored
            for batch in pending:
                response = await memory.AddMemories(AddMemoriesRequest(
                    request_id=str(uuid.uuid4()), namespace=NAMESPACE,
                    items=[MemoryItem(content=t, source_id=f"doc-{hash(t)}") for t in batch],
                    chunking=ChunkingOptions(whole_item=True)), timeout=300)
                stored += response.chunk_count
        started = time.perf_counter()
        await asyncio.gather(worker(), worker())
        return stored / (time.perf_counter() - started), stored


async def searches(address: str, store: EdgeStore, queries: list[str],
                   repeat: int) -> dict[str, Result]:
    """Rounds that interleave the bare round trip, the service's searches and
    the same queries straight to the engine (vectors computed beforehand), so
    drift in the machine's speed hits all of them alike; the median round
    counts."""
    import qdrant_edge as q

    from hivemesh.services.memory.store.edge import _filter, _sparse

    keywords = KeywordEncoder()
    dense = [hashing_embedding(t, DIMS) for t in queries]
    sparse = [keywords.query(t) for t in queries]
    flt = _filter(NAMESPACE)
    idf = q.SearchParams(idf=q.IdfParams(corpus=flt))

    def dense_request(i: int) -> q.QueryRequest:
        return q.QueryRequest(limit=10, filter=flt, with_payload=True,
                              query=q.Query.Nearest(dense[i], using="dense"))

    def hybrid_request(i: int) -> q.QueryRequest:
        return q.QueryRequest(limit=10, filter=flt, with_payload=True, query=q.Fusion.Rrf(k=60),
                              prefetches=[
                                  q.Prefetch(limit=100, filter=flt,
                                             query=q.Query.Nearest(dense[i], using="dense")),
                                  q.Prefetch(limit=100, filter=flt, params=idf,
                                             query=q.Query.Nearest(_sparse(sparse[i]),
                                                                   using="bm25"))])

    def engine(make):
        async def call(i: int):
            return store.shard.query(make(i % len(queries)))
        return call

    # Sanity: the service's own search path returns as many results.
    assert len(await store.search(NAMESPACE, Search(Mode.HYBRID, 10, dense=dense[0],
                                                    sparse=sparse[0]))) == 10
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        memory = MemoryServiceStub(channel)
        ping = health_pb2.HealthCheckRequest()

        async def bare(_: int):
            return await health.Check(ping, timeout=10)

        def searcher(mode: int):
            async def call(i: int):
                return await memory.SearchMemories(SearchMemoriesRequest(
                    namespace=NAMESPACE, query=queries[i % len(queries)], mode=mode, limit=10),
                    timeout=10)
            return call

        rounds: dict[str, list[Result]] = {}
        for _ in range(repeat):
            for name, call in (("bare round trip", bare),
                               ("in-process dense search", engine(dense_request)),
                               ("service dense search", searcher(SearchMode.SEARCH_MODE_DENSE)),
                               ("in-process hybrid search", engine(hybrid_request)),
                               ("service hybrid search",
                                searcher(SearchMode.SEARCH_MODE_HYBRID))):
                rounds.setdefault(name, []).append(
                    await run(name, call, concurrency=1, calls=len(queries), warmup=50))
        return {k: median_of(v) for k, v in rounds.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=500, help="searches per round")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (median)")
    args = parser.parse_args()
    texts = corpus(args.chunks)
    queries = [" ".join(t.split()[:6]) for t in random.Random(2).sample(texts, args.queries)]
    with tempfile.TemporaryDirectory(prefix="hivemesh-bench-") as tmp:
        data = Path(tmp)
        proc = start_service("memory", data_dir=data, env=ENV)
        try:
            rate, stored = asyncio.run(ingest(proc.address, texts))
        finally:
            proc.stop(timeout_s=300)
        print(f"ingest through the service      chunks={stored} dims={DIMS} "
              f"throughput={rate:8.0f} chunks/s  target >= 3000: "
              f"{'met' if rate >= 3000 else 'NOT met'}")

        started = time.perf_counter()
        store = EdgeStore.open(data, "memories", f"hashing-{DIMS}", DIMS)  # builds the index
        asyncio.run(store.close())
        print(f"HNSW index build at open        {time.perf_counter() - started:8.1f} s")

        # The engine in this process opens a copy: the service holds the
        # original's lock while both are measured.
        shutil.copytree(data / "memory" / "memories", Path(tmp) / "engine" / "memory" / "memories")

        async def measure(address: str) -> dict[str, Result]:
            store = EdgeStore.open(Path(tmp) / "engine", "memories", f"hashing-{DIMS}", DIMS)
            try:
                return await searches(address, store, queries, args.repeat)
            finally:
                await store.close()

        proc = start_service("memory", data_dir=data, env=ENV)
        try:
            service = engine = asyncio.run(measure(proc.address))
        finally:
            proc.stop(timeout_s=300)

    bare = service["bare round trip"]
    print(bare.line())
    for mode in ("dense", "hybrid"):
        own, raw = service[f"service {mode} search"], engine[f"in-process {mode} search"]
        print(raw.line())
        print(own.line(bare))
        budget = raw.p50_us + 1.5 * bare.p50_us
        print(f"{mode}: service p50 {own.p50_us:.0f}us vs target in-process + 1.5 bare = "
              f"{budget:.0f}us ({own.p50_us / budget:.2f}x of target): "
              f"{'met' if own.p50_us <= budget else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
