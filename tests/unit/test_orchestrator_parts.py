"""Pieces of the orchestrator on their own: the event bus (middleware,
priorities, failing subscribers, slow remote subscribers), the execution
context's fork, template references, the deadline scope and what counts
against a provider's breaker; runs and workflows over stand-in providers,
cancelled at chosen points."""

import asyncio
import contextlib

import grpc
import pytest

from hivemesh.common.v1 import RequestContext
from hivemesh.orchestrator.v1 import AgentStart, EventPriority, EventType, GenerationChunk
from hivemesh.runtime import errors
from hivemesh.services.orchestrator import templates
from hivemesh.services.orchestrator.context import ExecutionContext, step_id
from hivemesh.services.orchestrator.events import EventBus, EventSink, Subscription
from hivemesh.services.orchestrator.policy import Providers, deadline_scope, remaining_s
from hivemesh.services.orchestrator.runner import AgentRunner
from hivemesh.services.orchestrator.state import LocalLedger
from hivemesh.services.orchestrator.tools import ToolRegistry

START = EventType.EVENT_TYPE_AGENT_START
CHUNK = EventType.EVENT_TYPE_GENERATION_CHUNK


def _runner(providers) -> AgentRunner:
    return AgentRunner(providers, ToolRegistry(providers), LocalLedger(100, 60.0))


def emit(sink, event_type=START, agent="coder", workflow="wf-1"):
    payload = AgentStart(input="x") if event_type == START else GenerationChunk(text="t")
    return sink.emit(event_type, RequestContext(workflow_id=workflow), "0" * 32, payload,
                     agent=agent)


def test_bus_runs_middleware_then_subscribers_by_priority_and_survives_failures():
    bus = EventBus()
    order = []

    def enrich(event):
        event.context.tenant_id = "acme"
        return event
    bus.use(enrich)
    bus.use(lambda e: None if e.agent == "secret" else e)  # drops
    bus.subscribe(lambda e: order.append(("low", e.context.tenant_id)), priority=1)
    bus.subscribe(lambda e: 1 / 0, priority=5)
    bus.subscribe(lambda e: order.append(("high", e.context.tenant_id)), priority=9)
    sink = EventSink(bus)
    emit(sink)
    assert emit(sink, agent="secret") is None
    assert order == [("high", "acme"), ("low", "acme")]
    assert bus.subscriber_errors == 1
    assert sink.sequence == 2


def test_a_subscriber_that_unsubscribes_while_called_leaves_the_others_the_event():
    bus = EventBus()
    seen = []
    unsubscribe = None

    def once(event):
        seen.append("once")
        unsubscribe()
    unsubscribe = bus.subscribe(once, priority=5)
    bus.subscribe(lambda e: seen.append("next"), priority=1)
    bus.subscribe(lambda e: seen.append("last"))
    sink = EventSink(bus)
    emit(sink)
    emit(sink)
    assert seen == ["once", "next", "last", "next", "last"]


def test_subscribers_of_equal_priority_keep_the_order_they_subscribed_in_after_unsubscribes():
    bus = EventBus()
    seen = []
    unsubscribe_a = bus.subscribe(lambda e: seen.append("a"))
    unsubscribe_b = bus.subscribe(lambda e: seen.append("b"))
    bus.subscribe(lambda e: seen.append("c"))
    unsubscribe_a()
    unsubscribe_b()
    bus.subscribe(lambda e: seen.append("d"))
    emit(EventSink(bus))
    assert seen == ["c", "d"]


def test_step_ids_of_different_requests_never_meet():
    # Request "job" with step "a:b0" (a fan-out branch) and request "job:a"
    # with step "b0" (a task) joined naively give the same id.
    assert step_id("job", "a:b0") != step_id("job:a", "b0")
    assert step_id("job%3Aa", "b0") != step_id("job:a", "b0")
    # An id without ":" or "%" is as it always was (records kept by earlier
    # versions still match), and a step id is a valid request id.
    assert step_id("run-1", "reserve") == "run-1:reserve"
    long = step_id("x:" * 70, "gen", 1)
    assert long.startswith("h-") and len(long) <= 128
    assert step_id("job:a", "b0") == step_id("job:a", "b0")


def test_default_priorities_and_subscription_filters():
    bus = EventBus()
    chunks = Subscription(types=frozenset({CHUNK}))
    important = Subscription(min_priority=EventPriority.EVENT_PRIORITY_NORMAL, agent="coder")
    other_workflow = Subscription(workflow_id="wf-2")
    for s in (chunks, important, other_workflow):
        bus.add_subscription(s)
    sink = EventSink(bus)
    emit(sink, CHUNK)
    emit(sink, START)
    emit(sink, START, agent="tester")
    assert [e.priority for e in [chunks.queue.get_nowait()]] == [EventPriority.EVENT_PRIORITY_LOW]
    assert important.queue.qsize() == 1 and important.queue.get_nowait().type == START
    assert other_workflow.queue.empty()


def test_a_slow_subscriber_is_marked_with_its_dropped_events():
    bus = EventBus()
    slow = Subscription(queue_size=2)
    bus.add_subscription(slow)
    sink = EventSink(bus)
    for _ in range(5):
        emit(sink)
    assert slow.queue.qsize() == 2 and slow.dropped == 3


def test_fork_makes_a_child_context():
    parent = ExecutionContext.from_request(RequestContext(tenant_id="acme", workflow_id="wf",
                                                         session_id="s"), "triage", "req-1")
    parent.state["seen"] = 1
    child = parent.fork("expert", "t1", task_id="t1")
    assert child.parent_id == parent.context_id and child.context_id != parent.context_id
    assert (child.tenant_id, child.workflow_id, child.task_id, child.agent) == (
        "acme", "wf", "t1", "expert")
    child.state["seen"] = 2
    assert parent.state["seen"] == 1
    proto = child.to_proto()
    assert proto.parent_context_id == parent.context_id and proto.agent_id == "expert"


