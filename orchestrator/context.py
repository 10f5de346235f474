"""The execution context of an agent run (seeds 001 and 002): who the run
is for, where it sits in a workflow, and state shared along the run. A
sub-agent (a handoff target, a fan-out branch, a judge) runs in a fork: a
new context id whose parent is the forking run, same tenant and workflow."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from opentelemetry import baggage
from opentelemetry import context as otel_context

from hivemesh.common.v1 import RequestContext


def new_context_id() -> str:
    return f"ctx-{uuid.uuid4().hex}"


@dataclass
class ExecutionContext:
    context_id: str
    agent: str
    tenant_id: str = ""
    workflow_id: str = ""
    task_id: str = ""
    session_id: str = ""
    parent_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_request(cls, context: RequestContext, agent: str) -> ExecutionContext:
        return cls(context_id=context.context_id or new_context_id(), agent=agent,
                   tenant_id=context.tenant_id, workflow_id=context.workflow_id,
                   task_id=context.task_id, session_id=context.session_id,
                   parent_id=context.parent_context_id)

    def fork(self, agent: str, **changes: Any) -> ExecutionContext:
        """A child context for a sub-agent; state is copied, not shared."""
        return replace(self, context_id=new_context_id(), agent=agent,
                       parent_id=self.context_id, state=dict(self.state), **changes)

    def to_proto(self) -> RequestContext:
        return RequestContext(tenant_id=self.tenant_id, workflow_id=self.workflow_id,
                              task_id=self.task_id, agent_id=self.agent,
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
