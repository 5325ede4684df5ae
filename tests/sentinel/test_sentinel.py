"""Redis with Sentinel on the lab: three Redis hosts, a primary power cut, a partition, a replica
and a Sentinel gone. Every count comes from the ledger (the webfarm), not from Redis."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from tests.conftest import address, lab, on
from tests.fleet.conftest import (
    MASTER_NAME,
    REDIS_CLI,
    REDIS_CONF,
    REDIS_UNIT,
    SENTINEL_PORT,
    SENTINEL_UNIT,
    fleet_default,
    playbook,
    recap,
    redis_admin,
    redis_primary,
    secret,
)
from tests.fleet.faults.conftest import Scenario, size
from tests.fleet.test_flower import get
from tests.sentinel.conftest import REDIS_HOSTS

TUTORIAL = [f"http://198.18.0.1:8080/tutorial/{n}" for n in range(1, 6)]
# The bound: the fleet takes tasks again within this many seconds of losing its primary.
RESUME_WITHIN = 30.0


def sentinel(host: str, *words: str) -> Any:
    """One command to the Sentinel on ``host`` as the admin user (password on stdin), its reply
    as JSON."""
    script = (
        "read -r REDISCLI_AUTH; export REDISCLI_AUTH; "
        f"{REDIS_CLI} -p {SENTINEL_PORT} --no-auth-warning --json --user admin {' '.join(words)}"
    )
    return json.loads(on(host, script, input=secret("redis-admin") + "\n").stdout)


def sentinel_view(host: str) -> dict[str, str]:
    """SENTINEL MASTER <name> on ``host``: its flat field/value reply as a dict."""
    reply = sentinel(host, "SENTINEL", "MASTER", MASTER_NAME)
    # RESP2 (a flat list of field, value) or RESP3 (a map), as redis-cli's --json renders it.
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    return {str(k): str(v) for k, v in zip(reply[::2], reply[1::2], strict=True)}


def role(host: str) -> list[Any]:
    return list(json.loads(redis_admin("ROLE", host=host)))


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (Exception, pytest.fail.Exception):  # a host still booting answers nothing yet
            pass
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def settled(primary: str) -> bool:
    """``primary`` has both replicas online and every Sentinel names it, knowing the others."""
    replicas = role(primary)
    if replicas[0] != "master" or len(replicas[2]) != len(REDIS_HOSTS) - 1:
        return False
    for host in REDIS_HOSTS:
        view = sentinel_view(host)
        if (
            view["ip"] != address(primary)
            or view["flags"] != "master"
            or view["num-slaves"] != str(len(REDIS_HOSTS) - 1)
            or view["num-other-sentinels"] != str(len(REDIS_HOSTS) - 1)
        ):
            return False
    return True


def test_the_redis_host_the_fleet_grew_from_stays_the_primary(grown):
    """Its data stays where it is: the new hosts become its replicas, each runs a Sentinel.
    (That a second run changes nothing is checked after the failovers, the harder case.)"""
    primary = redis_primary()
    assert primary == "redis1", "the first Redis host starts as the primary"
    wait_until(lambda: settled(primary), 60, "both replicas and three Sentinels")
    for replica in REDIS_HOSTS[1:]:
        assert role(replica)[:4] == ["slave", address("redis1"), 6379, "connected"]


def test_the_fan_out_demo_runs_through_the_sentinels(grown):
    result = on("client1", "fleetapp fetch --json " + " ".join(TUTORIAL), timeout=120)
    out = json.loads(result.stdout)
    assert out["ok"] == len(TUTORIAL), result.stdout


def test_flower_reads_the_queue_lengths_through_the_sentinels(grown):
    """Flower's broker view asks the Sentinels too (celery_fleet.flower.follow_sentinels)."""
    url = f"https://{address('monitor1')}:5555/api/queues/length"
    status, body = get(url, (str(fleet_default("fleet_flower_user")), secret("flower")))
    assert status == 200, body[:500]
    names = {queue["name"] for queue in json.loads(body)["active_queues"]}
    assert {"default", "network"} <= names, body[:500]


