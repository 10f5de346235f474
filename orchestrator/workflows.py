"""Workflows: tasks run as a DAG with a concurrency limit, handoffs between
agents, and fan-out of one task to several agents or models with a combine
step (first, all, or a judge agent), as seeds 001 and 003 describe.

The whole definition is checked before anything runs (unique ids, known
dependencies and agents, no cycle, template references only to variables
given and to tasks the task depends on). A task failure either cancels the
rest (the default) or, with continue_on_failure, skips only its dependents.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from buf.validate import validate_pb2
from opentelemetry import trace

from hivemesh.common.v1 import ErrorReason, Usage
from hivemesh.orchestrator.v1 import (
    AgentDefinition, AgentFailed, AgentResult, BranchResult, CombineMode, EventType,
    RunAgentRequest, RunWorkflowRequest, RunWorkflowResponse, TaskResult, TaskSpec, TaskStart,
    TaskStatus, WorkflowComplete, WorkflowDefinition, WorkflowStart, WorkflowStatus)
from hivemesh.runtime import errors
from hivemesh.runtime.settings import RESPONSE_MARGIN_BYTES
from hivemesh.runtime.wellknown import duration_s, now_us
from hivemesh.services.orchestrator import templates
from hivemesh.services.orchestrator.agents import AgentRegistry
from hivemesh.services.orchestrator.context import (
    ExecutionContext, baggage_of, derived_workflow_id, step_id)
from hivemesh.services.orchestrator.events import EventSink, agent_results, shed
from hivemesh.services.orchestrator.policy import deadline_scope
from hivemesh.services.orchestrator.runner import (
    DOMAIN, AgentRunner, RunError, RunOptions, trace_id_of)
from hivemesh.services.orchestrator.state import RequestLedger

tracer = trace.get_tracer("hivemesh.orchestrator")
log = logging.getLogger("hivemesh.orchestrator")

DEFAULT_MAX_HANDOFFS = 3
# The longest input an agent run takes, in characters: what RunAgent
# accepts (RunAgentRequest.input's max_len).
MAX_INPUT_CHARS = RunAgentRequest.DESCRIPTOR.fields_by_name["input"].GetOptions().Extensions[
    validate_pb2.field].string.max_len


def validate(workflow: WorkflowDefinition, agents: AgentRegistry,
             variables: dict[str, str]) -> dict[str, frozenset[str]]:
    """Check the definition; returns each task's transitive dependencies.
    Raises INVALID_ARGUMENT listing every problem found."""
    problems: list[tuple[str, str]] = []
    ids = [t.task_id for t in workflow.tasks]
    seen: set[str] = set()
    for i, task in enumerate(workflow.tasks):
        where = f"workflow.tasks[{i}]"
        if task.task_id in seen:
            problems.append((f"{where}.task_id", f"task id {task.task_id!r} is used twice"))
        seen.add(task.task_id)
        for dep in task.depends_on:
            if dep not in ids:
                problems.append((f"{where}.depends_on", f"no task {dep!r} in the workflow"))
            elif dep == task.task_id:
                problems.append((f"{where}.depends_on", "a task cannot depend on itself"))
        names = _agents_of(task)
        if not names:
            problems.append((f"{where}.agent", "a task needs an agent (or a fan-out of agents)"))
        if task.agent and _over_agents(task):
            # Never run, it would still name the task in its TASK_COMPLETE.
            problems.append((f"{where}.agent", f"agent {task.agent!r} would not run: a fan-out "
                                               "over agents runs its own; leave agent empty"))
        for name in names:
            if agents.find(name) is None:
                problems.append((f"{where}.agent", f"no agent named {name!r}"))
        fan = task.fan_out if task.HasField("fan_out") else None
        if fan is not None and fan.combine == CombineMode.COMBINE_MODE_JUDGE:
            if not fan.judge_agent:
                problems.append((f"{where}.fan_out.judge_agent", "JUDGE needs a judge_agent"))
            elif agents.find(fan.judge_agent) is None:
                problems.append((f"{where}.fan_out.judge_agent",
                                 f"no agent named {fan.judge_agent!r}"))
    if problems:
        raise errors.invalid_argument(problems)
    closure = _transitive(workflow)
    for i, task in enumerate(workflow.tasks):
        for problem in templates.problems(task.input_template, variables, closure[task.task_id],
                                          allow_tasks=True):
            problems.append((f"workflow.tasks[{i}].input_template", problem))
        # The system prompts of the task's agents get the same variables:
        # a missing one would fail the task after others ran (and cost).
        judge = (task.fan_out.judge_agent if task.HasField("fan_out")
                 and task.fan_out.combine == CombineMode.COMBINE_MODE_JUDGE else "")
        for name in dict.fromkeys([*_agents_of(task), *([judge] if judge else [])]):
            for problem in templates.problems(agents.get(name).system_prompt, variables):
                problems.append(("variables", f"agent {name!r} of task {task.task_id!r}: "
                                              f"{problem}"))
    if problems:
        raise errors.invalid_argument(problems)
    return closure


def _over_agents(task: TaskSpec) -> bool:
    """Whether the task fans out over agents (rather than over models)."""
    return task.HasField("fan_out") and task.fan_out.WhichOneof("branches") == "agents"


def _agents_of(task: TaskSpec) -> list[str]:
    if _over_agents(task):
        return list(task.fan_out.agents.agents)
    return [task.agent] if task.agent else []


def _transitive(workflow: WorkflowDefinition) -> dict[str, frozenset[str]]:
    deps = {t.task_id: list(t.depends_on) for t in workflow.tasks}
    closure: dict[str, frozenset[str]] = {}
    visiting: set[str] = set()

    def visit(task_id: str, path: list[str]) -> frozenset[str]:
        if task_id in closure:
            return closure[task_id]
        if task_id in visiting:
            cycle = " -> ".join(path[path.index(task_id):] + [task_id])
            raise errors.invalid_argument([("workflow.tasks", f"dependency cycle: {cycle}")])
        visiting.add(task_id)
        found: set[str] = set()
        for dep in deps[task_id]:
            found |= {dep} | visit(dep, path + [task_id])
        visiting.discard(task_id)
        closure[task_id] = frozenset(found)
        return closure[task_id]

    for task_id in deps:
        visit(task_id, [])
    return closure


def _add_usage(total: Usage, usage: Usage) -> None:
    total.prompt_tokens += usage.prompt_tokens
    total.completion_tokens += usage.completion_tokens
    total.total_tokens += usage.total_tokens
    total.cached_prompt_tokens += usage.cached_prompt_tokens


def _cancelled(message: str):
    return errors.ServiceError(grpc.StatusCode.CANCELLED, ErrorReason.ERROR_REASON_CANCELLED,
                               message).to_status(DOMAIN)


@dataclass
class _Branch:
    label: str
    agent: str
    model: str


@dataclass
class _Limit:
    """A task's time limit (None: none), counted from when the task first
    holds a concurrency slot (``deadline``, loop time, set then)."""
    timeout: float | None
    timer: asyncio.Timeout
    deadline: float | None = None


class _TaskFailed(Exception):
    def __init__(self, error: errors.ServiceError) -> None:
        super().__init__(error.message)
        self.error = error


class WorkflowRun:
    """One execution of a workflow definition."""

    def __init__(self, runner: AgentRunner, agents: AgentRegistry, request: RunWorkflowRequest,
                 base: ExecutionContext, sink: EventSink, max_concurrency: int,
                 ledger: RequestLedger, lease_s: float,
                 max_response_bytes: int | None = None) -> None:
        """``ledger``: where the agent runs that ended are kept, so that a
        retry of the workflow (same request_id) takes them instead of
        running them again; ``lease_s``: how long a running one's claim
        holds there; ``max_response_bytes``: the most a response may carry
        (see :func:`fit_response`), checked before WORKFLOW_COMPLETE tells
        subscribers how the run ended."""
        self.max_response_bytes = max_response_bytes
        self.runner = runner
        self.ledger = ledger
        self.lease_s = lease_s
        self.agents = agents
        self.request = request
        self.workflow = request.workflow
        self.variables = dict(request.variables)
        self.workflow_id = self.workflow.workflow_id or derived_workflow_id(request.request_id)
        self.base = base
        self.base.workflow_id = self.workflow_id
        self.sink = sink
        self.slots = asyncio.Semaphore(max_concurrency)
        self.results = {t.task_id: TaskResult(task_id=t.task_id,
                                              status=TaskStatus.TASK_STATUS_PENDING)
                        for t in self.workflow.tasks}
        self.outputs: dict[str, str] = {}
        self.finished = {t.task_id: asyncio.Event() for t in self.workflow.tasks}
        self.first_error = None
        self.trace_id = ""
        self.currency = ""  # of the runs' charges

    @functools.cached_property
    def startable(self) -> tuple[str, ...]:
        """Handoff targets: the agents whose system prompts the run's
        variables fill (validate checked only the tasks' own agents). Worked
        out once, and only for a workflow whose tasks may hand off."""
        return tuple(n for n in self.agents.names()
                     if not templates.problems(self.agents.get(n).system_prompt,
                                               self.variables))

    def _task_complete(self, task: TaskSpec, result: TaskResult) -> None:
        """TASK_COMPLETE, in the task's context with the task's agent: the
        context its TASK_START had, except for a fan-out, whose branches
        each started in a context of their own (see EVENT_TYPE_TASK_COMPLETE);
        a fan-out over agents names none."""
        agent = "" if _over_agents(task) else task.agent
        self._emit(EventType.EVENT_TYPE_TASK_COMPLETE, result,
                   self._ctx(task, agent, task.task_id), agent)

    def _emit(self, event_type: int, payload, ctx: ExecutionContext | None = None,
              agent: str = "") -> None:
        context = (ctx or self.base).to_proto()
        if ctx is None:
            context.agent_id = ""
        self.sink.emit(event_type, context, self.trace_id, payload, agent=agent)

    async def run(self) -> RunWorkflowResponse:
        started = time.monotonic()
        with baggage_of(self.base):
            with tracer.start_as_current_span(
                    f"workflow {self.workflow.display_name or self.workflow_id}",
                    attributes={"hivemesh.workflow_id": self.workflow_id,
                                "hivemesh.tenant_id": self.base.tenant_id,
                                "hivemesh.task_count": len(self.workflow.tasks)}) as span:
                self.trace_id = trace_id_of(span)
                self._emit(EventType.EVENT_TYPE_WORKFLOW_START, WorkflowStart(
                    workflow_id=self.workflow_id, task_count=len(self.workflow.tasks)))
                try:
                    status = await self._run_tasks()
                except asyncio.CancelledError:
                    # Subscribers still learn how it ended.
                    span.set_status(trace.Status(trace.StatusCode.ERROR, "cancelled"))
                    self._complete(WorkflowStatus.WORKFLOW_STATUS_CANCELLED, started,
                                   answered=False)
                    raise
                if status != WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED:
                    span.set_status(trace.Status(trace.StatusCode.ERROR,
                                                 WorkflowStatus.Name(status)))
        return self._complete(status, started)

    def _complete(self, status: int, started: float,
                  answered: bool = True) -> RunWorkflowResponse:
        """The response, after emitting WORKFLOW_COMPLETE. A response too
        large to answer (``answered``: it is to be) raises PAYLOAD_TOO_LARGE,
        and WORKFLOW_COMPLETE says the run FAILED with that error: what the
        caller gets."""
        response = RunWorkflowResponse(workflow_id=self.workflow_id, status=status,
                                       trace_id=self.trace_id)
        for task in self.workflow.tasks:
            result = self.results[task.task_id]
            response.tasks.append(result)
            _add_usage(response.usage, result.usage)
            response.cost_micros += result.cost_micros
        response.currency = self.currency
        response.latency.CopyFrom(duration_s(time.monotonic() - started))
        if self.first_error is not None:
            response.error.CopyFrom(self.first_error)
        complete = WorkflowComplete(workflow_id=self.workflow_id, status=status,
                                    usage=response.usage, cost_micros=response.cost_micros,
                                    latency=response.latency)
        if self.first_error is not None:
            complete.error.CopyFrom(self.first_error)
        if answered and self.max_response_bytes is not None:
            try:
                response = fit_response(response, self.max_response_bytes)
            except errors.ServiceError as exc:
                complete.status = WorkflowStatus.WORKFLOW_STATUS_FAILED
                complete.error.CopyFrom(exc.to_status(DOMAIN))
                self._emit(EventType.EVENT_TYPE_WORKFLOW_COMPLETE, complete)
                raise
        self._emit(EventType.EVENT_TYPE_WORKFLOW_COMPLETE, complete)
        return response

    async def _run_tasks(self) -> int:
        tasks = {t.task_id: asyncio.create_task(self._task(t)) for t in self.workflow.tasks}
        try:
            await asyncio.gather(*tasks.values())
        except _TaskFailed:
            try:
                await _cancel_all(tasks.values())
            finally:  # the workflow too may be cancelled meanwhile
                self._mark_cancelled("cancelled after another task failed")
            return WorkflowStatus.WORKFLOW_STATUS_FAILED
        except asyncio.CancelledError:
            try:
                await _cancel_all(tasks.values())
            finally:  # also when cancelled again meanwhile
                self._mark_cancelled("the workflow was cancelled")
                self.first_error = self.first_error or _cancelled("the workflow was cancelled")
            raise
        statuses = {r.status for r in self.results.values()}
        if statuses == {TaskStatus.TASK_STATUS_SUCCEEDED}:
            return WorkflowStatus.WORKFLOW_STATUS_SUCCEEDED
        if TaskStatus.TASK_STATUS_SUCCEEDED not in statuses:
            return WorkflowStatus.WORKFLOW_STATUS_FAILED  # continue_on_failure, all failed
        return WorkflowStatus.WORKFLOW_STATUS_PARTIALLY_SUCCEEDED

    def _mark_cancelled(self, why: str) -> None:
        for task in self.workflow.tasks:
            result = self.results[task.task_id]
            if result.status in (TaskStatus.TASK_STATUS_PENDING, TaskStatus.TASK_STATUS_RUNNING):
                result.status = TaskStatus.TASK_STATUS_CANCELLED
                result.error.CopyFrom(_cancelled(why))
                if result.HasField("start_time"):
                    result.end_time.FromMicroseconds(now_us())
                self._task_complete(task, result)

    async def _task(self, task: TaskSpec) -> None:
        result = self.results[task.task_id]
        try:
            for dep in task.depends_on:
                await self.finished[dep].wait()
            failed = [d for d in task.depends_on
                      if self.results[d].status != TaskStatus.TASK_STATUS_SUCCEEDED]
            if failed and not self.workflow.continue_on_failure:
                return  # the workflow is failing; _mark_cancelled records it
            if failed:
                result.status = TaskStatus.TASK_STATUS_SKIPPED
                result.error.CopyFrom(errors.ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_DEPENDENCY_FAILED,
                    f"not run: dependency {failed[0]!r} did not succeed",
                    {"dependency": failed[0]}).to_status(DOMAIN))
                self._task_complete(task, result)
                return
            await self._execute(task, result)
        finally:
            self.finished[task.task_id].set()

    async def _execute(self, task: TaskSpec, result: TaskResult) -> None:
        rendered = templates.render(task.input_template, self.variables, self.outputs)
        timeout = task.timeout.ToTimedelta().total_seconds() if task.HasField("timeout") \
            else None
        try:
            _check_input(task, rendered, "its input")  # before any branch starts
            with tracer.start_as_current_span(f"task {task.task_id}", attributes={
                    "hivemesh.task_id": task.task_id}):
                async with asyncio.timeout(None) as timer:
                    limit = _Limit(timeout, timer)
                    if task.HasField("fan_out"):
                        await self._fan_out(task, rendered, result, limit)
                    else:
                        async with self._slot(result, limit):
                            self._emit(EventType.EVENT_TYPE_TASK_START, TaskStart(
                                task_id=task.task_id, input=rendered),
                                self._ctx(task, task.agent, task.task_id), task.agent)
                            final = await self._follow(task, task.agent, task.model, rendered,
                                                       result, f"{task.task_id}")
                        result.result.CopyFrom(final)
                        result.output = final.output
        except TimeoutError:
            self._fail(task, result, errors.ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED, ErrorReason.ERROR_REASON_DEADLINE_EXCEEDED,
                f"task {task.task_id!r} ran out of its time limit"))
        except RunError as exc:
            self._fail(task, result, exc.error)
        except errors.ServiceError as exc:
            self._fail(task, result, exc)
        except Exception as exc:  # noqa: BLE001 - a defect fails its task, not the workflow
            # Left to escape, it would skip WORKFLOW_COMPLETE and leave the
            # other tasks running: the task fails as INTERNAL instead.
            log.error("task %r failed unexpectedly", task.task_id, exc_info=exc)
            self._fail(task, result, errors.internal())
        else:
            result.status = TaskStatus.TASK_STATUS_SUCCEEDED
            result.end_time.FromMicroseconds(now_us())
            self.outputs[task.task_id] = result.output
            self._task_complete(task, result)

    @contextlib.asynccontextmanager
    async def _slot(self, result: TaskResult, limit: _Limit) -> AsyncIterator[None]:
        """A concurrency slot for (a branch of, the judge of) the task. The
        task starts when it first holds one: its time limit counts from
        then, not while it waits for other tasks to make room."""
        async with self.slots:
            loop = asyncio.get_running_loop()
            if not result.HasField("start_time"):
                result.start_time.FromMicroseconds(now_us())
                result.status = TaskStatus.TASK_STATUS_RUNNING
                if limit.timeout is not None:
                    limit.deadline = loop.time() + limit.timeout
                    limit.timer.reschedule(limit.deadline)
            left = None if limit.deadline is None else max(0.0, limit.deadline - loop.time())
            with deadline_scope(left):
                yield

    def _fail(self, task: TaskSpec, result: TaskResult, error: errors.ServiceError) -> None:
        result.status = TaskStatus.TASK_STATUS_FAILED
        result.error.CopyFrom(error.to_status(DOMAIN))
        result.end_time.FromMicroseconds(now_us())
        self.first_error = self.first_error or result.error
        self._task_complete(task, result)
        if not self.workflow.continue_on_failure:
            raise _TaskFailed(error)

    def _ctx(self, task: TaskSpec, agent: str, key: str) -> ExecutionContext:
        return self.base.fork(agent, key, task_id=task.task_id)

    async def _run_agent(self, task: TaskSpec, agent: str, model: str, text: str,
                         result: TaskResult, key: str, handoff: bool = False) -> AgentResult:
        """One agent run of a task; usage (also of a failed or cancelled run,
        such as a branch another one beat) goes to the task. ``model``: the
        alias overriding the agent's own ("" for none: an agent taken over
        by handoff, or the judge, runs on its own model)."""
        _check_input(task, text, f"the input of agent {agent!r}")  # a judge's, a handoff's
        targets = tuple(n for n in self.startable if n != agent) if handoff else ()
        options = RunOptions(request_id=step_id(self.request.request_id, key), derived_id=True,
                             input=text, model_override=model,
                             variables=self.variables,
                             handoff_targets=targets, refuse_handoff=not task.allow_handoff,
                             on_cancel=lambda failed: self._charge(result, failed))
        definition = self.agents.get(agent)
        ctx = self._ctx(task, agent, key)

        async def attempt() -> AgentResult:
            return await self.runner.run(definition, ctx, options, self.sink)
        try:
            # A run that ended in an earlier attempt of this workflow is taken
            # as it was: run again, it could read what it wrote itself (its
            # memory write-back) and send the providers other requests under
            # the same request ids.
            run, _ = await self.ledger.once(
                "step", options.request_id, _step_fingerprint(definition, options, ctx), attempt,
                AgentResult, self.lease_s)
        except RunError as exc:
            self._charge(result, exc.failed)
            raise
        self._charge(result, run)
        return run

    def _charge(self, result: TaskResult, run: AgentResult | AgentFailed) -> None:
        """A run's usage and cost go to its task, its currency to the workflow."""
        _add_usage(result.usage, run.usage)
        result.cost_micros += run.cost_micros
        self.currency = self.currency or run.currency

    async def _follow(self, task: TaskSpec, agent: str, model: str, text: str,
                      result: TaskResult, key: str) -> AgentResult:
        """Run the agent, following its handoffs when the task allows them."""
        limit = task.max_handoffs or DEFAULT_MAX_HANDOFFS
        # Artifacts saved (by the artifact_save tool) by agents that handed
        # the task on: the task's too, ahead of the last agent's.
        saved: list[str] = []
        for hop in range(limit + 1):
            run = await self._run_agent(task, agent, model, text, result,
                                        key if hop == 0 else f"{key}:handoff{hop}",
                                        handoff=task.allow_handoff)
            if not run.HasField("handoff"):
                if saved:
                    ids = [*saved, *run.artifact_ids]
                    del run.artifact_ids[:]
                    run.artifact_ids.extend(ids)
                return run
            saved += run.artifact_ids
            if hop < limit:  # followed; the one past the limit is not
                result.handoffs.append(run.handoff)
            agent, text, model = run.handoff.to_agent, run.handoff.input, ""
        raise errors.ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_HANDOFF_LIMIT,
            f"task {task.task_id!r} was handed off more than {limit} times",
            {"max_handoffs": str(limit)})

    # ------------------------------------------------------------ fan-out

    def _branches(self, task: TaskSpec) -> list[_Branch]:
        fan = task.fan_out
        if fan.WhichOneof("branches") == "agents":
            return [_Branch(a, a, task.model) for a in fan.agents.agents]
        return [_Branch(m, task.agent, m) for m in fan.models.models]

    async def _branch(self, task: TaskSpec, branch: _Branch, index: int, text: str,
                      result: TaskResult, limit: _Limit) -> AgentResult:
        async with self._slot(result, limit):
            self._emit(EventType.EVENT_TYPE_TASK_START, TaskStart(
                task_id=task.task_id, input=text, branch=branch.label),
                self._ctx(task, branch.agent, f"{task.task_id}:b{index}"), branch.agent)
            return await self._follow(task, branch.agent, branch.model, text, result,
                                      f"{task.task_id}:b{index}")

    async def _fan_out(self, task: TaskSpec, text: str, result: TaskResult,
                       limit: _Limit) -> None:
        branches = self._branches(task)
        records = [BranchResult(branch=b.label, agent=b.agent, model=b.model)
                   for b in branches]
        runs = [asyncio.create_task(self._branch(task, b, i, text, result, limit))
                for i, b in enumerate(branches)]
        combine = task.fan_out.combine
        try:
            if combine == CombineMode.COMBINE_MODE_FIRST:
                await self._first(runs, records)
            else:
                await asyncio.gather(*runs, return_exceptions=True)
        except BaseException:
            # Out of time, or the workflow is ending: each branch is still
            # reported, as far as it got.
            await _stop(runs, records, result, "the task ended before this branch did")
            raise
        await _stop(runs, records, result, "another branch answered first")
        winners = [r for r in records if r.HasField("result")]
        if not winners:
            first = next((r.error for r in records if r.HasField("error")), None)
            raise errors.ServiceError(
                grpc.StatusCode.ABORTED, ErrorReason.ERROR_REASON_ALL_BRANCHES_FAILED,
                f"every branch of task {task.task_id!r} failed"
                + (f"; first: {first.message}" if first is not None else ""))
        if combine == CombineMode.COMBINE_MODE_FIRST:
            chosen = next(r for r in records if r.selected)
            result.result.CopyFrom(chosen.result)
            result.output = chosen.result.output
        elif combine == CombineMode.COMBINE_MODE_ALL:
            # Text as written: escaped, every non-ASCII character would
            # reach the next agent as six (and cost as many tokens).
            result.output = json.dumps([{"branch": r.branch, "output": r.result.output}
                                        for r in winners], ensure_ascii=False)
        else:
            judged = "\n\n".join(f"### Candidate from {r.branch}\n{r.result.output}"
                                 for r in winners)
            judge_input = (f"Task:\n{text}\n\nCandidates:\n\n{judged}\n\n"
                           "Pick or merge the best answer and give the final answer.")
            async with self._slot(result, limit):
                final = await self._run_agent(task, task.fan_out.judge_agent, "", judge_input,
                                              result, f"{task.task_id}:judge")
            result.result.CopyFrom(final)
            result.output = final.output

    async def _first(self, runs: list[asyncio.Task], records: list[BranchResult]) -> None:
        pending = set(runs)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for finished in done:
                if not finished.cancelled() and finished.exception() is None:
                    records[runs.index(finished)].selected = True
                    return


