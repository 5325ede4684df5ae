"""Metrics and alerts on the lab: Prometheus, Alertmanager, the exporters (playbooks/metrics.yml).

Prometheus and Alertmanager are opened from the lab host, as an operator's browser would
(fleet_flower_allowed_networks), with Flower's user and password; the exporters are tried from
the monitor host (the only one their firewall admits) with and without its certificate.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests

from tests.conftest import LAB_NAMES, REPO, address, on, reaches
from tests.fleet.conftest import (
    CA_CERT,
    api,
    every_target_up,
    fleet,
    sandbox_exposure,
    secret,
    wait_for,
)

pytestmark = pytest.mark.timeout(600)

# The metrics services' keys, certificates and CA certificate (fleet_metrics_tls_dir).
TLS_DIR = "/etc/prometheus/tls"
WEBFARM = "http://198.18.0.1:8080"
# The lab's Alertmanager posts here (inventory/lab: fleet_alert_webhooks).
WEBHOOK = f"{WEBFARM}/webhook/lab"
UNITS = {
    "prometheus.service": ["monitor1"],
    "prometheus-alertmanager.service": ["monitor1"],
    "prometheus-node-exporter.service": LAB_NAMES,
    "prometheus-redis-exporter.service": ["redis1"],
}


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_each_service_runs_where_it_belongs(unit):
    for name in LAB_NAMES:
        state = on(name, f"systemctl is-active {unit}", check=False).stdout.strip()
        assert state == ("active" if name in UNITS[unit] else "inactive"), (name, unit, state)


def test_every_target_of_the_inventory_is_scraped_and_up():
    """Prometheus itself, Flower, a node exporter on every host, a Redis exporter per Redis host."""
    found = every_target_up()
    assert all(t["scrapeUrl"].startswith("https://") for t in found), found


def test_the_ui_and_api_refuse_anonymous_and_wrong_passwords():
    for port in (9090, 9093):
        for auth in (("admin", secret("flower") + "x"), ("intruder", secret("flower"))):
            assert api(port, "/-/ready", auth).status_code == 401
        response = requests.get(
            f"https://{address('monitor1')}:{port}/-/ready", timeout=10, verify=str(CA_CERT)
        )
        assert response.status_code == 401
        assert api(port, "/-/ready").status_code == 200


@pytest.mark.parametrize(("target", "port"), [("worker1", 9100), ("redis1", 9121)])
def test_an_exporter_answers_the_monitor_host_with_its_certificate_only(target, port):
    url = f"https://{address(target)}:{port}/metrics"
    anonymous = on("monitor1", f"curl -sS --cacert {TLS_DIR}/ca.crt {url}", check=False)
    assert anonymous.returncode != 0, "an exporter answered a client without a certificate"
    with_certificate = on(
        "monitor1",
        f"curl -sSf --cacert {TLS_DIR}/ca.crt --cert {TLS_DIR}/prometheus.crt"
        f" --key {TLS_DIR}/prometheus.key {url}",
    )
    assert "# TYPE" in with_certificate.stdout
    # The other hosts are dropped at the port (its key is readable by root on the monitor only).
    assert reaches("monitor1", address(target), port)
    for source in ("client1", "worker2"):
        assert not reaches(source, address(target), port), f"{source} reaches {target}:{port}"


def test_nothing_new_listens_on_a_wildcard_address():
    for name in LAB_NAMES:
        listening = on(name, "ss -Hltn").stdout.split("\n")
        for line in listening:
            fields = line.split()
            if len(fields) < 4:
                continue
            local = fields[3]
            port = local.rsplit(":", 1)[1]
            if port in {"9090", "9093", "9094", "9100", "9121"}:
                assert local.startswith(address(name) + ":"), (name, line)


# Two additions for a queue nobody consumes while the test runs.
ENQUEUE = """
from celery import Celery
app = Celery(set_as_current=False)  # CELERY_BROKER_URL and FLEET_* from the environment
for _ in range(2):
    app.send_task("fleetapp.add", args=(1, 2), queue="default")