def test_a_primary_power_cut_under_load_fails_over_and_loses_nothing(grown):
    """The primary loses power mid-load: the Sentinels promote a replica, the workers and the
    client follow it without a restart, and the old primary comes back as a replica."""
    old = redis_primary()
    wait_until(lambda: settled(old), 60, "a settled group before the fault")
    row = Scenario("sentinel: primary power cut", count=size(300, 900), rate=25).run(
        lambda: lab("kill", old), at=3
    )
    new = redis_primary()
    assert new != old
    assert row.lost == [], row
    assert row.raised_but_ran == 0, row
    assert row.publish_stall < RESUME_WITHIN, row
    assert row.longest_delay < RESUME_WITHIN, row
    lab("start", old)
    wait_until(lambda: role(old)[:2] == ["slave", address(new)], 120, f"{old} to rejoin")
    wait_until(lambda: settled(new), 120, "the group to settle after the failover")


def test_a_partitioned_primary_is_replaced_and_rejoins_as_a_replica(grown):
    """The primary is cut off from every other host for 25 s under load: the two Sentinels that
    still see each other elect a new primary, the fleet follows it, and once the network heals
    the old primary becomes a replica of the new one. Nobody could write to the old primary
    while it was cut off, so there is no second history to lose."""
    old = redis_primary()
    wait_until(lambda: settled(old), 60, "a settled group before the fault")

    def partition() -> None:
        lab("cut", old)
        time.sleep(25)  # publishing goes on meanwhile
        lab("heal", old)

    row = Scenario("sentinel: primary partitioned 25 s", count=size(500, 1000), rate=25).run(
        partition, at=3
    )
    new = redis_primary()
    assert new != old
    assert row.lost == [], row
    assert row.raised_but_ran == 0, row
    wait_until(lambda: role(old)[:2] == ["slave", address(new)], 120, f"{old} to rejoin")
    wait_until(lambda: settled(new), 120, "the group to settle after the partition")


def test_a_replica_and_its_sentinel_stopped_change_nothing_for_the_fleet(grown):
    """One replica's Redis and Sentinel stop under load: the primary keeps one replica, so it
    keeps taking writes, and two Sentinels are still a majority. No publish fails."""
    primary = redis_primary()
    wait_until(lambda: settled(primary), 60, "a settled group before the fault")
    replica = next(host for host in REDIS_HOSTS if host != primary)

    def stop_replica() -> None:
        on(replica, f"systemctl stop {SENTINEL_UNIT} {REDIS_UNIT}")

    try:
        row = Scenario(
            "sentinel: a replica and its Sentinel stopped", count=size(150, 600), rate=25
        ).run(stop_replica, at=2)
    finally:
        on(replica, f"systemctl start {REDIS_UNIT} {SENTINEL_UNIT}")
    assert (row.raised, row.lost) == (0, []), row
    assert redis_primary() == primary
    wait_until(lambda: settled(primary), 120, "the replica to come back")


def run_id(host: str, port: int = 6379) -> str:
    """The run_id of the Redis server (or, on SENTINEL_PORT, the Sentinel) on ``host``: a new
    one after every start."""
    script = (
        "read -r REDISCLI_AUTH; export REDISCLI_AUTH; "
        f"{REDIS_CLI} -p {port} --no-auth-warning --user admin INFO server"
    )
    info = on(host, script, input=secret("redis-admin") + "\n").stdout
    found = re.search(r"run_id:(\w+)", info)
    assert found, info
    return found.group(1)


