"""OrchestratorService: the gRPC face of the agents, the agent runner, the
workflow runner and the event bus. Agents and request_id replays go through
the state backend's AgentStore and RequestLedger (``state.py``)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc

from hivemesh.common.v1 import ErrorReason, StreamEnd, StreamOutcome
from hivemesh.orchestrator.v1 import (
    AgentEvent, AgentResult, DeleteAgentResponse, EventType, GetAgentResponse, Heartbeat,
    ListAgentsResponse, RegisterAgentRequest, RegisterAgentResponse, RunAgentRequest,
    RunAgentResponse, RunWorkflowResponse, StreamAgentResponse, SubscribeEventsResponse,
    WorkflowStatus)
from hivemesh.runtime import errors, paging
from hivemesh.runtime.resilience import fingerprint, replayed_copy
from hivemesh.runtime.settings import RESPONSE_MARGIN_BYTES
from hivemesh.runtime.wellknown import now_us, timestamp
from hivemesh.services.orchestrator.agents import definition_problems
from hivemesh.services.orchestrator.context import ExecutionContext
from hivemesh.services.orchestrator.events import (
    EventBus, EventSink, Subscription, build_event, fit_event)
from hivemesh.services.orchestrator.policy import deadline_scope
from hivemesh.services.orchestrator.runner import DOMAIN, AgentRunner, RunError, RunOptions
from hivemesh.services.orchestrator.settings import OrchestratorSettings
from hivemesh.services.orchestrator.state import (
    AgentStore, LocalLedger, RequestLedger, alongside)
from hivemesh.services.orchestrator.tools import ToolRegistry
from hivemesh.services.orchestrator.workflows import WorkflowRun, validate

SERVICE_NAME = "hivemesh.orchestrator.v1.OrchestratorService"
DEFAULT_PAGE_SIZE = 50
# What a repeated message field adds to each item's size: its tag and its
# length (a varint of at most 5 bytes).
_FIELD_OVERHEAD = 6
_TERMINAL = (EventType.EVENT_TYPE_AGENT_COMPLETE, EventType.EVENT_TYPE_AGENT_FAILED)
# What each kind of request records for its replays.
_RESULTS = {"register": RegisterAgentResponse, "delete": DeleteAgentResponse,
            "run": AgentResult, "workflow": RunWorkflowResponse}
# A running claim (shared state) holds this many times the request's time:
# a claim whose replica died is taken over once it has passed.
LEASE_FACTOR = 2.0


class OrchestratorServicer:
    def __init__(self, settings: OrchestratorSettings, agents: AgentStore,
                 tools: ToolRegistry, runner: AgentRunner, bus: EventBus,
                 ledger: RequestLedger | None = None) -> None:
        self.settings = settings
        self.agents = agents
        self.tools = tools
        self.runner = runner
        self.bus = bus
        # Request ids of different kinds of request never meet; RunAgent and
        # StreamAgent share "run".
        self.ledger = ledger or LocalLedger(settings.idempotency_size,
                                            settings.idempotency_ttl_s)
        self._closing = asyncio.Event()

    def close(self) -> None:
        """Graceful shutdown: end every SubscribeEvents stream as COMPLETED."""
        self._closing.set()

    # ------------------------------------------------------------ helpers

    def _time(self, context: grpc.aio.ServicerContext) -> float:
        """The request's time: the caller's deadline, or the default."""
        left = context.time_remaining()
        return left if left is not None else self.settings.default_run_timeout_s

    @property
    def _message_room(self) -> int:
        """The most one message of an answer or a stream may carry."""
        return self.settings.server.max_message_bytes - RESPONSE_MARGIN_BYTES

    def _deadline(self, context: grpc.aio.ServicerContext):
        """The run's deadline: the caller's, or the default when it set none."""
        return deadline_scope(self._time(context))

    async def _once(self, kind: str, request, run, context: grpc.aio.ServicerContext):
        """(result, replayed) of ``run()`` under the request's request_id."""
        return await self.ledger.once(kind, request.request_id, fingerprint(request), run,
                                      _RESULTS[kind], LEASE_FACTOR * self._time(context))

    async def _check_tools(self, agent) -> None:
        """Every allowed tool exists (the tool servers are listed again
        first if one is not known yet); UNAVAILABLE when a tool server that
        could hold it cannot be reached."""
        unknown = [t for t in agent.allowed_tools if not self.tools.known(t)]
        unreachable: list[str] = []
        if unknown:
            unreachable = await self.tools.refresh()
            unknown = [t for t in unknown if not self.tools.known(t)]
        if unknown and unreachable:
            raise errors.ServiceError(
                grpc.StatusCode.UNAVAILABLE, ErrorReason.ERROR_REASON_BACKEND_UNAVAILABLE,
                f"tool server(s) {', '.join(unreachable)} unreachable: cannot check "
                f"tool(s) {', '.join(unknown)}; retry later",
                {"tools": ",".join(unknown), "servers": ",".join(unreachable)})
        if unknown:
            raise errors.invalid_argument(
                [("agent.allowed_tools", f"unknown tool {t!r} (known: "
                  f"{', '.join(self.tools.names())})") for t in unknown])

    # ------------------------------------------------------------ agents

    async def GetAgent(self, request, context):
        return GetAgentResponse(agent=await self.agents.get(request.name))

    async def ListAgents(self, request, context):
        size = request.page_size or DEFAULT_PAGE_SIZE
        digest = paging.digest("agents")
        after = (paging.decode(request.page_token, digest, (str,))[0] if request.page_token
                 else "")
        page = await self.agents.page(after, size + 1)
        # Cut by size too: a page of large agents (system prompts up to
        # 256 KiB) would otherwise outgrow the message limit.
        response, room = ListAgentsResponse(), self._message_room
        for agent in page[:size]:
            room -= agent.ByteSize() + _FIELD_OVERHEAD
            if room < 0 and response.agents:
                break
            response.agents.append(agent)
        if len(page) > len(response.agents):
            response.next_page_token = paging.encode([response.agents[-1].name], digest)
        return response

    async def RegisterAgent(self, request, context):
        async def register():
            await self._check_tools(request.agent)
            problems = definition_problems(request.agent)
            if problems:
                raise errors.invalid_argument((f"agent.{f}", p) for f, p in problems)
            agent, created = await self.agents.register(request.agent, request.allow_update)
            return RegisterAgentResponse(agent=agent, created=created)
        response, replayed = await self._once("register", _as_registration(request), register,
                                              context)
        return replayed_copy(response) if replayed else response

    async def DeleteAgent(self, request, context):
        async def delete():
            return DeleteAgentResponse(deleted=await self.agents.delete(request.name))
        response, _ = await self._once("delete", request, delete, context)
        return response

    # ------------------------------------------------------------ runs

    def _look_up(self, name: str) -> asyncio.Task:
        """The agent, looked up while the request is claimed (one state
        store round trip less on the run's path); taken only by a run that
        goes ahead, so a retry of a run that completed replays it even when
        the agent was deleted since."""
        return alongside(self.agents.get(name))

    async def _start(self, request, lookup: asyncio.Task) -> tuple:
        agent = await lookup
        ctx = ExecutionContext.from_request(request.context, agent.name, request.request_id)
        opts = RunOptions(request_id=request.request_id, input=request.input,
                          model_override=request.model_override,
                          variables=dict(request.variables),
                          disable_fallback=request.disable_fallback)
        return agent, ctx, opts

    async def RunAgent(self, request, context):
        lookup = self._look_up(request.agent)

        async def run():
            agent, ctx, opts = await self._start(request, lookup)
            with self._deadline(context):
                return await self.runner.run(agent, ctx, opts, EventSink(self.bus))
        try:
            result, replayed = await self._once("run", _as_run(request), run, context)
        except RunError as exc:
            raise exc.error from None
        finally:
            lookup.cancel()
        return RunAgentResponse(result=result, replayed=replayed)

    async def StreamAgent(self, request, context):
        key = _as_run(request)
        queue: asyncio.Queue[AgentEvent] = asyncio.Queue()

        def listen(event: AgentEvent) -> None:
            if not (request.omit_generation_chunks
                    and event.type == EventType.EVENT_TYPE_GENERATION_CHUNK):
                queue.put_nowait(event)

        lookup = self._look_up(request.agent)

        async def run():
            agent, ctx, opts = await self._start(request, lookup)
            opts.stream_chunks = True
            with self._deadline(context):
                return await self.runner.run(agent, ctx, opts, EventSink(self.bus, listen))

        task = asyncio.create_task(self._once("run", key, run, context))
        replayed_result = None
        sent = False
        try:
            while True:
                got, event = await _next(queue, {task})
                if got:
                    sent = True
                    yield StreamAgentResponse(agent_event=fit_event(event, self._message_room))
                    if event.type in _TERMINAL:
                        break
                    continue
                if task.exception() is None:
                    result, replayed = task.result()
                    if replayed:
                        replayed_result = result
                        break
                if queue.empty():
                    break  # failed before emitting anything (or cut)
            if replayed_result is not None:
                ctx = ExecutionContext.from_request(request.context, request.agent,
                                                    request.request_id)
                event = build_event(EventType.EVENT_TYPE_AGENT_COMPLETE, ctx.to_proto(),
                                    replayed_result.trace_id, replayed_result,
                                    agent=request.agent, sequence=1)
                yield StreamAgentResponse(agent_event=fit_event(event, self._message_room))
                yield StreamAgentResponse(end=StreamEnd(
                    outcome=StreamOutcome.STREAM_OUTCOME_COMPLETED))
                return
            try:
                await task
            except (RunError, errors.ServiceError) as exc:
                error = exc.error if isinstance(exc, RunError) else exc
                if not sent:
                    # Nothing was delivered: the failure is the call's status
                    # (such as IDEMPOTENCY_CONFLICT), as for any other call.
                    raise error from None
                yield StreamAgentResponse(end=StreamEnd(
                    outcome=StreamOutcome.STREAM_OUTCOME_FAILED, error=error.to_status(DOMAIN)))
                return
            yield StreamAgentResponse(end=StreamEnd(
                outcome=StreamOutcome.STREAM_OUTCOME_COMPLETED))
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            lookup.cancel()

    async def RunWorkflow(self, request, context):
        # Checked inside the run: a retry of a workflow that completed
        # replays it even when one of its agents was deleted since.
        async def run():
            agents = await self.agents.snapshot()
            validate(request.workflow, agents, dict(request.variables))
            base = ExecutionContext.from_request(request.context, "", request.request_id)
            with self._deadline(context):
                workflow = WorkflowRun(
                    self.runner, agents, request, base, EventSink(self.bus),
                    request.max_concurrency or self.settings.default_max_concurrency,
                    self.ledger, LEASE_FACTOR * self._time(context),
                    max_response_bytes=self.settings.server.max_message_bytes)
                response = await workflow.run()
                if response.status != WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED:
                    # Answered, not kept, as a failed agent run: a retry runs
                    # it again (after an outage, or past a deadline that cut
                    # it off), and takes each agent run that ended in this
                    # attempt from its own record instead of running it again.
                    raise _Unsucceeded(response)
                return response
        try:
            response, replayed = await self._once("workflow", request, run, context)
        except _Unsucceeded as failed:
            return failed.response
        return replayed_copy(response) if replayed else response

    # ------------------------------------------------------------ events

    async def SubscribeEvents(self, request, context):
        if request.until_workflow_complete and not request.workflow_id:
            raise errors.invalid_argument(
                [("until_workflow_complete", "needs workflow_id")])
        subscription = Subscription(
            workflow_id=request.workflow_id, agent=request.agent,
            types=frozenset(request.types), min_priority=request.min_priority,
            context_id=request.context_id,
            until_workflow_complete=request.until_workflow_complete,
            queue_size=self.settings.subscriber_queue_size)
        self.bus.add_subscription(subscription)
        try:
            yield SubscribeEventsResponse(heartbeat=Heartbeat(send_time=timestamp(now_us())))
            closing = asyncio.ensure_future(self._closing.wait())
            try:
                while True:
                    # Fallen behind: what was queued before still goes out,
                    # then the end, counting every event not delivered.
                    if subscription.dropped and subscription.queue.empty():
                        yield SubscribeEventsResponse(end=StreamEnd(
                            outcome=StreamOutcome.STREAM_OUTCOME_FAILED,
                            error=errors.ServiceError(
                                grpc.StatusCode.RESOURCE_EXHAUSTED,
                                ErrorReason.ERROR_REASON_SUBSCRIBER_TOO_SLOW,
                                "the subscriber fell too far behind; events were dropped",
                                {"dropped_events": str(subscription.dropped)}
                            ).to_status(DOMAIN)))
                        return
                    got, event = await _next(subscription.queue, {closing},
                                             self.settings.heartbeat_interval_s)
                    if not got:
                        if closing.done():
                            break
                        yield SubscribeEventsResponse(
                            heartbeat=Heartbeat(send_time=timestamp(now_us())))
                        continue
                    if subscription.matches(event):
                        yield SubscribeEventsResponse(
                            agent_event=fit_event(event, self._message_room))
                    if subscription.ends_with(event):
                        break
            finally:
                closing.cancel()
            yield SubscribeEventsResponse(end=StreamEnd(
                outcome=StreamOutcome.STREAM_OUTCOME_COMPLETED))
        finally:
            self.bus.remove_subscription(subscription)


