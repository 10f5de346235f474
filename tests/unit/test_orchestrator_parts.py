"""Pieces of the orchestrator on their own: the event bus (middleware,
priorities, failing subscribers, slow remote subscribers), the execution
context's fork, template references and the deadline scope."""

import asyncio

import grpc
import pytest

from hivemesh.common.v1 import RequestContext
from hivemesh.orchestrator.v1 import AgentStart, EventPriority, EventType, GenerationChunk
from hivemesh.runtime import errors
from hivemesh.services.orchestrator import templates
from hivemesh.services.orchestrator.context import ExecutionContext
from hivemesh.services.orchestrator.events import EventBus, EventSink, Subscription
from hivemesh.services.orchestrator.policy import Providers, deadline_scope, remaining_s
from hivemesh.services.orchestrator.tools import ToolRegistry

START = EventType.EVENT_TYPE_AGENT_START
CHUNK = EventType.EVENT_TYPE_GENERATION_CHUNK


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


class _Information:
    """Stands in for the providers: Reserve hangs the first time (until the
    run is cancelled), Commit hangs when asked to; every call is recorded."""

    def __init__(self, hang_commit: bool = False) -> None:
        self.calls: list[str] = []
        self.hang_commit = hang_commit

    async def call(self, name, method, request, **kwargs):
        from hivemesh.information.v1 import CommitResponse, ReleaseResponse, ReserveResponse
        from hivemesh.llm.v1 import GenerateResponse, Message
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
    from hivemesh.services.orchestrator.runner import AgentRunner
    from hivemesh.services.orchestrator.state import LocalLedger
    fake = _Information()
    runner = AgentRunner(fake, ToolRegistry(fake), LocalLedger(100, 60))
    await _cancel_when(runner, fake, "Reserve")
    assert fake.calls == ["Reserve", "Reserve", "Release"]


async def test_a_run_cancelled_while_committing_still_records_the_spend():
    from hivemesh.services.orchestrator.runner import AgentRunner
    from hivemesh.services.orchestrator.state import LocalLedger
    fake = _Information(hang_commit=True)
    runner = AgentRunner(fake, ToolRegistry(fake), LocalLedger(100, 60))
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


async def test_concurrent_runs_share_one_listing_of_an_unreachable_tool_server():
    from hivemesh.services.orchestrator import tools as tool_registry

    class Down:
        listings = 0

        def add(self, *args):
            pass

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
