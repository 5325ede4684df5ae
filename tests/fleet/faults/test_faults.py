"""Faults under continuous load, counted by the ledger: no acknowledged publish is lost.

Every scenario publishes from client1 through the fault and asserts on the ledger (the
webfarm's record of executions, outside Redis and Celery). Duplicates are counted in the
table; the README's "Guarantees" says which scenarios may produce them.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import REPO, lab, lab_status, on
from tests.fleet.conftest import SECRETS, TLS_DIR, acl_log, playbook, recap, secret
from tests.fleet.faults.conftest import (
    APP_PYTHON,
    FULL,
    LOADGEN,
    REPORTS,
    WEBFARM,
    Scenario,
    ledger,
    redis_cli,
    size,
)
from tests.fleet.faults.ledger import report

pytestmark = pytest.mark.timeout(900)

# The lab's lease (fleet_visibility_timeout): how long a vanished worker's messages wait.
LEASE = 30
WORKER_UNITS = "celery-worker@network celery-worker@default"
# The app's interpreter on a host (fleet_app_venv).
VENV_PYTHON = "/opt/celery-fleet/venv/bin/python"


def wait_active(host: str, unit: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if on(host, f"systemctl is-active {unit}", check=False).stdout.strip() == "active":
            return
        time.sleep(1)
    pytest.fail(f"{unit} on {host} not active after {timeout} s")


def worker_restarts(host: str) -> str:
    return on(host, f"systemctl show -p NRestarts -p MainPID --value {WORKER_UNITS}").stdout


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


def test_cli_fan_out_through_a_redis_restart_returns_every_result():
    """The issue's first report, as a user runs it: `fleetapp fetch -f` of 400 URLs on client1,
    Redis restarted 3 s in. Every URL comes back with its result, and ran (the ledger)."""
    run_id = f"cli-fan-out-{int(time.time())}"
    requests.delete(f"{WEBFARM}/ledger/{run_id}", timeout=10)
    urls = "\n".join(f"{WEBFARM}/delay/2?ledger={run_id}.{n}" for n in range(400))
    on("client1", "cat > /tmp/fan-out-urls.txt", input=urls + "\n")
    fetched: dict[str, subprocess.CompletedProcess[str]] = {}

    def fan_out() -> None:
        fetched["result"] = on(
            "client1",
            "fleetapp fetch --json --timeout 600 -f /tmp/fan-out-urls.txt",
            check=False,
            timeout=700,
        )

    user = threading.Thread(target=fan_out)
    user.start()
    time.sleep(3)
    on("redis1", "systemctl restart redis-server")
    user.join()
    result = fetched["result"]
    # A CLI that died prints no JSON: show why.
    assert result.stdout.strip(), f"exit {result.returncode}: {result.stderr[-2000:]}"
    out = json.loads(result.stdout)
    failed = [r for r in out["results"] if not r["ok"]]
    assert (out["ok"], failed) == (400, []), result.stderr[-2000:]
    executions = requests.get(f"{WEBFARM}/ledger/{run_id}", timeout=10).json()["executions"]
    ran = {token for token, entries in executions.items() if any(e["sent"] for e in entries)}
    assert len(ran) == 400


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


def test_upgrade_under_load_loses_nothing():
    """playbooks/upgrade.yml rolls a new app version out while client1 keeps publishing.

    At full size it upgrades every host (workers one by one, the client, Flower); make test's
    small size upgrades worker1 alone (--limit), which is where tasks could be dropped.
    """
    limit = [] if FULL else ["--limit", "worker1"]
    with tempfile.TemporaryDirectory(prefix="fleetapp-next-") as tmp:
        project = Path(tmp) / "app"
        shutil.copytree(
            REPO / "app",
            project,
            ignore=shutil.ignore_patterns(".venv", "dist", "build", "*.egg-info"),
        )
        init = project / "src" / "fleetapp" / "__init__.py"
        init.write_text(init.read_text().replace('__version__ = "0.1.0"', '__version__ = "0.1.1"'))
        upgraded: dict[str, subprocess.CompletedProcess[str]] = {}
        pids_before = on("worker1", "systemctl show -p MainPID --value " + WORKER_UNITS).stdout

        def upgrade() -> None:
            upgraded["result"] = playbook(
                "playbooks/upgrade.yml", *limit, "-e", f"fleet_app_project_dir={project}"
            )
            upgraded["pids"] = on("worker1", "systemctl show -p MainPID --value " + WORKER_UNITS)
            upgraded["version"] = on("worker1", f"{APP_VERSION} fleetapp")

        try:
            # Publishing lasts about as long as the rolling upgrade.
            row = Scenario("upgrade.yml under load", count=size(300, 900), rate=5).run(
                upgrade, at=3
            )
        finally:
            back = playbook("playbooks/upgrade.yml", *limit)
        result = upgraded["result"]
        assert result.returncode == 0, result.stdout[-3000:]
        assert back.returncode == 0, back.stdout[-3000:]
        # The upgrade happened: worker1 ran 0.1.1 in new processes.
        assert upgraded["version"].stdout.strip() == "0.1.1", upgraded["version"]
        assert upgraded["pids"].stdout != pids_before
    assert row.lost == [], row
    assert row.raised == 0, row  # Redis never went away: no publish may fail
    # Warm shutdowns: what ran finished, what was reserved went back unstarted.
    assert row.duplicates == 0, row


def cut_for(host: str, seconds: float) -> None:
    lab("cut", host)
    try:
        time.sleep(seconds)
    finally:
        lab("heal", host)


def test_worker_partitioned_shorter_than_the_lease_runs_everything_once():
    """worker1 is cut off from everything for a third of the lease, then heals."""
    row = Scenario(
        "worker1 partition < lease", count=size(150, 400), rate=25, fetches_may_fail=True
    ).run(lambda: cut_for("worker1", LEASE / 3), at=2)
    assert row.lost == [], row
    # Its leases never lapsed and its fence never fired: nobody else took its tasks.
    assert row.duplicates == 0, row


def test_worker_partitioned_longer_than_the_lease_loses_nothing():
    """worker1 is cut off for 1.2 leases: its fence stops its tasks, worker2 takes them over."""
    row = Scenario(
        "worker1 partition > lease", count=size(150, 400), rate=25, fetches_may_fail=True
    ).run(lambda: cut_for("worker1", 1.2 * LEASE), at=2, drain_timeout=300)
    assert row.lost == [], row
    # Running tasks that the fence cancelled at 3/4 of the lease ran again on worker2 (counted
    # in the README's table; the webfarm records an answer that never reached worker1).
    assert row.longest_delay < 3 * LEASE, row


# The app's version as installed on a host.
APP_VERSION = f"{VENV_PYTHON} -c 'import importlib.metadata as m, sys;"
APP_VERSION += " print(m.version(sys.argv[1]))'"

REDIS_DIR = "/var/lib/redis"
REDIS_STAGE = "/var/lib/redis.fault-stage"


@pytest.fixture
def redis_on_a_small_disk() -> Iterator[None]:
    """Redis' directory on a small file system of its own (a tmpfs), which a test can fill.

    Redis stops cleanly, its files are copied onto the tmpfs and, afterwards, back.
    """
    used = int(on("redis1", f"du -sb {REDIS_DIR} | cut -f1").stdout)
    size_mb = used // 2**20 + 64
    # Whatever fails, Redis ends up on its own disk with what it wrote, and running.
    restore = (
        f"rm -f {REDIS_DIR}/ballast; systemctl stop redis-server;"
        f" if findmnt -n {REDIS_DIR} >/dev/null; then rm -rf {REDIS_STAGE}"
        f" && cp -a {REDIS_DIR} {REDIS_STAGE} && umount {REDIS_DIR}"
        f" && find {REDIS_DIR} -mindepth 1 -delete && cp -a {REDIS_STAGE}/. {REDIS_DIR}/; fi;"
        f" rm -rf {REDIS_STAGE}; systemctl start redis-server"
    )
    try:
        on(
            "redis1",
            f"systemctl stop redis-server && rm -rf {REDIS_STAGE}"
            f" && cp -a {REDIS_DIR} {REDIS_STAGE}"
            f" && mount -t tmpfs -o size={size_mb}m,mode=0750,uid=redis,gid=redis"
            f" fault-disk {REDIS_DIR}"
            f" && cp -a {REDIS_STAGE}/. {REDIS_DIR}/ && systemctl start redis-server",
        )
        yield
    finally:
        on("redis1", restore)
    assert on("redis1", f"findmnt -n {REDIS_DIR}", check=False).stdout == ""
    assert on("redis1", "systemctl is-active redis-server").stdout.strip() == "active"


def test_redis_disk_full_refuses_publishes_and_keeps_the_queue(redis_on_a_small_disk):
    """Redis' disk fills for 8 s: it refuses writes (MISCONF), keeps what it has, recovers."""
    restarts = {w: worker_restarts(w) for w in ("worker1", "worker2")}
    since = on("redis1", "date '+%Y-%m-%d %H:%M:%S'").stdout.strip()

    def fill_the_disk() -> None:
        # Every free block (dd ends at ENOSPC), so the next append to the AOF fails.
        on("redis1", f"dd if=/dev/zero of={REDIS_DIR}/ballast bs=64k 2>/dev/null; true")
        assert on("redis1", f"stat -f -c %a {REDIS_DIR}").stdout.strip() == "0"
        try:
            time.sleep(8)
        finally:
            on("redis1", f"rm -f {REDIS_DIR}/ballast")

    row = Scenario("redis disk full", count=size(150, 400), rate=25).run(fill_the_disk, at=2)
    log = on("redis1", f"journalctl -u redis-server --since='{since}' --no-pager").stdout
    assert "AOF write error looks solved" in log, f"Redis never failed to write its AOF:\n{log}"
    assert row.lost == [], row
    assert row.raised > 0, f"no publish was refused while the disk was full: {row}"
    assert row.raised_but_ran == 0, row
    assert {w: worker_restarts(w) for w in restarts} == restarts
    assert row.duplicates == 0, row


