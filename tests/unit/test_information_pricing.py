"""Integer cost arithmetic, budget periods, and the OpenTelemetry metrics of
accounted calls."""

from datetime import UTC, datetime

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from hivemesh.services.information.metrics import CallMetrics
from hivemesh.services.information.pricing import cost_micros, period_bounds
from hivemesh.services.information.store.base import (
    PERIOD_DAILY, PERIOD_MONTHLY, PERIOD_TOTAL, CallRecord, PriceRecord)

PRICE = PriceRecord("m", "", 2_500_000, 10_000_000, 1_250_000, "USD", 0)


def _us(*args) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp()) * 1_000_000


def test_cost_is_exact_and_rounds_up_to_a_micro():
    assert cost_micros(PRICE, 1_000_000, 0) == 2_500_000
    # 1 input token at 2.5 USD per million = 2.5 micros -> 3
    assert cost_micros(PRICE, 1, 0) == 3
    # cached prompt tokens are priced apart and never exceed the prompt
    assert cost_micros(PRICE, 1000, 100, cached_prompt_tokens=400) == \
        -(-(600 * 2_500_000 + 400 * 1_250_000 + 100 * 10_000_000) // 1_000_000)
    assert cost_micros(PRICE, 10, 0, cached_prompt_tokens=50) == cost_micros(
        PriceRecord("m", "", 0, 0, 1_250_000, "USD", 0), 10, 0, cached_prompt_tokens=10)
    assert cost_micros(None, 10**9, 10**9) == 0
    # no float drift at scale
    assert cost_micros(PRICE, 3 * 10**12, 0) == 7_500_000 * 10**6


def test_periods_roll_over_in_utc():
    assert period_bounds(PERIOD_TOTAL, _us(2026, 5, 17, 8)) == (0, None)
    assert period_bounds(PERIOD_DAILY, _us(2026, 5, 17, 23, 59, 59)) == \
        (_us(2026, 5, 17), _us(2026, 5, 18))
    assert period_bounds(PERIOD_MONTHLY, _us(2026, 12, 31, 23)) == \
        (_us(2026, 12, 1), _us(2027, 1, 1))
    assert period_bounds(PERIOD_MONTHLY, _us(2028, 2, 29, 12)) == \
        (_us(2028, 2, 1), _us(2028, 3, 1))


def test_the_last_microsecond_of_a_period_belongs_to_it_in_any_year():
    """A call tracked at the last microsecond of a day counts in that day,
    also centuries away from 1970 (a completion_time may be any past time),
    where a float of seconds no longer holds every microsecond."""
    for day in ((1000, 1, 1), (1400, 3, 1), (1970, 1, 1), (2026, 6, 1)):
        start = _us(*day)
        for period in (PERIOD_DAILY, PERIOD_MONTHLY):
            first, end = period_bounds(period, start - 1)
            assert end == start and first < start
            assert period_bounds(period, start)[0] == start


def test_calls_are_exported_as_opentelemetry_metrics():
    reader = InMemoryMetricReader()
    metrics = CallMetrics(MeterProvider(metric_readers=[reader]))
    for i in range(3):
        metrics.record(CallRecord(f"r{i}", "", 0, "acme", "wf", "a", "m", "openai", 100, 20, 0,
                                  250, "USD", 40_000, i != 2, False))
    data = {m.name: m for rm in reader.get_metrics_data().resource_metrics
            for sm in rm.scope_metrics for m in sm.metrics}
    calls = sum(p.value for p in data["hivemesh.llm.calls"].data.data_points)
    tokens = sum(p.value for p in data["gen_ai.client.token.usage.total"].data.data_points)
    cost = sum(p.value for p in data["hivemesh.llm.cost"].data.data_points)
    assert (calls, tokens, cost) == (3, 360, 750)
    latency = data["gen_ai.client.operation.duration"]
    assert (latency.unit, sum(p.count for p in latency.data.data_points)) == ("s", 3)
    # Buckets in seconds (the GenAI conventions'): 40 ms calls fall in
    # (0.02, 0.04], not with every call under 5 s in the SDK's default (0, 5].
    for point in latency.data.data_points:
        assert list(point.explicit_bounds)[:4] == [0.01, 0.02, 0.04, 0.08]
        assert point.bucket_counts[point.explicit_bounds.index(0.04)] == point.count


def _latency_p50_p95_ms(latencies_ms: list[int]) -> tuple[int, int]:
    from hivemesh.information.v1 import Scope
    from hivemesh.services.information.metrics import aggregate
    calls = [CallRecord(f"r{i}", "", 1_000 + i, "t", "w", "a", "m", "", 1, 1, 0, 0, "USD",
                        ms * 1_000, True, False) for i, ms in enumerate(latencies_ms)]
    (agg,) = aggregate(calls, scope=Scope(), model="", backend="", group_by=[], start_us=0,
                       end_us=10_000, bucket_us=0, currency="USD")
    return agg.latency_p50.ToMilliseconds(), agg.latency_p95.ToMilliseconds()


def test_latency_percentiles_are_nearest_rank_whatever_the_count():
    """The p-th percentile is the smallest latency at or above p % of the
    calls: the median of an even count is always its lower middle, not the
    lower or the upper one depending on how the count divides by 4."""
    assert _latency_p50_p95_ms([10]) == (10, 10)
    assert _latency_p50_p95_ms([10, 20]) == (10, 20)
    assert _latency_p50_p95_ms([10, 20, 30, 40]) == (20, 40)
    assert _latency_p50_p95_ms([10, 20, 30, 40, 50, 60]) == (30, 60)
    assert _latency_p50_p95_ms(list(range(10, 90, 10))) == (40, 80)
    assert _latency_p50_p95_ms(list(range(1, 21))) == (10, 19)
    assert _latency_p50_p95_ms(list(range(1, 101))) == (50, 95)
