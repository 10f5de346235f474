"""Money and time arithmetic of the information service, in integers only:
micro-units of the currency (1 USD = 1,000,000 micros) and microseconds."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hivemesh.services.information.store.base import (
    PERIOD_DAILY, PERIOD_MONTHLY, PERIOD_TOTAL, PriceRecord)

_US = 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# The most tokens one call may report or reserve, per field: a bound far
# above any model's, which keeps every token counter far inside int64.
MAX_TOKENS_PER_CALL = 10 ** 12
# The highest price per million tokens (input, output or cached input): a
# billion units of the currency, 1,000 a token, far above any model's in
# any currency (the dearest output, 600 USD a million tokens, is about
# 1.5 * 10**13 micros of VND). A price beyond it is a mistake, refused where
# it is set (settings at start-up, SetModelPrice).
MAX_PRICE_MICROS_PER_MILLION = 10 ** 15
# The most one call (a reservation or a charge) may cost: a billion units of
# the currency. Under 2**53, where the Redis store's Lua numbers (doubles)
# are exact, and far under int64; a call costing more (a huge count at a
# huge price) is refused as invalid rather than overflow.
MAX_COST_MICROS_PER_CALL = 10 ** 15


# The longest model or backend name of a price (ModelPrice's max_len).
MAX_PRICE_NAME_CHARS = 128
PRICE_AMOUNTS = ("input_micros_per_million", "output_micros_per_million",
                 "cached_input_micros_per_million")


def price_violations(model: str, backend: str, amounts: dict[str, int] | None = None
                     ) -> list[tuple[str, str]]:
    """(field, description) of what makes a price invalid, wherever it is
    set (SetModelPrice, the prices of the settings): a model of 1 to 128
    characters, a backend of at most 128 (empty: any backend), neither with
    a NUL (a price is keyed by both together: a NUL would let two prices
    share a key), and amounts of at most MAX_PRICE_MICROS_PER_MILLION."""
    out = []
    if not model:
        out.append(("model", "must be at least 1 characters"))
    for field, value in (("model", model), ("backend", backend)):
        if len(value) > MAX_PRICE_NAME_CHARS:
            out.append((field, f"must be at most {MAX_PRICE_NAME_CHARS} characters"))
        if "\x00" in value:
            out.append((field, "must not contain NUL (U+0000) characters"))
    for field, value in (amounts or {}).items():
        if value > MAX_PRICE_MICROS_PER_MILLION:
            out.append((field, f"at most {MAX_PRICE_MICROS_PER_MILLION:,} micros per million "
                               "tokens"))
    return out


def cost_micros(price: PriceRecord | None, prompt_tokens: int, completion_tokens: int,
                cached_prompt_tokens: int = 0) -> int:
    """Cost of a call: cached prompt tokens at the cached-input price, the
    rest of the prompt at the input price, completion at the output price;
    prices are per million tokens; rounded up to a whole micro."""
    if price is None:
        return 0
    cached = min(cached_prompt_tokens, prompt_tokens)
    total = ((prompt_tokens - cached) * price.input_micros_per_million
             + cached * price.cached_input_micros_per_million
             + completion_tokens * price.output_micros_per_million)
    return _ceil_div(total, 1_000_000)


def period_bounds(period: int, now_us: int) -> tuple[int, int | None]:
    """[start, end) of the budget period containing ``now_us`` (UTC); a
    TOTAL budget has one period, from the epoch, without end."""
    if period in (0, PERIOD_TOTAL):
        return 0, None
    # In integers: a float of seconds does not hold every microsecond of
    # times far from 1970 (the last one of a day would fall in the next).
    now = _EPOCH + timedelta(microseconds=now_us)
    if period == PERIOD_DAILY:
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start.fromordinal(start.toordinal() + 1).replace(tzinfo=UTC)
    elif period == PERIOD_MONTHLY:
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + (start.month == 12),
                            month=start.month % 12 + 1)
    else:
        raise ValueError(f"unknown budget period {period}")
    return _to_us(start), _to_us(end)


def _to_us(moment: datetime) -> int:
    return int(moment.timestamp()) * _US


@dataclass(frozen=True)
class PricePolicy:
    """What an unpriced model costs: ``free`` (0, reported as unpriced),
    ``reject`` (refuse the reservation or charge), or ``default`` (the
    configured default price)."""

    unknown_model: str = "free"
    default: PriceRecord | None = None
