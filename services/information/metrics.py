"""Call metrics: aggregation of recorded calls for GetMetrics (count, error
rate, latency percentiles, tokens, cost by scope, model, backend and time
bucket) and the same samples as OpenTelemetry metrics."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from opentelemetry import metrics

from hivemesh.information.v1 import MetricsAggregate
from hivemesh.runtime import errors
from hivemesh.runtime.wellknown import duration_us, timestamp
from hivemesh.services.information.store.base import CallRecord

_DIMENSIONS = {1: "tenant_id", 2: "workflow_id", 3: "agent_id", 4: "model", 5: "backend"}
# Bucket boundaries of the latency histogram, seconds: 0.01 doubling to 81.92.
LATENCY_BUCKETS_S = [0.01 * 2 ** i for i in range(14)]


class CallMetrics:
    """OpenTelemetry instruments fed with every accounted call. They export
    wherever the process's MeterProvider sends them (a no-op by default)."""

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        meter = metrics.get_meter("hivemesh.information", meter_provider=meter_provider)
        self.calls = meter.create_counter("hivemesh.llm.calls", unit="{call}",
                                          description="Accounted model calls")
        self.tokens = meter.create_counter("gen_ai.client.token.usage.total", unit="{token}",
                                           description="Tokens of accounted calls")
        self.cost = meter.create_counter("hivemesh.llm.cost", unit="{micro}",
                                         description="Cost of accounted calls, micro-units")
        self.latency = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s",
            description="Latency of accounted calls",
            # The GenAI semantic conventions' boundaries for this metric (the
            # SDK's defaults are meant for milliseconds: every call under 5 s
            # would fall in one bucket).
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)

    def record(self, call: CallRecord) -> None:
        attrs = {"gen_ai.request.model": call.model, "hivemesh.backend": call.backend,
                 "hivemesh.tenant_id": call.tenant_id, "hivemesh.success": call.success,
                 "hivemesh.cached": call.cached}
        self.calls.add(1, attrs)
        self.tokens.add(call.total_tokens, attrs)
        self.cost.add(call.cost_micros, attrs)
        self.latency.record(call.latency_us / 1e6, attrs)


def _percentile(sorted_us: list[int], percent: int) -> int:
    """Nearest rank: the smallest value at or above ``percent`` % of them
    (integer arithmetic: no rounding of float ranks, which made the median
    of an even count the lower or the upper middle depending on the count)."""
    if not sorted_us:
        return 0
    rank = -(-percent * len(sorted_us) // 100)
    return sorted_us[max(rank, 1) - 1]


# The most aggregates one GetMetrics answer holds (the contract's limit).
MAX_AGGREGATES = 10_000


def aggregate(calls: Iterable[CallRecord], *, scope, model: str, backend: str,
              group_by: list[int], start_us: int, end_us: int, bucket_us: int,
              currency: str) -> list[MetricsAggregate]:
    """Aggregates of the calls matching the filters, one per group (the
    dimensions in ``group_by``) and time bucket (the whole window when
    ``bucket_us`` is 0), ordered by bucket then group."""
    fields = [_DIMENSIONS[d] for d in group_by]
    filters = [(f, getattr(scope, f)) for f in ("tenant_id", "workflow_id", "agent_id")
               if getattr(scope, f)]
    if model:
        filters.append(("model", model))
    if backend:
        filters.append(("backend", backend))
    groups: dict[tuple, list[CallRecord]] = defaultdict(list)
    for call in calls:
        if any(getattr(call, f) != v for f, v in filters):
            continue
        bucket = start_us + ((call.time_us - start_us) // bucket_us) * bucket_us \
            if bucket_us else start_us
        groups[(bucket, *(getattr(call, f) for f in fields))].append(call)
    if len(groups) > MAX_AGGREGATES:
        raise errors.invalid_argument([("bucket", f"the request yields {len(groups):,} "
                                        f"aggregates, more than {MAX_AGGREGATES:,}: use a longer "
                                        "bucket, fewer dimensions or a shorter window")])
    out = []
    for key in sorted(groups):
        members = groups[key]
        bucket = key[0]
        latencies = sorted(c.latency_us for c in members)
        failed = sum(not c.success for c in members)
        agg = MetricsAggregate(
            start_time=timestamp(bucket),
            end_time=timestamp(min(end_us, bucket + bucket_us) if bucket_us else end_us),
            request_count=len(members), error_count=failed, error_rate=failed / len(members),
            cached_count=sum(c.cached for c in members),
            latency_p50=duration_us(_percentile(latencies, 50)),
            latency_p95=duration_us(_percentile(latencies, 95)),
            latency_p99=duration_us(_percentile(latencies, 99)),
            prompt_tokens=sum(c.prompt_tokens for c in members),
            completion_tokens=sum(c.completion_tokens for c in members),
            total_tokens=sum(c.total_tokens for c in members),
            cached_prompt_tokens=sum(c.cached_prompt_tokens for c in members),
            cost_micros=sum(c.cost_micros for c in members), currency=currency)
        for field, value in zip(fields, key[1:], strict=True):
            setattr(agg, field, value)
        out.append(agg)
    return out
