"""Flower's ``/metrics`` for the monitoring host only.

Flower 2.2 serves ``/metrics`` (Prometheus) to anyone who reaches its port: unlike its UI and
API it asks for no credentials. The port is admitted from the operators' networks
(``fleet_flower_allowed_networks``), so without this anyone there would read the task names,
worker names and rates. ``fleet-celery flower`` answers ``/metrics`` only to loopback and to the
addresses in ``FLEET_FLOWER_METRICS_ALLOWED`` (comma-separated addresses or networks: the
monitoring host's own), and 403 to every other client.
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
