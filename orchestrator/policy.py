"""The call policy toward the providers, in one place.

Every outbound call goes through :class:`Providers`, which

* carves its deadline from the run's remaining time (``deadline_scope``; or
  the share of it the call is given), capped by ``call_timeout_s``, and
  refuses to start a call with less than ``min_call_time_s`` left
  (DEADLINE_EXCEEDED, reason DEADLINE_TOO_SHORT);
* keeps one circuit breaker per provider: after consecutive failures that
  say the provider is unhealthy (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL,
  UNKNOWN) calls fail fast with UNAVAILABLE, reason CIRCUIT_OPEN, until a
  probe call succeeds; the LLM service saying one model's upstream failed
  is not the service failing. A call that ran out of time only because the run had
  less left than ``call_timeout_s`` (the caller's own deadline), and less
  than twice what the provider's recent answers to that method took, says
  nothing about the provider: it is not counted, and a probe ending so lets
  another call probe;
* opens a CLIENT span per call (the provider's server span is its child)
  and forwards W3C trace context;
* turns a provider's gRPC error into a ServiceError with the same code,
  reason and metadata, plus ``provider``, so it can be returned as is.

Retries are not done here: each channel carries its API's gRPC service
config (UNAVAILABLE only, bounded attempts, jittered backoff, retry
throttling), so a retried call stays one client span; or, when the
providers are reached through the Envoy sidecar's egress listeners (which
retry on another pod), no retry policy at all (``channel_retries``, for
the four providers; remote tool servers are reached directly and keep
theirs), so that one layer retries a failure, not both.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from hivemesh.artifact.v1 import ArtifactServiceStub
from hivemesh.client.base import trace_metadata
from hivemesh.client.channel import ChannelTls, open_channel
from hivemesh.client.errors import HivemeshError, from_rpc_error
from hivemesh.common.v1 import ErrorReason
from hivemesh.information.v1 import InformationServiceStub
from hivemesh.llm.v1 import LlmServiceStub
from hivemesh.memory.v1 import MemoryServiceStub
from hivemesh.orchestrator.v1 import ToolServiceStub
from hivemesh.runtime import errors
from hivemesh.runtime.resilience import CircuitBreaker, Permit, RecentLatencies
from hivemesh.runtime.telemetry import child_span

tracer = trace.get_tracer("hivemesh.orchestrator")

# Absolute time.monotonic() by which the current run must end.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "hivemesh_run_deadline", default=None)

_UNHEALTHY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
# How much earlier than the call's own deadline a DEADLINE_EXCEEDED may be
# seen and still be that deadline passing (gRPC keeps deadlines on its own
# clock, not quite ``time.monotonic``).
_CLOCK_SLACK_S = 0.02
# A call cut short by its caller's deadline counts against the provider
# when it had at least twice the median time of the provider's recent
# answers to the same method (over the last _LATENCY_WINDOW; see
# RecentLatencies).
_LATENCY_WINDOW = 32

# provider -> (api whose service config the channel loads, stub, full service name)
_PROVIDERS = {
    "llm": ("llm", LlmServiceStub, "hivemesh.llm.v1.LlmService"),
    "memory": ("memory", MemoryServiceStub, "hivemesh.memory.v1.MemoryService"),
    "information": ("information", InformationServiceStub,
                    "hivemesh.information.v1.InformationService"),
    "artifact": ("artifact", ArtifactServiceStub, "hivemesh.artifact.v1.ArtifactService"),
}
TOOL_SERVICE = ("orchestrator", ToolServiceStub, "hivemesh.orchestrator.v1.ToolService")


@contextlib.contextmanager
def deadline_scope(timeout_s: float | None) -> Iterator[float]:
    """Run the block with a deadline ``timeout_s`` from now, or the
    enclosing one if that is earlier. Yields the absolute deadline."""
    now = time.monotonic()
    outer = _deadline.get()
    deadline = outer if timeout_s is None else now + timeout_s
    if outer is not None:
        deadline = min(deadline, outer)
    if deadline is None:
        raise ValueError("deadline_scope needs a timeout outside a run")
    token = _deadline.set(deadline)
    try:
        yield deadline
    finally:
        _deadline.reset(token)


@contextlib.contextmanager
def beyond_deadline() -> Iterator[None]:
    """Calls made in the block settle what a run already did (release its
    budget hold, record what it spent): they run even when the run's own
    deadline has passed, each within the call timeout."""
    token = _deadline.set(None)
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining_s() -> float | None:
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def deadline_exceeded(what: str) -> errors.ServiceError:
    return errors.ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_TOO_SHORT",
                               f"too little time left for {what}")


@dataclass
class Provider:
    name: str
    service: str
    channel: grpc.aio.Channel
    stub: Any
    breaker: CircuitBreaker
    # method -> how long its recent successful calls took
    latencies: dict[str, RecentLatencies] = field(default_factory=dict)

    def answered(self, method: str, took_s: float) -> None:
        window = self.latencies.get(method)
        if window is None:
            window = self.latencies[method] = RecentLatencies(_LATENCY_WINDOW)
        window.answered(took_s)

    def within_usual(self, method: str, time_s: float) -> bool:
        """See RecentLatencies.within_usual (per method)."""
        window = self.latencies.get(method)
        return window is not None and window.within_usual(time_s)


@dataclass
class _Attempt:
    """One call: ``cut`` when the run's remaining time made its timeout
    shorter than the call timeout."""
    provider: Provider
    method: str
    timeout: float
    cut: bool
    started: float = field(default_factory=time.monotonic)

    def callers_deadline(self, error: errors.ServiceError) -> bool:
        """Whether ``error`` is the call running out of the time its run had
        left, shorter than the call timeout and than the provider usually
        needs: the caller's deadline, not a sign of the provider's health (a
        caller sending tight deadlines must not open the breaker for
        everyone). Either the call's deadline passed, or the provider said
        too little of it was left to start the work. A call that had the
        whole call timeout, or twice the provider's usual time (or that
        has no usual time yet), and ran out of it still counts: a provider
        that hangs opens its breaker whatever deadlines its callers send."""
        if not self.cut or error.code != grpc.StatusCode.DEADLINE_EXCEEDED:
            return False
        if errors.reason_name(error.reason) != "DEADLINE_TOO_SHORT" and \
                time.monotonic() < self.started + self.timeout - _CLOCK_SLACK_S:
            return False
        return self.provider.within_usual(self.method, self.timeout)


class Providers:
    """The provider channels (the four providers, and remote tool servers
    named ``tool:<server>``) and the policy every call goes through."""

    def __init__(self, addresses: dict[str, str | None], *, call_timeout_s: float = 60.0,
                 min_call_time_s: float = 0.05, breaker_failure_threshold: int = 5,
                 breaker_reset_s: float = 10.0, channel_retries: bool = True,
                 tls: ChannelTls | None = None) -> None:
        self.call_timeout_s = call_timeout_s
        self.min_call_time_s = min_call_time_s
        self._breaker = (breaker_failure_threshold, breaker_reset_s)
        self._providers: dict[str, Provider] = {}
        for name, address in addresses.items():
            if address:
                self.add(name, address, _PROVIDERS[name], retries=channel_retries, tls=tls)

    def add(self, name: str, address: str, kind: tuple[str, type, str], *,
            retries: bool = True, tls: ChannelTls | None = None) -> None:
        """``retries=False``: the channel does not retry (the address is a
        sidecar egress listener, which does); tool servers keep theirs.
        ``tls``: a TLS channel (the providers' or the tool servers' TLS
        settings), else plaintext. The service config's per-method timeouts
        are left out: every call here carries the deadline carved for it
        (up to CALL_TIMEOUT_S), which they would cut shorter."""
        api, stub, service = kind
        channel = open_channel(address, api, tls, retries=retries, timeouts=False)
        self._providers[name] = Provider(name, service, channel, stub(channel),
                                         CircuitBreaker(*self._breaker))

    def has(self, name: str) -> bool:
        return name in self._providers

    def breaker(self, name: str) -> CircuitBreaker:
        return self._provider(name).breaker

    async def close(self) -> None:
        for provider in self._providers.values():
            await provider.channel.close()

    def _provider(self, name: str) -> Provider:
        provider = self._providers.get(name)
        if provider is None:
            raise errors.ServiceError(
                grpc.StatusCode.UNAVAILABLE, ErrorReason.ERROR_REASON_BACKEND_UNAVAILABLE,
                f"no {name} service is configured for the orchestrator", {"provider": name})
        return provider

    def _timeout(self, what: str, share: float = 1.0) -> tuple[float, bool]:
        """(timeout, cut): the call's timeout, and whether the run's
        remaining time cut it below ``call_timeout_s``."""
        left = remaining_s()
        timeout = self.call_timeout_s if left is None else min(left * share,
                                                                self.call_timeout_s)
        if timeout < self.min_call_time_s:
            raise deadline_exceeded(what)
        return timeout, timeout < self.call_timeout_s

    def check(self, name: str, method: str, share: float = 1.0) -> None:
        """Raises what ``call`` would raise before sending ``method``
        (too little time left, the breaker open), and nothing else: for a
        step that must be done only if the call will be sent."""
        provider = self._provider(name)
        self._timeout(f"{name} {method}", share)
        if not provider.breaker.would_allow():
            raise _circuit_open(provider, method)

    def _admit(self, provider: Provider, method: str) -> Permit:
        permit = provider.breaker.allow()
        if permit is None:
            raise _circuit_open(provider, method)
        return permit

    @staticmethod
    def _record(attempt: _Attempt, error: errors.ServiceError | None,
                permit: Permit) -> None:
        breaker = attempt.provider.breaker
        if error is None:
            breaker.record_success()
            attempt.provider.answered(attempt.method, time.monotonic() - attempt.started)
        elif (error.code not in _UNHEALTHY or attempt.callers_deadline(error)
              or _about_one_backend(error)):
            breaker.release_probe(permit)
        else:
            breaker.record_failure(permit)

    @contextlib.contextmanager
    def _outcome(self, attempt: _Attempt, span, permit: Permit) -> Iterator[None]:
        """Feeds the call's outcome to the breaker and the span; a gRPC error
        leaves as the provider's ServiceError."""
        try:
            yield
        except grpc.RpcError as err:
            error = provider_error(attempt.provider.name, from_rpc_error(err))
            self._record(attempt, error, permit)
            _span_error(span, error)
            raise error from err
        except BaseException:
            attempt.provider.breaker.release_probe(permit)
            raise
        self._record(attempt, None, permit)

    @contextlib.contextmanager
    def _span(self, provider: Provider, method: str, attributes: dict | None) -> Iterator:
        with child_span(
                tracer, f"{provider.service}/{method}", kind=SpanKind.CLIENT,
                attributes={"rpc.system": "grpc", "rpc.service": provider.service,
                            "rpc.method": method, **(attributes or {})},
                record_exception=False, set_status_on_exception=False) as span:
            yield span

    async def call(self, name: str, method: str, request: Any, *,
                   span_attributes: dict | None = None,
                   annotate: Callable[[Any, Any], None] | None = None,
                   share: float = 1.0) -> Any:
        """One unary call under the policy. Raises ServiceError.
        ``annotate(span, response)`` adds attributes from the response.
        ``share``: the most of the run's remaining time the call may take
        (a call the run can do without leaves it time to go on)."""
        provider = self._provider(name)
        timeout, cut = self._timeout(f"{name} {method}", share)
        permit = self._admit(provider, method)
        with self._span(provider, method, span_attributes) as span:
            with self._outcome(_Attempt(provider, method, timeout, cut), span, permit):
                response = await getattr(provider.stub, method)(
                    request, timeout=timeout, metadata=trace_metadata())
            if annotate is not None:
                annotate(span, response)
            return response

    async def stream(self, name: str, method: str, request: Any, *,
                     span_attributes: dict | None = None,
                     annotate: Callable[[Any, Any], None] | None = None) -> AsyncIterator[Any]:
        """A server-streaming call under the policy; yields its messages.
        ``annotate(span, last_message)`` runs when the stream ends."""
        provider = self._provider(name)
        timeout, cut = self._timeout(f"{name} {method}")
        permit = self._admit(provider, method)
        with self._span(provider, method, span_attributes) as span:
            attempt = _Attempt(provider, method, timeout, cut)
            call = getattr(provider.stub, method)(request, timeout=timeout,
                                                  metadata=trace_metadata())
            last = None
            try:
                with self._outcome(attempt, span, permit):
                    async for message in call:
                        last = message
                        yield message
            finally:
                call.cancel()  # no-op once the stream has ended
                # Also when the reader stopped at the last message (a
                # terminal message saying the stream failed, say).
                if annotate is not None and last is not None:
                    annotate(span, last)


