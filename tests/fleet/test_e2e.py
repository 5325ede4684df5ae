"""End to end on the lab: the tutorial's fan-out from a client, Flower, Redis' refusals,
the firewall, and scaling out and in."""

from __future__ import annotations

import json
import re
import time

import pytest
import requests

from tests.conftest import address, lab, on, ssh
from tests.fleet.conftest import CA_CERT, KEY_PREFIX, TLS_DIR, playbook, secret, targets
from tests.fleet.faults.conftest import redis_cli

pytestmark = pytest.mark.timeout(900)

WEB = "http://198.18.0.1:8080"
TASK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def flower(path: str, auth: bool = True) -> requests.Response:
    credentials = ("admin", secret("flower")) if auth else None
    url = f"https://{address('monitor1')}:5555{path}"
    return requests.get(url, auth=credentials, timeout=10, verify=str(CA_CERT))


def node_targets(expected: set[str], timeout: float = 30) -> set[str]:
    """The hosts whose node exporter Prometheus scrapes, once they are `expected` (Prometheus
    applies a reloaded configuration's targets within 5 s) or `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        found = {t["labels"]["instance"] for t in targets() if t["labels"]["job"] == "node"}
        if found == expected or time.monotonic() > deadline:
            return found
        time.sleep(1)


def fetch_from_client(urls: list[str], *extra: str) -> dict:
    result = ssh("client1", " ".join(["fleetapp", "fetch", "--json", *extra, *urls]), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)
    if report.get("failed"):
        print(where_tasks_are(report))
    return report


def where_tasks_are(report: dict) -> str:
    """For a failed fan-out: what the workers' journals and Redis say of the failed tasks, so
    that a failure on a run whose lab is gone explains itself."""
    failed = [r for r in report["results"] if not r["ok"]]
    lines = [f"failed results: {json.dumps(failed)[:2000]}"]
    task_ids = TASK_ID.findall(json.dumps(failed))
    for host in ("worker1", "worker2"):
        for task_id in task_ids:
            grep = on(host, f"journalctl --no-pager -o short-precise | grep -F {task_id} | tail")
            lines.append(f"{host} {task_id}: {grep.stdout.strip() or '(nothing)'}")
    p = KEY_PREFIX
    indexed = redis_cli(f"HKEYS {p}_fleet.processing")
    scanned = redis_cli(f"--scan --pattern '{p}_fleet.processing.*'")
    for key in sorted(set(indexed) | set(scanned)):
        length = redis_cli(f"LLEN {key}")
        lines.append(f"processing list {key} (indexed: {key in indexed}): {length}")
    queues = redis_cli(f"LLEN {p}network", f"LLEN {p}default", f"HLEN {p}unacked")
    lines.append(f"LLEN network, default; HLEN unacked: {queues}")
    return "\n".join(lines)


def workers_that_ran(report: dict) -> set[str]:
    return {r["worker"].split("@", 1)[1] for r in report["results"]}


def started_at(host: str) -> str:
    return on(host, "systemctl show -p ActiveEnterTimestamp celery-worker@network").stdout.strip()


def test_fan_out_from_a_client_runs_on_every_worker():
    urls = [f"{WEB}/delay/0.5?i={i}" for i in range(24)]
    report = fetch_from_client(urls)
    assert report["failed"] == 0 and len(report["results"]) == len(urls)
    assert workers_that_ran(report) == {"worker1", "worker2"}


def test_tutorial_compare_reports_a_speedup():
    urls = [f"{WEB}/tutorial/{i}" for i in range(1, 6)]
    report = fetch_from_client(urls, "--compare")
    assert report["failed"] == 0
    # The 5 tutorial URLs take ~7.6 s one after the other and as long as the slowest in parallel.
    assert report["speedup"] > 2, report


def test_client_add_and_doctor():
    result = ssh("client1", "fleetapp add 2 3 --json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["result"] == 5
    doctor = ssh("client1", "fleetapp doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr


def flower_workers(expect: str, wait: float = 60) -> set[str]:
    """Hosts Flower lists; it learns of a new worker from its events, so give it a moment."""
    deadline = time.monotonic() + wait
    while True:
        response = flower("/api/workers?refresh=1")
        assert response.status_code == 200
        hosts = {name.split("@", 1)[1] for name in response.json()}
        if expect in hosts or time.monotonic() > deadline:
            return hosts
        time.sleep(2)


def test_flower_lists_every_worker_with_credentials():
    assert {"worker1", "worker2"} <= flower_workers(expect="worker2")


def test_flower_without_credentials_is_refused():
    assert flower("/api/workers", auth=False).status_code == 401
    assert flower("/", auth=False).status_code == 401


def redis_reply(client: str, command: str) -> str:
    """Send one raw RESP command from a lab machine over TLS (verified with the fleet's CA) and
    return Redis' first reply line."""
    probe = (
        "import socket, ssl; c = ssl.create_default_context(cafile='{ca}'); "
        "s = c.wrap_socket(socket.create_connection(('{host}', 6379), timeout=5), "
        "server_hostname='{host}'); s.sendall(b'{cmd}\\r\\n'); print(s.recv(200).decode().strip())"
    ).format(host=address("redis1"), cmd=command, ca=f"{TLS_DIR}/ca.crt")
    return on(client, f'python3 -c "{probe}"').stdout.strip()


def test_redis_without_credentials_gets_noauth():
    assert redis_reply("client1", "PING").startswith("-NOAUTH")


# NOPERM for the app user (CONFIG, FLUSHALL, DEBUG, ...) is checked in test_redis.py.


def test_machine_outside_the_inventory_cannot_reach_redis():
    lab("add", "outsider1")
    try:
        redis = address("redis1")
        connect = "import socket; socket.create_connection(('{}', {}), timeout=3)"
        # The network path is fine (ssh answers) but the Redis port drops the outsider.
        assert (
            on("outsider1", f'python3 -c "{connect.format(redis, 22)}"', check=False).returncode
            == 0
        )
        blocked = on("outsider1", f'python3 -c "{connect.format(redis, 6379)}"', check=False)
        assert blocked.returncode != 0
        assert "timed out" in blocked.stderr or "refused" in blocked.stderr
    finally:
        lab("remove", "outsider1")


def test_scale_out_then_in_leaves_the_other_workers_alone():
    before = {host: started_at(host) for host in ("worker1", "worker2")}
    lab("add", "worker3")
    try:
        # The monitor host too: Prometheus scrapes the new host from this run on.
        result = playbook("site.yml", "--limit", "worker3,redis,monitor")
        assert result.returncode == 0, result.stdout[-6000:]
        assert "worker3" in flower_workers(expect="worker3")
        everyone = {"redis1", "worker1", "worker2", "worker3", "client1", "monitor1"}
        assert node_targets(everyone) == everyone
        report = fetch_from_client([f"{WEB}/delay/1?i={i}" for i in range(60)])
        assert "worker3" in workers_that_ran(report)
        assert {host: started_at(host) for host in ("worker1", "worker2")} == before

        retire = playbook("playbooks/retire-worker.yml", "-e", "host=worker3")
        assert retire.returncode == 0, retire.stdout[-6000:]
        assert (
            on("worker3", "systemctl is-active celery.target", check=False).stdout.strip()
            != "active"
        )
        ruleset = on("redis1", "nft list ruleset").stdout
        assert address("worker3") not in ruleset
        assert address("worker1") in ruleset
        # Prometheus forgot it (no ScrapeTargetDown for a host retired on purpose).
        assert node_targets(everyone - {"worker3"}) == everyone - {"worker3"}
    finally:
        lab("remove", "worker3")
    assert {host: started_at(host) for host in ("worker1", "worker2")} == before
