"""Filters for the metrics playbook: Prometheus's targets and the queues' consumers."""

from __future__ import annotations

from typing import Any

from ansible_collections.celery_fleet.core.plugins.filter.queues import DEFAULT_INSTANCE


def fleet_scrape_targets(names: list[str], addresses: list[str], port: int) -> list[dict[str, Any]]:
    """One target per host, at its address, labelled with its inventory name."""
    return [
        {"address": f"{address}:{int(port)}", "labels": {"instance": name}}
        for name, address in zip(names, addresses, strict=True)
    ]


def fleet_queue_consumers(
    queues: list[dict[str, Any]], published: list[str]
) -> list[dict[str, str]]:
    """Which worker instance (the name before @ in a worker's name) consumes which queue.

    With an empty map every worker runs the default instance, which consumes the app's queues.
    """
    if not queues:
        return [{"instance": DEFAULT_INSTANCE["name"], "queue": queue} for queue in published]
    return [
        {"instance": str(entry["name"]), "queue": str(queue)}
        for entry in queues
        for queue in entry.get("queues") or [entry["name"]]
    ]


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "scrape_targets": fleet_scrape_targets,
            "queue_consumers": fleet_queue_consumers,
        }
