"""Orchestrator benchmark: RunAgent through the whole mesh, next to a bare
gRPC round trip (a health check on the orchestrator's own server) measured
in the same run, then the spans one run leaves per gRPC hop.

    python bench/orchestrator_bench.py [--runs N] [--runs16 N] [--repeat R] [--trace-runs T]

Every service runs in its own process (``hivemesh serve``): artifact,
information (SQLite), llm (the keyless mock backend, model ``mock-small``),
memory (embedded engine, hashing embedder) and the orchestrator; this
process is the load generator. The agent uses all four providers on every
run: memory recall (hybrid search in a namespace seeded beforehand) and
write-back of input and output, a RESERVE budget (reserve before the
generation, commit after it, on a priced model under a large tenant
budget), one generation, and an output artifact. Every run's input differs,
so the LLM's response cache never answers.

Phase 1, latency: the mesh runs without telemetry, once per SQLite
durability level of the providers' files (``--synchronous``: ``full``,
every provider's default, fsyncs each commit; ``normal`` survives
``kill -9`` but not a power loss); the orchestrator's own file of request
results stays at its default, ``normal``, in both.
p50/p99 at c=1, runs per second with p50/p99 at c=16; rounds interleave the
baseline and the runs (the median round counts). The CPU each process spent
per run at c=16 is read from /proc, which says where the time of a 2-core
machine goes.

Phase 2, spans: a fresh mesh exports its spans over OTLP/gRPC to a receiver
in this process; after a few runs the services are stopped (SIGTERM flushes
their span processors) and each run's trace is counted: spans per hop, a
hop being one client->server gRPC call (the server span of every call,
plus any client span whose server side sent no span).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import uuid
from collections import Counter, defaultdict
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Result, median_of, run  # noqa: E402

from hivemesh.cli.processes import Mesh, start_service  # noqa: E402
from hivemesh.client import InformationClient, from_rpc_error  # noqa: E402
from hivemesh.client.memory import MemoryClient  # noqa: E402
from hivemesh.common.v1 import RequestContext  # noqa: E402
from hivemesh.information.v1 import Budget, Scope  # noqa: E402
from hivemesh.orchestrator.v1 import (  # noqa: E402
    AgentDefinition, MemoryConfig, OrchestratorServiceStub, RegisterAgentRequest,
    RunAgentRequest)

TARGETS = {"p50 in bare round trips": 5.0, "runs/s at c=16": 300, "spans per hop": 2.0}
PROVIDERS = ("artifact", "information", "llm", "memory")
# The providers keeping an SQLite file (the memory service its ledger). The
# orchestrator's file of request results keeps its default (normal): a
# record it loses costs a repeated run, not an acknowledged write.
SQLITE_SERVICES = ("artifact", "information", "memory")
MODEL = "mock-small"
AGENT = "bench-coder"
NAMESPACE = "bench"
SEEDED_MEMORIES = 200
CTX = RequestContext(tenant_id="bench")
RUN_PATH = "hivemesh.orchestrator.v1.OrchestratorService/RunAgent"
NO_TELEMETRY = {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": ""}


class RunFailed(Exception):
    """A RunAgent call failed; the message says how, precisely."""


# ------------------------------------------------------------------ the mesh

def start_mesh(root: Path, telemetry: dict[str, str], synchronous: str = "full") -> Mesh:
    """The four providers, then the orchestrator pointed at them; every
    SQLite store of the mesh at the durability level ``synchronous``."""
    mesh = Mesh()
    root.mkdir(parents=True, exist_ok=True)
    try:
        for name in (*PROVIDERS, "orchestrator"):
            env = {**telemetry, f"HIVEMESH_{name.upper()}_SERVER__LOG_LEVEL": "WARNING"}
            if name in SQLITE_SERVICES:
                env[f"HIVEMESH_{name.upper()}_SQLITE_SYNCHRONOUS"] = synchronous
            if name == "orchestrator":
                env.update({f"HIVEMESH_ORCHESTRATOR_{p.upper()}_ADDRESS": mesh.services[p].address
                            for p in PROVIDERS})
            mesh.services[name] = start_service(name, data_dir=root / name, env=env,
                                                log_path=root / f"{name}.log")
    except BaseException:
        mesh.stop()
        raise
    return mesh


async def prepare(mesh: Mesh) -> None:
    """Price the model, give the tenant a large budget, seed the memory
    namespace and register the agent."""
    address = {name: proc.address for name, proc in mesh.services.items()}
    async with InformationClient(address["information"]) as info:
        await info.set_price(MODEL, input_micros_per_million=1_000_000,
                             output_micros_per_million=2_000_000)
        await info.create_budget(Budget(scope=Scope(tenant_id=CTX.tenant_id),
                                        limit_micros=10**15))
    async with MemoryClient(address["memory"]) as memory:
        await memory.add([f"Note {i}: helper number {i} adds two numbers and returns the sum."
                          for i in range(SEEDED_MEMORIES)], namespace=NAMESPACE, context=CTX)
    async with grpc.aio.insecure_channel(address["orchestrator"]) as channel:
        await OrchestratorServiceStub(channel).RegisterAgent(RegisterAgentRequest(
            request_id=str(uuid.uuid4()), agent=AgentDefinition(
                name=AGENT, model=MODEL, system_prompt="You are a careful Python programmer.",
                output_artifact_type="code",
                memory=MemoryConfig(enabled=True, write_back=True, namespace=NAMESPACE))),
            timeout=30)


def agent_call(stub: OrchestratorServiceStub):
    async def call(i: int):
        try:
            return await stub.RunAgent(RunAgentRequest(
                request_id=str(uuid.uuid4()), agent=AGENT, context=CTX,
                input=f"Implement function {i} ({uuid.uuid4().hex[:8]}) that adds two numbers"),
                timeout=30)
        except grpc.aio.AioRpcError as err:
            typed = from_rpc_error(err)
            raise RunFailed(f"RunAgent failed: {err.code().name} reason={typed.reason or '-'} "
                            f"metadata={dict(typed.metadata)} message={err.details()!r}") from err
    return call


def check(response) -> str:
    """What one run did; raises RunFailed when it skipped a provider."""
    r = response.result
    missing = [what for what, ok in (
        ("memory recall", r.memories_recalled > 0), ("budget commit", r.cost_micros > 0),
        ("generation", r.llm_calls == 1 and r.output), ("artifact", len(r.artifact_ids) == 1),
        ("no degradation", not r.degraded)) if not ok]
    if missing:
        raise RunFailed(f"a run did not do everything: {', '.join(missing)}; result: {r}")
    return (f"one run: model={r.model} backend={r.backend} llm_calls={r.llm_calls} "
            f"memories_recalled={r.memories_recalled} cost_micros={r.cost_micros} "
            f"artifacts={len(r.artifact_ids)} output={len(r.output)} chars; "
            "memory write-back on (input and output)")


# ------------------------------------------------------------------ phase 1

def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(mesh: Mesh) -> dict[str, float]:
    pids = {name: proc.process.pid for name, proc in mesh.services.items()}
    pids["load generator"] = os.getpid()
    try:
        return {name: cpu_seconds(pid) for name, pid in pids.items()}
    except OSError:
        return {}


async def latency(mesh: Mesh, runs: int, runs16: int, repeat: int) -> tuple[list[str], dict]:
    lines: list[str] = []
    figures: dict[str, float] = {}
    grown = 0
    async with grpc.aio.insecure_channel(mesh.services["orchestrator"].address) as channel, \
            MemoryClient(mesh.services["memory"].address) as memory:
        health = health_pb2_grpc.HealthStub(channel)
        ping = health_pb2.HealthCheckRequest()
        agent = agent_call(OrchestratorServiceStub(channel))
        lines.append(check(await agent(0)))

        async def bare(_: int):
            return await health.Check(ping, timeout=10)

        for concurrency, total in ((1, runs), (16, runs16)):
            n = max(1, total // repeat)
            rounds: dict[str, list[Result]] = defaultdict(list)
            cpu: Counter[str] = Counter()
            for i in range(repeat):
                rounds["bare"].append(await run("bare round trip (health)", bare,
                                                concurrency=concurrency, calls=max(n, 1000)))
                warmup = 50 if i == 0 else 0
                # Each round starts from the seeded namespace: recall costs
                # grow with its size, and write-back adds two chunks a run.
                await memory.delete(where={"metadata.agent": AGENT}, namespace=NAMESPACE,
                                    context=CTX)
                before = cpu_snapshot(mesh)
                rounds["agent"].append(await run("RunAgent (4 providers)", agent,
                                                 concurrency=concurrency, calls=n,
                                                 warmup=warmup))
                after = cpu_snapshot(mesh)
                grown = max(grown, await memory.count(namespace=NAMESPACE, context=CTX))
                cpu.update({k: (after[k] - before[k]) / (n * repeat + 50) for k in after})
            base, result = median_of(rounds["bare"]), median_of(rounds["agent"])
            lines += [base.line(), result.line(base)]
            figures[f"p50/bare c={concurrency}"] = result.p50_us / base.p50_us
            figures[f"runs/s c={concurrency}"] = result.throughput
            if concurrency == 16 and cpu:
                spent = {k: v * 1e3 for k, v in cpu.items()}
                cores = len(os.sched_getaffinity(0))
                lines.append("CPU per run at c=16 (ms): " + ", ".join(
                    f"{k} {v:.2f}" for k, v in sorted(spent.items(), key=lambda kv: -kv[1]))
                    + f"; total {sum(spent.values()):.2f} ms = at most "
                    f"{cores * 1000 / sum(spent.values()):.0f} runs/s on {cores} cores")
    lines.append(f"memory namespace: {SEEDED_MEMORIES} chunks seeded, reset to them before "
                 f"each round; at most {grown} at the end of a round")
    return lines, figures


# ------------------------------------------------------------------ phase 2

@dataclass(frozen=True)
class SpanRecord:
    service: str
    trace_id: bytes
    span_id: bytes
    parent_id: bytes
    name: str
    kind: int
    grpc: bool  # rpc.system == "grpc"
    db: bool  # a database client span (db.system.name set)
    duration_us: float


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector on a thread pool, so it keeps answering
    while this process blocks on stopping the services."""

    def __init__(self) -> None:
        self.records: list[SpanRecord] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.endpoint = f"http://127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def Export(self, request, context):
        got = []
        for resource in request.resource_spans:
            service = next((a.value.string_value for a in resource.resource.attributes
                            if a.key == "service.name"), "?")
            for scope in resource.scope_spans:
                for s in scope.spans:
                    keys = {a.key: a.value.string_value for a in s.attributes}
                    got.append(SpanRecord(service, s.trace_id, s.span_id, s.parent_span_id,
                                          s.name, s.kind, keys.get("rpc.system") == "grpc",
                                          "db.system.name" in keys,
                                          (s.end_time_unix_nano - s.start_time_unix_nano) / 1e3))
        with self._lock:
            self.records += got
        return trace_service_pb2.ExportTraceServiceResponse()

    def stop(self) -> None:
        self._server.stop(0)


