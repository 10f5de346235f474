"""Workflows through the orchestrator: DAG order and outputs, validation
before anything runs, failure policies, fan-out (first, all, judge),
handoffs, the concurrency limit, subscriptions, and the agent registry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

import grpc
import pytest
from fakes.mesh import mesh
from google.protobuf.duration_pb2 import Duration

from hivemesh.client import ArtifactClient, InformationClient, from_rpc_error
from hivemesh.client.errors import (
    AlreadyExistsError, InvalidArgumentError, ResourceExhaustedError, from_status)
from hivemesh.common.v1 import RequestContext, StreamOutcome
from hivemesh.orchestrator.v1 import (
    AgentDefinition, AgentList, BudgetPolicy, CombineMode, DeleteAgentRequest, EventType,
    FanOut, GetAgentRequest, ListAgentsRequest, MemoryConfig, ModelList, RegisterAgentRequest,
    RunAgentRequest, RunWorkflowRequest, SamplingConfig, SubscribeEventsRequest, TaskSpec,
    TaskStatus, WorkflowDefinition, WorkflowStatus)
from hivemesh.runtime.settings import ServerSettings
from hivemesh.services.llm.backends.base import ErrorKind, ToolCall
from hivemesh.services.orchestrator.agents import AgentFileError, AgentRegistry

FREE = BudgetPolicy(enforcement=3)


def rid() -> str:
    return str(uuid.uuid4())


async def call(method, request, timeout=30):
    try:
        return await method(request, timeout=timeout)
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err) from err


async def agents(m, *names: str, **fields) -> None:
    for name in names:
        await call(m.orchestrator.RegisterAgent, RegisterAgentRequest(
            request_id=rid(), agent=AgentDefinition(name=name, model="main", budget=FREE,
                                                    system_prompt=f"You are {name}.",
                                                    **fields)))


async def workflow(m, *tasks: TaskSpec, **kw):
    return await call(m.orchestrator.RunWorkflow, RunWorkflowRequest(
        request_id=rid(), workflow=WorkflowDefinition(tasks=tasks, **kw.pop("definition", {})),
        **kw))


async def test_a_workflow_task_and_a_run_whose_request_id_reads_like_it_stay_apart(tmp_path):
    """Task t1 of workflow request "job-7" and a RunAgent sent with
    request_id "job-7:t1" are different requests: neither replays nor
    conflicts with the other's steps at the providers."""
    async with mesh(tmp_path) as m:
        await agents(m, "coder")
        m.primary.queue_responses(["RUN", "TASK"])
        run = await call(m.orchestrator.RunAgent, RunAgentRequest(
            request_id="job-7:t1", agent="coder", input="implement multiply"))
        done = await call(m.orchestrator.RunWorkflow, RunWorkflowRequest(
            request_id="job-7", workflow=WorkflowDefinition(tasks=[
                TaskSpec(task_id="t1", agent="coder", input_template="implement add")])))
        assert run.result.output == "RUN"
        assert done.status == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED, done.tasks[0].error
        assert done.tasks[0].output == "TASK"


async def test_dag_runs_in_dependency_order_with_outputs_and_variables(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "coder", "tester", "reviewer")
        m.primary.queue_responses(["CODE", "TESTS", "VERDICT"])
        response = await workflow(
            m, TaskSpec(task_id="review", agent="reviewer", depends_on=["code", "test"],
                        input_template="Review {{tasks.code.output}} and "
                                       "{{tasks.test.output}}"),
            TaskSpec(task_id="test", agent="tester", depends_on=["code"],
                     input_template="Test {{tasks.code.output}}"),
            TaskSpec(task_id="code", agent="coder",
                     input_template="Write {{variables.feature}}"),
            variables={"feature": "add"})
        assert response.status == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED
        assert [t.task_id for t in response.tasks] == ["review", "test", "code"]
        by_id = {t.task_id: t for t in response.tasks}
        assert by_id["code"].output == "CODE" and by_id["test"].output == "TESTS"
        prompts = [c.messages[-1].content for c in m.primary.calls]
        assert prompts == ["Write add", "Test CODE", "Review CODE and TESTS"]
        assert response.usage.total_tokens == sum(t.usage.total_tokens for t in response.tasks)
        assert response.workflow_id.startswith("wf-") and len(response.trace_id) == 32
        assert {t.result.trace_id for t in response.tasks} == {response.trace_id}


async def test_escaped_braces_reach_the_prompts_as_written_beside_references(tmp_path):
    r"""``\{{`` writes ``{{`` in an agent's system prompt and a task's input;
    an agent whose prompt holds it is registered (not refused for an unknown
    reference), and the task outputs and variables around it still expand."""
    async with mesh(tmp_path) as m:
        await call(m.orchestrator.RegisterAgent, RegisterAgentRequest(
            request_id=rid(), agent=AgentDefinition(
                name="filler", model="main", budget=FREE,
                system_prompt=r"Fill \{{name}} slots for {{variables.team}}.")))
        m.primary.queue_responses(["Hello {{name}}", "DONE"])
        response = await workflow(
            m, TaskSpec(task_id="draft", agent="filler",
                        input_template=r"Write a greeting with \{{name}} for {{variables.team}}"),
            TaskSpec(task_id="check", agent="filler", depends_on=["draft"],
                     input_template=r"Check {{tasks.draft.output}} keeps \{{tasks.draft.output}}"),
            variables={"team": "ops"})
        assert response.status == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED
        systems = {c.messages[0].content for c in m.primary.calls}
        assert systems == {"Fill {{name}} slots for ops."}
        prompts = [c.messages[-1].content for c in m.primary.calls]
        assert prompts == ["Write a greeting with {{name}} for ops",
                           "Check Hello {{name}} keeps {{tasks.draft.output}}"]


@pytest.mark.parametrize("tasks, problem", [
    ([TaskSpec(task_id="a", agent="coder", input_template="x", depends_on=["b"]),
      TaskSpec(task_id="b", agent="coder", input_template="x", depends_on=["a"])],
     "dependency cycle"),
    ([TaskSpec(task_id="a", agent="coder", input_template="x", depends_on=["zz"])],
     "no task 'zz'"),
    ([TaskSpec(task_id="a", agent="ghost", input_template="x")], "no agent named 'ghost'"),
    ([TaskSpec(task_id="a", agent="coder", input_template="{{tasks.b.output}}"),
      TaskSpec(task_id="b", agent="coder", input_template="x")], "not a dependency"),
    ([TaskSpec(task_id="a", agent="coder", input_template="{{variables.nope}}")],
     "no variable 'nope'"),
    ([TaskSpec(task_id="a", agent="coder", input_template="x"),
      TaskSpec(task_id="a", agent="coder", input_template="y")], "used twice"),
    ([TaskSpec(task_id="a", agent="coder", input_template="x", fan_out=FanOut(
        models=ModelList(models=["main", "backup"]), combine=CombineMode.COMBINE_MODE_JUDGE))],
     "JUDGE needs a judge_agent"),
    # A fan-out over agents runs its own: an agent beside them would not run
    # (yet be named by the task's TASK_COMPLETE).
    ([TaskSpec(task_id="a", agent="translator", input_template="x", fan_out=FanOut(
        agents=AgentList(agents=["coder", "coder"]), combine=CombineMode.COMBINE_MODE_ALL))],
     "workflow.tasks[0].agent: agent 'translator' would not run"),
    ([TaskSpec(task_id="a", agent="coder", input_template="x"),
      TaskSpec(task_id="b", agent="translator", input_template="y", depends_on=["a"])],
     "agent 'translator' of task 'b': {{variables.lang}}: no variable 'lang'"),
])
async def test_invalid_workflows_are_refused_before_anything_runs(tmp_path, tasks, problem):
    async with mesh(tmp_path) as m:
        await agents(m, "coder")
        await call(m.orchestrator.RegisterAgent, RegisterAgentRequest(
            request_id=rid(), agent=AgentDefinition(
                name="translator", model="main", budget=FREE,
                system_prompt="You translate into {{variables.lang}}.")))
        with pytest.raises(InvalidArgumentError) as err:
            await workflow(m, *tasks)
        assert problem in str(err.value)
        assert m.primary.calls == []


