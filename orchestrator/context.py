"""The execution context of an agent run (seeds 001 and 002): who the run
is for, where it sits in a workflow, and state shared along the run. A
sub-agent (a handoff target, a fan-out branch, a judge) runs in a fork: a
new context id whose parent is the forking run, same tenant and workflow."""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from opentelemetry import baggage
from opentelemetry import context as otel_context

from hivemesh.common.v1 import RequestContext


_CONTEXT_IDS = uuid.UUID("6f1c2a52-3c1e-4b8e-9a57-0d5c1f3e8b21")


def derived_context_id(*parts: str) -> str:
    """The context id of a run, derived from its request: a retry of the
    request runs under the same id and so sends every provider the very
    requests of the first attempt, which their idempotency keys then accept
    (answering what was already done) instead of refusing as conflicts."""
    return f"ctx-{uuid.uuid5(_CONTEXT_IDS, chr(31).join(parts)).hex}"


def derived_workflow_id(request_id: str) -> str:
    """The id of a workflow run whose definition names none, derived from
    its request like a context id, for the same reason: the providers get
    the very requests of the first attempt ("wf-" + a UUID)."""
    return f"wf-{uuid.uuid5(_CONTEXT_IDS, chr(31).join(('workflow', request_id)))}"


# Request ids are at most this long in every contract.
MAX_REQUEST_ID = 128


def step_id(request_id: str, *parts: object) -> str:
    """The request id of one step of a request (its reserve, its n-th
    generation, a task of a workflow, ...): ``request_id:part:part``, or a
    digest of that when it would be longer than a request id may be. The
    same step of the same request always gets the same id, and no step of
    another request the same one: the caller's id is escaped (``%`` and
    ``:`` as ``%25`` and ``%3A``; an id without them is unchanged), so that
    request ``job`` with step ``a:b0`` and request ``job:a`` with step
    ``b0`` stay apart."""
    escaped = request_id.replace("%", "%25").replace(":", "%3A")
    return sub_step_id(escaped, *parts)


def sub_step_id(step: str, *parts: object) -> str:
    """The request id of a step of a step (a workflow task's generation):
    ``step`` is already a step id, not escaped again, so that it stays
    apart from a caller's request id that reads like it (a RunAgent sent
    with request_id "job:t1" and task t1 of workflow request "job")."""
    full = ":".join([step, *map(str, parts)])
    if len(full) <= MAX_REQUEST_ID:
        return full
    return "h-" + hashlib.sha256(full.encode()).hexdigest()


@dataclass
class ExecutionContext:
    context_id: str
    agent: str  # the agent definition that runs
    tenant_id: str = ""
    workflow_id: str = ""
    task_id: str = ""
    session_id: str = ""
    parent_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    # The caller's agent id (budget scopes, lineage); empty: the agent's name.
    agent_id: str = ""

    @classmethod
    def from_request(cls, context: RequestContext, agent: str,
                     request_id: str) -> ExecutionContext:
        """The context of the run ``request_id`` asks for: the caller's
        context id, or one derived from the request id."""
        return cls(context_id=context.context_id or derived_context_id(request_id),
                   agent=agent, tenant_id=context.tenant_id, workflow_id=context.workflow_id,
                   task_id=context.task_id, session_id=context.session_id,
                   parent_id=context.parent_context_id, agent_id=context.agent_id)

    def fork(self, agent: str, key: str, **changes: Any) -> ExecutionContext:
        """A child context for a sub-agent, its id derived from this one's
        and ``key`` (unique among this context's forks); state is copied,
        not shared. The child acts as ``agent``, not as the caller's agent."""
        return replace(self, context_id=derived_context_id(self.context_id, key), agent=agent,
                       parent_id=self.context_id, state=dict(self.state), agent_id="",
                       **changes)

    def to_proto(self) -> RequestContext:
        return RequestContext(tenant_id=self.tenant_id, workflow_id=self.workflow_id,
                              task_id=self.task_id, agent_id=self.agent_id or self.agent,
                              context_id=self.context_id, parent_context_id=self.parent_id,
                              session_id=self.session_id)


@contextlib.contextmanager
def baggage_of(ctx: ExecutionContext) -> Iterator[None]:
    """Tenant and workflow travel as W3C baggage on every call made inside."""
    current = otel_context.get_current()
    for key, value in (("hivemesh.tenant_id", ctx.tenant_id),
                       ("hivemesh.workflow_id", ctx.workflow_id)):
        if value:
            current = baggage.set_baggage(key, value, current)
    token = otel_context.attach(current)
    try:
        yield
    finally:
        otel_context.detach(token)
