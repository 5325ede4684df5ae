"""The deployment suite: site.yml converges the lab once, then every test looks at the result."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from fleettest.commands import BIN, run

from tests.conftest import LAB_NAMES, REPO, address, lab_status, on

SECRETS = Path(os.environ.get("HOME", "/root")) / ".celery-fleet" / "secrets" / "lab"
# The fleet's CA on the control node, and on every host (roles/pki): Redis and Flower serve TLS.
CA_CERT = SECRETS / "ca" / "ca.crt"
TLS_DIR = "/etc/celery-fleet/tls"
# The Redis hosts' server (fleet_redis_server). make test runs on Redis; FLEET_REDIS_SERVER=valkey
# gives every playbook run Valkey (`make ha` on a fresh lab: the Sentinel suite on Valkey).
REDIS_SERVER = os.environ.get("FLEET_REDIS_SERVER") or "redis"
# Its units, configuration and CLI carry its name (Debian packages Valkey as a rename).
REDIS_UNIT = f"{REDIS_SERVER}-server"
SENTINEL_UNIT = f"{REDIS_SERVER}-sentinel"
REDIS_CONF = f"/etc/{REDIS_SERVER}/{REDIS_SERVER}.conf"
# The server's CLI on a lab host, verifying the server with the fleet's CA.
REDIS_CLI = f"{REDIS_SERVER}-cli --tls --cacert {TLS_DIR}/ca.crt"
RECAP = re.compile(
    r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M
)


def playbook(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}
    server = ("-e", f"fleet_redis_server={REDIS_SERVER}") if REDIS_SERVER != "redis" else ()
    return run([str(BIN / "ansible-playbook"), *server, *args], cwd=REPO, env=env, timeout=timeout)


def recap(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, int]]:
    return {
        host: {
            "ok": int(ok),
            "changed": int(changed),
            "unreachable": int(unr),
            "failed": int(failed),
        }
        for host, ok, changed, unr, failed in RECAP.findall(result.stdout)
    }


FLEET_DEFAULTS = yaml.safe_load(
    (REPO / "roles" / "fleet" / "defaults" / "main.yml").read_text(encoding="utf-8")
)


def fleet_default(name: str) -> object:
    """A value the roles share (roles/fleet), for names the inventory does not set."""
    return FLEET_DEFAULTS[name]


# Every key and channel of the lab's application (fleetapp) carries it (fleet_redis_key_prefix).
KEY_PREFIX = "fleetapp:"
# Connections that try forbidden commands on purpose (tests/fleet/test_acl.py) carry this name.
PROBE_CLIENT_NAME = "acl-probe"


SENTINEL_PORT = 26379
MASTER_NAME = "fleet"


def redis_primary() -> str:
    """The lab host whose Redis is the primary: redis1 alone, or with Sentinel (three or more
    Redis hosts) the one most Sentinels name (right after a heal, a returning Sentinel may
    still name its own server)."""
    machines = lab_status()
    hosts = sorted(name for name in machines if re.fullmatch(r"redis\d+", name))
    if len(hosts) == 1:
        return hosts[0]
    by_address = {machines[name]["address"]: name for name in hosts}
    script = (
        "read -r REDISCLI_AUTH; export REDISCLI_AUTH; "
        f"{REDIS_CLI} -p {SENTINEL_PORT} --no-auth-warning --user admin"
        f" SENTINEL GET-MASTER-ADDR-BY-NAME {MASTER_NAME}"
    )
    named: list[str] = []
    for host in hosts:
        if machines[host]["state"] != "running":
            continue
        answer = on(host, script, check=False, input=secret("redis-admin") + "\n").stdout.split()
        if answer and answer[0] in by_address:
            named.append(by_address[answer[0]])
    if not named:
        raise AssertionError(f"no Sentinel on {', '.join(hosts)} names a primary")
    return max(set(named), key=named.count)


def redis_admin(*words: str, host: str | None = None) -> str:
    """One command as the admin user on the primary, or on ``host`` (redis-cli --json); the
    password goes on stdin."""
    args = " ".join(shlex.quote(word) for word in words)
    script = (
        "read -r REDISCLI_AUTH; export REDISCLI_AUTH; "
        f"{REDIS_CLI} --no-auth-warning --json --user admin {args}"
    )
    return on(host or redis_primary(), script, input=secret("redis-admin") + "\n").stdout


# A scratch server of the host's own binary (a unix socket in a throwaway directory, no TCP
# port): the default user off with the given rules, a transaction and a plain write by another
# user, a clean shutdown, a restart, then the keys it loaded back from its append-only file.
_AOF_REPLAY = r"""
set -eu
server=$1 rules=$2
dir=$(mktemp -d) pid=
stop() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$dir"; }
trap stop EXIT
cd "$dir"
read -r REDISCLI_AUTH; export REDISCLI_AUTH
printf 'user default off resetpass %s\nuser probe on #%s ~* &* +@all\n' "$rules" \
  "$(printf %s "$REDISCLI_AUTH" | sha256sum | cut -d' ' -f1)" > users.acl
