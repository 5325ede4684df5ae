"""A worker cut off from Redis still stops within its timeout.

The ledger-based durability scenarios (no task lost through a fault) are in tests/fleet/faults.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import on

pytestmark = pytest.mark.timeout(600)


def test_a_worker_cut_off_from_redis_still_stops_cleanly():
    redis = on("redis1", "hostname -I").stdout.split()[0]
    unit = "celery-worker@network"
    # Only worker2 loses Redis: packets vanish, as in a partition (no refusal to react to).
    on("worker2", f"ip route add blackhole {redis}/32")
    try:
        time.sleep(30)  # long enough for the worker to notice and start reconnecting
        on("worker2", f"systemctl stop {unit}", timeout=400)
        # A warm shutdown that finished by itself, not one systemd had to SIGKILL at
        # TimeoutStopSec (the task time limit plus a margin).
        assert on("worker2", f"systemctl show -p Result --value {unit}").stdout.strip() == "success"
    finally:
        on("worker2", f"ip route del blackhole {redis}/32")
        on("worker2", f"systemctl start {unit}")
