"""Faults under continuous load, counted by the ledger: no acknowledged publish is lost.

Every scenario publishes from client1 through the fault and asserts on the ledger (the
webfarm's record of executions, outside Redis and Celery). Duplicates are counted in the
table; the README's "Guarantees" says which scenarios may produce them.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import lab, on
from tests.fleet.faults.conftest import Scenario, size

pytestmark = pytest.mark.timeout(900)

# The lab's lease (fleet_visibility_timeout): how long a vanished worker's messages wait.
LEASE = 30


def wait_active(host: str, unit: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if on(host, f"systemctl is-active {unit}", check=False).stdout.strip() == "active":
            return
        time.sleep(1)
    pytest.fail(f"{unit} on {host} not active after {timeout} s")


def test_redis_restart_loses_nothing():
    """The 400-task regression: Redis restarted 4 s into sending, tasks running on both workers."""
    row = Scenario("redis restart", count=400, rate=50).run(
        lambda: on("redis1", "systemctl restart redis-server"), at=4
    )
    assert row.lost == [], row
    # Running tasks keep running through the restart; nothing waits for a lease to expire.
    assert row.longest_delay < LEASE, row


def test_worker_unit_killed_loses_nothing():
    """kill -9 every process of a worker unit mid-task; systemd starts it again."""
    row = Scenario("worker unit kill -9", count=size(100, 400), rate=25).run(
        lambda: on("worker1", "systemctl kill --signal=KILL celery-worker@network"),
        at=2,
        after=lambda: wait_active("worker1", "celery-worker@network"),
    )
    assert row.lost == [], row


def test_prefork_child_killed_loses_nothing():
    """kill -9 one prefork pool child mid-task (the default queue runs prefork)."""
    kill_child = (
        "main=$(systemctl show -p MainPID --value celery-worker@default);"
        " kill -9 $(pgrep -P $main | head -n 1)"
    )
    row = Scenario(
        "prefork child kill -9", count=size(40, 120), rate=8, delay=0.5, queue="default"
    ).run(lambda: on("worker1", kill_child), at=2)
    assert row.lost == [], row


def test_worker_stopped_loses_nothing():
    """systemctl stop (warm shutdown) mid-task: running tasks finish, reserved ones go back."""
    row = Scenario("worker stop", count=size(100, 400), rate=25).run(
        lambda: on("worker1", "systemctl stop celery-worker@network"),
        at=2,
        after=lambda: on("worker1", "systemctl start celery-worker@network"),
    )
    assert row.lost == [], row
    assert row.duplicates == 0, row


def test_worker_power_cut_loses_nothing():
    """A worker loses power mid-task: its messages come back when their lease expires."""

    def power_back() -> None:
        lab("start", "worker1")
        wait_active("worker1", "celery-worker@network")

    row = Scenario("worker power cut", count=size(100, 400), rate=25).run(
        lambda: lab("kill", "worker1"), at=2, after=power_back
    )
    assert row.lost == [], row