async def test_a_judge_named_but_not_used_is_not_checked(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "coder")
        done = await workflow(m, TaskSpec(task_id="a", agent="coder", input_template="x",
                                          fan_out=FanOut(models=ModelList(models=["main", "backup"]),
                                                         combine=CombineMode.COMBINE_MODE_FIRST,
                                                         judge_agent="nobody")))
        assert done.status == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED


async def test_failure_cancels_the_rest_by_default(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "coder")
        m.primary.simulate_failure(ErrorKind.BAD_REQUEST, times=1)
        m.primary.latency_s = 0.05
        response = await workflow(
            m, TaskSpec(task_id="a", agent="coder", input_template="x"),
            TaskSpec(task_id="b", agent="coder", input_template="y", depends_on=["a"]),
            max_concurrency=1)
        assert response.status == WorkflowStatus.WORKFLOW_STATUS_FAILED
        a, b = response.tasks
        assert a.status == TaskStatus.TASK_STATUS_FAILED
        assert b.status == TaskStatus.TASK_STATUS_CANCELLED
        assert response.error == a.error


async def test_continue_on_failure_skips_only_dependents(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "coder")
        await agents(m, "broken")
        await call(m.orchestrator.RegisterAgent, RegisterAgentRequest(
            request_id=rid(), allow_update=True, agent=AgentDefinition(
                name="broken", model="no-such-model", budget=FREE)))
        response = await workflow(
            m, TaskSpec(task_id="bad", agent="broken", input_template="x"),
            TaskSpec(task_id="after", agent="coder", input_template="y", depends_on=["bad"]),
            TaskSpec(task_id="free", agent="coder", input_template="z"),
            definition={"continue_on_failure": True})
        assert response.status == WorkflowStatus.WORKFLOW_STATUS_PARTIALLY_SUCCEEDED
        bad, after, free = response.tasks
        assert bad.status == TaskStatus.TASK_STATUS_FAILED
        assert after.status == TaskStatus.TASK_STATUS_SKIPPED and "bad" in after.error.message
        assert free.status == TaskStatus.TASK_STATUS_SUCCEEDED


async def test_fan_out_all_and_judge_and_first(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "coder", "judge", "alt")
        m.primary.queue_responses(["from main"])
        m.secondary.queue_responses(["from backup"])
        response = await workflow(m, TaskSpec(
            task_id="all", agent="coder", input_template="solve", fan_out=FanOut(
                models=ModelList(models=["main", "backup"]),
                combine=CombineMode.COMBINE_MODE_ALL)))
        (task,) = response.tasks
        assert json.loads(task.output) == [{"branch": "main", "output": "from main"},
                                           {"branch": "backup", "output": "from backup"}]
        assert [b.branch for b in task.branches] == ["main", "backup"]
        assert task.usage.total_tokens == sum(b.result.usage.total_tokens
                                              for b in task.branches)

        m.primary.queue_responses(["A1", "A2", "JUDGED"])
        response = await workflow(m, TaskSpec(
            task_id="judged", input_template="solve", fan_out=FanOut(
                agents=AgentList(agents=["coder", "alt"]),
                combine=CombineMode.COMBINE_MODE_JUDGE, judge_agent="judge")))
        (task,) = response.tasks
        assert task.output == "JUDGED" and task.result.agent == "judge"
        judge_prompt = m.primary.calls[-1].messages[-1].content
        assert "Candidate from coder" in judge_prompt and "Candidate from alt" in judge_prompt

        m.primary.latency_s = 2.0  # main is slow; backup answers first
        response = await workflow(m, TaskSpec(
            task_id="first", agent="coder", input_template="solve", fan_out=FanOut(
                models=ModelList(models=["main", "backup"]),
                combine=CombineMode.COMBINE_MODE_FIRST)))
        (task,) = response.tasks
        assert task.status == TaskStatus.TASK_STATUS_SUCCEEDED
        slow, fast = task.branches
        assert fast.selected and task.result.model == "backup"
        assert slow.error.code == grpc.StatusCode.CANCELLED.value[0]


async def test_the_workflows_currency_is_that_of_every_run_it_paid_for(tmp_path):
    async with mesh(tmp_path) as m, InformationClient(m.addresses["information"]) as info:
        await info.set_price("main", input_micros_per_million=1_000_000,
                             output_micros_per_million=1_000_000)
        for name, budget in (("a1", BudgetPolicy()), ("a2", BudgetPolicy()),
                             ("capped", BudgetPolicy(max_cost_micros_per_run=1))):
            await call(m.orchestrator.RegisterAgent, RegisterAgentRequest(
                request_id=rid(), agent=AgentDefinition(name=name, model="main",
                                                        budget=budget)))
        every = await workflow(m, TaskSpec(
            task_id="all", input_template="solve", fan_out=FanOut(
                agents=AgentList(agents=["a1", "a2"]), combine=CombineMode.COMBINE_MODE_ALL)))
        assert every.status == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED
        assert every.cost_micros > 0 and every.currency == "USD"
        # A run that failed after it was charged (over its cost cap).
        failed = await workflow(m, TaskSpec(task_id="a", agent="capped", input_template="x"))
        assert failed.status == WorkflowStatus.WORKFLOW_STATUS_FAILED
        assert failed.cost_micros > 0 and failed.currency == "USD"


async def test_an_agent_taking_over_by_handoff_runs_on_its_own_model(tmp_path):
    """The task's model overrides the agent the task names, not the agent a
    handoff brings in (nor a judge): that one runs on its own model."""
    async with mesh(tmp_path) as m:
        await agents(m, "triage")
        await call(m.orchestrator.RegisterAgent, RegisterAgentRequest(
            request_id=rid(), agent=AgentDefinition(name="expert", model="backup", budget=FREE,
                                                    system_prompt="You are expert.")))
        m.primary.queue_response("Passing on.", tool_calls=(ToolCall(
            "h", "handoff", json.dumps({"agent": "expert", "input": "deep question"})),))
        m.secondary.queue_response("expert on backup")
        response = await workflow(m, TaskSpec(task_id="ask", agent="triage", model="main",
                                              input_template="question", allow_handoff=True))
        (task,) = response.tasks
        assert (task.result.agent, task.result.model) == ("expert", "backup")
        assert task.output == "expert on backup" and len(m.primary.calls) == 1