def test_context_ids_follow_the_request_and_the_callers_agent_id_is_kept():
    def start(request_id, **ctx):
        return ExecutionContext.from_request(RequestContext(tenant_id="acme", **ctx), "coder",
                                             request_id)
    first, retry = start("req-1"), start("req-1")
    assert first.context_id == retry.context_id != start("req-2").context_id
    assert first.fork("x", "t1").context_id == retry.fork("x", "t1").context_id
    assert first.fork("x", "t1").context_id != first.fork("x", "t2").context_id
    own = start("req-1", context_id="ctx-mine", agent_id="custom-x")
    assert own.context_id == "ctx-mine" and own.to_proto().agent_id == "custom-x"
    assert start("req-1").to_proto().agent_id == "coder"
    assert own.fork("reviewer", "t").to_proto().agent_id == "reviewer"


def test_template_references():
    text = "Review {{ tasks.code.output }} for {{variables.user}}"
    assert templates.problems(text, {"user": "ada"}, frozenset({"code"}), allow_tasks=True) == []
    assert templates.render(text, {"user": "ada"}, {"code": "X"}) == "Review X for ada"
    assert templates.problems(text, {}, frozenset(), allow_tasks=True) == [
        "{{tasks.code.output}}: task 'code' is not a dependency",
        "{{variables.user}}: no variable 'user' was given"]
    assert templates.problems("{{tasks.code.output}}", {}) == [
        "{{tasks.code.output}}: unknown reference"]
    assert templates.problems("{{env.HOME}}", {}) == ["{{env.HOME}}: unknown reference"]


def test_a_backslash_before_two_braces_writes_them_literally():
    r"""``\{{`` is no reference and renders as ``{{``: references,
    unknown_references, problems and render all read it so; references
    around it still work, and values are never read as templates."""
    text = r"Fill \{{name}} and \{{ tasks.x.output }} for {{variables.user}}: {{tasks.code.output}}"
    assert templates.references(text) == ["variables.user", "tasks.code.output"]
    assert templates.problems(text, {"user": "ada"}, frozenset({"code"}), allow_tasks=True) == []
    assert templates.unknown_references(r"Answer in \{{json}} for {{variables.user}}") == []
    assert templates.render(text, {"user": "ada"}, {"code": r"\{{kept}} {{variables.user}}"}) \
        == r"Fill {{name}} and {{ tasks.x.output }} for ada: \{{kept}} {{variables.user}}"
    # The escape takes the backslash and the two braces only.
    assert templates.render(r"a \{ b \\{{c}} {\{{d}}} \{{{variables.user}}", {"user": "ada"}) \
        == r"a \{ b \{{c}} {{{d}}} {{{variables.user}}"
    assert templates.problems("{{name}}", {}) == ["{{name}}: unknown reference"]


async def test_provider_channels_leave_their_deadlines_to_the_calls(monkeypatch):
    """Every call to a provider carries the deadline carved for it (up to
    CALL_TIMEOUT_S): the service config's per-method timeouts (artifact
    10 s, information 5 s, ...) must not cut it shorter on the channel."""
    from hivemesh.client import channel as client_channel
    from hivemesh.services.orchestrator import policy
    opened = []

    def spy(target, api, tls=None, **kwargs):
        opened.append((api, kwargs))
        return client_channel.open_channel(target, api, tls, **kwargs)

    monkeypatch.setattr(policy, "open_channel", spy)
    providers = Providers({"artifact": "127.0.0.1:1", "information": "127.0.0.1:1"})
    try:
        assert sorted(api for api, _ in opened) == ["artifact", "information"]
        assert all(kwargs.get("timeouts") is False for _, kwargs in opened)
        config = client_channel.channel_options("information", timeouts=False)
        assert '"timeout"' not in str(config)
    finally:
        await providers.close()


def test_a_workflow_response_too_big_sheds_copies_then_tool_records_before_failing():
    from hivemesh.orchestrator.v1 import RunWorkflowResponse, TaskResult, ToolCallRecord
    from hivemesh.services.orchestrator.workflows import fit_response
    big = "x" * 100_000
    response = RunWorkflowResponse(tasks=[TaskResult(task_id=f"t{i}", output="short")
                                          for i in range(3)])
    for task in response.tasks:
        task.result.output = "short"
        task.result.tool_calls.extend([ToolCallRecord(tool_call_id="c", tool_name="get",
                                                      arguments="{}", result=big)])
    fitted = fit_response(response, 256 * 1024)
    assert [t.output for t in fitted.tasks] == ["short"] * 3  # the tasks' outputs stay
    calls = [c for t in fitted.tasks for c in t.result.tool_calls]
    assert [(c.tool_name, c.result) for c in calls] == [("get", "")] * 3
    with pytest.raises(errors.ServiceError) as err:
        fit_response(RunWorkflowResponse(tasks=[TaskResult(task_id="t", output=big * 3)]),
                     256 * 1024)
    assert err.value.reason == "PAYLOAD_TOO_LARGE"


async def test_deadline_scope_nests_and_fails_fast():
    assert remaining_s() is None
    with deadline_scope(10):
        with deadline_scope(0.01):
            assert remaining_s() <= 0.01
        assert remaining_s() > 9
        with deadline_scope(100):
            assert remaining_s() <= 10  # never later than the enclosing one
    providers = Providers({"llm": "127.0.0.1:1"}, min_call_time_s=0.05)
    try:
        with deadline_scope(0.01), pytest.raises(errors.ServiceError) as err:
            await providers.call("llm", "Generate", None)
        assert err.value.code.name == "DEADLINE_EXCEEDED"
        assert err.value.reason == "DEADLINE_TOO_SHORT"
        with pytest.raises(errors.ServiceError) as err:
            await providers.call("memory", "SearchMemories", None)
        assert err.value.metadata == {"provider": "memory"}
    finally:
        await providers.close()
    await asyncio.sleep(0)