FAKETIME_DROP_IN = "/etc/systemd/system/celery-worker@.service.d/zz-fault-clock.conf"


@pytest.fixture
def worker1_clock_ahead() -> Iterator[None]:
    """worker1's workers see a clock 10 minutes ahead (libfaketime: the lab shares one kernel
    clock, so a machine cannot set its own); monotonic clocks stay true, as on a real host."""
    on(
        "worker1",
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -q libfaketime >/dev/null",
        timeout=300,
    )
    library = on("worker1", "dpkg -L libfaketime | grep 'libfaketime.so.1$'").stdout.strip()
    restart = "systemctl daemon-reload && systemctl restart " + WORKER_UNITS
    try:
        on(
            "worker1",
            f"mkdir -p $(dirname {FAKETIME_DROP_IN}) && printf '%s\\n' '[Service]'"
            f" 'Environment=LD_PRELOAD={library} FAKETIME=+10m FAKETIME_DONT_FAKE_MONOTONIC=1'"
            f" > {FAKETIME_DROP_IN} && {restart}",
            timeout=300,
        )
        yield
    finally:
        # Whatever failed, worker1 runs on the true clock again.
        on("worker1", f"rm -f {FAKETIME_DROP_IN}; {restart}", timeout=300)


def test_worker_clock_ten_minutes_ahead_changes_nothing(worker1_clock_ahead):
    """Leases and deliveries use the Redis server's clock, never a worker's own."""
    main = on("worker1", "systemctl show -p MainPID --value celery-worker@network").stdout.strip()
    environ = on("worker1", f"tr '\\0' '\\n' < /proc/{main}/environ").stdout.split()
    preload = [v for v in environ if v.startswith(("LD_PRELOAD=", "FAKETIME="))]
    assert len(preload) == 2, f"the worker does not run with the skewed clock: {environ}"
    # What the workers' Python tells them the time is, against the true time.
    python = f"{VENV_PYTHON} -c 'import time; print(int(time.time()))'"
    seen = on("worker1", f"env {' '.join(preload)} {python}; {python}").stdout.split()
    assert 590 <= int(seen[0]) - int(seen[1]) <= 610, seen
    # A worker ahead that judged leases by its own clock would take back what worker2 runs.
    row = Scenario("worker1 clock +10 min", count=size(150, 400), rate=25).run(lambda: None, at=0)
    assert row.lost == [], row
    assert row.duplicates == 0, row