async def test_a_handoff_loop_stops_at_the_limit_and_lists_the_handoffs_followed(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "a", "b")
        for to in ("b", "a", "b"):
            m.primary.queue_response("over to you", tool_calls=(ToolCall(
                "h", "handoff", json.dumps({"agent": to, "input": "again"})),))
        response = await workflow(m, TaskSpec(task_id="loop", agent="a", input_template="go",
                                              allow_handoff=True, max_handoffs=2))
        (task,) = response.tasks
        assert task.status == TaskStatus.TASK_STATUS_FAILED
        assert from_status(task.error).reason == "HANDOFF_LIMIT"
        assert [(h.from_agent, h.to_agent) for h in task.handoffs] == [("a", "b"), ("b", "a")]
        assert len(m.primary.calls) == 3


async def test_handoff_is_followed_when_the_task_allows_it(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "triage", "expert", output_artifact_type="note")
        completed = []
        m.backend.bus.subscribe(lambda event: completed.append(event.agent_complete)
                                if event.type == EventType.EVENT_TYPE_AGENT_COMPLETE else None)
        m.primary.queue_response("Let me pass this on.", tool_calls=(ToolCall(
            "h", "handoff", json.dumps({"agent": "expert", "reason": "needs an expert",
                                        "input": "deep question"})),))
        m.primary.queue_response("expert answer")
        response = await workflow(m, TaskSpec(task_id="ask", agent="triage",
                                              input_template="question", allow_handoff=True))
        (task,) = response.tasks
        assert task.output == "expert answer" and task.result.agent == "expert"
        # The handing agent did not answer: it keeps no output and no artifact.
        handed, answered = completed
        assert handed.HasField("handoff") and handed.output == ""
        assert list(handed.artifact_ids) == []
        async with ArtifactClient(m.addresses["artifact"]) as artifacts:
            saved = [a async for a in artifacts.iter(workflow_id=response.workflow_id)]
        assert [(a.agent_id, a.content) for a in saved] == [("expert", "expert answer")]
        assert list(answered.artifact_ids) == [saved[0].artifact_id]
        (handoff,) = task.handoffs
        assert (handoff.from_agent, handoff.to_agent, handoff.input) == (
            "triage", "expert", "deep question")
        assert m.primary.calls[-1].messages[-1].content == "deep question"
        assert "handoff" in [t.name for t in m.primary.calls[0].tools]


async def test_a_handoff_request_fails_a_task_that_does_not_allow_it(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "triage", "expert")
        m.primary.queue_response(tool_calls=(ToolCall("h", "handoff", json.dumps(
            {"agent": "expert", "reason": "needs an expert"})),))
        m.primary.queue_response("triage answered itself")
        response = await workflow(m, TaskSpec(task_id="ask", agent="triage",
                                              input_template="question"))
        (task,) = response.tasks
        assert response.status == WorkflowStatus.WORKFLOW_STATUS_FAILED
        assert task.status == TaskStatus.TASK_STATUS_FAILED and not task.handoffs
        assert from_status(task.error).reason == "HANDOFF_NOT_ALLOWED"
        assert len(m.primary.calls) == 1 and "handoff" not in [
            t.name for t in m.primary.calls[0].tools]


def hold_first_generation(m) -> tuple[asyncio.Event, asyncio.Event]:
    """(started, release): the first generation waits for ``release``."""
    started, release = asyncio.Event(), asyncio.Event()
    original = m.primary._begin

    async def held(request, timeout_s):
        if not started.is_set():
            started.set()
            await release.wait()
        return await original(request, timeout_s)
    m.primary._begin = held
    return started, release


async def test_a_workflow_runs_its_agents_as_they_were_when_it_started(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "first", "second", "third")
        started, release = hold_first_generation(m)
        running = asyncio.create_task(workflow(
            m, TaskSpec(task_id="a", agent="first", input_template="go"),
            TaskSpec(task_id="b", agent="second", input_template="then", depends_on=["a"]),
            TaskSpec(task_id="c", agent="third", input_template="and", depends_on=["a"])))
        await started.wait()  # task a is generating
        await call(m.orchestrator.DeleteAgent, DeleteAgentRequest(request_id=rid(),
                                                                  name="second"))
        await call(m.orchestrator.RegisterAgent, RegisterAgentRequest(
            request_id=rid(), allow_update=True, agent=AgentDefinition(
                name="third", model="main", budget=FREE, system_prompt="You changed.")))
        release.set()
        response = await running
        assert response.status == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED
        systems = {c.messages[-1].content: c.messages[0].content for c in m.primary.calls}
        assert systems == {"go": "You are first.", "then": "You are second.",
                           "and": "You are third."}


async def test_concurrency_limit_is_respected(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "coder")
        m.primary.latency_s = 0.1
        running = peak = 0
        original = m.primary._begin

        async def counting(request, timeout_s):
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            try:
                return await original(request, timeout_s)
            finally:
                running -= 1
        m.primary._begin = counting
        response = await workflow(m, *(TaskSpec(task_id=f"t{i}", agent="coder",
                                                input_template=f"job {i}") for i in range(6)),
                                  max_concurrency=2)
        assert response.status == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED
        assert peak == 2


async def test_subscribe_events_filters_and_ends_after_the_workflow(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "coder")
        stream = m.orchestrator.SubscribeEvents(SubscribeEventsRequest(
            workflow_id="wf-watched", until_workflow_complete=True), timeout=30)
        other = m.orchestrator.SubscribeEvents(SubscribeEventsRequest(
            workflow_id="wf-watched", types=[EventType.EVENT_TYPE_TASK_COMPLETE]), timeout=30)
        # Filters that leave out WORKFLOW_COMPLETE still end with the workflow.
        filtered = m.orchestrator.SubscribeEvents(SubscribeEventsRequest(
            workflow_id="wf-watched", types=[EventType.EVENT_TYPE_TASK_COMPLETE],
            until_workflow_complete=True), timeout=30)
        assert (await filtered.read()).WhichOneof("event") == "heartbeat"
        first = await stream.read()
        assert first.WhichOneof("event") == "heartbeat"
        assert (await other.read()).WhichOneof("event") == "heartbeat"
        await workflow(m, TaskSpec(task_id="a", agent="coder", input_template="x"),
                       TaskSpec(task_id="b", agent="coder", input_template="y"),
                       definition={"workflow_id": "wf-watched"})
        await workflow(m, TaskSpec(task_id="c", agent="coder", input_template="z"))
        received = []
        while not received or received[-1].WhichOneof("event") != "end":
            received.append(await stream.read())
        assert received[-1].end.outcome == StreamOutcome.STREAM_OUTCOME_COMPLETED
        events = [x.agent_event for x in received[:-1] if x.WhichOneof("event") == "agent_event"]
        assert {e.context.workflow_id for e in events} == {"wf-watched"}
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert events[0].type == EventType.EVENT_TYPE_WORKFLOW_START
        assert events[-1].type == EventType.EVENT_TYPE_WORKFLOW_COMPLETE
        completions = [await other.read(), await other.read()]
        assert {c.agent_event.task_complete.task_id for c in completions} == {"a", "b"}
        # In the context of the task and its agent, as its TASK_START.
        assert {(c.agent_event.agent, c.agent_event.context.task_id) for c in completions} == {
            ("coder", "a"), ("coder", "b")}
        other.cancel()
        rest = []
        while not rest or rest[-1].WhichOneof("event") != "end":
            rest.append(await asyncio.wait_for(filtered.read(), 10))
        assert [x.agent_event.type for x in rest[:-1] if x.WhichOneof("event") == "agent_event"
                ] == [EventType.EVENT_TYPE_TASK_COMPLETE] * 2
        assert rest[-1].end.outcome == StreamOutcome.STREAM_OUTCOME_COMPLETED