async def _llm_that_hangs(answer: dict):
    """A gRPC server standing in for the LLM service: Generate answers at
    once while ``answer["generate"]`` is set, then waits until its caller
    gives up; ListModels fails at once with DEADLINE_EXCEEDED and the reason
    in ``answer["reason"]``. Returns (server, address)."""
    from grpc_status import rpc_status

    async def generate(request, context):
        if not answer["generate"]:
            await asyncio.Event().wait()
        return b""

    async def early(request, context):
        error = errors.ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    answer["reason"], "out of time")
        status = error.to_status("hivemesh.llm")
        await context.abort(error.code, status.message,
                            trailing_metadata=rpc_status.to_status(status).trailing_metadata)

    def handler(behavior):
        return grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=lambda b: b, response_serializer=lambda m: m)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "hivemesh.llm.v1.LlmService", {"Generate": handler(generate),
                                       "ListModels": handler(early)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _fails(providers: Providers, method: str, request,
                 timeout_s: float | None) -> errors.ServiceError:
    with contextlib.ExitStack() as scope:
        if timeout_s is not None:
            scope.enter_context(deadline_scope(timeout_s))
        with pytest.raises(errors.ServiceError) as err:
            await providers.call("llm", method, request)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    return err.value


async def test_a_call_cut_short_by_the_callers_deadline_does_not_count_against_the_breaker():
    """A call whose time ran out only because the run had less left than
    the call timeout, and less than twice what the provider usually takes,
    says nothing about the provider: it neither counts as a failure nor, as
    the half-open breaker's probe, closes or re-opens the breaker (it hands
    the probe back). A call that had the whole call timeout, or that the
    provider failed early, still counts."""
    from hivemesh.llm.v1 import GenerateRequest, ListModelsRequest
    answer = {"generate": True, "reason": "DEADLINE_TOO_SHORT"}
    server, address = await _llm_that_hangs(answer)
    providers = Providers({"llm": address}, call_timeout_s=0.5, breaker_failure_threshold=2,
                          breaker_reset_s=0.05)
    breaker = providers.breaker("llm")
    # Its usual time: as if its answers took 0.2 s (this stand-in answers at once).
    for _ in range(3):
        await providers.call("llm", "Generate", GenerateRequest())
    llm = providers._providers["llm"]
    llm.latencies.clear()
    for method, times in (("Generate", 3), ("ListModels", 1)):
        for _ in range(times):
            llm.answered(method, 0.2)
    answer["generate"] = False
    try:
        for _ in range(3):  # the caller's deadline, shorter than the usual time
            await _fails(providers, "Generate", GenerateRequest(), 0.1)
        # The provider saying too little of the caller's deadline was left.
        assert (await _fails(providers, "ListModels", ListModelsRequest(), 0.3)).reason == \
            "DEADLINE_TOO_SHORT"
        assert (breaker.state, breaker.failures) == ("closed", 0)
        # Out of time early for a reason of the provider's own: it counts.
        answer["reason"] = "UPSTREAM_ERROR"
        await _fails(providers, "ListModels", ListModelsRequest(), 0.3)
        assert (breaker.state, breaker.failures) == ("closed", 1)
        await _fails(providers, "Generate", GenerateRequest(), None)  # the whole call timeout
        assert breaker.state == "open"

        await asyncio.sleep(0.06)  # half-open: the next call is the probe
        await _fails(providers, "Generate", GenerateRequest(), 0.1)
        assert breaker.transitions == ["closed->open", "open->half_open"]
        probe = breaker.allow()  # handed back: another call may probe
        assert probe is not None and probe.probe
        breaker.release_probe(probe)
        await _fails(providers, "Generate", GenerateRequest(), None)  # out of the call timeout
        assert breaker.state == "open"
    finally:
        await providers.close()
        await server.stop(0)


async def test_a_provider_that_hangs_opens_its_breaker_whatever_deadlines_callers_send():
    """Cut short by the caller's deadline, a call that had more than twice
    the provider's usual time (or with no usual time known yet) counts."""
    from hivemesh.llm.v1 import GenerateRequest
    answer = {"generate": False, "reason": "DEADLINE_TOO_SHORT"}
    server, address = await _llm_that_hangs(answer)
    providers = Providers({"llm": address}, call_timeout_s=5, breaker_failure_threshold=2,
                          breaker_reset_s=10)
    breaker = providers.breaker("llm")
    try:
        await _fails(providers, "Generate", GenerateRequest(), 0.1)  # no usual time yet
        assert breaker.failures == 1
        answer["generate"] = True
        await providers.call("llm", "Generate", GenerateRequest())  # answers in far less
        assert breaker.failures == 0
        answer["generate"] = False
        await _fails(providers, "Generate", GenerateRequest(), 0.1)
        await _fails(providers, "Generate", GenerateRequest(), 0.1)
        assert breaker.state == "open"
    finally:
        await providers.close()
        await server.stop(0)


def _no_models():
    """ListModels of an LLM service that lists no alias (no fallback
    chains, no limits): the runs here use the models they name."""
    from hivemesh.llm.v1 import ListModelsResponse
    return ListModelsResponse()


class _Information:
    """Stands in for the providers: Reserve hangs the first time (until the
    run is cancelled), Commit hangs when asked to; every call is recorded."""

    def __init__(self, hang_commit: bool = False) -> None:
        self.calls: list[str] = []
        self.hang_commit = hang_commit

    async def call(self, name, method, request, **kwargs):
        from hivemesh.information.v1 import CommitResponse, ReleaseResponse, ReserveResponse
        from hivemesh.llm.v1 import GenerateResponse, Message
        if method == "ListModels":
            return _no_models()
        self.calls.append(method)
        if method == "Reserve":
            if self.calls.count("Reserve") == 1 and not self.hang_commit:
                await asyncio.Event().wait()
            return ReserveResponse(reservation_id="rsv-1")
        if method == "Generate":
            return GenerateResponse(message=Message(content="done"), model="m")
        if method == "Commit":
            if self.calls.count("Commit") == 1 and self.hang_commit:
                await asyncio.Event().wait()
            return CommitResponse(cost_micros=5)
        if method == "Release":
            return ReleaseResponse(released=True)
        raise AssertionError(method)


async def _cancel_when(runner, fake: _Information, method: str) -> None:
    from hivemesh.orchestrator.v1 import AgentDefinition
    from hivemesh.services.orchestrator.runner import RunOptions
    agent = AgentDefinition(name="coder", model="m")
    ctx = ExecutionContext.from_request(RequestContext(tenant_id="acme"), "coder", "req-1")
    run = asyncio.create_task(runner.run(agent, ctx, RunOptions("req-1", "x"),
                                         EventSink(EventBus())))
    for _ in range(1000):
        if method in fake.calls or run.done():
            break
        await asyncio.sleep(0.001)
    assert method in fake.calls and not run.done(), (fake.calls, run.done() and run.exception())
    await asyncio.sleep(0.01)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    await asyncio.gather(*list(runner._settling))


async def test_a_run_cancelled_while_reserving_releases_the_hold_it_may_have_got():
    fake = _Information()
    runner = _runner(fake)
    await _cancel_when(runner, fake, "Reserve")
    assert fake.calls == ["Reserve", "Reserve", "Release"]


async def test_a_run_cancelled_while_committing_still_records_the_spend():
    fake = _Information(hang_commit=True)
    runner = _runner(fake)
    await _cancel_when(runner, fake, "Commit")
    # The commit is sent again (its request id answers once), nothing released.
    assert fake.calls[-2:] == ["Commit", "Commit"] and "Release" not in fake.calls


async def test_waiting_on_an_event_queue_leaves_nothing_behind():
    from hivemesh.services.orchestrator.servicer import _next
    queue: asyncio.Queue = asyncio.Queue()
    never = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(_next(queue, {never}))
    await asyncio.sleep(0)
    waiting.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0)
    left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert left == []
    queue.put_nowait("event")
    assert await _next(queue, {never}) == (True, "event")
    assert await _next(queue, {never}, timeout=0.01) == (False, None)
    never.cancel()


