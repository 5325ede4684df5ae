"""Monitor host: Flower, hardened, on the private address with basic auth."""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.error
import urllib.request

import pytest
import requests

from tests.conftest import on, reaches
from tests.fleet.conftest import (
    CA_CERT,
    FLEET_DEFAULTS,
    KEY_PREFIX,
    TLS_DIR,
    sandbox_exposure,
    take_refusals,
)

testinfra_hosts = ["ansible://monitor"]

UNIT = "flower.service"
PORT = 5555
# Flower serves HTTPS with a certificate of the fleet's CA (roles/pki); the tests verify it.
VERIFY = str(CA_CERT)


def journal(host, unit: str = UNIT) -> str:
    return host.run(f"journalctl -u {unit} -n 60 --no-pager").stdout


def variable(host, name: str) -> str:
    """An inventory variable, templated by Ansible when it is a lookup."""
    variables = host.ansible.get_variables()
    if name not in variables and name in FLEET_DEFAULTS:
        return str(FLEET_DEFAULTS[name])  # a role default (roles/fleet)
    value = variables.get(name)
    if value is None or "{{" in str(value):
        value = host.ansible("debug", f"var={name}", check=False)[name]
    return str(value)


WEBFARM = "http://198.18.0.1:8080"
# What Redis refuses Flower's user when it publishes a task to the network queue.
FLOWER_PUBLISH_REFUSALS = (
    "lpush",
    "subscribe",
    f"{KEY_PREFIX}network",
    f"{KEY_PREFIX}_kombu.binding.network",
    f"{KEY_PREFIX}_kombu.binding_permanent.network",
)


def get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        context = ssl.create_default_context(cafile=VERIFY)
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def base_url(host) -> str:
    return f"https://{variable(host, 'fleet_private_address')}:{PORT}"


@pytest.fixture
def credentials(host) -> tuple[str, str]:
    return variable(host, "fleet_flower_user"), variable(host, "fleet_flower_password")


def test_flower_active_and_enabled(host):
    svc = host.service(UNIT)
    assert svc.is_running, journal(host)
    assert svc.is_enabled, journal(host)


@pytest.mark.parametrize(
    ("prop", "expected"),
    [
        ("User", "celery"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("CapabilityBoundingSet", ""),
        ("Restart", "always"),
        ("StateDirectory", "flower"),
    ],
)
def test_flower_hardening(host, prop, expected):
    assert host.check_output(f"systemctl show -P {prop} {UNIT}") == expected


def test_flower_listens_on_private_address_only(host):
    address = variable(host, "fleet_private_address")
    assert host.socket(f"tcp://{address}:{PORT}").is_listening, journal(host)
    assert not host.socket(f"tcp://0.0.0.0:{PORT}").is_listening


def test_env_file_permissions(host):
    env = host.file("/etc/celery-fleet/flower.env")
    assert (env.user, env.group, env.mode) == ("root", "celery", 0o640)


def test_state_directory(host):
    state = host.file("/var/lib/flower")
    assert state.is_directory
    assert (state.user, state.mode) == ("celery", 0o750)


def test_anonymous_request_is_refused(base_url):
    status, _ = get(f"{base_url}/")
    assert status == 401


def test_wrong_password_is_refused(base_url, credentials):
    status, _ = get(f"{base_url}/", (credentials[0], credentials[1] + "x"))
    assert status == 401


def test_dashboard_with_credentials(base_url, credentials):
    status, _ = get(f"{base_url}/", credentials)
    assert status == 200


def test_flower_sees_the_workers(base_url, credentials):
    status, body = get(f"{base_url}/api/workers?refresh=1", credentials)
    assert status == 200
    names = json.loads(body)
    assert any(name.startswith("network@") for name in names), names
    assert any(name.startswith("default@") for name in names), names


def test_metrics_only_for_the_monitoring_host(host, base_url):
    """Flower 2.2 serves /metrics without credentials; the runtime answers it to the monitoring
    host alone. The lab host may open Flower (fleet_flower_allowed_networks) but not /metrics."""
    status, _ = get(f"{base_url}/metrics")
    assert status == 403
    assert get(f"{base_url}/healthcheck")[0] == 200
    # From the monitor host itself, as its Prometheus scrapes it.
    scraped = host.run(f"curl -sf --cacert {TLS_DIR}/ca.crt {base_url}/metrics")
    assert scraped.rc == 0, scraped.stderr
    assert "flower_events_total" in scraped.stdout or "python_info" in scraped.stdout


def test_systemd_rates_the_flower_sandbox_ok(host):
    assert sandbox_exposure(host, "flower.service") <= 2.5


def test_only_the_allowed_networks_reach_flower(host):
    """fleet_flower_allowed_networks (the lab host) and the monitor itself; no fleet host."""
    address = variable(host, "fleet_private_address")
    assert reaches("monitor1", address, PORT)
    for source in ("client1", "worker1", "redis1"):
        assert not reaches(source, address, PORT), f"{source} reaches Flower"
    ruleset = host.run("nft list table inet celery_fleet_flower").stdout
    assert f"tcp dport != {PORT} accept" in ruleset and "198.18.0.1" in ruleset


def worker_pids() -> list[str]:
    units = ("celery-worker@network", "celery-worker@default")
    return [
        on(name, f"systemctl show -p MainPID --value {unit}").stdout.strip()
        for name in ("worker1", "worker2")
        for unit in units
    ]


def test_the_api_runs_nothing_without_the_right_credentials(base_url, credentials):
    """Publishing a task or shutting a worker down through Flower's API: refused without the
    password (401); with it, Flower's Redis user may not publish tasks and the workers do not
    obey shutdown (fleet_worker_control_commands). The webfarm's ledger shows nothing ran."""
    run = f"flowerapi{int(time.time())}"
    requests.delete(f"{WEBFARM}/ledger/{run}", timeout=10)
    task = {"args": [f"{WEBFARM}/delay/0?ledger={run}.1"]}
    pids = worker_pids()
    user, password = credentials
    for auth in (None, (user, password + "x"), ("intruder", password)):
        apply = requests.post(
            f"{base_url}/api/task/async-apply/fleetapp.fetch_url",
            json=task,
            auth=auth,
            timeout=10,
            verify=VERIFY,
        )
        shutdown = requests.post(
            f"{base_url}/api/worker/shutdown/network@worker1", auth=auth, timeout=10, verify=VERIFY
        )
        assert (apply.status_code, shutdown.status_code) == (401, 401), auth and auth[0]
    apply = requests.post(
        f"{base_url}/api/task/async-apply/fleetapp.fetch_url",
        json=task,
        auth=credentials,
        timeout=10,
        verify=VERIFY,
    )
    assert apply.status_code >= 500, apply.text[:300]
    shutdown = requests.post(
        f"{base_url}/api/worker/shutdown/network@worker1",
        auth=credentials,
        timeout=10,
        verify=VERIFY,
    )
    assert shutdown.status_code == 200, shutdown.text[:300]
    time.sleep(5)
    executed = requests.get(f"{WEBFARM}/ledger/{run}", timeout=10).json()["executions"]
    assert executed == {}, executed
    assert worker_pids() == pids
    # Redis' own record of the refused publish, under Flower's user.
    refused = take_refusals(
        # The publish (its binding or its push), and the subscription to its result that Celery
        # makes for the sender.
        lambda e: e.get("username") == "flower" and e.get("object") in FLOWER_PUBLISH_REFUSALS
    )
    assert any(e["object"] != "subscribe" for e in refused), "no refused publish in the ACL log"
