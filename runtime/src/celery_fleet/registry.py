"""Who serves the application: each worker's queues and registered tasks, kept in Redis.

``celery inspect`` asks the workers over the pidbox, a broadcast channel that carries
``shutdown`` as well, and reads the answers from reply queues the clients' Redis user may not
declare (least privilege: no task arguments of other clients through ``inspect active``). So each
worker's lease keeper writes what ``inspect registered`` and ``inspect active_queues`` would
answer into the hash ``_fleet.workers`` (field: the worker's node name; value: JSON stamped with
the Redis server's clock) when its consumer starts and at every renewal, and removes it when the
worker stops. Readers (``fleet-doctor``, the client's preflight) take only fresh entries; the
keepers delete entries older than a lease, left by workers that vanished.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kombu.utils.encoding import bytes_to_str

WORKERS_KEY = "_fleet.workers"
# An entry is fresh while its worker missed fewer than this many renewals, and in any case
# for as long as the worker keeps its leases without renewing them (it fences after 3/4 lease).
FRESH_RENEWALS = 3
FRESH_LEASE_SHARE = 0.75


def renew_every(lease: float) -> float:
    """Seconds between a worker's renewals (and registry writes) for this visibility timeout."""
    return max(1.0, min(lease / 10, 30.0))


@dataclass
class Entry:
    tasks: list[str] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    seen: float = 0.0


def entry(app: Any, consumer: Any, now: float) -> str:
    """This worker's entry: what ``inspect registered``/``active_queues`` would answer."""
    queues = getattr(getattr(consumer, "task_consumer", None), "queues", None) or []
    tasks = sorted(name for name in app.tasks if not name.startswith("celery."))
    return json.dumps({"tasks": tasks, "queues": sorted(q.name for q in queues), "seen": now})


def read(client: Any, key: str) -> dict[str, Entry]:
    """Every entry of the hash ``key`` (named in full, with the app's key prefix)."""
    raw = client.execute_command("HGETALL", key) or {}
    if isinstance(raw, list):  # RESP2 without redis-py's callback: a flat list
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    entries: dict[str, Entry] = {}
    for name, value in raw.items():
        try:
            data = json.loads(bytes_to_str(value))
            entries[bytes_to_str(name)] = Entry(
                tasks=list(data["tasks"]), queues=list(data["queues"]), seen=float(data["seen"])
            )
        except (ValueError, KeyError, TypeError):
            continue  # not written by this version: ignored, and expired by the keepers
    return entries


def fresh(entries: dict[str, Entry], now: float, lease: float) -> dict[str, Entry]:
    """The entries of workers that renewed recently."""
    horizon = now - max(FRESH_RENEWALS * renew_every(lease), FRESH_LEASE_SHARE * lease)
    return {name: e for name, e in sorted(entries.items()) if e.seen >= horizon}