class _NoChannels:
    """Stands in for the providers of a tool registry: no channel is opened
    (``add``); a subclass answers ``call``."""

    def add(self, *args, **kwargs):
        pass


async def test_concurrent_runs_share_one_listing_of_an_unreachable_tool_server():
    from hivemesh.services.orchestrator import tools as tool_registry

    class Down(_NoChannels):
        listings = 0

        async def call(self, name, method, request, **kwargs):
            Down.listings += 1
            await asyncio.sleep(0.05)
            raise errors.ServiceError(grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE", "down")

    registry = tool_registry.ToolRegistry(Down())
    registry.add_server("wx", "127.0.0.1:1")
    await registry.refresh()
    assert Down.listings == 1
    registry._listed_at = float("-inf")  # as if RELIST_AFTER_S had passed
    missing = await asyncio.gather(*(registry.find(["weather"]) for _ in range(5)))
    assert missing == [["weather"]] * 5 and Down.listings == 2


# -- workflows cut off while they clean up -------------------------------------


class _Steered:
    """Stands in for every provider of a workflow's runs. Each generation
    uses 7 tokens and each commit costs 5; ``hooks[(method, model)]`` (the
    model a Reserve, Generate, Commit or Release is for) runs first, with
    the number of such calls so far, and may wait, fail, or return the
    response. Every call is recorded as (method, model)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.hooks: dict[tuple[str, str], object] = {}
        self.reserved: dict[str, str] = {}  # reservation id -> model

    async def call(self, name, method, request, **kwargs):
        from hivemesh.common.v1 import Usage
        from hivemesh.information.v1 import CommitResponse, ReleaseResponse, ReserveResponse
        from hivemesh.llm.v1 import GenerateResponse, Message
        model = getattr(request, "model", "") or self.reserved.get(
            getattr(request, "reservation_id", ""), "")
        if method == "ListModels":
            return _no_models()
        self.calls.append((method, model))
        hook = self.hooks.get((method, model))
        if hook is not None:
            answer = await hook(self.calls.count((method, model)))
            if answer is not None:
                return answer
        if method == "Reserve":
            self.reserved[f"rsv:{request.request_id}"] = model
            return ReserveResponse(reservation_id=f"rsv:{request.request_id}")
        if method == "Generate":
            return GenerateResponse(
                message=Message(content=f"from {model}"), model=model,
                usage=Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7))
        if method == "Commit":
            return CommitResponse(cost_micros=5, currency="USD")
        if method == "Release":
            return ReleaseResponse(released=True)
        raise AssertionError(method)


def _workflow_run(providers, *tasks, agents=("coder",)):
    """A WorkflowRun of ``tasks`` over the real runner, and the events it sends."""
    from hivemesh.orchestrator.v1 import AgentDefinition, RunWorkflowRequest, WorkflowDefinition
    from hivemesh.services.orchestrator.agents import AgentRegistry
    from hivemesh.services.orchestrator.workflows import WorkflowRun
    bus = EventBus()
    events = []
    bus.subscribe(events.append)
    request = RunWorkflowRequest(request_id="wf-1", workflow=WorkflowDefinition(tasks=tasks))
    base = ExecutionContext.from_request(RequestContext(tenant_id="acme"), "", "wf-1")
    runner = _runner(providers)
    workflow = WorkflowRun(runner, AgentRegistry.of(
        AgentDefinition(name=name, model="main") for name in agents), request, base,
        EventSink(bus), 4, LocalLedger(100, 60.0), 60.0)
    return workflow, events


async def _run(workflow):
    """The workflow run as the servicer runs it: within the request's time."""
    with deadline_scope(60):
        return await workflow.run()


def _blocks(entered: asyncio.Event, until: asyncio.Event):
    """A hook that, on the first call, signals ``entered`` and waits for
    ``until``."""
    async def hook(count: int) -> None:
        if count == 1:
            entered.set()
            await until.wait()
    return hook


def _after(event: asyncio.Event):
    async def hook(count: int) -> None:
        await event.wait()
    return hook


async def _drained(gate: asyncio.Event) -> None:
    """Opens ``gate`` and waits for what still waited on it (calls left to
    finish in the background)."""
    gate.set()
    await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not asyncio.current_task()))


async def _cancel_once(running: asyncio.Task, entered: asyncio.Event,
                       gate: asyncio.Event) -> None:
    """Cancels the workflow ``running`` once ``entered`` is set, checks that
    the cancellation ends it, then lets everything it left go on finish."""
    await asyncio.wait_for(entered.wait(), 10)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await _drained(gate)


def _reported(events) -> dict[str, list]:
    """Each task's TASK_COMPLETE payloads, as sent before WORKFLOW_COMPLETE
    (which must be the last event)."""
    from hivemesh.orchestrator.v1 import EventType as T
    assert events and events[-1].type == T.EVENT_TYPE_WORKFLOW_COMPLETE
    assert [e.type for e in events].count(T.EVENT_TYPE_WORKFLOW_COMPLETE) == 1
    ended: dict[str, list] = {}
    for event in events:
        if event.type == T.EVENT_TYPE_TASK_COMPLETE:
            ended.setdefault(event.task_complete.task_id, []).append(event.task_complete)
    return ended