# AUTH with each (user, password) from client1, as the app connects (redis-py, verified TLS);
# the script, passwords included, goes to python on stdin.
AUTH_ATTEMPTS = """
import json, sys, redis
for user, password in json.loads(ATTEMPTS):
    try:
        redis.Redis(host=sys.argv[1], port=6379, username=user, password=password, ssl=True,
                    ssl_ca_certs=sys.argv[2], socket_timeout=5).ping()
        print("accepted")
    except redis.AuthenticationError:
        print("refused")
"""
STOP_FILE = "/tmp/fleet-faults-stop"
REDIS_USERS = {
    "worker": "redis-worker",
    "client": "redis-client",
    "flower": "redis-flower",
    "admin": "redis-admin",
    "exporter": "redis-exporter",
}
ROTATED = [*REDIS_USERS.values(), "flower"]


def redis_accepts(passwords: dict[str, str]) -> list[str]:
    redis1 = lab_status()["redis1"]["address"]
    script = f"ATTEMPTS = {json.dumps(list(passwords.items()))!r}\n{AUTH_ATTEMPTS}"
    return on("client1", f"{VENV_PYTHON} - {redis1} {TLS_DIR}/ca.crt", input=script).stdout.split()


def flower_answers(password: str) -> str:
    """HTTP status of Flower's API for the fleet's Flower user (curl reads it from stdin)."""
    url = f"https://{lab_status()['monitor1']['address']}:5555/api/workers"
    command = f"curl -s -o /dev/null -w '%{{http_code}}' --cacert {TLS_DIR}/ca.crt -K - {url}"
    return on("monitor1", command, input=f'user = "admin:{password}"\n').stdout