async def test_a_workflow_its_caller_cancels_still_tells_subscribers_how_it_ended(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "coder")
        m.primary.latency_s = 5.0
        stream = m.orchestrator.SubscribeEvents(SubscribeEventsRequest(
            workflow_id="wf-cut", until_workflow_complete=True), timeout=30)
        assert (await stream.read()).WhichOneof("event") == "heartbeat"
        request = RunWorkflowRequest(
            request_id=rid(), workflow=WorkflowDefinition(workflow_id="wf-cut", tasks=[
                TaskSpec(task_id="a", agent="coder", input_template="x"),
                TaskSpec(task_id="b", agent="coder", input_template="y", depends_on=["a"])]))
        running = m.orchestrator.RunWorkflow(request, timeout=30)
        received = []
        while not any(x.agent_event.type == EventType.EVENT_TYPE_AGENT_START for x in received):
            received.append(await asyncio.wait_for(stream.read(), 10))
        running.cancel()  # the caller leaves while task a generates
        while received[-1].WhichOneof("event") != "end":
            received.append(await asyncio.wait_for(stream.read(), 10))
        types = [x.agent_event.type for x in received if x.WhichOneof("event") == "agent_event"]
        assert EventType.EVENT_TYPE_AGENT_FAILED in types
        assert types[-1] == EventType.EVENT_TYPE_WORKFLOW_COMPLETE
        # Every task that was not finished ends CANCELLED, the started one too.
        ended = {x.agent_event.task_complete.task_id: x.agent_event.task_complete.status
                 for x in received if x.WhichOneof("event") == "agent_event"
                 and x.agent_event.type == EventType.EVENT_TYPE_TASK_COMPLETE}
        assert ended == {"a": TaskStatus.TASK_STATUS_CANCELLED,
                         "b": TaskStatus.TASK_STATUS_CANCELLED}
        last = received[-2].agent_event.workflow_complete
        assert last.status == WorkflowStatus.WORKFLOW_STATUS_CANCELLED
        # Not kept under its request_id: a retry runs it.
        m.primary.latency_s = 0
        retried = await call(m.orchestrator.RunWorkflow, request)
        assert not retried.replayed
        assert retried.status == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED


async def test_a_workflow_whose_every_task_failed_has_failed(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "coder")
        m.primary.simulate_failure(ErrorKind.BAD_REQUEST, times=10)
        done = await workflow(m, TaskSpec(task_id="a", agent="coder", input_template="x"),
                              definition={"continue_on_failure": True})
        assert done.status == WorkflowStatus.WORKFLOW_STATUS_FAILED


async def test_a_failing_subscriber_never_breaks_a_run(tmp_path):
    async with mesh(tmp_path) as m:
        seen = []

        def broken(event):
            raise RuntimeError("subscriber bug")
        m.backend.bus.subscribe(broken, priority=10)
        m.backend.bus.subscribe(lambda e: seen.append(e.type), priority=1)
        await agents(m, "coder")
        response = await workflow(m, TaskSpec(task_id="a", agent="coder", input_template="x"))
        assert response.status == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED
        assert seen[0] == EventType.EVENT_TYPE_WORKFLOW_START
        assert m.backend.bus.subscriber_errors == len(seen)


async def test_agent_registry_over_grpc(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, *(f"agent-{i}" for i in range(5)))
        with pytest.raises(AlreadyExistsError):
            await agents(m, "agent-0")
        names, token = [], ""
        while True:
            page = await call(m.orchestrator.ListAgents,
                              ListAgentsRequest(page_size=2, page_token=token))
            names += [a.name for a in page.agents]
            token = page.next_page_token
            if not token:
                break
        assert names == [f"agent-{i}" for i in range(5)]
        got = await call(m.orchestrator.GetAgent, GetAgentRequest(name="agent-3"))
        assert got.agent.create_time.seconds > 0
        request = RegisterAgentRequest(request_id=rid(), allow_update=True, agent=AgentDefinition(
            name="agent-3", description="updated"))
        first = await call(m.orchestrator.RegisterAgent, request)
        again = await call(m.orchestrator.RegisterAgent, request)
        assert not first.created and again.replayed and again.agent == first.agent
        # Its times are ignored: a retry may send the agent as it was returned.
        as_returned = await call(m.orchestrator.RegisterAgent, RegisterAgentRequest(
            request_id=request.request_id, allow_update=True, agent=first.agent))
        assert as_returned.replayed and as_returned.agent == first.agent
        deleted = await call(m.orchestrator.DeleteAgent,
                             DeleteAgentRequest(request_id=rid(), name="agent-3"))
        assert deleted.deleted
        gone = await call(m.orchestrator.DeleteAgent,
                          DeleteAgentRequest(request_id=rid(), name="agent-3"))
        assert not gone.deleted


def test_agent_files_load_and_registered_agents_persist(tmp_path):
    folder = tmp_path / "agents"
    folder.mkdir()
    (folder / "coder.toml").write_text(
        'name = "coder"\nsystem_prompt = "You code."\nmodel = "main"\n'
        'fallback_models = ["backup"]\n[memory]\nenabled = true\nrecallLimit = 3\n')
    (folder / "reviewer.json").write_text(json.dumps({"name": "reviewer",
                                                      "outputArtifactType": "review"}))
    registry = AgentRegistry(tmp_path / "store" / "agents.json")
    assert registry.load_dir(folder) == ["coder", "reviewer"]
    coder = registry.get("coder")
    assert coder.memory.recall_limit == 3 and list(coder.fallback_models) == ["backup"]
    registry.register(AgentDefinition(name="extra", description="kept"), allow_update=False)
    reopened = AgentRegistry(tmp_path / "store" / "agents.json")
    assert reopened.get("extra").description == "kept"
    # File agents are never stored: a deleted file takes its agent with it.
    assert reopened.names() == ["extra"]
    # What was accepted when registered still loads (a later check refuses
    # duplicate fallbacks at registration, not in the store).
    store = tmp_path / "store" / "agents.json"
    stored = json.loads(store.read_text())
    stored[0]["fallbackModels"] = ["main", "main"]
    store.write_text(json.dumps(stored))
    assert AgentRegistry(store).get("extra").fallback_models == ["main", "main"]
    (folder / "bad.toml").write_text('name = "Not Valid"\n')
    with pytest.raises(AgentFileError, match="bad.toml"):
        AgentRegistry().load_dir(folder)
    (folder / "bad.toml").write_text('name = "typo"\nsystem_prompt = "Hi {{variabels.x}}"\n')
    with pytest.raises(AgentFileError, match="bad.toml: system_prompt: .*unknown reference"):
        AgentRegistry().load_dir(folder)


