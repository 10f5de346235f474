"""The in-process event bus: every event of a run passes through
the bus's middleware (which may enrich or drop it), then reaches the
subscribers in priority order (higher first). A subscriber that raises is
logged and counted, never allowed to break the run.

Remote subscribers (SubscribeEvents) are :class:`Subscription` objects: a
filter and a bounded queue. A subscriber too slow to keep up is ended with
FAILED and the number of dropped events rather than slowing every run.

Events of one run are numbered by an :class:`EventSink` (one per workflow
run, or per agent run outside a workflow), so ``sequence`` has no gaps.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from hivemesh.common.v1 import RequestContext
from hivemesh.orchestrator.v1 import AgentEvent, AgentResult, EventPriority, EventType, TaskResult
from hivemesh.runtime.wellknown import now_us, timestamp

log = logging.getLogger("hivemesh.orchestrator.events")

EventMiddleware = Callable[[AgentEvent], AgentEvent | None]
Subscriber = Callable[[AgentEvent], None]

_PAYLOAD = {
    EventType.EVENT_TYPE_AGENT_START: "agent_start",
    EventType.EVENT_TYPE_MEMORY_RECALLED: "memory_recalled",
    EventType.EVENT_TYPE_GENERATION_CHUNK: "generation_chunk",
    EventType.EVENT_TYPE_TOOL_EXECUTE: "tool_execute",
    EventType.EVENT_TYPE_ARTIFACT_SAVED: "artifact_saved",
    EventType.EVENT_TYPE_BUDGET_ALERT: "budget_alert",
    EventType.EVENT_TYPE_AGENT_COMPLETE: "agent_complete",
    EventType.EVENT_TYPE_AGENT_FAILED: "agent_failed",
    EventType.EVENT_TYPE_HANDOFF: "handoff",
    EventType.EVENT_TYPE_TASK_START: "task_start",
    EventType.EVENT_TYPE_TASK_COMPLETE: "task_complete",
    EventType.EVENT_TYPE_WORKFLOW_COMPLETE: "workflow_complete",
    EventType.EVENT_TYPE_WORKFLOW_START: "workflow_start",
    EventType.EVENT_TYPE_GENERATION_COMPLETE: "generation_complete",
    EventType.EVENT_TYPE_MEMORY_WRITTEN: "memory_written",
    EventType.EVENT_TYPE_DEGRADED: "degraded",
}
_HIGH = {EventType.EVENT_TYPE_AGENT_FAILED, EventType.EVENT_TYPE_BUDGET_ALERT}


def default_priority(event_type: int, payload) -> int:
    if event_type == EventType.EVENT_TYPE_GENERATION_CHUNK:
        return EventPriority.EVENT_PRIORITY_LOW
    if event_type in _HIGH or (event_type == EventType.EVENT_TYPE_WORKFLOW_COMPLETE
                               and payload.HasField("error")):
        return EventPriority.EVENT_PRIORITY_HIGH
    return EventPriority.EVENT_PRIORITY_NORMAL


def build_event(event_type: int, context: RequestContext, trace_id: str, payload, *,
                agent: str = "", sequence: int) -> AgentEvent:
    """An event as a run sends it: its own event_id, the time now and the
    type's default priority."""
    event = AgentEvent(event_id=str(uuid.uuid4()), type=event_type, context=context,
                       create_time=timestamp(now_us()), trace_id=trace_id,
                       priority=default_priority(event_type, payload), agent=agent,
                       sequence=sequence)
    getattr(event, _PAYLOAD[event_type]).CopyFrom(payload)
    return event


def agent_results(message) -> list[AgentResult]:
    """The agent results ``message`` holds: itself (an AgentResult), or a
    task's final agent's and its branches' (a TaskResult)."""
    if isinstance(message, AgentResult):
        return [message]
    if isinstance(message, TaskResult):
        return [holder.result for holder in (message, *message.branches)
                if holder.HasField("result")]
    return []


def shed(message, results: list[AgentResult], limit: int) -> int:
    """Makes ``message`` smaller, in place, until it is at most ``limit``
    bytes, leaving out of the agent ``results`` it holds: first their
    outputs (a task's output is kept beside them; an agent's is also in its
    artifact), then their tool calls' arguments and results (names and ids
    stay; the TOOL_EXECUTE events carried them). Returns its size then,
    which may still be over ``limit``."""
    size = message.ByteSize()
    if size <= limit:
        return size
    for result in results:
        result.output = ""
    size = message.ByteSize()
    if size <= limit:
        return size
    for result in results:
        for call in result.tool_calls:
            call.arguments = call.result = ""
    return message.ByteSize()