def _check_input(task: TaskSpec, text: str, what: str) -> None:
    """An input longer than an agent run takes (the outputs of the tasks it
    names may make it so) fails the task as itself, INVALID_ARGUMENT with
    reason PAYLOAD_TOO_LARGE, not as whatever the LLM call it would make
    answered (an upstream error, when its message outgrew gRPC's limit)."""
    if len(text) > MAX_INPUT_CHARS:
        raise errors.ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT, ErrorReason.ERROR_REASON_PAYLOAD_TOO_LARGE,
            f"task {task.task_id!r}: {what} is {len(text):,} characters once rendered, more "
            f"than the {MAX_INPUT_CHARS:,} an agent's input may have",
            {"size_chars": str(len(text)), "limit_chars": str(MAX_INPUT_CHARS)})


def _step_fingerprint(agent: AgentDefinition, options: RunOptions,
                      ctx: ExecutionContext) -> str:
    """What one agent run of a workflow asks for: the agent (by name), the
    input, the model, whether it may hand off and the context it runs in
    (its tenant and session: another tenant's request under the same id is
    another request, never a replay of this one). Not what the registry
    holds meanwhile (the agent's definition, the agents a handoff may
    reach): a retry of the workflow after an agent was updated takes the
    runs that ended from their records, as the first attempt left them,
    instead of failing them as conflicts."""
    return hashlib.sha256(json.dumps([
        agent.name, ctx.to_proto().SerializeToString(deterministic=True).hex(), options.input,
        options.model_override, options.refuse_handoff,
        sorted(options.variables.items())]).encode()).hexdigest()


