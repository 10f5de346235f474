"""The circuit breaker shared by the LLM router and the orchestrator's
providers: closed, open, then half-open with exactly one probe."""

from hivemesh.runtime.resilience import CircuitBreaker


def _breaker(now: list[float]) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=2, reset_s=10, clock=lambda: now[0])


def _half_open_with_an_early_call(now: list[float]):
    """(breaker, early, probe): a call let through while closed and still
    out when the breaker opened, then went half-open and let its probe out."""
    breaker = _breaker(now)
    early = breaker.allow()
    for _ in range(2):
        breaker.allow()
        breaker.record_failure()
    now[0] = 10
    return breaker, early, breaker.allow()


def test_it_opens_after_the_threshold_and_lets_one_probe_through_after_the_reset():
    now = [0.0]
    breaker = _breaker(now)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == CircuitBreaker.OPEN and breaker.allow() is None
    now[0] = 10
    probe = breaker.allow()
    assert probe and probe.probe and breaker.state == CircuitBreaker.HALF_OPEN
    assert breaker.allow() is None  # one probe at a time
    breaker.record_success()
    assert breaker.state == CircuitBreaker.CLOSED and breaker.allow()


def test_a_probe_that_tells_nothing_lets_another_call_probe():
    now = [0.0]
    breaker = _breaker(now)
    for _ in range(2):
        breaker.allow()
        breaker.record_failure()
    now[0] = 10
    probe = breaker.allow()
    breaker.release_probe(probe)  # e.g. its caller left
    assert breaker.allow().probe


def test_a_call_let_through_before_the_breaker_opened_does_not_free_the_probe():
    """A call admitted while closed, still running when the breaker opens and
    then goes half-open, ends without telling anything: the probe sent since
    stays the only call let through."""
    now = [0.0]
    breaker, early, probe = _half_open_with_an_early_call(now)
    assert probe.probe
    breaker.release_probe(early)
    assert breaker.allow() is None  # still one probe out
    breaker.release_probe(probe)
    assert breaker.allow()


def test_a_call_let_through_before_the_breaker_opened_that_fails_sends_no_second_probe():
    """Its failure while the probe is out tells nothing new: the breaker
    stays half-open with that one probe, which alone decides."""
    now = [0.0]
    breaker, early, _ = _half_open_with_an_early_call(now)
    breaker.record_failure(early)
    assert breaker.state == CircuitBreaker.HALF_OPEN and breaker.allow() is None
    now[0] = 20  # even past another reset: the probe is still out
    assert breaker.allow() is None
    breaker.record_success()
    assert breaker.state == CircuitBreaker.CLOSED
    # The probe's own failure re-opens it.
    for _ in range(2):
        breaker.record_failure(breaker.allow())
    now[0] = 30
    probe = breaker.allow()
    breaker.record_failure(probe)
    assert breaker.state == CircuitBreaker.OPEN


def test_open_for_says_when_a_probe_will_be_let_through():
    now = [100.0]
    breaker = CircuitBreaker(failure_threshold=1, reset_s=30, clock=lambda: now[0])
    assert breaker.open_for() == 0
    breaker.record_failure(breaker.allow())
    now[0] += 10
    assert breaker.open_for() == 20 and breaker.allow() is None
    now[0] += 20
    assert breaker.open_for() == 0 and breaker.allow() is not None