async def test_workflow_retry_replays_the_result(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "coder")
        request = RunWorkflowRequest(request_id=rid(), workflow=WorkflowDefinition(
            tasks=[TaskSpec(task_id="a", agent="coder", input_template="x")]))
        first = await call(m.orchestrator.RunWorkflow, request)
        again = await call(m.orchestrator.RunWorkflow, request)
        assert again.replayed and not first.replayed
        assert again.tasks == first.tasks
        assert len(m.primary.calls) == 1
        await asyncio.sleep(0)


async def test_a_workflow_failed_by_an_outage_runs_again_when_retried(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "coder")
        await call(m.orchestrator.RegisterAgent, RegisterAgentRequest(
            request_id=rid(), agent=AgentDefinition(name="reviewer", model="backup",
                                                    budget=FREE)))
        request = RunWorkflowRequest(request_id=rid(), workflow=WorkflowDefinition(tasks=[
            TaskSpec(task_id="a", agent="coder", input_template="x"),
            TaskSpec(task_id="b", agent="reviewer", input_template="{{tasks.a.output}}",
                     depends_on=["a"])]))
        m.secondary.simulate_failure(ErrorKind.UNAVAILABLE, times=20)
        failed = await call(m.orchestrator.RunWorkflow, request)
        assert failed.status == WorkflowStatus.WORKFLOW_STATUS_FAILED
        assert [t.status for t in failed.tasks] == [TaskStatus.TASK_STATUS_SUCCEEDED,
                                                     TaskStatus.TASK_STATUS_FAILED]
        # The outage is over: the retry runs the workflow again instead of
        # replaying its failure, and takes task a's run from the first attempt,
        # also after its agent was updated meanwhile (the run ended as it did).
        m.secondary.reset_failure()
        await call(m.orchestrator.RegisterAgent, RegisterAgentRequest(
            request_id=rid(), allow_update=True, agent=AgentDefinition(
                name="coder", model="main", budget=FREE, system_prompt="You write Go.")))
        retried = await call(m.orchestrator.RunWorkflow, request)
        assert not retried.replayed
        assert retried.status == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED
        assert retried.tasks[0].result == failed.tasks[0].result
        assert len(m.primary.calls) == 1  # task a generated once
        again = await call(m.orchestrator.RunWorkflow, request)
        assert again.replayed and again.tasks == retried.tasks


async def test_a_workflow_cut_off_by_its_callers_deadline_runs_again_when_retried(tmp_path):
    async with mesh(tmp_path, min_call_time_s=0.5) as m:
        await agents(m, "coder")
        request = RunWorkflowRequest(request_id=rid(), workflow=WorkflowDefinition(
            tasks=[TaskSpec(task_id="a", agent="coder", input_template="x")]))
        # Too little time for any provider call: the task fails at once.
        cut = await call(m.orchestrator.RunWorkflow, request, timeout=0.3)
        assert cut.status == WorkflowStatus.WORKFLOW_STATUS_FAILED
        assert from_status(cut.tasks[0].error).reason == "DEADLINE_TOO_SHORT"
        retried = await call(m.orchestrator.RunWorkflow, request)
        assert not retried.replayed
        assert retried.status == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED
        again = await call(m.orchestrator.RunWorkflow, request)
        assert again.replayed and again.tasks == retried.tasks


async def test_results_too_big_for_one_response_keep_each_output_once_or_fail_clearly(
        tmp_path):
    async with mesh(tmp_path, server=ServerSettings(port=0, max_message_bytes=256 * 1024)) as m:
        await agents(m, "coder", sampling=SamplingConfig(max_tokens=100_000))
        for _ in range(2):
            m.primary.queue_response("x" * 60_000)
        fits = await workflow(m, TaskSpec(task_id="a", agent="coder", input_template="x"),
                              TaskSpec(task_id="b", agent="coder", input_template="y"))
        assert [len(t.output) for t in fits.tasks] == [60_000, 60_000]
        assert [t.result.output for t in fits.tasks] == ["", ""]  # the copies left out
        for _ in range(5):
            m.primary.queue_response("y" * 60_000)
        completions = []
        m.backend.bus.subscribe(lambda e: completions.append(e.workflow_complete)
                                if e.type == EventType.EVENT_TYPE_WORKFLOW_COMPLETE else None)
        with pytest.raises(ResourceExhaustedError) as err:
            await workflow(m, *(TaskSpec(task_id=f"t{i}", agent="coder", input_template="x")
                                for i in range(5)))
        assert err.value.reason == "PAYLOAD_TOO_LARGE"
        assert err.value.metadata["limit_bytes"] == str(256 * 1024)
        # Subscribers learn what the caller got: a failure, not a success.
        (complete,) = completions
        assert complete.status == WorkflowStatus.WORKFLOW_STATUS_FAILED
        assert from_status(complete.error).reason == "PAYLOAD_TOO_LARGE"


async def test_a_handoff_is_offered_only_to_agents_the_runs_variables_can_start(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "triage", "expert")
        await call(m.orchestrator.RegisterAgent, RegisterAgentRequest(
            request_id=rid(), agent=AgentDefinition(
                name="translator", model="main", budget=FREE,
                system_prompt="You translate into {{variables.lang}}.")))
        m.primary.queue_response(tool_calls=(ToolCall("h", "handoff", json.dumps(
            {"agent": "translator", "reason": "needs a translation"})),))
        m.primary.queue_response("triage answered itself")
        response = await workflow(m, TaskSpec(task_id="ask", agent="triage",
                                              input_template="question", allow_handoff=True))
        (task,) = response.tasks
        assert response.status == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED, task.error
        offered = next(t for t in m.primary.calls[0].tools if t.name == "handoff")
        assert list(offered.parameters["properties"]["agent"]["enum"]) == ["expert"]
        assert task.output == "triage answered itself" and not task.handoffs


