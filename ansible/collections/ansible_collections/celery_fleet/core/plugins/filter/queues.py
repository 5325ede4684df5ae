"""Filters for the queue map (fleet_app_queues): the one place its rules are written."""

from __future__ import annotations

import re
from typing import Any

# A queue name that is also a valid systemd instance name and an env-file name.
QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
POOLS = ("prefork", "gevent", "threads", "solo")
KEYS = {
    "name",
    "hosts",
    "pool",
    "concurrency",
    "prefetch_multiplier",
    "max_tasks_per_child",
    "max_memory_per_child",
    "loglevel",
    "extra_args",
    "queues",
}
# With an empty map every worker consumes the app's default queue (no -Q) with prefork.
DEFAULT_INSTANCE: dict[str, Any] = {
    "name": "default",
    "queues": [],
    "pool": "prefork",
    "concurrency": 0,
    "prefetch_multiplier": 1,
}


def _members(entry: dict[str, Any], groups: dict[str, list[str]]) -> list[str]:
    hosts = entry.get("hosts", "workers")
    if isinstance(hosts, str):
        return list(groups.get(hosts, []))
    return list(hosts)


def fleet_queues_for_host(
    queues: list[dict[str, Any]], host: str, groups: dict[str, list[str]]
) -> list[dict[str, Any]]:
    """The worker instances `host` runs: the entries whose hosts include it."""
    if not queues:
        return [dict(DEFAULT_INSTANCE)] if host in groups.get("workers", []) else []
    return [dict(entry) for entry in queues if host in _members(entry, groups)]


def fleet_queue_problems(queues: list[dict[str, Any]], groups: dict[str, list[str]]) -> list[str]:
    """What is wrong with the queue map, one sentence per problem (empty when it is right)."""
    problems: list[str] = []
    names = [str(entry.get("name", "")) for entry in queues]
    for entry, name in zip(queues, names, strict=True):
        if not QUEUE_NAME.match(name):
            problems.append(f"queue {name!r}: a name needs 1-64 letters, digits, '_', '.' or '-'")
        unknown = sorted(set(entry) - KEYS)
        if unknown:
            problems.append(f"queue {name!r}: unknown keys {', '.join(unknown)}")
        if entry.get("pool", "prefork") not in POOLS:
            problems.append(f"queue {name!r}: pool must be one of {', '.join(POOLS)}")
        if int(entry.get("concurrency", 0)) < 0:
            problems.append(f"queue {name!r}: concurrency must be 0 (vCPUs) or more")
        hosts = entry.get("hosts", "workers")
        if isinstance(hosts, str) and hosts not in groups:
            problems.append(f"queue {name!r}: no inventory group {hosts!r}")
        elif not _members(entry, groups):
            problems.append(f"queue {name!r}: no host consumes it")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"queues listed twice: {', '.join(duplicates)}")
    return problems


def fleet_unconsumed_queues(routed: list[str], queues: list[dict[str, Any]]) -> list[str]:
    """Queues the app routes tasks to that no entry of the map consumes."""
    if not queues:
        return []  # the default instance consumes the app's default queue(s) without -Q
    consumed = {q for entry in queues for q in entry.get("queues", [entry.get("name")])}
    return sorted(set(routed) - consumed)


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "queues_for_host": fleet_queues_for_host,
            "queue_problems": fleet_queue_problems,
            "unconsumed_queues": fleet_unconsumed_queues,
        }