printf '%s\n' "port 0" "unixsocket $dir/server.sock" "dir $dir" "aclfile $dir/users.acl" \
  "appendonly yes" "aof-use-rdb-preamble no" 'save ""' "logfile $dir/server.log" > server.conf
cli() { "$server-cli" -s "$dir/server.sock" --user probe --no-auth-warning "$@"; }
up() {
  "$server-server" server.conf & pid=$!
  for _ in $(seq 100); do [ "$(cli PING 2>/dev/null)" = PONG ] && return; sleep 0.1; done
  cat server.log; exit 1
}
down() {  # SHUTDOWN writes and syncs the AOF before the server exits
  cli SHUTDOWN > /dev/null 2>&1 || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { pid=; return; }; sleep 0.1; done
  cat server.log; exit 1
}
up
# Two writes: a transaction of one is written to the AOF as that command alone.
printf 'MULTI\nSET in-transaction 1\nSET in-transaction-too 1\nEXEC\nSET plain 1\n' | cli >/dev/null
down
up
cli KEYS '*' | sort | tr '\n' ' '
down
"""


def aof_keeps_transactions(host: str, server: str, default_user_rules: str) -> bool:
    """Whether ``server`` (redis or valkey) on ``host`` loads a MULTI/EXEC back from its
    append-only file when its default user (off) has ``default_user_rules``: Redis 7.0 to 8.0.2
    and Valkey up to 8.1.1 replay it as the default user and drop what it may not run
    (redis/redis#14541, valkey-io/valkey#3983)."""
    script = f"sh -c {shlex.quote(_AOF_REPLAY)} - {server} {shlex.quote(default_user_rules)}"
    keys = on(host, script, input=f"scratch-{os.getpid()}-password\n").stdout.split()
    assert "plain" in keys, f"{server} on {host} lost a plain write across a restart: {keys}"
    return {"in-transaction", "in-transaction-too"} <= set(keys)


def check_default_user_against_aof_replay(host: str, server: str, acl_list: str) -> None:
    """The default user (off) keeps every permission exactly where ``server`` needs it: a
    scratch server of the same binary with a default user of -@all loses a MULTI/EXEC across a
    restart if and only if the running server's default user (in ``acl_list``, its ACL LIST)
    has +@all, and keeps it with +@all."""
    (default,) = [line for line in acl_list.splitlines() if line.startswith("user default ")]
    workaround = "+@all" in default.split()
    assert aof_keeps_transactions(host, server, "-@all") is not workaround, (
        f"the default user is {default!r}, but the server "
        + (
            "keeps transactions without it: drop the workaround for it (roles/redis/vars)"
            if workaround
            else "drops transactions without +@all: tasks would be lost on restart"
        )
    )
    if workaround:
        assert aof_keeps_transactions(host, server, "~* &* +@all")


def acl_log() -> list[dict[str, Any]]:
    """Redis' own record of refused commands, keys and channels (ACL LOG), newest first."""
    return list(json.loads(redis_admin("ACL", "LOG", "512") or "[]"))


def _unexpected(entry: dict[str, Any]) -> bool:
    return entry.get("reason") != "auth" and f"name={PROBE_CLIENT_NAME}" not in str(
        entry.get("client-info", "")
    )


def take_refusals(expected: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """The ACL log entries a test caused on purpose (``expected``); fails on any other refusal,
    then clears the log so the module's check (below) does not count them."""
    entries = [entry for entry in acl_log() if _unexpected(entry)]
    other = [entry for entry in entries if not expected(entry)]
    assert not other, f"Redis refused the fleet's own services: {other}"
    redis_admin("ACL", "LOG", "RESET")
    return [entry for entry in entries if expected(entry)]


@pytest.fixture(scope="module", autouse=True)
def nothing_refused(deployed: subprocess.CompletedProcess[str]) -> Iterator[None]:
    """No service of the fleet is ever refused by Redis' ACL while a module's tests run.

    The ACL presets were derived from what Celery, kombu, Flower and the runtime send; this is
    the recording kept as a test, over every test of the suite. Deliberate probes and wrong
    passwords are left out. (A Redis restart clears the log: refusals before one are not seen.)
    """
    redis_admin("ACL", "LOG", "RESET")
    yield
    refused = [entry for entry in acl_log() if _unexpected(entry)]
    if refused:
        shown = [
            {k: entry.get(k) for k in ("username", "reason", "object", "context", "count")}
            for entry in refused
        ]
        pytest.fail(f"Redis refused the fleet's own services: {shown}")


def secret(name: str) -> str:
    return (SECRETS / name).read_text().strip()


# `site.yml --check` against machines nothing was deployed to yet (make test's fresh lab), run
# before the converge; None when the session started on a deployed lab.
FRESH_CHECK: dict[str, subprocess.CompletedProcess[str] | None] = {"result": None}


def lab_is_fresh() -> bool:
    probe = "test -e /etc/celery-fleet"  # the first thing any tier's deploy creates
    return all(on(name, probe, check=False).returncode != 0 for name in LAB_NAMES)


@pytest.fixture(scope="session", autouse=True)
def deployed() -> subprocess.CompletedProcess[str]:
    """One converge of the whole topology; every test in this suite depends on it."""
    if REDIS_SERVER != "redis":
        # This suite (and the fault suite) checks Redis' own units and paths by name.
        pytest.exit(f"FLEET_REDIS_SERVER={REDIS_SERVER} is for the Sentinel suite (make ha)", 2)
    if lab_is_fresh():
        FRESH_CHECK["result"] = playbook("site.yml", "--check")
    result = playbook("site.yml")
    if result.returncode != 0:
        pytest.fail(f"site.yml failed:\n{result.stdout[-8000:]}\n{result.stderr[-2000:]}")
    return result


def sandbox_exposure(host: Any, unit: str) -> float:
    """systemd's own score of a unit's sandbox (0 = locked down, 10 = exposed; <= 2.5 is "OK"),
    on a testinfra host or a lab machine (by name)."""
    command = f"systemd-analyze security --no-pager {unit}"
    out = on(host, command).stdout if isinstance(host, str) else host.check_output(command)
    return float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)[1])