def spans_per_hop(records: list[SpanRecord], runs: int) -> tuple[list[str], float]:
    traces: dict[bytes, list[SpanRecord]] = defaultdict(list)
    for record in records:
        traces[record.trace_id].append(record)
    server, client = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT
    per_run = [spans for spans in traces.values()
               if any(s.kind == server and s.name == RUN_PATH for s in spans)]
    if not per_run:
        return [f"spans: no trace of a RunAgent arrived ({len(records)} spans in all)"], 0.0
    ratios, hop_counts, span_counts, db_counts = [], [], [], []
    for spans in per_run:
        served = {s.parent_id for s in spans if s.kind == server and s.grpc}
        hops = sum(1 for s in spans if s.grpc and (
            s.kind == server or (s.kind == client and s.span_id not in served)))
        ratios.append(len(spans) / hops)
        hop_counts.append(hops)
        span_counts.append(len(spans))
        db_counts.append(sum(s.db for s in spans))
    durations: dict[str, list[float]] = defaultdict(list)
    for spans in per_run:
        for s in spans:
            if s.kind != client or s.db:
                durations[_label(s)].append(s.duration_us)
    kinds = Counter(trace_pb2.Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_").lower()
                    for s in per_run[-1])
    names = Counter(_label(s) for s in per_run[-1])
    worst = max(ratios)
    return [
        f"traced runs: {len(per_run)} of {runs}; spans per run {min(span_counts)}-"
        f"{max(span_counts)}, gRPC hops per run {min(hop_counts)}-{max(hop_counts)}; "
        f"spans per hop mean {sum(ratios) / len(ratios):.2f}, worst {worst:.2f}; without the "
        f"database client spans ({min(db_counts)}-{max(db_counts)} a run) worst "
        f"{max((n - d) / h for n, d, h in zip(span_counts, db_counts, hop_counts)):.2f}; "
        f"counting each Qdrant call as a hop (memory -> engine) worst "
        f"{max(n / (h + d) for n, d, h in zip(span_counts, db_counts, hop_counts)):.2f}",
        "one run's spans by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
        "one run's spans: " + ", ".join(f"{k}" + (f" x{v}" if v > 1 else "")
                                        for k, v in sorted(names.items())),
        "time inside each step at c=1 (median over the traced runs, spans exported): " + ", ".join(
            f"{k} {statistics.median(v):.0f}us" for k, v in
            sorted(durations.items(), key=lambda kv: -statistics.median(kv[1]))),
    ], worst