@pytest.mark.parametrize("cleaning_up_after", ["a failed task", "a first cancellation"])
async def test_a_workflow_cancelled_while_it_cleans_up_still_ends_every_task(
        cleaning_up_after):
    from hivemesh.orchestrator.v1 import TaskSpec, TaskStatus
    fake = _Steered()
    generating, releasing, gate = asyncio.Event(), asyncio.Event(), asyncio.Event()
    fake.hooks[("Generate", "main")] = _blocks(generating, gate)
    fake.hooks[("Release", "main")] = _blocks(releasing, gate)
    tasks = [TaskSpec(task_id="slow", agent="coder", input_template="x"),
             TaskSpec(task_id="after", agent="coder", input_template="y", depends_on=["slow"])]
    if cleaning_up_after == "a failed task":
        async def refused(count: int) -> None:
            await generating.wait()
            raise errors.ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "REFUSED", "no")
        fake.hooks[("Generate", "bad")] = refused
        tasks.append(TaskSpec(task_id="bad", agent="coder", model="bad", input_template="z"))
    workflow, events = _workflow_run(fake, *tasks)
    running = asyncio.create_task(_run(workflow))
    await asyncio.wait_for(generating.wait(), 10)
    if cleaning_up_after == "a first cancellation":
        running.cancel()
    # The run of "slow" is cancelled and releases its hold: the workflow is
    # cancelled (again) meanwhile.
    await _cancel_once(running, releasing, gate)
    ended = _reported(events)
    want = {"slow": TaskStatus.TASK_STATUS_CANCELLED, "after": TaskStatus.TASK_STATUS_CANCELLED}
    if cleaning_up_after == "a failed task":
        want["bad"] = TaskStatus.TASK_STATUS_FAILED
    assert {t: [r.status for r in results] for t, results in ended.items()} == {
        t: [status] for t, status in want.items()}
    assert {t: r.status for t, r in workflow.results.items()} == want


async def test_a_fan_out_cancelled_while_it_stops_its_other_branch_reports_both():
    from hivemesh.orchestrator.v1 import (
        CombineMode, FanOut, ModelList, TaskSpec, TaskStatus)
    fake = _Steered()
    generating, releasing, gate = asyncio.Event(), asyncio.Event(), asyncio.Event()
    fake.hooks[("Generate", "slow")] = _blocks(generating, gate)
    fake.hooks[("Generate", "fast")] = _after(generating)
    fake.hooks[("Release", "slow")] = _blocks(releasing, gate)
    workflow, events = _workflow_run(fake, TaskSpec(
        task_id="first", agent="coder", input_template="x", fan_out=FanOut(
            models=ModelList(models=["slow", "fast"]), combine=CombineMode.COMBINE_MODE_FIRST)))
    running = asyncio.create_task(_run(workflow))
    # "fast" answers first; "slow" is cancelled and releases its hold: the
    # workflow is cancelled meanwhile.
    await _cancel_once(running, releasing, gate)
    (task,) = _reported(events)["first"]
    assert task.status == TaskStatus.TASK_STATUS_CANCELLED
    slow, fast = task.branches
    assert fast.selected and fast.result.output == "from fast"
    assert slow.error.code == grpc.StatusCode.CANCELLED.value[0] and not slow.selected
    assert task.usage.total_tokens == 7 and task.cost_micros == 5


# -- a spend recorded again after its run was cancelled -----------------------


async def test_a_fan_out_counts_the_spend_its_cancelled_branch_was_committing():
    from hivemesh.orchestrator.v1 import CombineMode, FanOut, ModelList, TaskSpec, TaskStatus
    from hivemesh.orchestrator.v1 import EventType as T
    fake = _Steered()
    committing, gate = asyncio.Event(), asyncio.Event()
    # "slow" has generated and is committing when "fast" answers.
    fake.hooks[("Commit", "slow")] = _blocks(committing, gate)
    fake.hooks[("Generate", "fast")] = _after(committing)
    workflow, events = _workflow_run(fake, TaskSpec(
        task_id="first", agent="coder", input_template="x", fan_out=FanOut(
            models=ModelList(models=["slow", "fast"]), combine=CombineMode.COMBINE_MODE_FIRST)))
    response = await asyncio.wait_for(_run(workflow), 10)
    (task,) = response.tasks
    assert task.status == TaskStatus.TASK_STATUS_SUCCEEDED, task.error
    slow, fast = task.branches
    assert fast.selected and slow.error.code == grpc.StatusCode.CANCELLED.value[0]
    # The commit cut off was sent again and answered: both generations, and
    # both commits, are the task's.
    assert fake.calls.count(("Commit", "slow")) == 2
    (failed,) = [e.agent_failed for e in events if e.type == T.EVENT_TYPE_AGENT_FAILED]
    assert (failed.usage.total_tokens, failed.cost_micros, failed.currency) == (7, 5, "USD")
    assert not failed.degraded
    assert (task.usage.total_tokens, task.cost_micros) == (14, 10)
    assert (response.usage.total_tokens, response.cost_micros) == (14, 10)
    await _drained(gate)


async def _cancelled_while_committing(fake: _Steered, *, cancel_again: bool = False):
    """Runs an agent on model "main", cancels it while its first Commit is
    under way (and again, with ``cancel_again``, once the Commit is sent
    again); returns what the run reported (on_cancel, AGENT_FAILED)."""
    from hivemesh.orchestrator.v1 import AgentDefinition
    from hivemesh.orchestrator.v1 import EventType as T
    from hivemesh.services.orchestrator.runner import RunOptions
    bus = EventBus()
    events, told = [], []
    bus.subscribe(events.append)
    runner = _runner(fake)
    ctx = ExecutionContext.from_request(RequestContext(tenant_id="acme"), "coder", "req-1")
    run = asyncio.create_task(runner.run(
        AgentDefinition(name="coder", model="main"), ctx,
        RunOptions("req-1", "x", on_cancel=told.append), EventSink(bus)))
    await asyncio.wait_for(fake.first_commit.wait(), 10)
    run.cancel()
    if cancel_again:
        await asyncio.wait_for(fake.second_commit.wait(), 10)
        run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    (failed,) = [e.agent_failed for e in events if e.type == T.EVENT_TYPE_AGENT_FAILED]
    assert told == [failed]
    return failed


