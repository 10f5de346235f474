"""Embedder benchmark: the local model (all-MiniLM-L6-v2 with numpy,
HIVEMESH_MEMORY_EMBEDDER=local) next to the hashing embedder in the same run,
in this process (no service): start-up time and memory of the local model,
texts per second at three text lengths, and the latency of embedding one
search query.

    python bench/embedder_bench.py [--rounds R]

Texts are English words drawn at random (seeded): sentences of 12 to 20
words (~20 word pieces), chunks of about 1,000 characters (~200 word
pieces) and chunks of about 2,000 characters, the service's default chunk
size, which the local model truncates to 256 word pieces. Each figure is
the median of R rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hivemesh.services.memory.embedders import HashingEmbedder, LocalEmbedder  # noqa: E402

WORDS = """the of and to in is that for it as was with be by on not he this are or his
from at which but have an they you were her she there been one all we their has would
when if so no will can more other into time could some them what only new about than
these may two first any like then now such people my over also its after made did many
before must through back years where much your way well down should because each just
those how too little state good very make world still own see men work long get here
between both life being under never day same another know while last might us great old
year off come since against go came right used take three service memory search vector
agent model budget artifact deploy release invoice payment request answer result store
query cluster engine index build test review code change error retry timeout network
server client token stream chunk source document note meeting plan team customer order
price report schedule database record history ticket message context workflow task""".split()


def texts(kind: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if kind == "sentence":
            words = rng.choices(WORDS, k=rng.randint(12, 20))
        else:
            size = 1000 if kind == "chunk-1000" else 2000
            words = []
            while sum(len(w) + 1 for w in words) < size:
                words.append(rng.choice(WORDS))
        out.append(" ".join(words).capitalize() + ".")
    return out


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def throughput(embedder, batch: list[str], rounds: int) -> tuple[float, int]:
    rates, tokens = [], 0
    for _ in range(rounds):
        started = time.perf_counter()
        result = await embedder.embed(batch)
        rates.append(len(batch) / (time.perf_counter() - started))
        tokens = result.tokens
    return statistics.median(rates), tokens


async def query_latency_us(embedder, queries: list[str]) -> float:
    for q in queries[:5]:
        await embedder.embed([q], query=True)
    spent = []
    for q in queries:
        started = time.perf_counter()
        await embedder.embed([q], query=True)
        spent.append(time.perf_counter() - started)
    return statistics.median(spent) * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    before = rss_mib()
    started = time.perf_counter()
    local = await LocalEmbedder.open()
    await local.embed(["warm up"])
    print(f"local model start-up {time.perf_counter() - started:6.2f} s, "
          f"resident memory +{rss_mib() - before:.0f} MiB")
    hashing = HashingEmbedder(384)

    sets = [("sentence", 512), ("chunk-1000", 64), ("chunk-2000", 64)]
    for kind, n in sets:
        batch = texts(kind, n, seed=len(kind))
        for embedder in (hashing, local):
            rate, tokens = await throughput(embedder, batch, args.rounds)
            unit = "word pieces" if embedder is local else "estimated tokens"
            print(f"{embedder.model:<24} {kind:<11} n={n:<4} {rate:9.1f} texts/s "
                  f"({tokens / n:5.0f} {unit} per text)")
    queries = texts("sentence", 50, seed=99)
    for embedder in (hashing, local):
        p50 = await query_latency_us(embedder, queries)
        print(f"{embedder.model:<24} one query   p50={p50:8.0f}us")


if __name__ == "__main__":
    asyncio.run(main())
