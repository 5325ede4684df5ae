"""Least privilege, tried for real: from each tier's host, with that host's own Redis user.

Each host runs a probe with the credentials of its own env file (the ones its services use) and
tries what its tier must not do: delete a queue or ``unacked``, steal a task, forge a result,
read every result, run Lua, touch another application's keys. A ``shutdown`` broadcast reaches
the workers, which refuse it (fleet_worker_control_commands). Redis must
answer NOPERM, and its own ACL log must record each refusal under that host's user: the client
cannot pretend. The probe names its connections ``acl-probe``, so the session's check that
nothing else was ever refused (tests/fleet/conftest.py) leaves these out.
"""

from __future__ import annotations

import json
import shlex
import time
from typing import Any

import pytest

from tests.conftest import on
from tests.fleet.conftest import KEY_PREFIX, PROBE_CLIENT_NAME, acl_log, take_refusals

P = KEY_PREFIX
OTHER = "otherapp:"  # another application's keys on the same Redis
FANOUT = f"{P}/0."

# Run with the venv's python on the host; reads the host's own broker URL, never prints it.
PROBE = r"""
import json, sys
import redis
env = {}
for line in open("/etc/celery-fleet/app.env", encoding="utf-8"):
    name, sep, value = line.strip().partition("=")
    if sep and not name.startswith("#"):
        env[name] = value.strip('"')
url = env["CELERY_BROKER_URL"]
tls = {"ssl_ca_certs": env["FLEET_REDIS_CA_FILE"]} if url.startswith("rediss://") else {}
client = redis.Redis.from_url(url, socket_timeout=5, client_name=sys.argv[1], protocol=2, **tls)
answers = {}
for words in json.load(sys.stdin):
    try:
        if words[0] in ("SUBSCRIBE", "PSUBSCRIBE"):
            pubsub = client.pubsub()
            getattr(pubsub, words[0].lower())(*words[1:])
            pubsub.get_message(timeout=2)
            pubsub.close()
        else:
            client.execute_command(*words)
        answers[" ".join(words)] = "OK"
    except redis.exceptions.RedisError as exc:
        answers[" ".join(words)] = f"{type(exc).__name__}: {exc}"
print(json.dumps(answers))
"""

