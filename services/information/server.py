"""Wiring of the information service: ``open_store`` and ``create_server``
take settings; only the CLI reads them from the environment."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from hivemesh.information.v1 import add_InformationServiceServicer_to_server
from hivemesh.runtime import errors
from hivemesh.runtime.middleware import default_chain
from hivemesh.runtime.server import RunningServer, ServiceBinding, start_server
from hivemesh.runtime.sweeper import Pruning, Sweeper, sweep_until
from hivemesh.services.information.pricing import PricePolicy
from hivemesh.services.information.servicer import (
    DOMAIN, SERVICE_NAME, InformationServicer)
from hivemesh.runtime.wellknown import now_us
from hivemesh.services.information.settings import InformationSettings, PriceSettings
from hivemesh.services.information.store.base import InformationStore, PriceRecord

log = logging.getLogger("hivemesh.information")
# Records past their retention are looked for this often, at most this many
# of a kind at once.
_PRUNE_INTERVAL_S = 60.0
_PRUNE_BATCH = 10_000


async def open_store(settings: InformationSettings) -> InformationStore:
    if settings.backend == "redis":
        if settings.redis_url is None:
            raise ValueError("HIVEMESH_INFORMATION_REDIS_URL is required with the redis backend")
        from hivemesh.services.information.store.redis import RedisStore
        return await RedisStore.open(settings.redis_url.get_secret_value(),
                                     prefix=settings.redis_prefix,
                                     cluster=settings.redis_cluster,
                                     request_ttl_s=settings.request_ttl_s)
    from hivemesh.services.information.store.sqlite import SqliteStore
    return SqliteStore(settings.data_dir, synchronous=settings.sqlite_synchronous,
                       request_ttl_s=settings.request_ttl_s)


def _store_failure(store: InformationStore):
    """A store that could not be reached or could not write is UNAVAILABLE
    (a retry may succeed; nothing was reported as done), not INTERNAL."""
    def translate(exc: BaseException) -> errors.ServiceError | None:
        if not isinstance(exc, store.failures):
            return None
        return errors.unavailable("information store", f"{store.name}: {exc}",
                                  retry_after_s=1.0)
    return translate


def _price(model: str, backend: str, p: PriceSettings, currency: str) -> PriceRecord:
    cached = p.cached_input_micros_per_million
    return PriceRecord(model, backend, p.input_micros_per_million, p.output_micros_per_million,
                       p.input_micros_per_million if cached is None else cached, currency,
                       now_us())


async def _sweep(store: InformationStore, interval_s: float, history_retention_s: float,
                 stop: asyncio.Event) -> None:
    """Release reservations that were never settled, once their TTL is over;
    now and then forget what is past its retention (until nothing is left to
    forget, a batch per sweep); until ``stop`` is set (see ``sweep_until``)."""
    def prune(limit: int) -> Awaitable[int]:
        now = now_us()
        return store.prune(now, now - int(history_retention_s * 1e6), limit)

    pruning = Pruning(prune, batch=_PRUNE_BATCH, interval_s=_PRUNE_INTERVAL_S)

    async def step() -> None:
        expired = await store.expire(now_us())
        if expired:
            log.info("released expired reservations", extra={"count": expired})
        pruned = await pruning()
        if pruned:
            log.info("forgot records past their retention, or set them to expire",
                     extra={"count": pruned})

    # A failed sweep is retried by the next; reserve also expires.
    await sweep_until(stop, step, interval_s, logger=log,
                      failure="sweeping expired reservations failed")


async def create_server(settings: InformationSettings,
                        store: InformationStore) -> tuple[RunningServer, int]:
    for key, price in settings.prices.items():
        model, _, backend = key.partition("@")
        await store.set_price(_price(model, backend, price, settings.currency))
    default = (_price("*", "", settings.default_price, settings.currency)
               if settings.default_price else None)
    if settings.unknown_model == "default" and default is None:
        raise ValueError("unknown_model=default needs HIVEMESH_INFORMATION_DEFAULT_PRICE")
    servicer = InformationServicer(
        store, currency=settings.currency,
        policy=PricePolicy(settings.unknown_model, default),
        reservation_ttl_s=settings.reservation_ttl_s,
        default_max_tokens=settings.default_max_tokens,
        alert_poll_interval_s=settings.alert_poll_interval_s,
        heartbeat_interval_s=settings.heartbeat_interval_s)
    sweeper = Sweeper(lambda stop: _sweep(store, settings.sweep_interval_s,
                                          settings.history_retention_s, stop),
                      name="hivemesh.information.sweeper")

    async def stop_background() -> None:
        await servicer.close_streams()
        await sweeper.stop()

    running = await start_server(settings.server, domain=DOMAIN, services=[
        ServiceBinding(SERVICE_NAME, add_InformationServiceServicer_to_server, servicer)],
        middleware=default_chain(DOMAIN, translate=_store_failure(store)),
        on_shutdown=[stop_background])
    return running, running.port
