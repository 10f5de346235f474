"""One agent run, start to finish (seeds 001, 003 and 004):

1. recall memories (and session history) and reserve budget, concurrently;
   a refused reservation fails the run before anything is generated, a
   memory outage only degrades it;
2. generate, trying the agent's fallback models in order when a model fails
   before any output; run the tools the model asks for (bounded by the
   agent's allowlist and iteration limit) and feed their results back;
3. save the output artifact, commit usage and write memory back,
   concurrently (an agent with per-run caps commits first: a run over a cap
   fails and keeps nothing, ``caps.py``); a failed generation releases its
   reservation.

Every id sent to a provider is derived from the run's request id, so a
retried run finds the providers' idempotency records instead of doing the
work twice. Spans: one ``invoke_agent`` span per run, the provider calls as
client spans below it (the LLM calls carrying the GenAI attributes), one
``execute_tool`` span per tool call.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2, struct_pb2
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from hivemesh.artifact.v1 import SaveArtifactRequest
from hivemesh.client.errors import from_status
from hivemesh.common.v1 import ErrorReason, StreamOutcome, Usage
from hivemesh.information.v1 import CommitRequest, ReleaseRequest, ReserveRequest, TrackCompletionRequest
from hivemesh.llm.v1 import (
    Conversation, FinishReason, GenerateRequest, GenerateResponse, GenerationConfig,
    ListModelsRequest, Message, Model, ModelKind, Role, StreamGenerateRequest, StreamSummary, Tool,
    ToolCall)
from hivemesh.memory.v1 import (
    AddMemoriesRequest, AppendHistoryRequest, GetHistoryRequest, GetHistoryResponse,
    HistoryMessage, Lineage, MemoryItem, MessageRole, SearchMemoriesRequest,
    SearchMemoriesResponse, SearchMode)
from hivemesh.orchestrator.v1 import (
    AgentDefinition, AgentFailed, AgentResult, AgentStart, ArtifactSaved, BudgetAlert,
    BudgetEnforcement, DegradedComponent, DegradedNote, EventType, GenerationChunk,
    GenerationComplete, Handoff, MemoryRecalled, MemoryWritten, ToolCallRecord, ToolError)
from hivemesh.runtime import errors
from hivemesh.runtime.resilience import Coalescer, fingerprint
from hivemesh.runtime.text import estimate_tokens
from hivemesh.runtime.wellknown import duration_s
from hivemesh.services.orchestrator import caps, templates
from hivemesh.services.orchestrator.context import (
    ExecutionContext, baggage_of, step_id, sub_step_id)
from hivemesh.services.orchestrator.events import EventSink
from hivemesh.services.orchestrator.policy import (
    Providers, beyond_deadline, provider_error, remaining_s)
from hivemesh.services.orchestrator.state import RequestLedger, alongside
from hivemesh.services.orchestrator.tools import ToolCall as ToolInvocation
from hivemesh.services.orchestrator.tools import ToolOutcome, ToolRegistry, parse_arguments

tracer = trace.get_tracer("hivemesh.orchestrator")
log = logging.getLogger("hivemesh.orchestrator")

DOMAIN = "hivemesh.orchestrator"
HANDOFF_TOOL = "handoff"
# The built-in tool whose artifacts the run reports as its own.
SAVE_TOOL = "artifact_save"
DEFAULT_RECALL_LIMIT = 5
DEFAULT_HISTORY_TOKENS = 2000
# What a run's first hold counts for one memory not yet recalled: a chunk of
# the memory service's default size (2,000 characters) and its framing.
HELD_TOKENS_PER_MEMORY = 512
DEFAULT_TOOL_ITERATIONS = 8
# Most characters of a tool call's id (the LLM contract's ToolCall.id).
MAX_TOOL_CALL_ID = 128
# How long a memory read's claim in the request ledger holds when the run
# has no deadline (``_pinned``).
READ_LEASE_S = 60.0
# The most of a run's remaining time a memory call may take: memory is
# optional (an outage degrades the run), so a memory service that hangs
# leaves the run time to generate and keep its work.
MEMORY_SHARE = 0.5
# How long the LLM service's chat aliases (their fallback chains, their
# most output tokens) are used before ListModels is asked again; after a
# ListModels that failed, how long until it is asked again.
MODELS_TTL_S = 60.0
MODELS_RETRY_S = 5.0
# Pages of one ListModels: a service paging on and on is not followed.
MAX_MODEL_PAGES = 100
# Errors after which the next fallback model is tried.
_FALLBACK_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                             grpc.StatusCode.NOT_FOUND})


@dataclass
class RunOptions:
    request_id: str
    input: str
    # request_id is a step id of a request (a workflow's task), not a
    # caller's: its steps are derived from it as it is (sub_step_id).
    derived_id: bool = False
    model_override: str = ""
    variables: dict[str, str] = field(default_factory=dict)
    disable_fallback: bool = False
    # Agents this run may hand off to (a workflow task with allow_handoff).
    handoff_targets: tuple[str, ...] = ()
    # A handoff request fails the run (a workflow task without allow_handoff).
    refuse_handoff: bool = False
    # Stream the generation and emit GENERATION_CHUNK events.
    stream_chunks: bool = False
    # Told what a cancelled run had used (a failed run's RunError carries
    # it; a failed run cancelled while releasing its hold is told here).
    on_cancel: Callable[[AgentFailed], None] | None = None


class RunError(Exception):
    """A failed run: the error to return and what was done before it."""

    def __init__(self, error: errors.ServiceError, failed: AgentFailed) -> None:
        super().__init__(error.message)
        self.error = error
        self.failed = failed


def trace_id_of(span) -> str:
    return format(span.get_span_context().trace_id, "032x")


class _Run:
    """What one run has done so far."""

    def __init__(self, agent: AgentDefinition, ctx: ExecutionContext, opts: RunOptions,
                 sink: EventSink, trace_id: str) -> None:
        self.agent = agent
        self.ctx = ctx
        self.opts = opts
        self.sink = sink
        self.trace_id = trace_id
        self.context = ctx.to_proto()
        self.result = AgentResult(agent=agent.name, context_id=ctx.context_id,
                                  trace_id=trace_id)
        self.reservation: str | None = None
        self.output = ""
        self.last_generation = None  # GenerateResponse or StreamSummary
        self.last_generation_id = ""  # the request id of its LLM call
        # The last generation's Commit (or TrackCompletion), sent again in
        # the background after the run was cancelled while sending it.
        self.spend_resent: asyncio.Task | None = None
        # (method, request) recording the spend of a generation whose tokens
        # were used (one that completed, or a stream cut after some output)
        # and that is not being recorded yet: a cancelled run sends it in
        # the background (``_send_unsent``), so no text goes out unpaid.
        self.unsent_spend: tuple[str, Any] | None = None
        # Memory reads that failed (the run goes without them), not kept
        # yet: (ledger key, fingerprint, note). Kept once a generation is
        # about to be sent (``_keep_failed_reads``).
        self.failed_reads: list[tuple[str, str, DegradedNote]] = []
        # The run tries each model of its chain itself, calling each with
        # disable_fallback (under RESERVE, so that each is held for).
        self.whole_chain = False
        # The chain is the LLM service's (an alias's fallback_aliases),
        # run here: it falls back as the LLM service would.
        self.llm_chain = False
        # The LLM service's chat aliases, when the run asked for them.
        self.models: dict[str, Model] = {}

    @property
    def enforcement(self) -> int:
        """How the agent's budget is enforced (RESERVE when it says none)."""
        return (self.agent.budget.enforcement
                or BudgetEnforcement.BUDGET_ENFORCEMENT_RESERVE)

    def step(self, *parts: object) -> str:
        """The request id of one of this run's provider calls."""
        derive = sub_step_id if self.opts.derived_id else step_id
        return derive(self.opts.request_id, *parts)

    def emit(self, event_type: int, payload) -> None:
        self.sink.emit(event_type, self.context, self.trace_id, payload, agent=self.agent.name)

    def degrade(self, component: int, error: errors.ServiceError) -> DegradedNote:
        note = DegradedNote(component=component, reason=errors.reason_name(error.reason),
                            message=error.message)
        self.noted(note)
        return note

    def noted(self, note: DegradedNote) -> None:
        self.result.degraded.append(note)
        self.emit(EventType.EVENT_TYPE_DEGRADED, note)

    def add_usage(self, usage: Usage, cost_micros: int, currency: str) -> None:
        total = self.result.usage
        total.prompt_tokens += usage.prompt_tokens
        total.completion_tokens += usage.completion_tokens
        total.total_tokens += usage.total_tokens
        total.cached_prompt_tokens += usage.cached_prompt_tokens
        self.result.cost_micros += cost_micros
        self.result.currency = currency or self.result.currency

    def failed(self) -> AgentFailed:
        r = self.result
        return AgentFailed(partial_output=self.output, usage=r.usage, cost_micros=r.cost_micros,
                           currency=r.currency, tool_calls=r.tool_calls, degraded=r.degraded)


