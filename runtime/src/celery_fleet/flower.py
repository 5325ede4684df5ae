"""Flower's ``/metrics`` for the monitoring host only.

Flower 2.2 serves ``/metrics`` (Prometheus) to anyone who reaches its port: unlike its UI and
API it asks for no credentials. The port is admitted from the operators' networks
(``fleet_flower_allowed_networks``), so without this anyone there would read the task names,
worker names and rates. ``fleet-celery flower`` answers ``/metrics`` only to loopback and to the
addresses in ``FLEET_FLOWER_METRICS_ALLOWED`` (comma-separated addresses or networks: the
monitoring host's own), and 403 to every other client.

With Sentinel, Flower 2.2's broker view (queue lengths: its Broker page, ``/api/queues/length``)
asks only the first Sentinel of the URL, and gives it no credentials (only ``sentinel_kwargs``,
which the fleet keeps free of passwords): the fleet's Sentinels refuse it. ``follow_sentinels``
gives it every Sentinel of the URL and the URL's credentials, as the runtime does for kombu and
Celery.

``record_heartbeats`` exports when Flower last heard from each worker, which Flower's own
metrics cannot tell (the fleet's alert rules need it to see a worker that died without a word).
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


def metrics_allowed(setting: str | None = None) -> tuple[Network, ...]:
    """Loopback and the networks of FLEET_FLOWER_METRICS_ALLOWED."""
    if setting is None:
        setting = os.environ.get("FLEET_FLOWER_METRICS_ALLOWED", "")
    items = (item.strip() for item in setting.split(","))
    return LOOPBACK + tuple(ipaddress.ip_network(item, strict=False) for item in items if item)


def admits(networks: tuple[Network, ...], remote_ip: str | None) -> bool:
    try:
        address = ipaddress.ip_address(remote_ip or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def follow_sentinels() -> None:
    """Flower's Sentinel broker view: every Sentinel of the URL, with its credentials."""
    from flower.utils import broker  # type: ignore[import-untyped]
    from redis.asyncio import sentinel as async_sentinel
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from celery_fleet import config

    original_init = broker.RedisSentinel.__init__

    def __init__(self: Any, broker_url: str, *args: Any, **kwargs: Any) -> None:
        self._fleet_sentinels = config.sentinel_addresses(broker_url)
        original_init(self, broker_url, *args, **kwargs)

    def _get_redis_client(self: Any, broker_options: Any, broker_use_ssl: Any) -> Any:
        credentials = {"username": self.username, "password": self.password}
        # Flower's client is redis-py's asyncio one, which takes its own Retry.
        sentinel_kwargs = {
            **((broker_options or {}).get("sentinel_kwargs") or {}),
            "retry": Retry(NoBackoff(), 0),
        }
        sentinel_kwargs = config.sentinel_kwargs_with_credentials(sentinel_kwargs, credentials)
        connection_kwargs: dict[str, Any] = {
            **credentials,
            "socket_connect_timeout": self.socket_connect_timeout,
            "socket_timeout": self.socket_timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        if isinstance(broker_use_ssl, dict):
            connection_kwargs.update(ssl=True, **broker_use_ssl)
        # Untyped in redis-py.
        sentinel_class: Any = async_sentinel.Sentinel
        sentinels = sentinel_class(
            self._fleet_sentinels, sentinel_kwargs=sentinel_kwargs, **connection_kwargs
        )
        return sentinels.master_for(self.master_name)

    broker.RedisSentinel.__init__ = __init__
    broker.RedisSentinel._get_redis_client = _get_redis_client


def restrict_metrics() -> None:
    """Make Flower's Metrics handler refuse every client outside metrics_allowed()."""
    from flower.views.monitor import Metrics  # type: ignore[import-untyped]
    from tornado.web import HTTPError

    networks = metrics_allowed()
    prepare = Metrics.prepare

    def prepare_for_allowed(self: Any) -> Any:
        # Tornado's own peer address (Flower does not trust X-Forwarded-For unless --xheaders).
        if not admits(networks, self.request.remote_ip):
            raise HTTPError(403)
        return prepare(self)

    Metrics.prepare = prepare_for_allowed


def record_heartbeats() -> None:
    """Export when Flower last heard from each worker.

    Flower 2.2's metrics cannot tell a dead worker from a live one: ``flower_worker_online`` goes
    to 0 only on a worker-offline event (a killed worker, or a host that lost power, sends none)
    and ``flower_events_total`` counts task events alone. This gauge is set, on Flower's clock,
    at each worker-online and worker-heartbeat event (every 2 s from a live worker), and removed
    when Flower purges the worker; the alert rules compare it with the time.
    """
    import contextlib
    import time

    from flower import events  # type: ignore[import-untyped]
    from prometheus_client import Gauge

    last_heartbeat = Gauge(
        "celery_fleet_worker_last_heartbeat_timestamp_seconds",
        "When Flower last received a heartbeat or online event of the worker (Unix time).",
        ["worker"],
    )
    observe_worker = events.PrometheusMetrics.observe_worker
    remove_workers = events.PrometheusMetrics.remove_workers

    def observe(self: Any, worker: str, event: dict[str, Any]) -> None:
        observe_worker(self, worker, event)
        if event.get("type") in ("worker-online", "worker-heartbeat"):
            last_heartbeat.labels(worker).set(time.time())

    def remove(self: Any, worker_names: Any) -> Any:
        for worker in worker_names:
            with contextlib.suppress(KeyError):  # never heard from
                last_heartbeat.remove(worker)
        return remove_workers(self, worker_names)

    events.PrometheusMetrics.observe_worker = observe
    events.PrometheusMetrics.remove_workers = remove