def _circuit_open(provider: Provider, method: str) -> errors.ServiceError:
    return errors.ServiceError(
        grpc.StatusCode.UNAVAILABLE, "CIRCUIT_OPEN",
        f"{provider.name} circuit is open after repeated failures; not calling {method}",
        {"provider": provider.name})


def _about_one_backend(error: errors.ServiceError) -> bool:
    """Whether the provider answered about one backend of its own, not
    about itself: the LLM service saying a model's upstream failed
    (``upstream_error``) or that its own breakers are open for the model's
    backends (``backends``). The service is healthy and serves other models:
    counted against it, one model's outage would fail every model's calls
    fast; its own breakers and the run's fallback chain deal with the model."""
    return "upstream_error" in error.metadata or (
        errors.reason_name(error.reason) == "CIRCUIT_OPEN" and "backends" in error.metadata)


# Reasons of errors with no ErrorInfo (the provider was never reached or
# never answered: gRPC made the status).
_TRANSPORT_REASONS = {grpc.StatusCode.UNAVAILABLE: ErrorReason.ERROR_REASON_BACKEND_UNAVAILABLE,
                      grpc.StatusCode.DEADLINE_EXCEEDED: ErrorReason.ERROR_REASON_DEADLINE_EXCEEDED}


def provider_error(name: str, typed: HivemeshError) -> errors.ServiceError:
    """The provider's error as this service's own: same code, reason,
    metadata and details (BadRequest field violations, RetryInfo,
    QuotaFailure violations), plus which provider failed."""
    reason = typed.reason or _TRANSPORT_REASONS.get(typed.code,
                                                    ErrorReason.ERROR_REASON_UPSTREAM_ERROR)
    details: list = []
    if typed.field_violations:
        details.append(errors.bad_request(typed.field_violations))
    if typed.retry_delay is not None:
        details.append(errors.retry_info(typed.retry_delay.total_seconds()))
    if typed.quota_violations:
        details.append(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=subject, description=description)
            for subject, description in typed.quota_violations]))
    # The provider was already retried by this service's own policy: a
    # caller retrying the whole call would multiply the attempts (and the
    # runs) against a provider that is down.
    return errors.ServiceError(typed.code, reason, f"{name}: {typed.message}",
                               {**typed.metadata, "provider": name}, details, retry=False)


def _span_error(span, error: errors.ServiceError) -> None:
    span.set_attribute("rpc.grpc.status_code", error.code.value[0])
    span.set_attribute("error.type", errors.reason_name(error.reason))
    span.set_status(Status(StatusCode.ERROR, error.message))