async def test_a_first_fan_out_counts_what_its_cancelled_branch_used(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "coder")
        failed = []
        m.backend.bus.subscribe(lambda event: failed.append(event.agent_failed)
                                if event.type == EventType.EVENT_TYPE_AGENT_FAILED else None)
        # main asks for a tool (a generation that is paid for), then hangs;
        # backup answers once main's second generation has started.
        m.primary.queue_response(tool_calls=(ToolCall("t", "memory_search", "{}"),))
        second_started = asyncio.Event()
        primary_begin, secondary_begin = m.primary._begin, m.secondary._begin

        async def hangs_second_time(request, timeout_s):
            if len(m.primary.calls) == 1:
                second_started.set()
                await asyncio.Event().wait()
            return await primary_begin(request, timeout_s)

        async def after_main(request, timeout_s):
            await second_started.wait()
            return await secondary_begin(request, timeout_s)
        m.primary._begin, m.secondary._begin = hangs_second_time, after_main
        response = await workflow(m, TaskSpec(
            task_id="first", agent="coder", input_template="solve", fan_out=FanOut(
                models=ModelList(models=["main", "backup"]),
                combine=CombineMode.COMBINE_MODE_FIRST)))
        (task,) = response.tasks
        slow, fast = task.branches
        assert fast.selected and slow.error.code == grpc.StatusCode.CANCELLED.value[0]
        (cancelled,) = failed
        assert cancelled.usage.total_tokens > 0
        assert task.usage.total_tokens == (fast.result.usage.total_tokens
                                           + cancelled.usage.total_tokens)
        assert response.usage.total_tokens == task.usage.total_tokens


async def cut_off_in_the_second_generation(m, request: RunWorkflowRequest) -> None:
    """Runs the workflow and leaves (cancels the call) once the second
    generation has started: the first task is done, its work kept."""
    held = asyncio.Event()
    original = m.primary._begin

    async def hold_second(chat, timeout_s):
        if len(m.primary.calls) == 1:
            held.set()
            await asyncio.Event().wait()
        return await original(chat, timeout_s)
    m.primary._begin = hold_second
    running = m.orchestrator.RunWorkflow(request, timeout=30)
    try:
        await asyncio.wait_for(held.wait(), 10)
    finally:
        running.cancel()
        m.primary._begin = original


async def test_a_cut_off_workflow_without_an_id_runs_again_when_retried(tmp_path):
    async with mesh(tmp_path) as m:
        await call(m.orchestrator.RegisterAgent, RegisterAgentRequest(
            request_id=rid(), agent=AgentDefinition(name="coder", model="main",
                                                    budget=BudgetPolicy())))
        request = RunWorkflowRequest(request_id=rid(), workflow=WorkflowDefinition(tasks=[
            TaskSpec(task_id="a", agent="coder", input_template="x"),
            TaskSpec(task_id="b", agent="coder", input_template="y", depends_on=["a"])]))
        await cut_off_in_the_second_generation(m, request)
        retried = await call(m.orchestrator.RunWorkflow, request)
        assert not retried.replayed
        assert retried.status == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED, retried.error


async def test_a_retried_workflow_finds_the_artifacts_its_first_attempt_saved(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "coder", output_artifact_type="note")
        request = RunWorkflowRequest(request_id=rid(), workflow=WorkflowDefinition(
            workflow_id="wf-saved", tasks=[
                TaskSpec(task_id="a", agent="coder", input_template="x"),
                TaskSpec(task_id="b", agent="coder", input_template="y", depends_on=["a"])]))
        await cut_off_in_the_second_generation(m, request)
        retried = await call(m.orchestrator.RunWorkflow, request)
        assert retried.status == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED, retried.error
        async with ArtifactClient(m.addresses["artifact"]) as artifacts:
            saved = [a async for a in artifacts.iter(workflow_id="wf-saved")]
        assert sorted(a.task_id for a in saved) == ["a", "b"]


async def test_a_tasks_time_limit_starts_when_it_gets_a_concurrency_slot(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "coder")
        quick_done = asyncio.Event()
        m.backend.bus.subscribe(lambda event: quick_done.set() if event.type
                                == EventType.EVENT_TYPE_TASK_COMPLETE
                                and event.task_complete.task_id == "quick" else None)
        original = m.primary._begin

        async def slow_first(request, timeout_s):
            if len(m.primary.calls) == 0:  # "slow" holds the only slot
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(quick_done.wait(), 3)
            return await original(request, timeout_s)
        m.primary._begin = slow_first
        response = await workflow(
            m, TaskSpec(task_id="slow", agent="coder", input_template="x"),
            TaskSpec(task_id="quick", agent="coder", input_template="y",
                     timeout=Duration(seconds=1)),
            max_concurrency=1)
        slow, quick = response.tasks
        assert quick.status == TaskStatus.TASK_STATUS_SUCCEEDED, quick.error
        assert quick.start_time.ToMicroseconds() >= slow.end_time.ToMicroseconds()
        # Once running, a task (a fan-out too) still ends at its limit.
        async def hangs(request, timeout_s):
            await asyncio.Event().wait()
        m.primary._begin = hangs
        for fan_out in (None, FanOut(models=ModelList(models=["main", "main"]),
                                     combine=CombineMode.COMBINE_MODE_ALL)):
            response = await workflow(m, TaskSpec(
                task_id="stuck", agent="coder", input_template="z",
                timeout=Duration(seconds=1), fan_out=fan_out))
            (stuck,) = response.tasks
            assert stuck.status == TaskStatus.TASK_STATUS_FAILED
            assert from_status(stuck.error).reason == "DEADLINE_EXCEEDED"


async def test_a_fan_out_out_of_time_still_reports_each_branch(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "coder")
        m.primary.queue_responses(["from main"])
        original = m.secondary._begin

        async def hangs(request, timeout_s):
            await asyncio.Event().wait()
        m.secondary._begin = hangs
        response = await workflow(m, TaskSpec(
            task_id="all", agent="coder", input_template="solve", timeout=Duration(seconds=1),
            fan_out=FanOut(models=ModelList(models=["main", "backup"]),
                           combine=CombineMode.COMBINE_MODE_ALL)))
        m.secondary._begin = original
        (task,) = response.tasks
        assert from_status(task.error).reason == "DEADLINE_EXCEEDED"
        done, cut = task.branches
        assert done.result.output == "from main"
        assert cut.branch == "backup" and cut.error.code == grpc.StatusCode.CANCELLED.value[0]
        assert "answered first" not in cut.error.message


async def test_a_handoff_whose_arguments_cannot_be_parsed_is_refused_not_a_crash(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "triage", "expert")
        m.primary.queue_response(tool_calls=(
            ToolCall("h", "handoff", "[" * 100_000 + "]" * 100_000),))
        m.primary.queue_response("triage answered itself")
        response = await workflow(m, TaskSpec(task_id="ask", agent="triage",
                                              input_template="question", allow_handoff=True))
        (task,) = response.tasks
        assert response.status == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED, task.error
        assert task.output == "triage answered itself" and not task.handoffs