"""


def default_queue_served_again() -> bool:
    """As Prometheus has it: both default workers live, and their queue drained."""

    def value(query: str) -> float:
        result = api(9090, "/api/v1/query", query=query).json()["data"]["result"]
        return float(result[0]["value"][1]) if result else 0.0

    consumers = value('celery_fleet:queue_consumers{queue="default"}')
    return consumers == 2 and value('celery_fleet:queue_length{queue="default"}') == 0


def test_redis_is_read_through_the_exporters_own_user():
    """The queues' lengths come through, labelled by queue (and kombu's unacked hash, labelled
    fleet_key, when it exists). Exporter 1.69 (Debian 13) exports no series for a key that does
    not exist, so the test fills a queue whose consumers it stops."""
    workers = ("worker1", "worker2")
    for host in workers:
        on(host, "systemctl stop celery-worker@default")
    try:
        on("client1", "cat > /tmp/enqueue.py", input=ENQUEUE)
        on(
            "client1",
            "set -a; . /etc/celery-fleet/app.env; set +a;"
            " /opt/celery-fleet/venv/bin/fleet-python /tmp/enqueue.py",
        )

        def series() -> dict[tuple[Any, Any], float] | None:
            query = 'redis_key_size{queue=~".+"} or redis_key_size{fleet_key="unacked"}'
            result = api(9090, "/api/v1/query", query=query).json()["data"]["result"]
            found = {
                (r["metric"].get("queue"), r["metric"].get("fleet_key")): float(r["value"][1])
                for r in result
            }
            return found if found.get(("default", None), 0) >= 2 else None

        found = wait_for("the queue and unacked series", series, timeout=60, every=2)
    finally:
        for host in workers:
            on(host, "systemctl start celery-worker@default")
        # Back in Flower before the next test looks at the fleet.
        wait_for("the default queue served again", default_queue_served_again, timeout=120)
    assert found[("default", None)] == 2, found
    assert set(found) <= {("default", None), ("network", None), (None, "unacked")}, found
    clients = on("redis1", "ps -o args= -C prometheus-redis-exporter").stdout
    assert "password" not in clients.lower() and secret("redis-exporter") not in clients


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_systemd_rates_the_sandbox_ok(unit):
    assert sandbox_exposure(UNITS[unit][0], unit) <= 2.5


def test_the_alert_rules_pass_their_promtool_tests():
    """tests/fleet/metrics/alerts.test.yml, against the rules file as deployed."""
    tests = (REPO / "tests" / "fleet" / "metrics" / "alerts.test.yml").read_text()
    on("monitor1", "cat > /tmp/alerts.test.yml", input=tests)
    result = on("monitor1", "promtool test rules /tmp/alerts.test.yml", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_fleet_status_shows_the_whole_fleet():
    """Every host with its units and workers, the queues, Redis; nothing wrong: exit status 0.
    What it shows is Prometheus's last scrape: a worker an earlier test restarted may take a
    scrape or two to count as live again, so it is asked for up to a minute."""
    expected = (
        *LAB_NAMES,
        "celery-worker@network.service",
        "flower.service",
        "redis-server.service",
        "network@worker1",
        "default@worker2",
        "master",
        "No alert firing",
    )
    deadline = time.monotonic() + 60
    while True:
        shown = fleet("status")
        missing = [text for text in expected if text not in shown.stdout]
        if (shown.returncode == 0 and not missing) or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert not missing, (missing, shown.stdout)
    assert secret("flower") not in shown.stdout + shown.stderr


def alerts_posted(state: str, alertname: str, worker: str) -> list[dict[str, Any]]:
    received = requests.get(WEBHOOK, timeout=10).json()["received"]
    return [
        alert
        for entry in received
        for alert in entry["body"]["alerts"]
        if alert["status"] == state
        and alert["labels"]["alertname"] == alertname
        and alert["labels"].get("worker") == worker
    ]


def test_a_stopped_worker_is_reported_to_the_receiver_and_resolved_when_it_is_back():
    """CeleryWorkerOffline waits 1 min (the rule); with the 15 s scrape and evaluation and the
    lab's 10 s group_wait it reaches the webhook within 2 min, and its resolution (30 s
    group_interval) within 1.5 min of the worker's return."""
    unit, worker = "celery-worker@default", "default@worker2"
    requests.delete(WEBHOOK, timeout=10)
    on("worker2", f"systemctl stop {unit}")
    stopped = time.monotonic()
    try:
        fired = wait_for(
            "CeleryWorkerOffline posted",
            lambda: alerts_posted("firing", "CeleryWorkerOffline", worker),
            timeout=150,
        )
        print(f"\nCeleryWorkerOffline posted {time.monotonic() - stopped:.0f} s after the stop")
        assert fired[0]["labels"]["severity"] == "critical"
        # fleet status shows it, the stopped unit, and says something is wrong (exit status 2).
        shown = fleet("status")
        assert shown.returncode == 2, shown.stdout + shown.stderr
        assert "CeleryWorkerOffline" in shown.stdout and "celery-worker@default" in shown.stdout
    finally:
        on("worker2", f"systemctl start {unit}")
    started = time.monotonic()
    wait_for(
        "the resolution posted",
        lambda: alerts_posted("resolved", "CeleryWorkerOffline", worker),
        timeout=120,
    )
    print(f"resolved posted {time.monotonic() - started:.0f} s after the start")
