"""Monitor host: Flower, hardened, on the private address with basic auth."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import pytest

from tests.fleet.conftest import FLEET_DEFAULTS, sandbox_exposure

testinfra_hosts = ["ansible://monitor"]

UNIT = "flower.service"
PORT = 5555


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


def get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def base_url(host) -> str:
    return f"http://{variable(host, 'fleet_private_address')}:{PORT}"


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


def test_metrics_for_prometheus(base_url):
    # Flower 2.2 serves /metrics without authentication (scrapers reach it on the private address).
    status, body = get(f"{base_url}/metrics")
    assert status == 200
    assert b"flower_" in body or b"celery_" in body or b"python_info" in body


def test_systemd_rates_the_flower_sandbox_ok(host):
    assert sandbox_exposure(host, "flower.service") <= 2.5