def api(
    port: int, path: str, auth: tuple[str, str] | None = None, **params: str
) -> requests.Response:
    """A service of the monitor host (Flower 5555, Prometheus 9090, Alertmanager 9093), as the
    lab host's operator: Flower's user unless ``auth`` says otherwise."""
    return requests.get(
        f"https://{address('monitor1')}:{port}{path}",
        params=params,
        auth=auth or ("admin", secret("flower")),
        timeout=10,
        verify=str(CA_CERT),
    )


def targets() -> list[dict[str, Any]]:
    """Prometheus's active targets, as its API lists them."""
    response = api(9090, "/api/v1/targets", state="active")
    assert response.status_code == 200, response.text
    return list(response.json()["data"]["activeTargets"])


# (job, instance) of every target the lab's inventory makes: Prometheus itself, Flower, a node
# exporter on every host, a Redis exporter per Redis host.
LAB_TARGETS = {("prometheus", "monitor1"), ("flower", "monitor1"), ("redis", "redis1")} | {
    ("node", name) for name in LAB_NAMES
}


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 5) -> Any:
    """``check()``'s first true result; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.0f} s: {what}")
        time.sleep(every)


def every_target_up(timeout: float = 90) -> list[dict[str, Any]]:
    """Prometheus's targets once they are exactly the lab's (LAB_TARGETS), all up."""

    def all_up() -> list[dict[str, Any]] | None:
        found = targets()
        seen = {(t["labels"]["job"], t["labels"]["instance"]) for t in found}
        return found if seen == LAB_TARGETS and all(t["health"] == "up" for t in found) else None

    return list(wait_for(f"exactly these targets, all up: {sorted(LAB_TARGETS)}", all_up, timeout))


def fleet(*args: str) -> subprocess.CompletedProcess[str]:
    """The `fleet` command (cli/) as an operator runs it, on a wide terminal without colour."""
    env = {**os.environ, "COLUMNS": "220", "NO_COLOR": "1"}
    return run([str(BIN / "fleet"), *args], cwd=REPO, env=env, timeout=300)
