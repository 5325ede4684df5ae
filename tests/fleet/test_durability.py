"""A worker cut off from Redis still stops within its timeout; a worker that stops consuming
while it stays alive is restarted by its watchdog.

The ledger-based durability scenarios (no task lost through a fault) are in tests/fleet/faults.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.conftest import on, ssh
from tests.fleet.test_workers import seconds

pytestmark = pytest.mark.timeout(600)

UNIT = "celery-worker@network"


def wait_until(host: str, command: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while on(host, command, check=False).returncode != 0:
        assert time.monotonic() < deadline, f"{host}: not within {timeout:g} s: {command}"
        time.sleep(0.5)


def wait_ready(host: str, since: str) -> None:
    """The network worker on host has logged " ready." since that time (date +%s)."""
    journal = f"journalctl -u {UNIT} --since @{since} --no-pager"
    wait_until(host, f"{journal} | grep -q ' ready\\.'", 60)


def test_a_worker_cut_off_from_redis_still_stops_cleanly():
    redis = on("redis1", "hostname -I").stdout.split()[0]
    # Only worker2 loses Redis: packets vanish, as in a partition (no refusal to react to).
    on("worker2", f"ip route add blackhole {redis}/32")
    try:
        time.sleep(30)  # long enough for the worker to notice and start reconnecting
        on("worker2", f"systemctl stop {UNIT}", timeout=400)
        # A warm shutdown that finished by itself, not one systemd had to SIGKILL at
        # TimeoutStopSec (the task time limit plus a margin).
        assert on("worker2", f"systemctl show -p Result --value {UNIT}").stdout.strip() == "success"
    finally:
        on("worker2", f"ip route del blackhole {redis}/32")
        since = on("worker2", "date +%s").stdout.strip()
        on("worker2", f"systemctl start {UNIT}")
        # Leave the fleet as found: the next tests fan out at once, and a worker still starting
        # would take none of it.
        wait_ready("worker2", since)


WEB = "http://198.18.0.1:8080"
# The test's watchdog time, shorter than the deployed one (same code path, a shorter wait).
TEST_WATCHDOG = 20
# Due after the stalled worker is killed (at most 1.5 watchdog times after its last ask).
HELD_COUNTDOWN = 75


def fetch_in_background(urls: list[str], into: dict[str, dict]) -> threading.Thread:
    """fleetapp fetch from client1 in a thread; its JSON report lands in into["report"]."""

    def fetch() -> None:
        command = " ".join(["fleetapp", "fetch", "--json", "--timeout", "300", *urls])
        result = ssh("client1", command, timeout=330)
        into["report"] = (
            json.loads(result.stdout)
            if result.returncode == 0
            else {"failed": -1, "error": result.stdout[-2000:] + result.stderr[-2000:]}
        )

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    return thread


def restarts(host: str) -> int:
    return int(on(host, f"systemctl show -p NRestarts --value {UNIT}").stdout.strip())


@pytest.mark.timeout(900)
def test_a_worker_that_stops_consuming_is_restarted_by_its_watchdog():
    """The failure Celery has shown after broker restarts: connected, heartbeating, taking
    nothing. worker2 consumes the network queue alone and, 15 s after it starts, stops
    asking Redis for messages (FLEET_TEST_STOP_POLLING_AFTER, for this process only)."""
    timespan = on("worker2", f"systemctl show -p WatchdogUSec --value {UNIT}").stdout.strip()
    assert seconds(timespan) > 0, f"{UNIT} has no watchdog (WatchdogUSec={timespan})"
    dropin = f"/run/systemd/system/{UNIT}.service.d"
    on("worker1", f"systemctl stop {UNIT}")
    try:
        since = on("worker2", "date +%s").stdout.strip()
        journal = f"journalctl -u {UNIT} --since @{since} --no-pager"
        stall = (
            "[Service]\\nEnvironment=FLEET_TEST_STOP_POLLING_AFTER=15\\n"
            f"WatchdogSec={TEST_WATCHDOG}\\n"
        )
        on(
            "worker2",
            f"mkdir -p {dropin} && printf '{stall}' > {dropin}/50-test-stall.conf"
            f" && systemctl daemon-reload && systemctl restart {UNIT}"
            # This process keeps the failpoint and the short watchdog; the one systemd starts
            # after the kill has neither.
            f" && rm -r {dropin} && systemctl daemon-reload",
        )
        before = restarts("worker2")
        wait_ready("worker2", since)
        # Taken before the stall and held for its ETA when the worker is killed.
        sent = ssh(
            "client1",
            "fleet-celery call fleetapp.add --args '[2, 3]' --queue network"
            f" --countdown {HELD_COUNTDOWN}",
        )
        held = sent.stdout.strip()
        assert sent.returncode == 0 and held, sent.stderr
        wait_until("worker2", f"{journal} | grep -qF 'fleetapp.add[{held}] received'", 10)
        wait_until("worker2", f"{journal} | grep -q 'no more asks for messages'", 30)
        stalled = time.monotonic()
        # Sent after the stall: they wait in the queue for a worker that asks.
        queued: dict[str, dict] = {}
        queued_fetch = fetch_in_background([f"{WEB}/delay/0.5?i={i}" for i in range(5)], queued)
        while restarts("worker2") == before:
            assert time.monotonic() - stalled < 3 * TEST_WATCHDOG, "the stalled worker lives on"
            time.sleep(1)
        restarted_after = time.monotonic() - stalled
        queued_fetch.join(330)
        assert queued["report"]["failed"] == 0, queued
        result = ssh("client1", f"fleet-celery result {held}", timeout=HELD_COUNTDOWN + 120)
        assert result.stdout.strip() == "5", result.stdout + result.stderr
        log = on("worker2", journal).stdout
        assert "Watchdog timeout" in log
        # Held by the killed process, then by the new one once its lease ran out.
        assert log.count(f"fleetapp.add[{held}] received") == 2, log[-3000:]
        print(f"restarted {restarted_after:.0f} s after its last ask (WatchdogSec {TEST_WATCHDOG})")
        # It stops feeding half a watchdog time after its last ask; systemd kills it one
        # watchdog time after the last feed.
        assert restarted_after < 1.5 * TEST_WATCHDOG + 10
    finally:
        on("worker2", f"rm -rf {dropin} && systemctl daemon-reload")
        since = on("worker2", "date +%s").stdout.strip()
        # Restarted by hand, so the watchdog's restart does not count against it later
        # (test_workers checks NRestarts for crash loops); the next tests fan out at once.
        on("worker2", f"systemctl restart {UNIT}")
        on("worker1", f"systemctl start {UNIT}")
        for host in ("worker1", "worker2"):
            wait_ready(host, since)