def _defect(agent: AgentDefinition, exc: Exception) -> errors.ServiceError:
    """An unexpected error in a run: logged, and the run fails as INTERNAL
    like any failed run (its hold released, AGENT_FAILED sent)."""
    log.error("the run of agent %r failed unexpectedly", agent.name, exc_info=exc)
    return errors.internal()


class AgentRunner:
    def __init__(self, providers: Providers, tools: ToolRegistry,
                 ledger: RequestLedger) -> None:
        """``ledger``: where the reads a run builds its prompt from are kept
        under the run's request id (``_pinned``)."""
        self.providers = providers
        self.tools = tools
        self.ledger = ledger
        # Settling calls that outlive the run that started them (it was
        # cancelled): kept here until they end.
        self._settling: set[asyncio.Task] = set()
        # (time.monotonic() when asked, alias -> Model, or the error of a
        # ListModels that failed): ``_models``; runs that find it old at
        # the same moment ask once.
        self._model_table: tuple[float, dict[str, Model] | errors.ServiceError] | None = None
        self._asking_models = Coalescer()

    async def run(self, agent: AgentDefinition, ctx: ExecutionContext, opts: RunOptions,
                  sink: EventSink) -> AgentResult:
        """Runs the agent; returns its result or raises RunError (an invalid
        request raises its ServiceError before the run starts)."""
        problems = templates.problems(agent.system_prompt, opts.variables)
        if problems:
            raise errors.invalid_argument([("variables", p) for p in problems])
        system = templates.render(agent.system_prompt, opts.variables)
        started = time.monotonic()
        with baggage_of(ctx), tracer.start_as_current_span(
                f"invoke_agent {agent.name}", kind=SpanKind.INTERNAL,
                attributes={"gen_ai.operation.name": "invoke_agent",
                            "gen_ai.agent.name": agent.name,
                            "hivemesh.context_id": ctx.context_id,
                            "hivemesh.workflow_id": ctx.workflow_id,
                            "hivemesh.task_id": ctx.task_id},
                record_exception=False, set_status_on_exception=False) as span:
            run = _Run(agent, ctx, opts, sink, trace_id_of(span))
            run.emit(EventType.EVENT_TYPE_AGENT_START,
                     AgentStart(input=opts.input, model=opts.model_override or agent.model))
            try:
                await self._pipeline(run, system)
            except Exception as exc:  # noqa: BLE001 - a defect too ends the run cleanly
                error = exc if isinstance(exc, errors.ServiceError) else _defect(agent, exc)
                # Tokens a generation used before the failure are paid for.
                self._send_unsent(run)
                await self._resent_spend(run)
                span.set_status(Status(StatusCode.ERROR, error.message))
                span.set_attribute("error.type", errors.reason_name(error.reason))
                failed = run.failed()
                failed.error.CopyFrom(error.to_status(DOMAIN))
                run.emit(EventType.EVENT_TYPE_AGENT_FAILED, failed)
                try:
                    await asyncio.shield(self._release(run, 3))
                except asyncio.CancelledError:
                    # Cancelled while releasing: the run ends as cancelled,
                    # and the one waiting for it is told what it used.
                    if opts.on_cancel is not None:
                        opts.on_cancel(failed)
                    raise
                raise RunError(error, failed) from exc
            except asyncio.CancelledError:
                span.set_status(Status(StatusCode.ERROR, "cancelled"))
                self._send_unsent(run)
                await self._resent_spend(run)
                failed = run.failed()
                failed.error.CopyFrom(errors.ServiceError(
                    grpc.StatusCode.CANCELLED, ErrorReason.ERROR_REASON_CANCELLED,
                    f"the run of agent {agent.name!r} was cancelled (the caller left or its "
                    "deadline passed)").to_status(DOMAIN))
                run.emit(EventType.EVENT_TYPE_AGENT_FAILED, failed)
                if opts.on_cancel is not None:
                    opts.on_cancel(failed)
                await asyncio.shield(self._release(run, 2))
                raise
            run.result.latency.CopyFrom(duration_s(time.monotonic() - started))
            run.emit(EventType.EVENT_TYPE_AGENT_COMPLETE, run.result)
            return run.result

    # ------------------------------------------------------------ pipeline

    async def _pipeline(self, run: _Run, system: str) -> None:
        agent, opts = run.agent, run.opts
        enforcement = run.enforcement
        models = self._model_chain(run)
        if agent.allowed_tools:
            missing = await self.tools.find(agent.allowed_tools)
            if missing:
                run.degrade(DegradedComponent.DEGRADED_COMPONENT_TOOL, errors.ServiceError(
                    grpc.StatusCode.UNAVAILABLE, ErrorReason.ERROR_REASON_BACKEND_UNAVAILABLE,
                    f"tool(s) {', '.join(missing)} not available (tool servers unreachable: "
                    f"{', '.join(self.tools.unreachable) or 'none'}); the run goes without"))

        # What the prompt holds before memories and history are known.
        known = [Message(role=Role.ROLE_SYSTEM, content=system),
                 Message(role=Role.ROLE_USER, content=opts.input)]
        recall = asyncio.create_task(self._recall(run)) if agent.memory.enabled else None
        history = (asyncio.create_task(self._history(run))
                   if agent.memory.history_enabled and run.ctx.session_id else None)
        # The first hold is made while they are read: it counts what they
        # may add, so that a prompt within that needs no second hold.
        unread = _read_allowance(agent.memory, recall is not None, history is not None)
        unheld = False  # the first hold was refused for what the reads might add
        try:
            if enforcement == BudgetEnforcement.BUDGET_ENFORCEMENT_RESERVE:
                # Every model that may generate is held for at its own price:
                # the LLM service's own fallback chain is run here (each model
                # called with disable_fallback), as the agent's is.
                table = await self._models()
                if isinstance(table, errors.ServiceError):
                    if not models[0]:
                        # No model to hold for without the LLM service's default.
                        raise dataclasses.replace(table)
                    # Without the LLM service's table the run keeps to its
                    # own chain, each model held for (none falls back unheld).
                    table = {}
                if not models[0]:
                    # Held (and generated) under the alias the LLM service
                    # would answer with: a hold needs a model to be priced.
                    models = self._model_chain(run, _default_alias(table))
                if not self._own_chain(run):
                    models = _llm_chain(table, models[0])
                    run.llm_chain = len(models) > 1
                run.whole_chain = True
                run.models = table
                try:
                    await self._reserve(run, models[0], known, 1, unread=unread)
                except errors.ServiceError as exc:
                    if not unread or errors.reason_name(exc.reason) != "BUDGET_EXCEEDED":
                        raise
                    # Perhaps only what the reads might add does not fit:
                    # held once they are read, for the prompt as it is.
                    unheld = True
            memories = await recall if recall else []
            past = await history if history else []
        except BaseException:
            for task in (recall, history):
                if task is not None:
                    task.cancel()
            raise

        messages = [Message(role=Role.ROLE_SYSTEM, content=_with_memories(system, memories))]
        messages += past
        messages.append(Message(role=Role.ROLE_USER, content=opts.input))
        if enforcement == BudgetEnforcement.BUDGET_ENFORCEMENT_RESERVE and (unheld or (
                caps.estimate_prompt_tokens(messages) > caps.estimate_prompt_tokens(known)
                + unread)):
            # The hold was made before the memories and the history were
            # read, and they came larger than it allowed (or it was refused
            # for what they might have added): held again for the prompt as
            # it is sent, before anything is generated, and refused as any
            # reservation.
            await self._rehold(run, models[0], messages, 1,
                               run.step("reserve", 1, models[0], "prompt"))
        offered = self._offered_tools(run)
        limit = agent.max_tool_iterations or DEFAULT_TOOL_ITERATIONS
        call_ids: set[str] = set()  # of the tool calls made so far
        iteration = 0
        while True:
            iteration += 1
            if iteration > 1 and enforcement == BudgetEnforcement.BUDGET_ENFORCEMENT_RESERVE:
                await self._reserve(run, models[0], messages, iteration)
            reply = await self._generate(run, models, messages, offered, iteration)
            _unique_tool_call_ids(reply, iteration, call_ids)
            calls = list(reply.tool_calls)
            if not calls:
                run.output = reply.content
                break
            await self._settle(run, iteration)
            handoff = next((c for c in calls if c.name == HANDOFF_TOOL), None)
            if handoff is not None and opts.refuse_handoff \
                    and HANDOFF_TOOL not in agent.allowed_tools:
                raise errors.ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    ErrorReason.ERROR_REASON_HANDOFF_NOT_ALLOWED,
                    f"agent {agent.name!r} asked to hand off, which its task does not allow "
                    "(allow_handoff is false)", {"agent": agent.name})
            if handoff is not None and self._handoff(run, handoff):
                # Not an answer: the agent taking over gives it (and saves
                # its artifact); this run keeps nothing.
                run.output = ""
                return await self._finish(run, enforcement, iteration, settled=True)
            if iteration > limit:
                raise errors.ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    ErrorReason.ERROR_REASON_TOOL_ITERATION_LIMIT,
                    f"agent {agent.name!r} still asked for tools after {limit} tool turns",
                    {"max_tool_iterations": str(limit)})
            messages.append(_as_sent(reply))
            messages += await self._run_tools(run, calls, iteration)
        await self._finish(run, enforcement, iteration, settled=False)

    def _model_chain(self, run: _Run, default: str = "") -> list[str]:
        """The aliases to try in order; ``default`` stands for an empty
        model (the LLM service's default chat alias)."""
        first = run.opts.model_override or run.agent.model or default
        if run.opts.disable_fallback:
            return [first]
        return [first, *(m for m in run.agent.fallback_models if m != first)]

    @staticmethod
    def _own_chain(run: _Run) -> bool:
        """Whether the run's chain is its own (the agent's fallback models,
        or its first model alone), not the LLM service's."""
        return bool(run.agent.fallback_models) or run.opts.disable_fallback

    async def _models(self) -> dict[str, Model] | errors.ServiceError:
        """The LLM service's chat aliases (ListModels), asked again once
        they are ``MODELS_TTL_S`` old; the error of a ListModels that
        failed, asked again ``MODELS_RETRY_S`` after it."""
        cached = self._model_table
        if cached is not None:
            fresh = MODELS_RETRY_S if isinstance(cached[1], errors.ServiceError) else MODELS_TTL_S
            if time.monotonic() - cached[0] < fresh:
                return cached[1]
        table, _ = await self._asking_models.run("models", self._ask_models)
        return table

    async def _ask_models(self) -> dict[str, Model] | errors.ServiceError:
        asked = time.monotonic()
        table: dict[str, Model] = {}
        token = ""
        try:
            for _ in range(MAX_MODEL_PAGES):
                page = await self.providers.call("llm", "ListModels", ListModelsRequest(
                    kind=ModelKind.MODEL_KIND_CHAT, page_size=1000, page_token=token))
                table.update((m.alias, m) for m in page.models)
                token = page.next_page_token
                if not token:
                    break
        except errors.ServiceError as exc:
            log.warning("could not list the LLM service's models (runs under RESERVE use "
                        "their own chains meanwhile): %s", exc.message)
            self._model_table = (asked, exc)
            return exc
        self._model_table = (asked, table)
        return table

    def _offered_tools(self, run: _Run) -> list[Tool]:
        tools = [Tool(name=d.name, description=d.description, parameters=d.parameters)
                 for d in self.tools.definitions(run.agent.allowed_tools)]
        if run.opts.handoff_targets:
            tools.append(_handoff_tool(run.opts.handoff_targets))
        return tools

    # ------------------------------------------------------------ memory

    async def _recall(self, run: _Run) -> list[str]:
        memory = run.agent.memory
        request = SearchMemoriesRequest(
            context=run.context, namespace=memory.namespace, query=run.opts.input[:16384],
            limit=memory.recall_limit or DEFAULT_RECALL_LIMIT,
            mode=SearchMode.SEARCH_MODE_HYBRID)
        if memory.HasField("score_threshold"):
            request.score_threshold = memory.score_threshold
        found = await self._pinned(run, "SearchMemories", request, SearchMemoriesResponse,
                                   DegradedComponent.DEGRADED_COMPONENT_MEMORY_RECALL,
                                   refused_fails=True)
        if found is None:
            return []
        run.result.memories_recalled = len(found.results)
        run.emit(EventType.EVENT_TYPE_MEMORY_RECALLED, MemoryRecalled(
            namespace=found.namespace, chunk_ids=[r.chunk.chunk_id for r in found.results]))
        return [r.chunk.text for r in found.results]

    async def _history(self, run: _Run) -> list[Message]:
        memory = run.agent.memory
        request = GetHistoryRequest(
            context=run.context, namespace=memory.namespace, session_id=run.ctx.session_id,
            token_budget=memory.history_token_budget or DEFAULT_HISTORY_TOKENS)
        found = await self._pinned(run, "GetHistory", request, GetHistoryResponse,
                                   DegradedComponent.DEGRADED_COMPONENT_HISTORY)
        if found is None:
            return []
        return [Message(role=_ROLES.get(m.role, Role.ROLE_USER), content=m.content,
                        name=m.name) for m in found.messages
                if m.role != MessageRole.MESSAGE_ROLE_TOOL]

    async def _pinned(self, run: _Run, method: str, request, result_type: type,
                      component: int, *, refused_fails: bool = False):
        """The memory read ``method(request)`` as it answered the first attempt of
        this run (kept in the request ledger under the run's request id);
        None when the run goes without it (degraded, as ``component``).
        A retried run builds the prompt its first attempt sent: its
        generation keeps the first attempt's request id, and read again
        the memory would hold the first attempt's own write-back and
        history, a different prompt the LLM service refuses as an
        idempotency conflict. So a read that failed is kept too, as having
        read nothing, once the run goes on to generate without it
        (``_keep_failed_reads``); a retry then goes without it again and is
        told why as the first attempt was (the same degraded note). A read
        that failed in an attempt that generated nothing is read again.
        ``refused_fails``: a read the memory service refuses as invalid
        fails the run instead of degrading it."""
        digest = fingerprint(request, ignore=())
        # Kept as an Any: the read's response, or the DegradedNote of a read
        # that failed.
        key = run.step("read", method, digest[:16])
        # Sent while the read is claimed (a read, so a retry that finds the
        # first attempt's answer kept just drops it).
        answer = alongside(self.providers.call("memory", method, request, share=MEMORY_SHARE))

        async def read():
            kept = any_pb2.Any()
            kept.Pack(await answer)
            return kept
        try:
            kept, _ = await self._kept(key, digest, read, any_pb2.Any)
        except errors.ServiceError as exc:
            if refused_fails and exc.code == grpc.StatusCode.INVALID_ARGUMENT:
                raise
            run.failed_reads.append((key, digest, run.degrade(component, exc)))
            return None
        finally:
            answer.cancel()
        if kept.Is(DegradedNote.DESCRIPTOR):
            note = DegradedNote()
            kept.Unpack(note)
            run.noted(note)
            return None
        found = result_type()
        kept.Unpack(found)
        return found

    async def _keep_failed_reads(self, run: _Run) -> None:
        """The run goes on to generate without the reads that failed: each
        is kept, right before the first generation is sent (once nothing
        refuses it: the budget hold, the caps, the LLM breaker, the
        deadline), as having read nothing (with its degraded note), so that
        a retry builds the same prompt (``_pinned``)."""
        failed, run.failed_reads = run.failed_reads, []

        async def keep(key: str, digest: str, note: DegradedNote) -> None:
            kept = any_pb2.Any()
            kept.Pack(note)

            async def nothing():
                return kept
            await self._kept(key, digest, nothing, any_pb2.Any)
        await asyncio.gather(*(keep(*read) for read in failed))

    async def _kept(self, key: str, digest: str, work, result_type: type):
        """(result, replayed): ``work()`` as it answered the first attempt
        of the run, kept in the request ledger under ``key`` (a request id
        derived from the run's); a failure is not kept."""
        return await self.ledger.once("read", key, digest, work, result_type,
                                      remaining_s() or READ_LEASE_S)

    async def _write_back(self, run: _Run) -> None:
        memory = run.agent.memory
        lineage = Lineage(workflow_id=run.ctx.workflow_id, task_id=run.ctx.task_id,
                          agent_id=run.agent.name,
                          generation_id=run.last_generation_id)
        items = [MemoryItem(content=text, source_id=f"{run.ctx.context_id}:{kind}",
                            lineage=lineage) for kind, text in
                 (("input", run.opts.input), ("output", run.output)) if text]
        for item in items:
            item.metadata.update({"kind": item.source_id.rsplit(":", 1)[1],
                                  "agent": run.agent.name})
        try:
            added = await self.providers.call("memory", "AddMemories", AddMemoriesRequest(
                request_id=run.step("memory"), context=run.context,
                namespace=memory.namespace, items=items), share=MEMORY_SHARE)
        except errors.ServiceError as exc:
            run.degrade(DegradedComponent.DEGRADED_COMPONENT_MEMORY_WRITE_BACK, exc)
            return
        run.emit(EventType.EVENT_TYPE_MEMORY_WRITTEN, MemoryWritten(
            namespace=added.namespace, chunk_ids=[c for i in added.items for c in i.chunk_ids]))

    async def _append_history(self, run: _Run) -> None:
        try:
            await self.providers.call("memory", "AppendHistory", AppendHistoryRequest(
                request_id=run.step("history"), context=run.context,
                namespace=run.agent.memory.namespace, session_id=run.ctx.session_id,
                messages=[HistoryMessage(role=MessageRole.MESSAGE_ROLE_USER,
                                         content=run.opts.input),
                          HistoryMessage(role=MessageRole.MESSAGE_ROLE_ASSISTANT,
                                         content=run.output, name=run.agent.name)]),
                share=MEMORY_SHARE)
        except errors.ServiceError as exc:
            run.degrade(DegradedComponent.DEGRADED_COMPONENT_HISTORY, exc)

    # ------------------------------------------------------------ budget

    def _in_background(self, work) -> asyncio.Task:
        """Runs ``work`` (a coroutine) to its end although the run that
        needed it was cancelled."""
        task = asyncio.create_task(work)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    async def _past_deadline(self, method: str, request):
        """Sends an information request that settles what the run did, past
        the run's deadline; sent again, its request_id answers with what the
        first sending did, or does it now. Its response, or the
        ServiceError it failed with."""
        try:
            with beyond_deadline():
                return await self.providers.call("information", method, request)
        except errors.ServiceError as exc:
            return exc

    async def _resend(self, method: str, request):
        """``_past_deadline``, None when it fails (a hold then lapses at its TTL)."""
        answer = await self._past_deadline(method, request)
        return None if isinstance(answer, errors.ServiceError) else answer

    async def _resend_spend(self, method: str, request):
        """``_past_deadline`` of a Commit or TrackCompletion sent again."""
        answer = await self._past_deadline(method, request)
        if isinstance(answer, errors.ServiceError) and method == "Commit":
            # The run left its hold to this commit: not committed, the hold
            # goes back, as a failed run's does.
            await self._release_id(request.reservation_id, 2)
        return answer

    def _send_unsent(self, run: _Run) -> None:
        """A run cancelled after a generation used tokens and before their
        spend was sent: the spend goes in the background, under the request
        id it would have had (so a retry of the run is answered with it),
        and ``_resent_spend`` awaits it as for a spend cut off mid-send."""
        unsent, run.unsent_spend = run.unsent_spend, None
        if unsent is None or run.spend_resent is not None:
            return
        method, request = unsent
        if method == "Commit":
            run.reservation = None  # settled by the commit sent now
        run.spend_resent = self._in_background(self._resend_spend(method, request))

    async def _resent_spend(self, run: _Run) -> None:
        """A run cancelled while recording its last generation's spend sends
        the request again in the background (``_record_spend``). Its answer
        is awaited here, as a cancelled run awaits the release of its hold,
        so that what the run reports (AGENT_FAILED, its workflow task)
        counts that generation at the cost the budget was charged. If the
        request fails, or the run is cancelled again before it is answered
        (it is still sent), the generation's tokens are counted without a
        cost and a DEGRADED note (budget) says why."""
        resent, run.spend_resent = run.spend_resent, None
        if resent is None:
            return
        try:
            charged = await asyncio.shield(resent)
        except asyncio.CancelledError:
            # Cancelled again: the run ends now (it raises a cancellation anyway).
            unknown = errors.ServiceError(
                grpc.StatusCode.CANCELLED, ErrorReason.ERROR_REASON_CANCELLED,
                "the run was cancelled again before the spend of its last generation was "
                "recorded: the request is still pending, its cost is not counted here")
        else:
            if not isinstance(charged, errors.ServiceError):
                self._charged(run, charged)
                return
            unknown = errors.ServiceError(
                charged.code, charged.reason,
                "the spend of the last generation, cut off by the run's cancellation, could "
                f"not be recorded: {charged.message}")
        run.add_usage(run.last_generation.usage, 0, "")
        run.degrade(DegradedComponent.DEGRADED_COMPONENT_BUDGET, unknown)

    async def _release_reserved(self, request: ReserveRequest) -> None:
        reserved = await self._resend("Reserve", request)
        if reserved is not None:
            await self._release_id(reserved.reservation_id, 2)

    async def _reserve(self, run: _Run, model: str, messages: list[Message],
                       iteration: int, *, step: str = "", unread: int = 0) -> None:
        """Holds budget for one generation of ``model`` from ``messages``
        and ``unread`` tokens more (of reads still running), under the
        request id ``step`` (by default the iteration's)."""
        request = ReserveRequest(
            request_id=step or run.step("reserve", iteration), context=run.context, model=model,
            estimated_prompt_tokens=caps.estimate_prompt_tokens(messages) + unread,
            max_tokens=_completion_limit(run, model, messages))
        try:
            response = await self.providers.call("information", "Reserve", request)
        except asyncio.CancelledError:
            # The hold may be made all the same: ask for it again and release it.
            self._in_background(self._release_reserved(request))
            raise
        except errors.ServiceError as exc:
            if exc.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE) \
                    and errors.reason_name(exc.reason) not in ("DEADLINE_TOO_SHORT",
                                                               "CIRCUIT_OPEN"):
                # Maybe sent, and not answered (in time, or the connection
                # dropped after it was sent): the same. (Not sent at all, the
                # hold asked for again is made and released.)
                self._in_background(self._release_reserved(request))
            raise
        run.reservation = response.reservation_id

    async def _rehold(self, run: _Run, model: str, messages: list[Message],
                      iteration: int, step: str) -> None:
        """The run's hold made again, for ``model`` and ``messages`` under
        the request id ``step``, once the hold it replaces is released: it
        is measured against the budget without that one (a budget with room
        for one hold, not two, takes it)."""
        previous = run.reservation
        if previous is not None:
            # Shielded, and the run keeps the hold until it is released: a
            # run cancelled meanwhile releases it (again) on its way out.
            await asyncio.shield(self._release_id(previous, 2))
            run.reservation = None
        await self._reserve(run, model, messages, iteration, step=step)

    async def _hold_for(self, run: _Run, model: str, messages: list[Message],
                        iteration: int) -> None:
        """Before a fallback model generates in place of the one the run
        holds budget for: a hold for it, at its own price, refused as any
        reservation (BUDGET_EXCEEDED: the run fails before it generates),
        once the first model's hold is released. Without this a fallback
        priced above the first model would spend past a HARD budget."""
        if run.enforcement != BudgetEnforcement.BUDGET_ENFORCEMENT_RESERVE:
            return
        # A fallback model's hold has a request id of its own (its price is
        # its own).
        await self._rehold(run, model, messages, iteration,
                           run.step("reserve", iteration, model))

    async def _release(self, run: _Run, reason: int) -> None:
        reservation, run.reservation = run.reservation, None
        if reservation is not None:
            await self._release_id(reservation, reason)

    async def _release_id(self, reservation: str, reason: int) -> None:
        # If it fails, the hold expires on its own; nothing was charged.
        # A request id of its own per release: a retried run's Reserve
        # holds again under the same reservation id, and a release under an
        # id already used would be answered as the first one was (the new
        # hold left to its TTL).
        await self._resend("Release", ReleaseRequest(
            request_id=f"{reservation}:release:{uuid.uuid4().hex}", reservation_id=reservation,
            reason=reason))

    async def _settle(self, run: _Run, iteration: int) -> None:
        """Commit (or track) the usage of the last generation; then the run
        must be within its per-run caps."""
        await self._charge(run, iteration)
        caps.check_spent(run.agent, run.result)

    async def _charge_cut(self, run: _Run, summary, iteration: int) -> None:
        """A streamed generation that broke after some output used tokens
        all the same (its summary's usage, the LLM service's estimate when
        the upstream reported none): they are charged as a failed call, so
        that the budget and the failed run's usage count them. They are
        tracked under a request id of their own, and the hold is left to
        the run's release: a retry of the run generates again (the LLM
        service keeps no broken stream) and settles that hold with its own
        usage under the ids a completed generation uses, which a charge of
        the cut one under those ids would make a conflict. A charge that
        fails counts the tokens at no cost."""
        request = self._cut_spend(run, summary, iteration)
        if request is None:
            return
        # Cancelled while it is sent, the run sends it again (the same id).
        run.unsent_spend = ("TrackCompletion", request)
        charged = await self._past_deadline("TrackCompletion", request)
        run.unsent_spend = None
        if isinstance(charged, errors.ServiceError):
            run.add_usage(summary.usage, 0, "")
            if run.enforcement == BudgetEnforcement.BUDGET_ENFORCEMENT_TRACK:
                run.degrade(DegradedComponent.DEGRADED_COMPONENT_BUDGET, charged)
            return
        self._charged(run, charged)

    @staticmethod
    def _spend_request(run: _Run, iteration: int) -> tuple[str, Any] | None:
        """(method, request) recording the last generation's spend, as the
        agent's budget enforcement wants it; None when it wants none."""
        enforcement = run.enforcement
        if enforcement == BudgetEnforcement.BUDGET_ENFORCEMENT_DISABLED:
            return None
        common = _spend(run.last_generation, success=True)
        if enforcement == BudgetEnforcement.BUDGET_ENFORCEMENT_TRACK:
            return "TrackCompletion", TrackCompletionRequest(
                request_id=run.step("track", iteration), context=run.context, **common)
        return "Commit", CommitRequest(request_id=run.step("commit", iteration),
                                       reservation_id=run.reservation, **common)

    @staticmethod
    def _cut_spend(run: _Run, summary, iteration: int) -> TrackCompletionRequest | None:
        """The TrackCompletion of a stream cut after some output, made the
        run's last generation; None (its tokens counted at no cost) when
        the agent's budget enforcement records no spend."""
        run.last_generation = summary
        if run.enforcement == BudgetEnforcement.BUDGET_ENFORCEMENT_DISABLED:
            run.add_usage(summary.usage, 0, "")
            return None
        # Each cut stream is a charge of its own: a retry cut again tracks
        # its own usage, not another request under the first cut's id (a
        # conflict).
        return TrackCompletionRequest(
            request_id=run.step("cut", iteration, uuid.uuid4().hex), context=run.context,
            **_spend(summary, success=False))

    async def _charge(self, run: _Run, iteration: int) -> None:
        last = run.last_generation
        run.unsent_spend = None  # sent now (_record_spend sends it again if cut off)
        spend = self._spend_request(run, iteration)
        if spend is None:
            run.add_usage(last.usage, 0, "")
            return
        method, request = spend
        if method == "TrackCompletion":
            try:
                charged = await self._record_spend(run, method, request)
            except errors.ServiceError as exc:
                run.add_usage(last.usage, 0, "")
                run.degrade(DegradedComponent.DEGRADED_COMPONENT_BUDGET, exc)
                return
        else:
            # Until the commit is answered the run still holds the
            # reservation: if the commit fails, the run's failure releases it
            # (and reports the generation's tokens, charged nothing).
            try:
                charged = await self._record_spend(run, method, request)
            except errors.ServiceError:
                run.add_usage(last.usage, 0, "")
                raise
            run.reservation = None
        self._charged(run, charged)

    def _charged(self, run: _Run, charged) -> None:
        """Counts the last generation at the cost recording its spend
        charged, and reports the budget alerts that recording fired."""
        run.add_usage(run.last_generation.usage, charged.cost_micros, charged.currency)
        for alert in charged.alerts:
            run.emit(EventType.EVENT_TYPE_BUDGET_ALERT, BudgetAlert(
                alert_id=alert.alert_id, budget_id=alert.budget_id,
                threshold_percent=alert.threshold_percent, spent_micros=alert.spent_micros,
                limit_micros=alert.limit_micros, spent_tokens=alert.spent_tokens,
                limit_tokens=alert.limit_tokens, currency=alert.currency))

    async def _record_spend(self, run: _Run, method: str, request):
        """Commits or tracks a generation's spend. The spend happened: it is
        recorded even past the run's deadline, and if the run is cancelled
        meanwhile the request is sent again in the background (and settles
        the reservation)."""
        try:
            with beyond_deadline():
                return await self.providers.call("information", method, request)
        except asyncio.CancelledError:
            run.reservation = None  # settled by the request sent again
            run.spend_resent = self._in_background(self._resend_spend(method, request))
            raise

    # ------------------------------------------------------------ generation

    async def _generate(self, run: _Run, models: list[str], messages: list[Message],
                        tools: list[Tool], iteration: int) -> Message:
        sampling = run.agent.sampling
        config = GenerationConfig()
        if sampling.HasField("temperature"):
            config.temperature = sampling.temperature
        if sampling.HasField("top_p"):
            config.top_p = sampling.top_p
        # The agent's own fallback list is the whole chain when it has one;
        # under RESERVE the run tries the LLM service's chain itself.
        own_chain = run.whole_chain or self._own_chain(run)

        def request_of(model: str) -> dict:
            # Each model is sent the limit its hold was made for (the
            # model's max_output_tokens as the run's table gave it, which
            # the LLM service may have raised since), so no answer outgrows
            # its hold, and within what the run's token cap leaves.
            limited = GenerationConfig(max_tokens=_completion_limit(run, model, messages))
            limited.MergeFrom(config)
            return dict(request_id=run.step("gen", iteration, model),
                        context=run.context, model=model,
                        conversation=Conversation(messages=messages), config=limited,
                        tools=tools, disable_fallback=own_chain)

        async def one(fields: dict):
            if run.failed_reads:
                # Kept only once a generation will be sent (one refused
                # before, by the breaker or the deadline, leaves them to be
                # read afresh by a retry).
                method = "StreamGenerate" if run.opts.stream_chunks else "Generate"
                self.providers.check("llm", method)
                await self._keep_failed_reads(run)
            if run.opts.stream_chunks:
                return await self._stream(run, StreamGenerateRequest(**fields), iteration)
            return await self._call_generate(run, GenerateRequest(**fields), iteration)

        answered: list = []  # this attempt's (generated, request fields)

        async def pick() -> struct_pb2.Struct:
            failure: errors.ServiceError | None = None
            # The context window of a model that found the prompt too long:
            # as the LLM service does, only a model with a larger one (or
            # an unknown one) is tried after it.
            too_long_for: int | None = None
            for position, model in enumerate(models):
                window = run.models[model].context_window_tokens if model in run.models else 0
                if too_long_for is not None and window and window <= too_long_for:
                    continue
                fields = request_of(model)
                if position:
                    await self._hold_for(run, model, messages, iteration)
                try:
                    generated = await one(fields)
                except errors.ServiceError as exc:
                    if not _falls_back(run, exc):
                        raise
                    if exc.code == grpc.StatusCode.OUT_OF_RANGE:
                        too_long_for = max(too_long_for or 0, window)
                    failure = exc
                    continue
                answered.append((generated, fields))
                chosen = struct_pb2.Struct()
                chosen.update({"model": model})
                if failure is not None:
                    chosen.update({"reason": errors.reason_name(failure.reason),
                                   "message": failure.message})
                return chosen
            assert failure is not None
            raise failure

        # Which model of the chain answered is kept under the run's request
        # id too: a retry takes that model's kept answer, not a new one from
        # a model that failed in the first attempt and answers now (its
        # usage and output would not be what was committed and saved). It
        # is kept per chain: a failed run retried with another chain (another
        # model_override) runs it, as its generations' request ids are others.
        # A chain of one model has one answer: its generation's own record
        # is all a retry needs, so nothing more is kept (a request ledger
        # round trip saved).
        if len(models) == 1:
            chosen, replayed = await pick(), False
        else:
            chosen, replayed = await self._kept_choice(run, models, messages, iteration, pick)
        if replayed:
            if chosen["model"] != models[0]:
                await self._hold_for(run, chosen["model"], messages, iteration)
            fields = request_of(chosen["model"])
            generated = await one(fields)
        else:
            generated, fields = answered[0]
        if "reason" in chosen:
            run.result.fallback_used = True
            run.degrade(DegradedComponent.DEGRADED_COMPONENT_MODEL_FALLBACK, errors.ServiceError(
                grpc.StatusCode.UNAVAILABLE, chosen["reason"], chosen["message"]))
        elif generated.fallback_used:
            # The LLM service's own chain moved on: degraded as when the
            # run's does (the LLM service does not say why).
            run.result.fallback_used = True
            run.degrade(DegradedComponent.DEGRADED_COMPONENT_MODEL_FALLBACK, errors.ServiceError(
                grpc.StatusCode.UNAVAILABLE, ErrorReason.ERROR_REASON_BACKEND_UNAVAILABLE,
                f"llm: model {fields['model']!r} did not answer; the LLM service's fallback "
                f"model {generated.model!r} did"))
        run.last_generation_id = fields["request_id"]
        return self._generated(run, generated, iteration)

    async def _kept_choice(self, run: _Run, models: list[str], messages: list[Message],
                           iteration: int, pick):
        """(chosen, replayed): which model of the chain answered, as it did
        in the first attempt of the run (``pick()`` when none did yet)."""
        digest = hashlib.sha256("\n".join(
            [fingerprint(Conversation(messages=messages), ignore=()), *models]).encode()
        ).hexdigest()
        chain = hashlib.sha256("\n".join(models).encode()).hexdigest()[:16]
        return await self._kept(run.step("model", iteration, chain), digest, pick,
                                struct_pb2.Struct)

    def _answered(self, run: _Run, generated, iteration: int) -> None:
        """A generation answered: its tokens were used, so from here a run
        cancelled before it records the spend (while the answer is kept in
        the request ledger, say) sends it (``_send_unsent``)."""
        run.last_generation = generated
        run.unsent_spend = self._spend_request(run, iteration)

    async def _call_generate(self, run: _Run, request: GenerateRequest, iteration: int):
        """The generation as it answered the first attempt of this run, kept
        in the request ledger under its request id like the memory reads
        (``_pinned``): its usage was committed and its output saved under
        ids derived from it, and the LLM service keeps its own record in
        memory only (a restarted service, or another replica, would generate
        again, and differently, under the same request id)."""
        async def generate():
            generated = await self.providers.call(
                "llm", "Generate", request, span_attributes=_genai_request(request),
                annotate=_genai_response)
            self._answered(run, generated, iteration)
            return generated
        found, _ = await self._kept(request.request_id, fingerprint(request, ignore=()),
                                    generate, GenerateResponse)
        return found

    async def _stream(self, run: _Run, request: StreamGenerateRequest, iteration: int):
        """The streamed generation, kept like an unstreamed one
        (``_call_generate``); taken from there, its content is one chunk, as
        the LLM service replays a stream. It is kept as a GenerateResponse:
        RunAgent and StreamAgent share runs, so a retry may take it under
        the same request id either way (the requests' fingerprints match)."""
        async def generate():
            generated = _as_response(await self._stream_live(run, request, iteration))
            self._answered(run, generated, iteration)
            return generated
        summary, replayed = await self._kept(request.request_id, fingerprint(request, ignore=()),
                                             generate, GenerateResponse)
        if replayed and summary.message.content:
            run.emit(EventType.EVENT_TYPE_GENERATION_CHUNK,
                     GenerationChunk(text=summary.message.content, iteration=iteration))
        return summary

    async def _stream_live(self, run: _Run, request: StreamGenerateRequest, iteration: int):
        # Deltas the model produced, its text's and its tool calls' alike:
        # either is generated (and paid) output.
        delivered = 0
        calls_text = ""  # the tool calls' names and arguments streamed so far
        summary = None
        failed = None  # the terminal message of a stream that ended FAILED
        try:
            # Closed here, also when the loop is left by an exception: a
            # generator left suspended would keep its client span as the
            # run's current span (the run's later calls its children).
            stream = self.providers.stream(
                "llm", "StreamGenerate", request, span_attributes=_genai_request(request),
                annotate=_annotate_stream)
            async with contextlib.aclosing(stream):
                async for message in stream:
                    kind = message.WhichOneof("event")
                    if kind == "delta":
                        delivered += 1
                        run.output += message.delta.text
                        run.emit(EventType.EVENT_TYPE_GENERATION_CHUNK,
                                 GenerationChunk(text=message.delta.text, iteration=iteration))
                    elif kind == "tool_call_delta":
                        delivered += 1
                        calls_text += (message.tool_call_delta.name
                                       + message.tool_call_delta.arguments_delta)
                    elif kind == "end":
                        summary = message.summary
                        if message.end.outcome != StreamOutcome.STREAM_OUTCOME_COMPLETED:
                            failed = message.end
                            break
            if failed is not None:
                # The stream's span has ended: the charge is the run's call.
                if delivered:
                    await self._charge_cut(run, summary, iteration)
                raise provider_error("llm", from_status(failed.error))
            if summary is None:
                raise errors.ServiceError(grpc.StatusCode.UNAVAILABLE, "STREAM_INTERRUPTED",
                                          "llm: the generation stream was cut")
        except asyncio.CancelledError:
            if delivered and summary is None:
                # The caller left (or its deadline passed) after text went
                # out: what it cost is estimated and sent by the cancelled
                # run (_send_unsent).
                cut = self._cut_spend(run, _estimated_cut(request, run.output + calls_text),
                                      iteration)
                if cut is not None:
                    run.unsent_spend = ("TrackCompletion", cut)
            raise
        except errors.ServiceError as error:
            if delivered and summary is None:
                # Cut below its own end (the LLM service went away): no
                # usage came back, so what the text sent cost is estimated.
                await self._charge_cut(run, _estimated_cut(request, run.output + calls_text),
                                       iteration)
            # No fallback after output, however the stream ended (its own
            # end, a gRPC error, or closing without an end): the chunks
            # already sent would run on into another model's text.
            error.partial_output = delivered > 0
            raise
        return summary

    def _generated(self, run: _Run, generated, iteration: int) -> Message:
        """Record a generation (a GenerateResponse or a StreamSummary)."""
        self._answered(run, generated, iteration)
        result = run.result
        result.llm_calls += 1
        result.model, result.backend = generated.model, generated.backend
        result.upstream_model = generated.upstream_model
        run.emit(EventType.EVENT_TYPE_GENERATION_COMPLETE, GenerationComplete(
            iteration=iteration, model=generated.model, backend=generated.backend,
            upstream_model=generated.upstream_model, usage=generated.usage,
            finish_reason=FinishReason.Name(generated.finish_reason).removeprefix(
                "FINISH_REASON_"), latency=generated.latency, cached=generated.cached,
            fallback_used=generated.fallback_used))
        run.output = ""
        return generated.message

    # ------------------------------------------------------------ tools

    async def _run_tools(self, run: _Run, calls: list[ToolCall], iteration: int
                         ) -> list[Message]:
        records = await asyncio.gather(*(self._run_tool(run, c, iteration) for c in calls))
        replies = []
        for call, record in zip(calls, records, strict=True):
            run.result.tool_calls.append(record)
            run.emit(EventType.EVENT_TYPE_TOOL_EXECUTE, record)
            if call.name == SAVE_TOOL and not record.HasField("error"):
                self._tool_saved(run, call, record)
            content = record.result if not record.HasField("error") else json.dumps(
                {"error": {"code": record.error.code, "message": record.error.message}})
            replies.append(Message(role=Role.ROLE_TOOL, content=content,
                                   tool_call_id=call.id, name=_sendable_name(call.name)))
        return replies

    def _tool_saved(self, run: _Run, call: ToolCall, record: ToolCallRecord) -> None:
        """An artifact the built-in ``artifact_save`` saved is one the run
        saved: in the result's artifact_ids, and an ARTIFACT_SAVED event."""
        try:
            answer = json.loads(record.result)
            event = ArtifactSaved(
                artifact_id=str(answer["artifact_id"]),
                artifact_type=str(parse_arguments(call.arguments)["artifact_type"]),
                size_bytes=int(answer.get("size_bytes", 0)))
        except (ValueError, TypeError, KeyError, AttributeError):
            return  # not the built-in's answer (an embedding application's own tool)
        if not event.artifact_id:
            return
        run.result.artifact_ids.append(event.artifact_id)
        run.emit(EventType.EVENT_TYPE_ARTIFACT_SAVED, event)

    async def _run_tool(self, run: _Run, call: ToolCall, iteration: int) -> ToolCallRecord:
        started = time.monotonic()
        record = ToolCallRecord(tool_call_id=call.id, tool_name=call.name,
                                arguments=call.arguments, iteration=iteration)
        with tracer.start_as_current_span(
                f"execute_tool {call.name}", kind=SpanKind.INTERNAL,
                attributes={"gen_ai.operation.name": "execute_tool",
                            "gen_ai.tool.name": call.name, "gen_ai.tool.call.id": call.id},
                record_exception=False, set_status_on_exception=False) as span:
            if call.name == HANDOFF_TOOL and run.opts.handoff_targets \
                    and HANDOFF_TOOL not in run.agent.allowed_tools:
                # Offered, but not called as it must be (_handoff refused it).
                outcome = ToolOutcome(error=ToolError(
                    code="INVALID_ARGUMENTS",
                    message="hand off with a JSON object naming as 'agent' one of: "
                            f"{', '.join(run.opts.handoff_targets)}"))
            elif call.name not in run.agent.allowed_tools:
                outcome = ToolOutcome(error=ToolError(
                    code="NOT_ALLOWED",
                    message=f"agent {run.agent.name!r} may not call {call.name!r}"))
            else:
                outcome = await self._tool_outcome(ToolInvocation(
                    name=call.name, arguments=call.arguments, tool_call_id=call.id,
                    request_id=run.step("tool", iteration, call.id),
                    ctx=run.ctx, memory_namespace=run.agent.memory.namespace))
            if outcome.error is not None:
                record.error.CopyFrom(outcome.error)
                span.set_status(Status(StatusCode.ERROR, outcome.error.message))
                span.set_attribute("error.type", outcome.error.code)
            else:
                record.result = outcome.result
            if outcome.failure is not None:
                failure = outcome.failure
                run.degrade(DegradedComponent.DEGRADED_COMPONENT_TOOL, errors.ServiceError(
                    failure.code, failure.reason, f"tool {call.name}: {failure.message}"))
        record.duration.CopyFrom(duration_s(time.monotonic() - started))
        return record

    async def _tool_outcome(self, invocation: ToolInvocation) -> ToolOutcome:
        """The tool's answer as it answered the first attempt of this run,
        kept in the request ledger under the call's request id like the
        memory reads (``_pinned``): run again, a tool may answer otherwise
        (``memory_search`` would find the first attempt's own write-back),
        and the next generation would get another prompt under the same
        request id. A tool that could not answer at all is not kept."""
        failed: list[ToolOutcome] = []

        async def execute() -> ToolCallRecord:
            outcome = await self.tools.execute(invocation)
            if outcome.failure is not None:
                failed.append(outcome)
                raise outcome.failure
            kept = ToolCallRecord(result=outcome.result)
            if outcome.error is not None:
                kept.error.CopyFrom(outcome.error)
            return kept
        # The context too: another tenant's request under the same id is
        # another request, never a replay of this one.
        digest = hashlib.sha256("\n".join([
            invocation.name, invocation.arguments,
            invocation.ctx.to_proto().SerializeToString(deterministic=True).hex()]).encode()
        ).hexdigest()
        try:
            kept, _ = await self._kept(invocation.request_id, digest, execute, ToolCallRecord)
        except errors.ServiceError:
            if failed:
                return failed[0]
            raise
        return ToolOutcome(result=kept.result,
                           error=kept.error if kept.HasField("error") else None)

    def _handoff(self, run: _Run, call: ToolCall) -> bool:
        """Record a valid handoff request; False when it is not valid (the
        model then gets a tool error like any other bad call)."""
        try:
            args = parse_arguments(call.arguments)
        except ValueError:
            return False
        target = args.get("agent") if isinstance(args, dict) else None
        if target not in run.opts.handoff_targets:
            return False
        handoff = Handoff(from_agent=run.agent.name, to_agent=target,
                          reason=str(args.get("reason", "")),
                          input=str(args.get("input", "")) or run.opts.input)
        run.result.handoff.CopyFrom(handoff)
        with tracer.start_as_current_span(
                f"handoff {run.agent.name} -> {target}",
                attributes={"hivemesh.handoff.from": run.agent.name,
                            "hivemesh.handoff.to": target}):
            run.emit(EventType.EVENT_TYPE_HANDOFF, handoff)
        return True

    # ------------------------------------------------------------ finish

    async def _finish(self, run: _Run, enforcement: int, iteration: int, *,
                      settled: bool) -> None:
        run.result.output = run.output
        policy = run.agent.budget
        if not settled and (policy.max_cost_micros_per_run or policy.max_tokens_per_run):
            # Whether the run stayed within its caps decides whether it
            # succeeds: known before anything of it is kept.
            await self._settle(run, iteration)
            settled = True
        steps = []
        if not settled:
            steps.append(self._settle(run, iteration))
        if run.agent.output_artifact_type and run.output:
            steps.append(self._save_artifact(run))
        if run.agent.memory.write_back and run.output:
            steps.append(self._write_back(run))
        if run.agent.memory.history_enabled and run.ctx.session_id and run.output:
            steps.append(self._append_history(run))
        outcomes = await asyncio.gather(*steps, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _save_artifact(self, run: _Run) -> None:
        request = SaveArtifactRequest(
            request_id=run.step("artifact"), workflow_id=run.ctx.workflow_id or
            run.ctx.context_id, task_id=run.ctx.task_id, agent_id=run.agent.name,
            artifact_type=run.agent.output_artifact_type, content=run.output)
        # Nothing that differs between attempts (such as the trace id): a
        # retried run saves the very request of the first attempt.
        request.metadata.update({"model": run.result.model, "backend": run.result.backend,
                                 "context_id": run.ctx.context_id})
        saved = await self.providers.call("artifact", "SaveArtifact", request)
        run.result.artifact_ids.append(saved.artifact.artifact_id)
        run.emit(EventType.EVENT_TYPE_ARTIFACT_SAVED, ArtifactSaved(
            artifact_id=saved.artifact.artifact_id,
            artifact_type=saved.artifact.artifact_type, size_bytes=saved.artifact.size_bytes))


_ROLES = {MessageRole.MESSAGE_ROLE_SYSTEM: Role.ROLE_SYSTEM,
          MessageRole.MESSAGE_ROLE_USER: Role.ROLE_USER,
          MessageRole.MESSAGE_ROLE_ASSISTANT: Role.ROLE_ASSISTANT}


def _spend(generation, *, success: bool) -> dict:
    """The fields of a Commit or TrackCompletion recording ``generation``
    (a GenerateResponse or a StreamSummary)."""
    return dict(usage=generation.usage, model=generation.model, backend=generation.backend,
                latency=generation.latency, cached=generation.cached, success=success)


def _estimated_cut(request: StreamGenerateRequest, output: str) -> StreamSummary:
    """The summary of a stream cut before the LLM service could send its
    own: the request's model, the output delivered, and its usage
    estimated from the text of the conversation and of that output."""
    prompt = caps.estimate_prompt_tokens(request.conversation.messages)
    completion = estimate_tokens(output)
    return StreamSummary(
        model=request.model, usage_estimated=True, message=Message(content=output),
        usage=Usage(prompt_tokens=prompt, completion_tokens=completion,
                    total_tokens=prompt + completion))


def _unique_tool_call_ids(reply: Message, iteration: int,
                          used: set[str] | None = None) -> None:
    """Gives each tool call of the reply an id of its own, as the LLM
    contract wants them (at most 128 characters, unique within the
    conversation): a model (or an OpenAI-compatible server) may send none,
    one id twice, an id of an earlier reply again (numbering each reply's
    calls afresh) or one too long, and results are matched to calls by id.
    ``used``: the ids of the conversation's earlier replies; this reply's
    are added to it."""
    seen: set[str] = set(used or ())
    # An id given is never given again, also not one the model itself
    # wrote on a later call.
    taken = seen | {call.id for call in reply.tool_calls if call.id}
    for index, call in enumerate(reply.tool_calls):
        if not call.id or call.id in seen or len(call.id) > MAX_TOOL_CALL_ID:
            given, n = f"call-{iteration}-{index}", 0
            while given in taken:
                n += 1
                given = f"call-{iteration}-{index}-{n}"
            call.id = given
            taken.add(given)
        seen.add(call.id)
    if used is not None:
        used.update(seen)


def _as_response(summary: StreamSummary) -> GenerateResponse:
    """A streamed generation's summary as the unary call answers it."""
    return GenerateResponse(
        message=summary.message, usage=summary.usage, finish_reason=summary.finish_reason,
        model=summary.model, backend=summary.backend, upstream_model=summary.upstream_model,
        latency=summary.latency, cached=summary.cached, replayed=summary.replayed,
        attempts=summary.attempts, fallback_used=summary.fallback_used)


# Errors after which the LLM service's chain goes on to its next alias, on
# top of _FALLBACK_CODES: a prompt too long for the model's context window,
# the upstream refusing the model's credentials.
_LLM_CHAIN_CODES = frozenset({grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAUTHENTICATED,
                              grpc.StatusCode.PERMISSION_DENIED})


def _falls_back(run: _Run, exc: errors.ServiceError) -> bool:
    """Whether the next model of the run's chain is tried after ``exc``:
    never once output went out, nor after a refused hold. A chain that is
    the LLM service's goes on where that service would: also after
    _LLM_CHAIN_CODES, and after a request no backend of the model could
    express (nothing sent: ``attempts`` 0)."""
    if getattr(exc, "partial_output", False) or errors.reason_name(exc.reason) == \
            "BUDGET_EXCEEDED":
        return False
    if exc.code in _FALLBACK_CODES:
        return True
    if not run.llm_chain:
        return False
    return exc.code in _LLM_CHAIN_CODES or (
        exc.code == grpc.StatusCode.INVALID_ARGUMENT
        and errors.reason_name(exc.reason) == "INVALID_REQUEST"
        and exc.metadata.get("attempts") == "0")


# What the LLM contract accepts as a tool call's name.
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _sendable_name(name: str) -> str:
    """A tool name as the conversation sent back to the LLM service may
    carry it: a model may make up one the contract refuses (such as
    ``functions.search``), which would fail every later call of the run."""
    if _TOOL_NAME.fullmatch(name):
        return name
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "unnamed"


def _as_sent(reply: Message) -> Message:
    """The model's reply as the next call sends it back: its tool calls
    under names the contract accepts (the calls were run, and are recorded,
    under the names the model gave)."""
    sent = Message()
    sent.CopyFrom(reply)
    for call in sent.tool_calls:
        call.name = _sendable_name(call.name)
    return sent


def _default_alias(table: dict[str, Model]) -> str:
    default = next((m.alias for m in table.values() if m.is_default), None)
    if default is None:
        raise errors.ServiceError(
            grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND",
            "llm: the agent names no model and the LLM service has no default chat "
            "model alias", {"provider": "llm"})
    return default


def _llm_chain(table: dict[str, Model], first: str) -> list[str]:
    """The aliases the LLM service tries for ``first``, in its order: each
    alias's fallback_aliases after it, breadth first, each alias once."""
    chain: list[str] = []
    queue = [first]
    while queue:
        alias = queue.pop(0)
        if alias in chain:
            continue
        chain.append(alias)
        model = table.get(alias)
        if model is not None:
            queue += [a for a in model.fallback_aliases if a in table]
    return chain


def _completion_limit(run: _Run, model: str, messages: list[Message]) -> int:
    """The most tokens ``model`` may generate next in ``run``: what its hold
    is made for and what its request is sent (the model's
    max_output_tokens as the run's table of models gives it, if known)."""
    most = run.models[model].max_output_tokens if model in run.models else 0
    return caps.completion_limit(run.agent, run.result, messages, most)


def _read_allowance(memory, recall: bool, history: bool) -> int:
    """The prompt tokens a run's first hold counts for reads it is made
    beside: the session history's token budget (the read returns no more),
    and per memory recalled a chunk of the memory service's default size."""
    tokens = 0
    if recall:
        tokens += (memory.recall_limit or DEFAULT_RECALL_LIMIT) * HELD_TOKENS_PER_MEMORY
    if history:
        tokens += memory.history_token_budget or DEFAULT_HISTORY_TOKENS
    return tokens


def _with_memories(system: str, memories: list[str]) -> str:
    if not memories:
        return system
    recalled = "\n".join(f"- {m}" for m in memories)
    return f"{system}\n\nRelevant memories:\n{recalled}".strip()


def _handoff_tool(targets: tuple[str, ...]) -> Tool:
    tool = Tool(name=HANDOFF_TOOL, description=(
        "Hand the task to another agent when it is better suited. The run ends here and "
        "the other agent continues with the given input."))
    tool.parameters.update({"type": "object", "required": ["agent", "reason"], "properties": {
        "agent": {"type": "string", "enum": list(targets)},
        "reason": {"type": "string"}, "input": {"type": "string"}}})
    return tool


def _genai_request(request) -> dict:
    attributes = {"gen_ai.operation.name": "chat", "gen_ai.request.model": request.model}
    if request.config.max_tokens:
        attributes["gen_ai.request.max_tokens"] = request.config.max_tokens
    if request.config.HasField("temperature"):
        attributes["gen_ai.request.temperature"] = request.config.temperature
    return attributes


def _annotate_stream(span, last) -> None:
    """A generation stream's client span, from its last message: the usage,
    and an error status when its terminal message says it failed."""
    _genai_response(span, last.summary)
    if last.WhichOneof("event") == "end" and \
            last.end.outcome != StreamOutcome.STREAM_OUTCOME_COMPLETED:
        span.set_status(Status(StatusCode.ERROR, last.end.error.message or "stream failed"))


def _genai_response(span, response) -> None:
    if response is None or not response.model:
        return
    span.set_attributes({
        "gen_ai.response.model": response.upstream_model or response.model,
        "gen_ai.provider.name": response.backend,
        "gen_ai.usage.input_tokens": response.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": response.usage.completion_tokens,
        "gen_ai.response.finish_reasons": [
            FinishReason.Name(response.finish_reason).removeprefix("FINISH_REASON_").lower()],
    })