def _label(span: SpanRecord) -> str:
    kind = trace_pb2.Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_")[0]
    return f"{span.service.removeprefix('hivemesh-')}:{span.name.rsplit('/', 1)[-1]}[{kind}]"


async def traced_runs(mesh: Mesh, runs: int) -> None:
    async with grpc.aio.insecure_channel(mesh.services["orchestrator"].address) as channel:
        agent = agent_call(OrchestratorServiceStub(channel))
        for i in range(runs):
            check(await agent(i))


# ------------------------------------------------------------------ main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300, help="agent runs at c=1 (all rounds)")
    parser.add_argument("--runs16", type=int, default=2000,
                        help="agent runs at c=16 (all rounds)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="interleaved rounds per concurrency (median taken)")
    parser.add_argument("--trace-runs", type=int, default=10, help="runs traced for spans per hop")
    parser.add_argument("--synchronous", default="full,normal",
                        help="SQLite durability levels of the latency phase, comma-separated "
                             "(full is every service's default)")
    args = parser.parse_args()
    levels = args.synchronous.split(",")
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="hivemesh-orch-bench-") as tmp:
        root = Path(tmp)
        for level in levels:
            folder = root / f"latency-{level}"
            mesh = start_mesh(folder, NO_TELEMETRY, level)
            try:
                print(f"\nSQLite synchronous={level} in every provider; mesh: "
                      f"{', '.join(f'{n} {p.address}' for n, p in mesh.services.items())}")
                asyncio.run(prepare(mesh))
                lines, figures[level] = asyncio.run(
                    latency(mesh, args.runs, args.runs16, args.repeat))
                for line in lines:
                    print(line)
            except RunFailed as exc:
                print(f"orchestrator failed during the latency phase: {exc}")
                _print_log_tail(folder)
                return 1
            finally:
                mesh.stop()

        receiver = Receiver()
        try:
            mesh = start_mesh(root / "spans", {
                **NO_TELEMETRY, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
                "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "200"})
            try:
                asyncio.run(prepare(mesh))
                asyncio.run(traced_runs(mesh, args.trace_runs))
            except RunFailed as exc:
                print(f"orchestrator failed during the span phase: {exc}")
                _print_log_tail(root / "spans")
                return 1
            finally:
                mesh.stop()  # SIGTERM: each service flushes its spans on the way out
        finally:
            receiver.stop()
        span_lines, worst = spans_per_hop(receiver.records, args.trace_runs)
        for line in span_lines:
            print(line)

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print("")
    for level in levels:
        p50_ratio, rate = figures[level]["p50/bare c=1"], figures[level]["runs/s c=16"]
        print(f"synchronous={level}: target p50 <= {TARGETS['p50 in bare round trips']:.0f} "
              f"bare round trips (c=1): {p50_ratio:.2f} round trips "
              f"({figures[level]['p50/bare c=16']:.2f} at c=16): "
              f"{verdict(p50_ratio <= TARGETS['p50 in bare round trips'])}")
        print(f"synchronous={level}: target >= {TARGETS['runs/s at c=16']} agent runs/s at "
              f"c=16: {rate:.0f}/s: {verdict(rate >= TARGETS['runs/s at c=16'])}")
    print(f"target <= {TARGETS['spans per hop']:.0f} spans per hop: worst run {worst:.2f}: "
          f"{verdict(0 < worst <= TARGETS['spans per hop'])}")
    return 0


def _print_log_tail(folder: Path, lines: int = 20) -> None:
    for log in sorted(folder.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        if tail:
            print(f"--- {log.name} (last {len(tail)} lines)")
            print("\n".join(tail))


if __name__ == "__main__":
    sys.exit(main())