def test_a_changed_redis_conf_restarts_the_primary_only_after_a_handover(grown):
    """site.yml finds the primary's redis.conf changed (edited by hand here, as a changed setting
    would): it does not restart the server in place, where writes would be refused until the
    Sentinels react, but hands the primary role over first and restarts it after the other
    plays, as a replica. The replicas, whose files did not change, keep running."""
    old = redis_primary()
    wait_until(lambda: settled(old), 60, "a settled group")
    servers = {host: run_id(host) for host in REDIS_HOSTS}
    on(old, f"echo '# edited by hand' >> {REDIS_CONF}")
    result = playbook("site.yml", "--tags", "redis")
    assert result.returncode == 0, result.stdout[-6000:]
    assert f"{old} handed the primary role of {MASTER_NAME} over to" in result.stdout
    assert "edited by hand" not in on(old, f"cat {REDIS_CONF}").stdout
    restarted = {host: run_id(host) != servers[host] for host in REDIS_HOSTS}
    assert restarted == {host: host == old for host in REDIS_HOSTS}, restarted
    new = redis_primary()
    assert new != old
    wait_until(lambda: settled(new), 120, "the group to settle after the restart")


def test_a_rolling_upgrade_under_load_refuses_no_publish_and_loses_nothing(grown):
    """playbooks/upgrade-redis.yml under load restarts every Redis server and Sentinel, one host
    at a time: the replicas first, then the primary, once it has handed its role over (writes
    wait while a replica takes them all and is promoted). No publish raises, nothing is lost."""
    old = redis_primary()
    wait_until(lambda: settled(old), 60, "a settled group before the upgrade")
    servers = {host: run_id(host) for host in REDIS_HOSTS}
    sentinels = {host: run_id(host, SENTINEL_PORT) for host in REDIS_HOSTS}
    stop_file = "/tmp/fleet-upgrade-redis-done"
    upgraded: dict[str, Any] = {}

    def upgrade() -> None:
        try:
            upgraded["result"] = playbook("playbooks/upgrade-redis.yml")
        finally:
            on("client1", f"touch {stop_file}")

    row = Scenario(
        "sentinel: rolling upgrade (upgrade-redis.yml)",
        # A rate the two workers keep up with for minutes, so a delay is the upgrade's own.
        count=size(2000, 4000),
        rate=5,
        stop_file=stop_file,
    ).run(upgrade, at=3)
    result = upgraded["result"]
    assert result.returncode == 0, result.stdout[-6000:]
    assert (row.raised, row.lost, row.raised_but_ran) == (0, [], 0), row
    assert row.published >= 5 * 30, row  # the load went on through the whole upgrade
    # The primary went last, after handing its role over.
    assert f"{old} handed the primary role of {MASTER_NAME} over to" in result.stdout
    plays = [line for line in result.stdout.splitlines() if line.startswith("ok: [redis")]
    assert plays and f"[{old}]" in plays[-1], plays[-5:]
    new = redis_primary()
    assert new != old
    wait_until(lambda: settled(new), 120, "the group to settle after the upgrade")
    restarted = {host: run_id(host) != servers[host] for host in REDIS_HOSTS}
    assert all(restarted.values()), restarted
    restarted = {host: run_id(host, SENTINEL_PORT) != sentinels[host] for host in REDIS_HOSTS}
    assert all(restarted.values()), restarted


def test_a_run_after_the_failovers_changes_nothing_and_keeps_the_primary(grown):
    """site.yml after failovers: the playbook asks the Sentinels which server is the primary,
    so it repoints no server (the inventory's first host is a replica now) and changes nothing."""
    primary = redis_primary()
    wait_until(lambda: settled(primary), 120, "a settled group")
    again = playbook("site.yml")
    assert again.returncode == 0, again.stdout[-4000:]
    changed = {host: counts["changed"] for host, counts in recap(again).items()}
    assert set(changed.values()) == {0}, changed
    assert redis_primary() == primary
    wait_until(lambda: settled(primary), 60, "the same settled group")


def test_no_redis_server_or_sentinel_refused_the_fleet(grown):
    """Redis' and each Sentinel's own ACL log: nothing of the fleet's services or of the
    Sentinels themselves was refused, not even a password (this suite tries no wrong one), over
    this suite's faults."""
    refused = []
    for host in REDIS_HOSTS:
        entries = json.loads(redis_admin("ACL", "LOG", "128", host=host) or "[]")
        refused += [(host, "redis", e) for e in entries]
        entries = sentinel(host, "ACL", "LOG", "128") or []
        refused += [(host, "sentinel", e) for e in entries]
    assert not refused, refused