async def test_a_handoff_to_no_agent_it_was_offered_tells_the_model_which_it_may_name(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "triage", "expert")
        m.primary.queue_response(tool_calls=(
            ToolCall("h", "handoff", json.dumps({"agent": "nobody", "reason": "r"})),))
        m.primary.queue_response("triage answered itself")
        response = await workflow(m, TaskSpec(task_id="ask", agent="triage",
                                              input_template="question", allow_handoff=True))
        (task,) = response.tasks
        assert task.output == "triage answered itself" and not task.handoffs
        (refused,) = task.result.tool_calls
        # The handoff tool was offered: the model is told what was wrong
        # with its call, not that it may not make it.
        assert refused.error.code == "INVALID_ARGUMENTS"
        assert "expert" in refused.error.message


async def test_a_retried_workflow_replays_the_tasks_that_ended_with_memory_written(tmp_path):
    """Task "a" recalled nothing, wrote its work to memory and ended before
    the caller left. Run again, it would recall its own write-back and send
    the LLM service another prompt under the first attempt's request id (an
    idempotency conflict): a retried workflow takes the runs that ended from
    the first attempt instead of running them again."""
    async with mesh(tmp_path) as m:
        await agents(m, "coder", memory=MemoryConfig(enabled=True, write_back=True,
                                                     namespace="wf-retry"))
        request = RunWorkflowRequest(request_id=rid(), workflow=WorkflowDefinition(tasks=[
            TaskSpec(task_id="a", agent="coder", input_template="write the adder"),
            TaskSpec(task_id="b", agent="coder", input_template="test {{tasks.a.output}}",
                     depends_on=["a"])]))
        await cut_off_in_the_second_generation(m, request)
        first_a = [c for c in m.primary.calls]
        retried = await call(m.orchestrator.RunWorkflow, request)
        assert retried.status == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED, retried.error
        a, b = retried.tasks
        assert a.status == b.status == TaskStatus.TASK_STATUS_SUCCEEDED
        # "a" was not generated again: one generation for it, one for "b"
        # cut off, one for "b" now.
        assert len(m.primary.calls) == len(first_a) + 1
        assert a.usage.total_tokens > 0  # its usage still counts in the workflow


async def test_another_tenants_workflow_under_the_same_request_id_replays_nothing(tmp_path):
    """The agent runs a cut-off workflow kept for its retry are the retry's
    alone: another tenant's workflow under the same request_id (a client
    reusing ids) is another request, refused, never given the first
    tenant's outputs."""
    async with mesh(tmp_path) as m:
        await agents(m, "coder")
        tasks = [TaskSpec(task_id="a", agent="coder", input_template="write the adder"),
                 TaskSpec(task_id="b", agent="coder", input_template="test {{tasks.a.output}}",
                          depends_on=["a"])]
        request = RunWorkflowRequest(request_id=rid(), workflow=WorkflowDefinition(tasks=tasks),
                                     context=RequestContext(tenant_id="first"))
        await cut_off_in_the_second_generation(m, request)
        other = RunWorkflowRequest(request_id=request.request_id,
                                   workflow=WorkflowDefinition(tasks=tasks),
                                   context=RequestContext(tenant_id="second"))
        for _ in range(100):
            try:
                response = await call(m.orchestrator.RunWorkflow, other)
                break
            except AlreadyExistsError:
                # Refused whole while the first attempt is still ending (it
                # is then forgotten, as cut off): the steps it kept remain.
                await asyncio.sleep(0.05)
        else:
            pytest.fail("the first attempt never ended")
        a = response.tasks[0]
        assert a.status == TaskStatus.TASK_STATUS_FAILED and not a.output
        assert a.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]


async def test_an_all_fan_outs_output_keeps_non_ascii_text_as_written(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "coder", "alt", "writer")
        m.primary.queue_responses(["café", "日本語", "done"])
        done = await workflow(
            m, TaskSpec(task_id="f", input_template="x", fan_out=FanOut(
                agents=AgentList(agents=["coder", "alt"]), combine=CombineMode.COMBINE_MODE_ALL)),
            TaskSpec(task_id="g", agent="writer", depends_on=["f"],
                     input_template="Summarise {{tasks.f.output}}"),
            max_concurrency=1)
        assert done.status == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED
        assert "café" in done.tasks[0].output and "日本語" in done.tasks[0].output
        assert json.loads(done.tasks[0].output) == [{"branch": "coder", "output": "café"},
                                                    {"branch": "alt", "output": "日本語"}]
        prompt = m.primary.calls[-1].messages[-1].content
        assert "café" in prompt and "日本語" in prompt


async def read_to_end(stream) -> list:
    """A SubscribeEvents stream's messages up to its end (the heartbeats
    left out)."""
    received = []
    while not received or received[-1].WhichOneof("event") != "end":
        message = await asyncio.wait_for(stream.read(), 10)
        if message.WhichOneof("event") != "heartbeat":
            received.append(message)
    return received


async def test_events_too_big_for_a_message_are_trimmed_and_streams_reach_their_end(tmp_path):
    """A TASK_COMPLETE holds its output twice (the task's and its agent's),
    a fan-out's its branches' too: it sheds what the response sheds, and if
    still too big it is trimmed further, marked, rather than breaking the
    subscribers' streams before WORKFLOW_COMPLETE and their end."""
    async with mesh(tmp_path, server=ServerSettings(port=0, max_message_bytes=256 * 1024)) as m:
        await agents(m, "coder", "alt", sampling=SamplingConfig(max_tokens=100_000))
        m.primary.queue_response("x" * 150_000)  # once fits a message, twice does not
        stream = m.orchestrator.SubscribeEvents(SubscribeEventsRequest(
            workflow_id="wf-big", until_workflow_complete=True), timeout=30)
        assert (await stream.read()).WhichOneof("event") == "heartbeat"
        done = await workflow(m, TaskSpec(task_id="t", agent="coder", input_template="x"),
                              definition={"workflow_id": "wf-big"})
        assert done.status == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED
        received = await read_to_end(stream)
        assert received[-1].end.outcome == StreamOutcome.STREAM_OUTCOME_COMPLETED
        events = {x.agent_event.type: x.agent_event for x in received[:-1]}
        complete = events[EventType.EVENT_TYPE_TASK_COMPLETE]
        assert complete.trimmed and complete.task_complete.output == "x" * 150_000
        assert complete.task_complete.result.output == ""  # the copy left out
        assert not events[EventType.EVENT_TYPE_AGENT_COMPLETE].trimmed
        assert (events[EventType.EVENT_TYPE_WORKFLOW_COMPLETE].workflow_complete.status
                == WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED)

        # Each branch's output fits, the task's (both) does not even once.
        m.primary.queue_responses(["y" * 110_000, "z" * 110_000])
        stream = m.orchestrator.SubscribeEvents(SubscribeEventsRequest(
            workflow_id="wf-bigger", until_workflow_complete=True), timeout=30)
        assert (await stream.read()).WhichOneof("event") == "heartbeat"
        with pytest.raises(ResourceExhaustedError):
            await workflow(m, TaskSpec(task_id="f", input_template="x", fan_out=FanOut(
                agents=AgentList(agents=["coder", "alt"]), combine=CombineMode.COMBINE_MODE_ALL)),
                definition={"workflow_id": "wf-bigger"})
        received = await read_to_end(stream)
        assert received[-1].end.outcome == StreamOutcome.STREAM_OUTCOME_COMPLETED
        events = {x.agent_event.type: x.agent_event for x in received[:-1]}
        complete = events[EventType.EVENT_TYPE_TASK_COMPLETE]
        assert complete.trimmed and complete.task_complete.output == ""
        assert complete.task_complete.task_id == "f"  # what it is about stays
        assert complete.task_complete.status == TaskStatus.TASK_STATUS_SUCCEEDED
        assert [b.branch for b in complete.task_complete.branches] == ["coder", "alt"]
        assert (events[EventType.EVENT_TYPE_WORKFLOW_COMPLETE].workflow_complete.status
                == WorkflowStatus.WORKFLOW_STATUS_FAILED)