def _committing(fake: _Steered, second):
    """Commit of "main": the first waits (for the run's cancellation), the
    second runs ``second``."""
    fake.first_commit, fake.second_commit, fake.gate = (
        asyncio.Event(), asyncio.Event(), asyncio.Event())

    async def hook(count: int) -> None:
        if count == 1:
            fake.first_commit.set()
            await fake.gate.wait()
        else:
            fake.second_commit.set()
            await second()
    fake.hooks[("Commit", "main")] = hook


async def test_a_run_cancelled_while_committing_reports_what_the_commit_sent_again_charged():
    fake = _Steered()

    async def answers() -> None:
        return None
    _committing(fake, answers)
    failed = await _cancelled_while_committing(fake)
    assert (failed.usage.total_tokens, failed.cost_micros, failed.currency) == (7, 5, "USD")
    assert not failed.degraded
    await _drained(fake.gate)


async def test_a_spend_not_recorded_after_a_cancellation_is_counted_without_its_cost():
    from hivemesh.orchestrator.v1 import DegradedComponent
    fake = _Steered()

    async def fails() -> None:
        raise errors.ServiceError(grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE", "down")
    _committing(fake, fails)
    failed = await _cancelled_while_committing(fake)
    assert (failed.usage.total_tokens, failed.cost_micros) == (7, 0)
    (note,) = failed.degraded
    assert note.component == DegradedComponent.DEGRADED_COMPONENT_BUDGET
    assert note.reason == "BACKEND_UNAVAILABLE" and "down" in note.message
    await _drained(fake.gate)


async def test_a_commit_sent_again_that_fails_releases_the_hold():
    """Cancelled while committing, the run left the hold to the commit it
    sends again; when that commit fails, nothing settled the hold: it is
    released, as the hold of a run whose commit failed is."""
    fake = _Steered()

    async def fails() -> None:
        raise errors.ServiceError(grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE", "down")
    _committing(fake, fails)
    await _cancelled_while_committing(fake)
    await _drained(fake.gate)
    assert fake.calls.count(("Commit", "main")) == 2
    assert fake.calls[-1] == ("Release", "main")


async def test_a_run_cancelled_again_reports_its_commit_as_still_pending():
    from hivemesh.orchestrator.v1 import DegradedComponent
    fake = _Steered()
    _committing(fake, lambda: fake.gate.wait())
    failed = await _cancelled_while_committing(fake, cancel_again=True)
    assert (failed.usage.total_tokens, failed.cost_micros) == (7, 0)
    (note,) = failed.degraded
    assert note.component == DegradedComponent.DEGRADED_COMPONENT_BUDGET
    assert "pending" in note.message
    # The commit sent again still ends (and settles the hold).
    await _drained(fake.gate)
    assert fake.calls.count(("Commit", "main")) == 2 and ("Release", "main") not in fake.calls


async def test_a_failed_run_cancelled_while_releasing_its_hold_still_counts_its_spend():
    from hivemesh.common.v1 import Usage
    from hivemesh.llm.v1 import GenerateResponse, Message, ToolCall
    from hivemesh.orchestrator.v1 import TaskSpec, TaskStatus
    from hivemesh.orchestrator.v1 import EventType as T
    fake = _Steered()
    releasing, gate = asyncio.Event(), asyncio.Event()

    async def tool_then_failure(count: int):
        if count == 1:  # paid for (committed) before the run fails
            return GenerateResponse(
                message=Message(tool_calls=[ToolCall(id="c1", name="lookup", arguments="{}")]),
                model="main", usage=Usage(prompt_tokens=3, completion_tokens=4,
                                          total_tokens=7))
        raise errors.ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "REFUSED", "no")
    fake.hooks[("Generate", "main")] = tool_then_failure
    fake.hooks[("Release", "main")] = _blocks(releasing, gate)
    workflow, events = _workflow_run(fake, TaskSpec(task_id="a", agent="coder",
                                                    input_template="x"))
    running = asyncio.create_task(_run(workflow))
    # The run failed and releases the hold of its second generation: the
    # workflow is cancelled meanwhile.
    await _cancel_once(running, releasing, gate)
    (task,) = _reported(events)["a"]
    assert task.status == TaskStatus.TASK_STATUS_CANCELLED
    (failed,) = [e.agent_failed for e in events if e.type == T.EVENT_TYPE_AGENT_FAILED]
    assert (failed.usage.total_tokens, failed.cost_micros) == (7, 5)
    assert (task.usage.total_tokens, task.cost_micros) == (7, 5)
    (complete,) = [e.workflow_complete for e in events
                   if e.type == T.EVENT_TYPE_WORKFLOW_COMPLETE]
    assert (complete.usage.total_tokens, complete.cost_micros) == (7, 5)


async def test_a_run_whose_commit_fails_reports_the_tokens_it_generated():
    from hivemesh.orchestrator.v1 import AgentDefinition
    from hivemesh.services.orchestrator.runner import RunError, RunOptions
    fake = _Steered()

    async def fails(count: int) -> None:
        raise errors.ServiceError(grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE", "down")
    fake.hooks[("Commit", "main")] = fails
    runner = _runner(fake)
    ctx = ExecutionContext.from_request(RequestContext(tenant_id="acme"), "coder", "req-1")
    with pytest.raises(RunError) as err:
        await runner.run(AgentDefinition(name="coder", model="main"), ctx,
                         RunOptions("req-1", "x"), EventSink(EventBus()))
    assert err.value.error.reason == "BACKEND_UNAVAILABLE"
    failed = err.value.failed
    assert (failed.usage.total_tokens, failed.cost_micros) == (7, 0)
    assert fake.calls[-1] == ("Release", "main")  # the hold is not kept


# -- a defect inside a workflow task -------------------------------------------


async def test_an_unexpected_error_in_a_task_fails_it_and_ends_the_workflow():
    from hivemesh.orchestrator.v1 import TaskSpec, TaskStatus, WorkflowStatus
    fake = _Steered()
    generating, gate = asyncio.Event(), asyncio.Event()
    fake.hooks[("Generate", "main")] = _blocks(generating, gate)
    workflow, events = _workflow_run(
        fake, TaskSpec(task_id="slow", agent="coder", input_template="x"),
        TaskSpec(task_id="broken", agent="coder", model="broken", input_template="y"))
    run = workflow.runner.run

    async def defective(agent, ctx, options, sink):
        if options.model_override == "broken":
            await generating.wait()
            raise RuntimeError("a defect")
        return await run(agent, ctx, options, sink)
    workflow.runner.run = defective
    response = await asyncio.wait_for(_run(workflow), 10)
    await _drained(gate)
    assert response.status == WorkflowStatus.WORKFLOW_STATUS_FAILED
    assert response.error.code == grpc.StatusCode.INTERNAL.value[0]
    ended = _reported(events)
    assert [r.status for r in ended["broken"]] == [TaskStatus.TASK_STATUS_FAILED]
    assert [r.status for r in ended["slow"]] == [TaskStatus.TASK_STATUS_CANCELLED]


# -- a streamed generation cut after some output --------------------------------


class _CutStream:
    """Stands in for the providers of a streamed run without accounting:
    model "first" streams one piece of text and is then cut (``how``: a
    gRPC error, or the stream closing without its end); "second" answers."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.models: list[str] = []

    async def call(self, name, method, request, **kwargs):
        raise AssertionError(method)

    async def stream(self, name, method, request, **kwargs):
        from hivemesh.common.v1 import StreamEnd, StreamOutcome
        from hivemesh.llm.v1 import ContentDelta, Message, StreamGenerateResponse, StreamSummary
        self.models.append(request.model)
        if request.model == "first":
            yield StreamGenerateResponse(delta=ContentDelta(text="half an ans"))
            if self.how == "error":
                raise errors.ServiceError(grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE",
                                          "llm: connection reset")
            return
        yield StreamGenerateResponse(delta=ContentDelta(text="whole"))
        yield StreamGenerateResponse(
            end=StreamEnd(outcome=StreamOutcome.STREAM_OUTCOME_COMPLETED),
            summary=StreamSummary(model=request.model, message=Message(content="whole")))


@pytest.mark.parametrize("how", ["error", "closed"])
async def test_a_streamed_generation_cut_after_output_does_not_fall_back(how):
    from hivemesh.orchestrator.v1 import AgentDefinition, BudgetPolicy
    from hivemesh.orchestrator.v1 import EventType as T
    from hivemesh.services.orchestrator.runner import RunError, RunOptions
    fake = _CutStream(how)
    runner = _runner(fake)
    agent = AgentDefinition(name="coder", model="first", fallback_models=["second"],
                            budget=BudgetPolicy(enforcement=3))
    ctx = ExecutionContext.from_request(RequestContext(), "coder", "req-1")
    bus = EventBus()
    events = []
    bus.subscribe(events.append)
    with deadline_scope(60), pytest.raises(RunError) as failed:
        await runner.run(agent, ctx, RunOptions("req-1", "x", stream_chunks=True),
                         EventSink(bus))
    # The client holds the first model's text: another model's would not
    # continue it.
    assert fake.models == ["first"]
    assert failed.value.error.code == grpc.StatusCode.UNAVAILABLE
    assert failed.value.failed.partial_output == "half an ans"
    assert [e.generation_chunk.text for e in events if e.type == T.EVENT_TYPE_GENERATION_CHUNK
            ] == ["half an ans"]


class _CutAndTracked(_CutStream):
    """A stream cut as _CutStream's, and an information service that
    records what is tracked."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.tracked = []

    async def call(self, name, method, request, **kwargs):
        from hivemesh.information.v1 import TrackCompletionResponse
        if method != "TrackCompletion":
            raise AssertionError(method)
        self.tracked.append(request)
        return TrackCompletionResponse(cost_micros=7, currency="USD")


@pytest.mark.parametrize("how", ["error", "closed"])
async def test_a_stream_cut_without_its_end_is_charged_an_estimate(how):
    """The LLM service went away mid-stream, so no usage came back: the
    text it had sent was generated (and billed) all the same, and is
    tracked at an estimate instead of not at all."""
    from hivemesh.orchestrator.v1 import AgentDefinition, BudgetPolicy
    from hivemesh.services.orchestrator.runner import RunError, RunOptions
    fake = _CutAndTracked(how)
    runner = _runner(fake)
    agent = AgentDefinition(name="coder", model="first", budget=BudgetPolicy(enforcement=2))
    ctx = ExecutionContext.from_request(RequestContext(), "coder", "req-1")
    with deadline_scope(60), pytest.raises(RunError) as failed:
        await runner.run(agent, ctx, RunOptions("req-1", "x", stream_chunks=True),
                         EventSink(EventBus()))
    (tracked,) = fake.tracked
    assert tracked.model == "first" and not tracked.success
    assert tracked.usage.completion_tokens > 0 and tracked.usage.prompt_tokens > 0
    assert failed.value.failed.cost_micros == 7
    assert failed.value.failed.usage == tracked.usage


def test_tool_calls_get_ids_unlike_any_other_call_of_the_reply():
    from hivemesh.llm.v1 import Message, ToolCall
    from hivemesh.services.orchestrator.runner import _unique_tool_call_ids
    # The model's own id may be the one a call without an id would be given.
    reply = Message(tool_calls=[ToolCall(id="call-1-1", name="a"), ToolCall(id="", name="b"),
                                ToolCall(id="call-1-1", name="c"), ToolCall(id="", name="d")])
    _unique_tool_call_ids(reply, 1)
    ids = [c.id for c in reply.tool_calls]
    assert ids[0] == "call-1-1" and len(set(ids)) == 4 and all(ids)


async def test_memory_search_refuses_a_limit_that_is_not_an_integer():
    from hivemesh.services.orchestrator.tools import ToolCall

    class Memory:
        calls = []

        async def call(self, name, method, request, **kwargs):
            from hivemesh.memory.v1 import SearchMemoriesResponse
            self.calls.append(request.limit)
            return SearchMemoriesResponse()
    memory = Memory()
    registry = ToolRegistry(memory)
    ctx = ExecutionContext.from_request(RequestContext(), "coder", "req-1")
    outcomes = [await registry.execute(ToolCall(
        name="memory_search", arguments=f'{{"query": "x", "limit": {limit}}}',
        tool_call_id="c1", request_id="req-1:tool", ctx=ctx)) for limit in ("true", "3")]
    assert outcomes[0].error is not None and outcomes[0].error.code == "INVALID_ARGUMENTS"
    assert outcomes[1].error is None and memory.calls == [3]


async def test_tool_arguments_with_text_no_message_can_carry_are_a_tool_error():
    from hivemesh.services.orchestrator.tools import ToolCall, parse_arguments

    class Memory:
        async def call(self, name, method, request, **kwargs):
            from hivemesh.memory.v1 import SearchMemoriesResponse
            return SearchMemoriesResponse()
    registry = ToolRegistry(Memory())
    ctx = ExecutionContext.from_request(RequestContext(), "coder", "req-1")
    # Valid JSON: a lone surrogate escape, which is no UTF-8 text.
    outcome = await registry.execute(ToolCall(
        name="memory_search", arguments='{"query": "x \\ud800"}', tool_call_id="c1",
        request_id="req-1:tool", ctx=ctx))
    assert outcome.error is not None and outcome.error.code == "INVALID_ARGUMENTS"
    with pytest.raises(ValueError):  # a handoff's reason or input too
        parse_arguments('{"agent": "b", "reason": "\\udc00"}')


async def test_an_unexpected_error_in_a_fan_out_branch_is_logged_and_fails_only_it(caplog):
    from hivemesh.orchestrator.v1 import (
        CombineMode, FanOut, ModelList, TaskSpec, TaskStatus, WorkflowStatus)
    workflow, events = _workflow_run(_Steered(), TaskSpec(
        task_id="all", agent="coder", input_template="x", fan_out=FanOut(
            models=ModelList(models=["broken", "main"]), combine=CombineMode.COMBINE_MODE_ALL)))
    run = workflow.runner.run

    async def defective(agent, ctx, options, sink):
        if options.model_override == "broken":
            raise RuntimeError("a defect in the branch")
        return await run(agent, ctx, options, sink)
    workflow.runner.run = defective
    with caplog.at_level("ERROR", logger="hivemesh.orchestrator"):
        response = await asyncio.wait_for(_run(workflow), 10)
    assert response.status == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED
    (task,) = response.tasks
    assert task.status == TaskStatus.TASK_STATUS_SUCCEEDED
    broken, main = task.branches
    assert broken.error.code == grpc.StatusCode.INTERNAL.value[0] and main.result.output
    # The error says to see the service log: the defect is there.
    assert any(r.exc_info and "a defect in the branch" in str(r.exc_info[1])
               for r in caplog.records)


async def test_a_tool_server_that_pages_in_a_circle_is_listed_once_not_forever():
    from hivemesh.orchestrator.v1 import ListToolsResponse, ToolDefinition

    class Circular(_NoChannels):
        pages = 0

        async def call(self, name, method, request, **kwargs):
            Circular.pages += 1
            if Circular.pages > 50:
                raise AssertionError("still listing")
            # The same page again and again, always with a next page.
            return ListToolsResponse(tools=[ToolDefinition(name="weather")],
                                     next_page_token="page-2")

    registry = ToolRegistry(Circular())
    registry.add_server("wx", "127.0.0.1:1")
    assert await registry.refresh() == ["wx"]
    assert registry.known("weather") and Circular.pages == 2


async def test_memory_written_back_names_the_generation_that_produced_it():
    from hivemesh.orchestrator.v1 import AgentDefinition, BudgetPolicy, MemoryConfig
    from hivemesh.services.orchestrator.runner import RunOptions

    class Providers:
        generations: list[str] = []
        lineages: list = []

        async def call(self, name, method, request, **kwargs):
            from hivemesh.llm.v1 import GenerateResponse, Message
            from hivemesh.memory.v1 import AddMemoriesResponse
            if method == "Generate":
                self.generations.append(request.request_id)
                return GenerateResponse(message=Message(content="answer"), model=request.model)
            if method == "AddMemories":
                self.lineages += [item.lineage for item in request.items]
                return AddMemoriesResponse()
            raise AssertionError(method)
    fake = Providers()
    agent = AgentDefinition(name="coder", model="main", budget=BudgetPolicy(enforcement=3),
                            memory=MemoryConfig(write_back=True))
    ctx = ExecutionContext.from_request(RequestContext(), "coder", "req-1")
    with deadline_scope(60):
        await _runner(fake).run(agent, ctx, RunOptions("req-1", "question"),
                                EventSink(EventBus()))
    assert fake.lineages and {lin.generation_id for lin in fake.lineages} == {
        fake.generations[-1]}


async def test_a_run_that_ends_at_its_token_cap_succeeds_and_one_over_it_fails():
    from hivemesh.common.v1 import Usage
    from hivemesh.llm.v1 import GenerateResponse, Message
    from hivemesh.orchestrator.v1 import AgentDefinition, BudgetPolicy
    from hivemesh.services.orchestrator.runner import RunError, RunOptions

    class Llm:
        total = 0

        async def call(self, name, method, request, **kwargs):
            assert method == "Generate"
            return GenerateResponse(message=Message(content="answer"), model="main",
                                    usage=Usage(total_tokens=self.total))
    fake = Llm()
    agent = AgentDefinition(name="coder", model="main", budget=BudgetPolicy(
        enforcement=3, max_tokens_per_run=100))
    ctx = ExecutionContext.from_request(RequestContext(), "coder", "req-1")
    fake.total = 100  # all the cap allowed: within it
    with deadline_scope(60):
        result = await _runner(fake).run(agent, ctx, RunOptions("req-1", "x"),
                                         EventSink(EventBus()))
    assert result.output == "answer" and result.usage.total_tokens == 100
    fake.total = 101
    with deadline_scope(60), pytest.raises(RunError) as over:
        await _runner(fake).run(agent, ctx, RunOptions("req-2", "x"), EventSink(EventBus()))
    assert over.value.error.reason == "BUDGET_EXCEEDED"
