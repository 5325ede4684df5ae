"""Faults under continuous load, counted by the ledger: no acknowledged publish is lost.

Every scenario publishes from client1 through the fault and asserts on the ledger (the
webfarm's record of executions, outside Redis and Celery). Duplicates are counted in the
table; the README's "Guarantees" says which scenarios may produce them.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.conftest import lab, on
from tests.fleet.faults.conftest import Scenario, redis_cli, size

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


def worker_restarts(host: str) -> str:
    unit = "celery-worker@network"
    return on(host, f"systemctl show -p NRestarts -p MainPID --value {unit}").stdout


def power_back(host: str, *units: str) -> None:
    lab("start", host)
    for unit in units:
        wait_active(host, unit)


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

    row = Scenario("worker power cut", count=size(100, 400), rate=25).run(
        lambda: lab("kill", "worker1"),
        at=2,
        after=lambda: power_back("worker1", "celery-worker@network"),
    )
    assert row.lost == [], row


def test_redis_power_cut_loses_nothing():
    """redis1 loses power mid-load and boots again: publishes meanwhile raise, none is lost.

    A lab machine's power cut kills every process but not the kernel, so what Redis had written
    to its append-only file survives; on a real host up to one second of writes (appendfsync
    everysec) may be lost, which the README states.
    """

    def power_cut() -> None:
        lab("kill", "redis1")
        time.sleep(5)  # publishing goes on meanwhile
        power_back("redis1", "redis-server")

    row = Scenario("redis power cut", count=size(250, 600), rate=25).run(power_cut, at=3)
    assert row.lost == [], row
    assert row.raised_but_ran == 0, row  # a publish that raised never reached a worker


def test_client_cut_off_from_redis_raises_instead_of_losing():
    """client1 is partitioned for 10 s: every publish either reaches Redis or raises."""

    def cut_and_heal() -> None:
        lab("cut", "client1")
        try:
            time.sleep(10)
        finally:
            lab("heal", "client1")

    row = Scenario("client partition", count=size(150, 400), rate=25).run(cut_and_heal, at=2)
    assert row.lost == [], row
    assert row.raised_but_ran == 0, row


def test_redis_out_of_memory_refuses_publishes_and_keeps_the_queue():
    """maxmemory reached (noeviction): publishes fail loudly, queued tasks stay, it recovers."""
    before = redis_cli("CONFIG GET maxmemory")[1]
    restarts = {w: worker_restarts(w) for w in ("worker1", "worker2")}

    def fill_up() -> None:
        info = dict(line.split(":", 1) for line in redis_cli("INFO memory") if ":" in line)
        # Below what is in use: every command that may add memory is refused.
        redis_cli(f"CONFIG SET maxmemory {int(info['used_memory']) // 2}")
        try:
            time.sleep(6)
        finally:
            redis_cli(f"CONFIG SET maxmemory {before}")

    row = Scenario("redis maxmemory", count=size(150, 400), rate=25).run(fill_up, at=2)
    assert redis_cli("CONFIG GET maxmemory")[1] == before
    assert row.lost == [], row
    assert row.raised > 0, f"no publish was refused while Redis was full: {row}"
    assert row.raised_but_ran == 0, row
    # The workers rode it out: none died and was restarted by systemd.
    assert {w: worker_restarts(w) for w in restarts} == restarts
    # Workers ride it out like a lost connection (celery_fleet.patches, fix 6): before, the
    # consumer died and every running task ran again one lease later.
    assert row.duplicates == 0, row


def test_countdown_beyond_the_lease_runs_once():
    """A countdown twice the lease: the worker holding it renews it, nobody else takes it."""
    row = Scenario(
        "countdown > lease", count=size(20, 100), rate=10, delay=0.5, countdown=2 * LEASE
    ).run(lambda: None, at=0, drain_timeout=4 * LEASE + 60)
    assert row.lost == [], row
    assert row.duplicates == 0, row
    assert row.longest_delay >= 2 * LEASE, row


# The sysctls the roles persist, with their live values.
PERSISTED_SYSCTLS = (
    "for key in $(sed -n 's/^ *\\([a-z0-9_.]*\\) *=.*/\\1/p' /etc/sysctl.conf /etc/sysctl.d/*.conf"
    ' 2>/dev/null | sort -u); do echo "$key=$(sysctl -n $key 2>/dev/null)"; done'
)


def fresh_namespace_sysctls(persisted: str) -> str:
    """The values the persisted keys have in a brand-new network namespace."""
    subprocess.run(["ip", "netns", "add", "probe-fresh-netns"], check=True)
    try:
        values = []
        for line in persisted.split():
            key = line.split("=", 1)[0]
            value = subprocess.run(
                ["ip", "netns", "exec", "probe-fresh-netns", "sysctl", "-n", key],
                capture_output=True,
                text=True,
            ).stdout.strip()
            values.append(f"{key}={value}")
        return "\n".join(values)
    finally:
        subprocess.run(["ip", "netns", "del", "probe-fresh-netns"], check=True)


def reboot(host: str, *units: str, sysctls_set: bool = True) -> None:
    """A clean reboot on a fresh network namespace, as a real host boots on a fresh kernel.

    What the roles set up must come back by itself: the firewall, the sysctls, the units.
    sysctls_set: the host persists values other than a fresh namespace's, so their return shows.
    """

    def snapshot() -> dict[str, str]:
        state = {
            "nftables": on(host, "nft list tables", check=False).stdout,
            "sysctls": on(host, PERSISTED_SYSCTLS).stdout,
        }
        for unit in units:
            state[unit] = on(host, f"systemctl is-active {unit}", check=False).stdout.strip()
        return state

    before = snapshot()
    assert before["sysctls"].strip(), f"no persisted sysctl found on {host}"
    if sysctls_set:
        # Else this test could not see a sysctl that does not come back.
        assert fresh_namespace_sysctls(before["sysctls"]) != before["sysctls"].strip()
    lab("stop", host)
    # Network sysctls live in the namespace, which outlives a lab machine's power-off.
    subprocess.run(["ip", "netns", "del", f"fleet-{host}"], check=True)
    power_back(host, *units)
    assert snapshot() == before, f"{host} came back different"


def test_redis_reboot_comes_back_whole_and_loses_nothing():
    row = Scenario("redis reboot", count=size(150, 400), rate=25).run(
        # redis1 persists only somaxconn, at 4096: this kernel's default already.
        lambda: reboot("redis1", "redis-server", sysctls_set=False),
        at=3,
    )
    assert row.lost == [], row


def test_worker_reboot_comes_back_whole_and_loses_nothing():
    row = Scenario("worker reboot", count=size(100, 400), rate=25).run(
        lambda: reboot("worker1", "celery-worker@network", "celery-worker@default"), at=2
    )
    assert row.lost == [], row