TLS_SERVERS = (("redis1", "redis", "127.0.0.1:6379"), ("monitor1", "flower", None))


def public_keys() -> list[str]:
    """The servers' keys on disk (their public halves)."""
    return [
        on(host, f"openssl pkey -in {TLS_DIR}/{name}.key -pubout").stdout
        for host, name, _ in TLS_SERVERS
    ]


def served_public_keys() -> list[str]:
    """The public keys Redis and Flower present to a client now."""
    served = []
    for host, _, endpoint in TLS_SERVERS:
        endpoint = endpoint or f"{lab_status()[host]['address']}:5555"
        served.append(
            on(
                host,
                f"openssl s_client -connect {endpoint} -CAfile {TLS_DIR}/ca.crt </dev/null"
                " 2>/dev/null | openssl x509 -noout -pubkey",
            ).stdout
        )
    return served


def test_secret_rotation_under_load_fails_nothing_and_loses_nothing():
    """playbooks/rotate-secrets.yml replaces every password and server key while client1 keeps
    publishing from one process, and new client processes start throughout (each reads the
    password deployed at that moment). Nothing fails, nothing is lost, Redis never restarts,
    and afterwards only the new secrets open anything."""
    old = {name: secret(name) for name in ROTATED}
    keys_before = public_keys()
    assert served_public_keys() == keys_before
    redis_cli("ACL LOG RESET")
    redis_pid = on("redis1", "systemctl show -P MainPID redis-server").stdout.strip()
    fresh_run = f"rotation-fresh-{int(time.time())}"
    requests.delete(f"{WEBFARM}/ledger/{fresh_run}", timeout=10)
    fresh: list[list[Any]] = []
    fresh_failures: list[str] = []
    rotated: dict[str, subprocess.CompletedProcess[str]] = {}

    def rotate() -> None:
        done = threading.Event()

        def start_fresh_clients() -> None:
            n = 0
            while not done.is_set():
                result = on(
                    "client1",
                    f"{APP_PYTHON} {LOADGEN} --run={fresh_run} --count=1 --first={n}"
                    f" --webfarm={WEBFARM}",
                    check=False,
                )
                try:
                    fresh.extend(json.loads(result.stdout)["publishes"])
                except ValueError:
                    fresh_failures.append(f"rc={result.returncode} {result.stderr[-500:]}")
                n += 1
                done.wait(4)  # a new process every few seconds, not a CPU-bound stream of them

        starter = threading.Thread(target=start_fresh_clients)
        starter.start()
        try:
            rotated["result"] = playbook("playbooks/rotate-secrets.yml")
        finally:
            done.set()
            starter.join()
            on("client1", f"touch {STOP_FILE}")

    # The long-lived publisher goes on until the rotation has ended, Redis' last step included.
    rotation = Scenario("secret rotation", count=size(1000, 3000), rate=1.5, stop_file=STOP_FILE)
    row = rotation.run(rotate, at=3)
    result = rotated["result"]
    assert result.returncode == 0, result.stdout[-3000:]
    assert all(host["failed"] == 0 for host in recap(result).values()), recap(result)
    assert row.lost == [] and row.raised == 0, row
    fresh_row = report("secret rotation: new client processes", fresh, ledger(fresh_run))
    REPORTS.append(fresh_row)
    assert not fresh_failures and fresh_row.raised == 0 and fresh_row.lost == [], (
        fresh_failures,
        fresh_row,
    )
    assert fresh_row.published >= 10, fresh_row  # new clients did start throughout
    # Redis kept every connection: it reloaded users and certificates, it never restarted.
    assert on("redis1", "systemctl show -P MainPID redis-server").stdout.strip() == redis_pid
    # The workers and Flower connect with the new passwords: cut their connections, and tasks
    # still run; no service of the fleet was refused a password (Redis' own ACL log).
    redis_cli("CLIENT KILL USER worker", "CLIENT KILL USER flower")
    after = Scenario("after the rotation, workers reconnected", count=10, rate=5).run(
        lambda: None, at=0
    )
    assert after.lost == [] and after.raised == 0, after
    refused = [
        f"{entry.get('username')} from {entry.get('client-info')}"
        for entry in acl_log()
        if entry.get("reason") == "auth"
    ]
    assert not refused, refused

    new = {name: secret(name) for name in ROTATED}
    assert all(new[name] != old[name] for name in ROTATED)
    users = list(REDIS_USERS.items())
    assert redis_accepts({user: old[name] for user, name in users}) == ["refused"] * len(users)
    assert redis_accepts({user: new[name] for user, name in users}) == ["accepted"] * len(users)
    assert flower_answers(old["flower"]) == "401"
    assert flower_answers(new["flower"]) == "200"
    keys_after = public_keys()
    assert all(before != now for before, now in zip(keys_before, keys_after, strict=True))
    assert served_public_keys() == keys_after  # Redis and Flower serve the new keys
    assert not list(SECRETS.glob("*.previous")) and not list(SECRETS.glob("*.next"))