class _Unsucceeded(Exception):
    """A workflow that did not succeed: its response is returned but not
    kept for replays."""

    def __init__(self, response: RunWorkflowResponse) -> None:
        super().__init__("the workflow did not succeed")
        self.response = response


async def _next(queue: asyncio.Queue, others: set[asyncio.Future],
                timeout: float | None = None) -> tuple[bool, Any]:
    """(True, the queue's next item), or (False, None) once one of ``others``
    is done or the timeout passed; its wait on the queue never outlives it
    (a stream closed by its client leaves no task behind)."""
    getter = asyncio.ensure_future(queue.get())
    try:
        await asyncio.wait({getter, *others}, timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getter.done():
            getter.cancel()
    if getter.done() and not getter.cancelled():
        return True, getter.result()
    return False, None


def _as_registration(request: RegisterAgentRequest) -> RegisterAgentRequest:
    """The request as far as it asks for something: the agent's create_time
    and update_time are ignored (a retry may send the agent as returned)."""
    key = RegisterAgentRequest()
    key.CopyFrom(request)
    key.agent.ClearField("create_time")
    key.agent.ClearField("update_time")
    return key


def _as_run(request) -> RunAgentRequest:
    """RunAgent and StreamAgent share runs under one request_id."""
    return RunAgentRequest(request_id=request.request_id, context=request.context,
                           agent=request.agent, input=request.input,
                           model_override=request.model_override,
                           variables=request.variables,
                           disable_fallback=request.disable_fallback)
