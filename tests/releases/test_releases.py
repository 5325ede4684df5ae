"""The other release and the other server: after the main suites (Debian 13, Redis), the fleet on
a fresh lab of Debian 12 machines (Redis 7.0), then with its Redis host replaced by a Debian 13
machine running Valkey (a lab of mixed releases). Each converges, changes nothing on a second
run, fans the tutorial out over both workers, and gives Redis' default user exactly the
permissions its server replays the append-only file with.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import lab, lab_status, on
from tests.fleet.conftest import (
    TLS_DIR,
    check_default_user_against_aof_replay,
    playbook,
    recap,
    secret,
)
from tests.fleet.test_e2e import WEB, fetch_from_client, workers_that_ran

pytestmark = pytest.mark.timeout(1800)

APP_HOSTS = ("worker1", "worker2", "client1", "monitor1")
# (release of every machine, release of the Redis host, its server)
PHASES = [("bookworm", "bookworm", "redis"), ("bookworm", "trixie", "valkey")]


def site(server: str, *args: str) -> subprocess.CompletedProcess[str]:
    return playbook("site.yml", "-e", f"fleet_redis_server={server}", *args)


@pytest.fixture(scope="module", params=PHASES, ids=["debian12-redis", "mixed-valkey"])
def fleet(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, str]]:
    release, redis_release, server = request.param
    if redis_release == release:
        lab("down", timeout=600)
        lab("up", "--release", release, timeout=1200)
    else:
        # A new Redis host (at a new address) in place of the old one, as a user replaces one.
        lab("remove", "redis1")
        lab("add", "redis1", "--release", redis_release, "--address", "198.18.0.20")
    machines = lab_status()
    assert {machines[name]["release"] for name in APP_HOSTS} == {release}
    assert machines["redis1"]["release"] == redis_release
    result = site(server)
    assert result.returncode == 0, result.stdout[-8000:]
    yield request.param


def redis_admin(server: str, *words: str) -> str:
    script = (
        "read -r REDISCLI_AUTH; export REDISCLI_AUTH; "
        f"{server}-cli --tls --cacert {TLS_DIR}/ca.crt --no-auth-warning --user admin "
        + " ".join(words)
    )
    return on("redis1", script, input=secret("redis-admin") + "\n").stdout


def test_every_machine_runs_the_release_the_lab_made(fleet):
    for name, machine in lab_status().items():
        codename = on(name, ". /etc/os-release; echo $VERSION_CODENAME").stdout.strip()
        assert codename == machine["release"], name


def test_the_redis_host_runs_the_chosen_server_only(fleet):
    _, _, server = fleet
    other = {"redis": "valkey", "valkey": "redis"}[server]
    assert on("redis1", f"systemctl is-active {server}-server").stdout.strip() == "active"
    assert on("redis1", f"test -e /usr/bin/{other}-server", check=False).returncode != 0
    info = redis_admin(server, "INFO", "server")
    assert f"{'valkey' if server == 'valkey' else 'redis'}_version:" in info, info[:500]


def test_a_second_run_changes_nothing(fleet):
    _, _, server = fleet
    result = site(server)
    assert result.returncode == 0, result.stdout[-6000:]
    changed = {host: c["changed"] for host, c in recap(result).items() if c["changed"]}
    assert changed == {}, result.stdout[-6000:]


def test_the_tutorials_fan_out_runs_on_both_workers(fleet):
    report = fetch_from_client([f"{WEB}/delay/0.5?i={i}" for i in range(12)])
    assert not report.get("failed"), json.dumps(report)[:3000]
    assert workers_that_ran(report) == {"worker1", "worker2"}


def test_the_default_user_has_the_permissions_its_server_replays_the_aof_with(fleet):
    """As tests/fleet/test_redis.py on the main suite's server, on this phase's server."""
    _, _, server = fleet
    check_default_user_against_aof_replay("redis1", server, redis_admin(server, "ACL", "LIST"))


def test_a_server_the_redis_host_cannot_take_is_refused_before_anything_changes(fleet):
    """Valkey on Debian 12 (not packaged there); Redis beside the Valkey that holds the data."""
    _, redis_release, server = fleet
    other = {"redis": "valkey", "valkey": "redis"}[server]
    result = site(other)
    assert result.returncode != 0
    said = " ".join(result.stdout.split())
    expected = (
        "fleet_redis_server=valkey, but redis1 runs Debian 12 (bookworm), which packages redis"
        if redis_release == "bookworm"
        else "fleet_redis_server=redis, but redis1 has valkey-server installed"
    )
    assert expected in said, result.stdout[-3000:]
    assert "PLAY [Redis broker" not in result.stdout
    assert all(counts["changed"] == 0 for counts in recap(result).values())