# The Redis service tasks alone (the ACL users applied to the running server), preflight included.
REDIS_SERVICE_ONLY = ("--limit", "redis1", "--tags", "redis_service")


def test_a_resumed_rotation_does_not_restart_redis():
    """A rotation that stopped after Redis took the new users and forgot the old passwords
    leaves its .previous files behind; the next run tries those first. The role probes which
    admin password Redis knows and applies the users without a restart (Redis' MainPID stays),
    at the cost of the probe's one refused AUTH in Redis' ACL log."""
    stale = SECRETS / "redis-admin.previous"
    assert not stale.exists()
    redis_pid = on("redis1", "systemctl show -P MainPID redis-server").stdout.strip()
    redis_cli("ACL LOG RESET")
    # A previous admin password the running Redis does not know (it forgot it, or never had it).
    stale_password = secrets.token_hex(16)
    stale.write_text(stale_password + "\n")
    stale.chmod(0o600)
    try:
        result = playbook("site.yml", *REDIS_SERVICE_ONLY)
        assert result.returncode == 0, result.stdout[-3000:]
        assert on("redis1", "systemctl show -P MainPID redis-server").stdout.strip() == redis_pid
        refused = [
            (e.get("username"), e.get("count")) for e in acl_log() if e.get("reason") == "auth"
        ]
        assert refused == [("admin", 1)], refused
    finally:
        stale.unlink(missing_ok=True)
        # Redis forgets the stale password again.
        assert playbook("site.yml", *REDIS_SERVICE_ONLY).returncode == 0
    assert redis_accepts({"admin": secret("redis-admin")}) == ["accepted"]
    assert redis_accepts({"admin": stale_password}) == ["refused"]
