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
        since = on("worker2", "date +%s").stdout.strip()
        on("worker2", f"systemctl start {unit}")
        # Leave the fleet as found: the next tests fan out at once, and a worker still starting
        # would take none of it.
        ready = f"journalctl -u {unit} --since @{since} --no-pager | grep -q ' ready\\.'"
        deadline = time.monotonic() + 60
        while on("worker2", ready, check=False).returncode != 0:
            assert time.monotonic() < deadline, f"{unit} on worker2 not ready within 60 s"
            time.sleep(0.5)