async def _cancel_all(tasks) -> None:
    """Cancels ``tasks`` and waits until every one has ended, also when the
    caller is cancelled meanwhile: what they report (their results, the
    usage their runs charge, their TASK_COMPLETE) is then all in before it
    is read, and none of them goes on after its workflow has ended. A
    cancellation of the caller while it waits is passed on to the tasks
    (their runs stop waiting for the calls that settle them, such as the
    release of a budget hold, which go on in the background) and raised
    once they have ended."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    interrupted: asyncio.CancelledError | None = None
    while not all(task.done() for task in tasks):
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError as exc:
            interrupted = exc
            for task in tasks:
                task.cancel()
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: reported by the caller, not logged
    if interrupted is not None:
        raise interrupted


async def _stop(runs: list[asyncio.Task], records: list[BranchResult], result: TaskResult,
                why: str) -> None:
    """Cancel the branches still running (``why``) and record every branch
    in the task's result (also when the task is cancelled meanwhile)."""
    try:
        await _cancel_all(runs)
    finally:
        for run, record in zip(runs, records, strict=True):
            _record_branch(run, record, why)
        result.branches.extend(records)


def _record_branch(run: asyncio.Task, record: BranchResult, why: str) -> None:
    if run.cancelled():
        record.error.CopyFrom(_cancelled(why))
        return
    exc = run.exception()
    if exc is None:
        record.result.CopyFrom(run.result())
        record.model = record.result.model or record.model
    elif isinstance(exc, RunError):
        record.error.CopyFrom(exc.error.to_status(DOMAIN))
    elif isinstance(exc, errors.ServiceError):
        record.error.CopyFrom(exc.to_status(DOMAIN))
    else:
        # The error tells to see the service log: the defect must be there.
        log.error("fan-out branch %r failed unexpectedly", record.branch, exc_info=exc)
        record.error.CopyFrom(errors.internal().to_status(DOMAIN))


def fit_response(response: RunWorkflowResponse, limit: int) -> RunWorkflowResponse:
    """A workflow's response as a call can carry it. Outputs are repeated in
    it (a task's output, its final agent's, each branch's): when the whole
    outgrows the message limit, only each task's output stays (the agents'
    outputs are also in their artifacts); then, if still too big, the
    agents' tool calls keep their names and ids but lose their arguments and
    results (the TOOL_EXECUTE events carried them); when even that is too
    big, the run fails with RESOURCE_EXHAUSTED, reason PAYLOAD_TOO_LARGE,
    naming the sizes, and is not kept for replay."""
    results = [result for task in response.tasks for result in agent_results(task)]
    size = shed(response, results, limit - RESPONSE_MARGIN_BYTES)
    if size > limit - RESPONSE_MARGIN_BYTES:
        raise errors.ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "PAYLOAD_TOO_LARGE",
            f"the workflow's results are {size:,} bytes, more than the {limit:,} a response "
            "may carry; the tasks' outputs are in the artifact store where their agents save "
            "one", {"size_bytes": str(size), "limit_bytes": str(limit)})
    return response