def fit_event(event: AgentEvent, limit: int) -> AgentEvent:
    """The event as a message of at most ``limit`` bytes carries it: the
    event itself when it fits, else a copy marked ``trimmed`` whose payload
    sheds what a RunWorkflow response sheds (:func:`shed`), then, if still
    too big, its longest texts, longest first, and at worst the payload
    itself. A stream then goes on to its terminal events instead of
    breaking on one it cannot send."""
    if event.ByteSize() <= limit:
        return event
    fitted = AgentEvent()
    fitted.CopyFrom(event)
    fitted.trimmed = True
    which = fitted.WhichOneof("payload")
    if which is None:
        return fitted
    payload = getattr(fitted, which)
    excess = shed(fitted, agent_results(payload), limit) - limit
    for length, holder, name in sorted(_texts(payload), key=lambda t: -t[0]):
        if excess <= 0:
            break
        holder.ClearField(name)
        excess -= length
    if fitted.ByteSize() > limit:
        fitted.ClearField(which)
    return fitted


def _texts(message):
    """(size in bytes, holder, field name) of every non-empty singular
    string or bytes field in ``message``, its nested messages' included."""
    for kind, value in message.ListFields():
        if kind.type in (kind.TYPE_STRING, kind.TYPE_BYTES):
            if not kind.is_repeated:
                yield len(value.encode() if isinstance(value, str) else value), message, kind.name
        elif kind.type == kind.TYPE_MESSAGE and not kind.message_type.GetOptions().map_entry:
            for item in (value if kind.is_repeated else (value,)):
                yield from _texts(item)


@dataclass(eq=False)
class Subscription:
    """One SubscribeEvents stream: its filters and its queue."""

    workflow_id: str = ""
    agent: str = ""
    types: frozenset[int] = frozenset()
    min_priority: int = 0
    context_id: str = ""
    # Ends with the workflow's WORKFLOW_COMPLETE, whatever the filters let through.
    until_workflow_complete: bool = False
    queue_size: int = 10_000
    queue: asyncio.Queue = field(init=False)
    dropped: int = 0

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(self.queue_size)

    def matches(self, event: AgentEvent) -> bool:
        return ((not self.workflow_id or event.context.workflow_id == self.workflow_id)
                and (not self.agent or event.agent == self.agent)
                and (not self.types or event.type in self.types)
                and event.priority >= self.min_priority
                and (not self.context_id or event.context.context_id == self.context_id))

    def ends_with(self, event: AgentEvent) -> bool:
        return (self.until_workflow_complete
                and event.type == EventType.EVENT_TYPE_WORKFLOW_COMPLETE
                and event.context.workflow_id == self.workflow_id)

    def offer(self, event: AgentEvent) -> None:
        if self.dropped:
            self.dropped += 1  # already failed; the stream ends at its next read
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1


class EventBus:
    def __init__(self) -> None:
        self._middleware: list[EventMiddleware] = []
        self._subscribers: list[tuple[int, int, Subscriber]] = []
        # Counts every subscribe, so ties keep their order after unsubscribes.
        self._subscribed = itertools.count()
        self._subscriptions: set[Subscription] = set()
        self.subscriber_errors = 0

    def use(self, middleware: EventMiddleware) -> None:
        """Add a middleware; they run in the order added."""
        self._middleware.append(middleware)

    def subscribe(self, subscriber: Subscriber, priority: int = 0) -> Callable[[], None]:
        """Call ``subscriber`` for every event, higher priority first (ties in
        the order subscribed). Returns a function that unsubscribes."""
        entry = (-priority, next(self._subscribed), subscriber)
        self._subscribers.append(entry)
        self._subscribers.sort(key=lambda e: e[:2])
        return lambda: self._subscribers.remove(entry) if entry in self._subscribers else None

    def add_subscription(self, subscription: Subscription) -> None:
        self._subscriptions.add(subscription)

    def remove_subscription(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    @property
    def idle(self) -> bool:
        return not self._subscribers and not self._subscriptions

    def publish(self, event: AgentEvent) -> AgentEvent | None:
        """Run the middleware and deliver; returns the event as delivered,
        or None when a middleware dropped it."""
        for middleware in self._middleware:
            try:
                result = middleware(event)
            except Exception:
                log.exception("event middleware failed; event delivered unchanged")
                continue
            if result is None:
                return None
            event = result
        # A copy: a subscriber may subscribe or unsubscribe (itself, say)
        # while it is called, and the others must still get the event.
        for _, _, subscriber in tuple(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                self.subscriber_errors += 1
                log.exception("event subscriber failed", extra={"event_type": event.type})
        for subscription in self._subscriptions:
            if subscription.matches(event) or subscription.ends_with(event):
                subscription.offer(event)
        return event


class EventSink:
    """Builds and numbers the events of one run, sends them to the bus and
    to an optional listener (a StreamAgent call)."""

    def __init__(self, bus: EventBus, listener: Subscriber | None = None) -> None:
        self.bus = bus
        self.listener = listener
        self.sequence = 0

    def emit(self, event_type: int, context: RequestContext, trace_id: str, payload, *,
             agent: str = "") -> AgentEvent | None:
        self.sequence += 1
        if self.listener is None and self.bus.idle:
            return None  # nobody listens: numbered, never built
        event = build_event(event_type, context, trace_id, payload, agent=agent,
                            sequence=self.sequence)
        delivered = self.bus.publish(event)
        if delivered is not None and self.listener is not None:
            self.listener(delivered)
        return delivered