async def test_the_task_complete_of_a_fan_out_over_agents_names_no_agent(tmp_path):
    async with mesh(tmp_path) as m:
        await agents(m, "coder", "alt")
        stream = m.orchestrator.SubscribeEvents(SubscribeEventsRequest(
            workflow_id="wf-fan", until_workflow_complete=True), timeout=30)
        assert (await stream.read()).WhichOneof("event") == "heartbeat"
        await workflow(m, TaskSpec(task_id="f", input_template="x", fan_out=FanOut(
            agents=AgentList(agents=["coder", "alt"]), combine=CombineMode.COMBINE_MODE_ALL)),
            definition={"workflow_id": "wf-fan"})
        (complete,) = [x.agent_event for x in await read_to_end(stream)
                       if x.agent_event.type == EventType.EVENT_TYPE_TASK_COMPLETE]
        assert (complete.agent, complete.context.agent_id) == ("", "")


async def test_list_agents_pages_end_before_they_outgrow_a_message(tmp_path):
    async with mesh(tmp_path, server=ServerSettings(port=0, max_message_bytes=256 * 1024)) as m:
        for i in range(3):  # two of them outgrow a message
            await call(m.orchestrator.RegisterAgent, RegisterAgentRequest(
                request_id=rid(), agent=AgentDefinition(
                    name=f"big-{i}", model="main", budget=FREE, system_prompt="p" * 100_000)))
        await agents(m, "small-0", "small-1")
        pages, token = [], ""
        while True:  # the default page size
            page = await call(m.orchestrator.ListAgents, ListAgentsRequest(page_token=token))
            pages.append([a.name for a in page.agents])
            token = page.next_page_token
            if not token:
                break
        assert pages == [["big-0"], ["big-1"], ["big-2", "small-0", "small-1"]]


async def test_a_workflow_out_of_time_fails_rather_than_being_cancelled(tmp_path):
    """Only its caller cancels a workflow; one whose time (here the default
    run timeout, the caller setting no deadline) runs out fails, its task
    with DEADLINE_EXCEEDED."""
    async with mesh(tmp_path, default_run_timeout_s=1.0) as m:
        await agents(m, "coder")
        m.primary.latency_s = 5
        done = await call(m.orchestrator.RunWorkflow, RunWorkflowRequest(
            request_id=rid(), workflow=WorkflowDefinition(tasks=[
                TaskSpec(task_id="a", agent="coder", input_template="x")])), timeout=None)
        assert done.status == WorkflowStatus.WORKFLOW_STATUS_FAILED
        assert done.tasks[0].status == TaskStatus.TASK_STATUS_FAILED
        assert done.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


async def test_a_task_whose_rendered_input_is_too_long_fails_as_such(tmp_path):
    """Not as an upstream error of the LLM call it would have made: the
    input is over what an agent run takes (RunAgentRequest.input)."""
    async with mesh(tmp_path) as m:
        await agents(m, "coder", sampling=SamplingConfig(max_tokens=10_000_000))
        m.primary.queue_response("z" * 600_000)
        done = await workflow(
            m, TaskSpec(task_id="a", agent="coder", input_template="x"),
            TaskSpec(task_id="b", agent="coder", depends_on=["a"],
                     input_template="{{tasks.a.output}} and {{tasks.a.output}}"))
        a, b = done.tasks
        assert a.status == TaskStatus.TASK_STATUS_SUCCEEDED
        assert b.status == TaskStatus.TASK_STATUS_FAILED
        assert b.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        error = from_status(b.error)
        assert error.reason == "PAYLOAD_TOO_LARGE"
        assert error.metadata == {"size_chars": "1200005", "limit_chars": "1048576"}
        assert "1,200,005" in error.message and "1,048,576" in error.message
        assert len(m.primary.calls) == 1  # b never asked for a generation


async def test_an_artifact_saved_before_a_handoff_is_the_tasks(tmp_path):
    """An agent saves an artifact with its tool, then hands the task on: the
    task's result lists it, ahead of what the agent it handed to saved."""
    async with mesh(tmp_path) as m:
        await agents(m, "triage", "expert", allowed_tools=["artifact_save"])
        m.primary.queue_response(tool_calls=(ToolCall("c1", "artifact_save", json.dumps(
            {"artifact_type": "notes", "content": "what triage found"})),))
        m.primary.queue_response("Passing on.", tool_calls=(ToolCall(
            "h", "handoff", json.dumps({"agent": "expert", "input": "deep question"})),))
        m.primary.queue_response("the expert's answer")
        response = await workflow(m, TaskSpec(task_id="ask", agent="triage",
                                              input_template="question", allow_handoff=True))
        (task,) = response.tasks
        assert task.output == "the expert's answer"
        assert len(task.result.artifact_ids) == 1, list(task.result.artifact_ids)


async def test_a_subscriber_fallen_behind_gets_what_was_queued_then_the_count_of_the_rest(
        tmp_path):
    """A burst of 20 events on a queue of 5: the 5 queued are delivered,
    then a FAILED end whose dropped_events counts the other 15."""
    from google.rpc import error_details_pb2

    from hivemesh.orchestrator.v1 import AgentStart
    from hivemesh.services.orchestrator.events import build_event
    async with mesh(tmp_path, subscriber_queue_size=5) as m:
        sub = m.orchestrator.SubscribeEvents(SubscribeEventsRequest(), timeout=10)
        assert (await sub.read()).WhichOneof("event") == "heartbeat"
        await asyncio.sleep(0.2)
        # 20 events published in one go (a burst), the queue holds 5.
        for i in range(20):
            m.backend.bus.publish(build_event(
                EventType.EVENT_TYPE_AGENT_START, RequestContext(tenant_id="t"), "0" * 32,
                AgentStart(), agent="a", sequence=i + 1))
        got = []
        while True:
            msg = await sub.read()
            if msg is grpc.aio.EOF:
                break
            got.append(msg)
        events = [x for x in got if x.HasField("agent_event")]
        end = got[-1].end
        info = error_details_pb2.ErrorInfo()
        for d in end.error.details:
            if d.Is(info.DESCRIPTOR):
                d.Unpack(info)
        assert end.outcome == StreamOutcome.STREAM_OUTCOME_FAILED
        # Every event the subscriber did not get is counted as dropped.
        assert (len(events), int(info.metadata["dropped_events"])) == (5, 15)
