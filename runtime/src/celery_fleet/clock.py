"""Redis' clock, as seen from this host.

kombu stamps each delivered message with ``time()`` and its restore sweep compares those
stamps with its own ``time()``: two hosts whose clocks disagree by more than the visibility
timeout either redeliver running tasks or never redeliver lost ones. Every stamp and every
comparison made through this module uses the Redis server's clock instead (its ``TIME``,
measured by the lease keeper), so host clocks may drift without changing who owns what.
"""

from __future__ import annotations

import time

_offset = 0.0


def now() -> float:
    """Seconds since the epoch by the Redis server's clock (local clock until first measured)."""
    return time.time() + _offset


def offset() -> float:
    """How far the Redis server's clock is ahead of this host's, in seconds."""
    return _offset


def observe(server_seconds: int, server_microseconds: int, sent: float, received: float) -> None:
    """Record a ``TIME`` reply; ``sent``/``received`` are local times around the round trip."""
    global _offset
    server = server_seconds + server_microseconds / 1_000_000
    _offset = server - (sent + received) / 2
