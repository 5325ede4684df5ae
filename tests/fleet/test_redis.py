"""Deployment tests for the redis role (playbooks/redis.yml).

Hosts come from the lead's conftest / testinfra:
``testinfra.get_hosts(["ansible://redis"], ansible_inventory="inventory/lab")``.

Secrets never appear in assertion messages: passwords reach redis-cli through
REDISCLI_AUTH and only stdout/stderr of the commands are reported.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.fleet.conftest import (
    FLEET_DEFAULTS,
    KEY_PREFIX,
    REDIS_CLI,
    check_default_user_against_aof_replay,
    take_refusals,
)

testinfra_hosts = ["ansible://redis"]

SERVICE = "redis-server"
ACL_FILE = "/etc/redis/users.acl"
NFT_TABLE = "celery_fleet_redis"

P = KEY_PREFIX
# Checked with ACL DRYRUN, so a broken ACL cannot flush or shut down the lab broker while
# testing; tests/fleet/test_acl.py tries the tiers' forbidden actions for real from their hosts.
NOBODY_BUT_ADMIN = [
    "CONFIG GET maxmemory",
    "CONFIG SET maxmemory 1",
    "FLUSHALL",
    "FLUSHDB",
    "DEBUG SLEEP 0",
    "KEYS *",
    "SCAN 0",
    "SHUTDOWN",
    "ACL LIST",
    "MONITOR",
    "CLIENT KILL ID 1",
    "SCRIPT FLUSH",
    "EVAL return 0",
    "LPUSH otherapp:celery x",
]
# What each tier's user must be able to do, with the application's prefix (kombu 5.7, Celery 5.7).
ALLOWED = {
    "worker": [
        f"BLMOVE {P}network {P}_fleet.processing.h.1.1.0.network RIGHT LEFT 1",
        f"BRPOP {P}network 1",
        f"LPUSH {P}network x",
        f"LREM {P}_fleet.processing.h.1.1.0.network 1 x",
        f"ZADD {P}unacked_index 1 tag",
        f"HSET {P}unacked tag x",
        f"HGETALL {P}_fleet.processing",
        f"SET {P}unacked_mutex x NX PX 1000",
        f"SETEX {P}celery-task-meta-x 60 y",
        f"PUBLISH {P}celery-task-meta-x y",
        f"PUBLISH {P}/0.celeryev/task.succeeded x",
        f"PSUBSCRIBE {P}/0.celery.pidbox",
        f"PSUBSCRIBE {P}/0.celeryev/worker.*",
        f"INCR {P}_fleet.starts.x",
        "EVALSHA 0000000000000000000000000000000000000000 0",
        "MULTI",
        "TIME",
    ],
    "client": [
        f"LPUSH {P}network x",
        f"LPUSH {P}default x",
        f"SADD {P}_kombu.binding.network x",
        f"GET {P}celery-task-meta-x",
        f"DEL {P}celery-task-meta-x",
        f"SUBSCRIBE {P}celery-task-meta-x",
        f"PUBLISH {P}/0.celeryev/task.sent x",
        f"HGETALL {P}_fleet.workers",
        f"SET {P}celery-taskset-meta-x.s 3",
        f"PUBLISH {P}/0.celery.pidbox x",
        "TIME",
    ],
    "flower": [
        f"LLEN {P}network",
        f"GET {P}celery-task-meta-x",
        f"SADD {P}_kombu.binding.reply.celery.pidbox x",
        f"BRPOP {P}abc.reply.celery.pidbox 1",
        f"DEL {P}abc.reply.celery.pidbox",
        f"PUBLISH {P}/0.celery.pidbox x",
        f"PSUBSCRIBE {P}/0.celeryev/*",
        f"ZADD {P}_kombu.binding_deadlines 1 celeryev",
    ],
    # prometheus-redis-exporter: statistics, and the lengths of the app's queues and unacked.
    "exporter": [
        "INFO ALL",
        "LATENCY LATEST",
        "SLOWLOG LEN",
        "SLOWLOG GET 1",
        f"TYPE {P}network",
        f"LLEN {P}network",
        f"HLEN {P}unacked",
        f"ZCARD {P}unacked_index",
    ],
}
FORBIDDEN = {
    "worker": ["PSUBSCRIBE *", "EVAL return 0", "GET otherapp:x", "INFO"],
    "client": [
        f"DEL {P}network",
        f"DEL {P}unacked",
        f"BRPOP {P}network 1",
        f"SET {P}celery-task-meta-x forged",
        f"PUBLISH {P}celery-task-meta-x forged",
        f"PSUBSCRIBE {P}celery-task-meta-*",
        f"SET {P}celery-taskset-meta-x.c done",
        f"DEL {P}celery-taskset-meta-x.j",
        f"SADD {P}_kombu.binding.unacked x",
        f"LPUSH {P}unacked x",
        "EVALSHA 0000000000000000000000000000000000000000 0",
        "INFO",
    ],
    "flower": [
        f"DEL {P}unacked",
        f"HSET {P}unacked tag x",
        f"LPUSH {P}network x",
        f"SET {P}celery-task-meta-x forged",
        f"DEL {P}network",
        f"SREM {P}_kombu.binding.network x",
        "EVALSHA 0000000000000000000000000000000000000000 0",
        "INFO",
    ],
    # CONFIG GET would show it masterauth (the replicas' password); it reads no value, writes none.
    "exporter": [
        "CONFIG GET masterauth",
        f"GET {P}celery-task-meta-x",
        f"HGETALL {P}unacked",
        f"LRANGE {P}network 0 -1",
        "LLEN otherapp:celery",
        f"LPUSH {P}network x",
        f"DEL {P}unacked",
        "PUBLISH x y",
    ],
}
TIERS = ("worker", "client", "flower", "exporter")


def _resolve(host, name):
    """Value of an inventory variable, templated (lookups included).

    ``host.ansible.get_variables()`` returns the raw inventory, where
    ``fleet_private_address`` is ``{{ ansible_host }}`` and passwords are
    password lookups, so templated values are resolved with the debug module.
    """
    variables = host.ansible.get_variables()
    if name not in variables and name in FLEET_DEFAULTS:
        return FLEET_DEFAULTS[name]  # a role default (roles/fleet), not the inventory's
    value = variables.get(name)
    if isinstance(value, str) and "{{" not in value and "{%" not in value:
        return value
    result = host.ansible("ansible.builtin.debug", f"var={name}", check=False)
    return result[name]


def _template(host, expression):
    """Evaluate a Jinja expression for the redis host on the controller."""
    args = "msg={{ (" + expression + ") | to_json }}"
    result = host.ansible("ansible.builtin.debug", args, check=False)
    msg = result["msg"]
    return json.loads(msg) if isinstance(msg, str) else msg


def _journal(host):
    return host.run("journalctl -u %s -n 50 --no-pager", SERVICE).stdout


def _root(host, command, *args):
    if host.user().name == "root":
        return host.run(command, *args)
    with host.sudo():
        return host.run(command, *args)


@pytest.fixture(scope="module")
def redis_port(host):
    return str(_resolve(host, "fleet_redis_port") or 6379)


@pytest.fixture(scope="module")
def private_address(host):
    return _resolve(host, "fleet_private_address")


@pytest.fixture(scope="module")
def users(host):
    return {
        role: (
            _resolve(host, f"fleet_redis_{role}_user"),
            _resolve(host, f"fleet_redis_{role}_password"),
        )
        for role in ("admin", *TIERS)
    }


@pytest.fixture(scope="module")
def cli(host, redis_port, users):
    """redis-cli over loopback as one of the fleet users (None = no AUTH)."""

    def run(role, *words):
        base = REDIS_CLI + " -h 127.0.0.1 -p %s --no-auth-warning"
        if role is None:
            return host.run(base + " " + " ".join(["%s"] * len(words)), redis_port, *words)
        user, password = users[role]
        cmd = "REDISCLI_AUTH=%s " + base + " --user %s " + " ".join(["%s"] * len(words))
        return host.run(cmd, password, redis_port, user, *words)

    return run


@pytest.fixture(scope="module")
def admin(cli):
    def run(*words):
        result = cli("admin", *words)
        assert result.rc == 0, result.stderr
        return result.stdout.strip()

    return run


def test_service_running_and_enabled(host):
    service = host.service(SERVICE)
    assert service.is_running, f"{SERVICE} is not running:\n{_journal(host)}"
    assert service.is_enabled, f"{SERVICE} is not enabled:\n{_journal(host)}"


def test_listens_on_private_address_and_loopback_only(host, redis_port, private_address):
    listening = {
        s
        for s in host.socket.get_listening_sockets()
        if s.startswith("tcp") and s.endswith(f":{redis_port}")
    }
    expected = {f"tcp://{private_address}:{redis_port}", f"tcp://127.0.0.1:{redis_port}"}
    assert listening == expected, f"{listening} != {expected}:\n{_journal(host)}"
    assert not host.socket(f"tcp://0.0.0.0:{redis_port}").is_listening


@pytest.mark.parametrize(
    ("parameter", "expected"),
    [
        ("appendonly", "yes"),
        ("appendfsync", "everysec"),
        ("maxmemory-policy", "noeviction"),
        ("protected-mode", "yes"),
        ("timeout", "0"),
        ("tcp-keepalive", "60"),
        # TLS only: no plaintext port.
        ("port", "0"),
        ("tls-port", "6379"),
        ("tls-auth-clients", "no"),
        ("tls-protocols", "TLSv1.2 TLSv1.3"),
    ],
)
def test_config_value(admin, parameter, expected):
    assert admin("CONFIG", "GET", parameter).splitlines() == [parameter, expected]


def test_maxmemory_is_set(admin):
    name, value = admin("CONFIG", "GET", "maxmemory").splitlines()
    assert name == "maxmemory"
    assert int(value) > 0


def test_rdb_save_points_configured(admin):
    _, value = admin("CONFIG", "GET", "save").splitlines()
    assert value.strip(), "RDB save points are disabled"


def test_acl_default_user_off(admin):
    default = [
        line for line in admin("ACL", "LIST").splitlines() if line.startswith("user default ")
    ]
    assert len(default) == 1
    assert " off " in f"{default[0]} ", default[0]


def test_the_default_user_has_the_permissions_its_server_replays_the_aof_with(host, admin):
    check_default_user_against_aof_replay(
        host.backend.get_hostname(), "redis", admin("ACL", "LIST")
    )


def test_acl_users_present(admin, users):
    listed = set(admin("ACL", "USERS").splitlines())
    assert {name for name, _ in users.values()} <= listed


def test_acl_file_permissions_and_hashed_passwords(host, users):
    acl = host.file(ACL_FILE)
    assert acl.exists
    assert acl.user == "redis"
    assert acl.mode == 0o640
    content = _root(host, "cat %s", ACL_FILE).stdout
    for _, password in users.values():
        assert password not in content, "a plaintext password is stored in the ACL file"
    assert re.search(r"#[0-9a-f]{64}\b", content)


def test_ping_without_auth_is_refused(cli):
    result = cli(None, "PING")
    assert "NOAUTH" in result.stdout + result.stderr, result.stdout


@pytest.mark.parametrize("role", ["admin", *TIERS])
def test_ping_as_user(cli, role):
    assert cli(role, "PING").stdout.strip() == "PONG"


@pytest.mark.parametrize("role", TIERS)
def test_no_tier_may_run_admin_commands_or_touch_another_app(admin, users, role):
    for command in NOBODY_BUT_ADMIN:
        result = admin("ACL", "DRYRUN", users[role][0], *command.split())
        assert "no permissions" in result, (role, command, result)


def test_config_get_is_refused_live(cli):
    result = cli("client", "CONFIG", "GET", "maxmemory")
    assert result.stdout.startswith("NOPERM"), result.stdout
    assert take_refusals(lambda e: e.get("username") == "client" and "config" in e["object"])


@pytest.mark.parametrize(("role", "command"), [(r, c) for r in TIERS for c in ALLOWED[r]])
def test_tier_may(admin, users, role, command):
    assert admin("ACL", "DRYRUN", users[role][0], *command.split()) == "OK"


@pytest.mark.parametrize(("role", "command"), [(r, c) for r in TIERS for c in FORBIDDEN[r]])
def test_tier_may_not(admin, users, role, command):
    assert "no permissions" in admin("ACL", "DRYRUN", users[role][0], *command.split())


@pytest.fixture(scope="module")
def ruleset(host):
    result = _root(host, "nft list table inet %s", NFT_TABLE)
    assert result.rc == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("group", ["workers", "clients", "monitor"])
def test_firewall_admits_group(host, ruleset, group):
    addresses = _template(
        host,
        f"groups.get('{group}', []) | map('extract', hostvars, 'fleet_private_address') | list",
    )
    for address in addresses:
        assert address in ruleset, f"{address} ({group}) missing from table {NFT_TABLE}"


def test_firewall_drops_everything_else(ruleset, redis_port):
    assert f"tcp dport != {redis_port} accept" in ruleset
    assert "drop" in ruleset


def test_firewall_persisted(host):
    assert host.file("/etc/nftables.d/redis.nft").exists
    assert host.file("/etc/nftables.conf").contains("/etc/nftables.d/")
    assert host.service("nftables").is_enabled


def test_limit_nofile_covers_maxclients(host, admin):
    _, maxclients = admin("CONFIG", "GET", "maxclients").splitlines()
    limit = host.check_output("systemctl show -p LimitNOFILE --value %s", SERVICE)
    assert int(limit) >= int(maxclients) + 32, f"LimitNOFILE={limit} maxclients={maxclients}"