# What no tier but the workers may do (and the workers only the first part of).
ANY_TIER_FORBIDDEN = [
    ["LPUSH", f"{OTHER}celery", "acl-probe"],
    ["GET", f"{OTHER}celery-task-meta-acl-probe"],
    ["PSUBSCRIBE", "*"],
    ["SUBSCRIBE", f"{OTHER}celery-task-meta-acl-probe"],
    ["EVAL", "return 1", "0"],
    ["KEYS", "*"],
    ["CONFIG", "GET", "maxmemory"],
]
CLIENT_AND_FLOWER_FORBIDDEN = [
    ["DEL", f"{P}network"],  # delete a queue
    ["DEL", f"{P}unacked"],  # void at-least-once
    ["HDEL", f"{P}unacked", "acl-probe"],
    ["BRPOP", f"{P}network", "1"],  # steal a task
    ["RPOP", f"{P}default"],
    ["BLMOVE", f"{P}network", f"{P}acl-probe", "RIGHT", "LEFT", "1"],
    ["SET", f"{P}celery-task-meta-acl-probe", "forged"],  # forge a result
    ["PUBLISH", f"{P}celery-task-meta-acl-probe", "forged"],
    ["PSUBSCRIBE", f"{P}celery-task-meta-*"],  # read every result of the app
    ["SCRIPT", "LOAD", "return 1"],
    ["EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "0"],
]
FORBIDDEN = {
    "client1": ANY_TIER_FORBIDDEN
    + CLIENT_AND_FLOWER_FORBIDDEN
    + [
        ["PUBLISH", f"{FANOUT}celeryev/task.succeeded", "forged"],  # forge events
        ["LPUSH", f"{P}_fleet.processing.acl-probe", "acl-probe"],  # not a queue
    ],
    "monitor1": ANY_TIER_FORBIDDEN
    + CLIENT_AND_FLOWER_FORBIDDEN
    + [
        ["LPUSH", f"{P}network", "acl-probe"],  # push a task
        ["HSET", f"{P}unacked", "acl-probe", "x"],
    ],
    "worker1": ANY_TIER_FORBIDDEN,
}
USERS = {"client1": "client", "monitor1": "flower", "worker1": "worker"}


def probe(host: str, commands: list[list[str]], name: str = PROBE_CLIENT_NAME) -> dict[str, str]:
    result = on(
        host,
        f"/opt/celery-fleet/venv/bin/python -c {shlex.quote(PROBE)} {name}",
        input=json.dumps(commands),
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return dict(json.loads(result.stdout))


@pytest.fixture(scope="module")
def refusals() -> dict[str, dict[str, str]]:
    return {host: probe(host, commands) for host, commands in FORBIDDEN.items()}


@pytest.mark.parametrize("host", sorted(FORBIDDEN))
def test_each_tier_is_refused_what_it_must_not_do(refusals, host):
    answers = refusals[host]
    allowed = {cmd: answer for cmd, answer in answers.items() if "NoPermission" not in answer}
    assert not allowed, f"{host} ({USERS[host]}) was allowed: {allowed}"
    assert len(refusals[host]) == len(FORBIDDEN[host])


@pytest.mark.parametrize("host", sorted(FORBIDDEN))
def test_redis_acl_log_records_each_refusal_under_the_tiers_user(refusals, host):
    """The server's own record, not the client's word: one entry per refused command."""
    entries = [
        e
        for e in acl_log()
        if e.get("username") == USERS[host] and f"name={PROBE_CLIENT_NAME}" in e["client-info"]
    ]
    logged = {(e["reason"], e["object"]) for e in entries}
    for words in FORBIDDEN[host]:
        # Redis logs the command (reason "command") or the key/channel it refused.
        names = {words[0].lower(), " ".join(words[:2]).lower().replace(" ", "|")}
        assert any(obj in names or obj in words[1:] for _, obj in logged), (words, logged)


def test_tiers_do_what_they_need(refusals):
    """The other side: each user can do its tier's work (a broken ACL would fail the fleet)."""
    granted = {
        "client1": [
            ["LPUSH", f"{P}acl-probe-not-a-queue", "x"],
        ],
    }
    # A client publishes only to the application's queues.
    assert "NoPermission" in probe("client1", granted["client1"])[" ".join(granted["client1"][0])]
    answers = probe(
        "client1",
        [
            ["LLEN", f"{P}network"],
            ["GET", f"{P}celery-task-meta-acl-probe"],
            ["SUBSCRIBE", f"{P}celery-task-meta-acl-probe"],
            ["HGETALL", f"{P}_fleet.workers"],
        ],
        name="acl-granted",
    )
    assert set(answers.values()) == {"OK"}, answers


CELERY_BROADCAST = r"""
import json
import sys
from celery import Celery
app = Celery(set_as_current=False)  # CELERY_BROKER_URL and FLEET_* from the environment
try:
    replies = app.control.broadcast(sys.argv[1], reply=sys.argv[2] == "reply", timeout=5)
    print(json.dumps({"replies": replies}))
except Exception as exc:
    print(json.dumps({"raised": f"{type(exc).__name__}: {exc}"}))
"""


def broadcast(host: str, command: str, reply: bool = True) -> dict[str, Any]:
    # fleet-python gives the runtime and the host's settings (the key prefix, the credentials).
    script = (
        "set -a; . /etc/celery-fleet/app.env; set +a; "
        f"/opt/celery-fleet/venv/bin/fleet-python -c {shlex.quote(CELERY_BROADCAST)} {command}"
        f" {'reply' if reply else 'no-reply'}"
    )
    result = on(host, script, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main_pids() -> dict[str, str]:
    return {
        f"{host}/{unit}": on(host, f"systemctl show -p MainPID --value {unit}").stdout.strip()
        for host in ("worker1", "worker2")
        for unit in ("celery-worker@network", "celery-worker@default")
    }


def worker_journal(host: str) -> str:
    return on(host, "journalctl -u celery-worker@network -n 80 --no-pager").stdout


def test_a_clients_shutdown_broadcast_is_refused_by_every_worker():
    """Clients may broadcast (revoking a task is a broadcast); the workers obey only the
    control commands in fleet_worker_control_commands, so shutdown stops nobody."""
    before = main_pids()
    marks = {
        host: worker_journal(host).count("refused control command 'shutdown'")
        for host in ("worker1", "worker2")
    }
    answer = broadcast("client1", "shutdown", reply=False)
    assert "raised" not in answer, answer
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        counts = {h: worker_journal(h).count("refused control command 'shutdown'") for h in marks}
        if all(counts[h] > marks[h] for h in marks):
            break
        time.sleep(0.5)
    assert all(counts[h] > marks[h] for h in marks), counts
    time.sleep(2)
    assert main_pids() == before


def test_a_client_cannot_read_the_workers_answers():
    """inspect needs a reply queue; the client's user may not declare one (no task args of
    other clients through `inspect active`)."""
    answer = broadcast("client1", "ping")
    assert "NoPermission" in answer.get("raised", ""), answer
    assert take_refusals(lambda entry: entry.get("username") == "client")


def test_workers_refuse_control_commands_the_operator_did_not_enable():
    """Flower may broadcast (inspect), but shutdown is not among fleet_worker_control_commands."""
    before = main_pids()
    answer = broadcast("monitor1", "shutdown")
    replies = answer.get("replies")
    assert replies, answer
    for reply in replies:
        ((node, body),) = reply.items()
        assert "not enabled" in body.get("error", ""), (node, body)
    assert len(replies) == 4  # both queues on both workers answered, and refused
    time.sleep(2)
    assert main_pids() == before
    journal = on("worker1", "journalctl -u celery-worker@network -n 50 --no-pager").stdout
    assert "refused control command 'shutdown'" in journal


def test_flower_can_still_inspect_the_workers():
    answer = broadcast("monitor1", "ping")
    assert len(answer.get("replies") or []) == 4, answer
