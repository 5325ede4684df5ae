"""Worker hosts: celery-worker@<queue> instances, their config, hardening and node names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.fleet.conftest import sandbox_exposure

testinfra_hosts = ["ansible://workers"]

REPO = Path(__file__).resolve().parents[2]
VENV = "/opt/celery-fleet/venv"
APP = "fleetapp.celery:app"
QUEUES = ["network", "default"]  # fleet_app_queues in inventory/lab
POOLS = {"network": "gevent", "default": "prefork"}

HARDENING = {
    "User": "celery",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "CapabilityBoundingSet": "",
    "Restart": "always",
    "KillMode": "mixed",
    "KillSignal": "15",
}


def app_version() -> str:
    text = (REPO / "app" / "src" / "fleetapp" / "__init__.py").read_text(encoding="utf-8")
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def journal(host, unit: str) -> str:
    return host.run(f"journalctl -u {unit} -n 60 --no-pager").stdout


def show(host, unit: str, *props: str) -> dict[str, str]:
    args = " ".join(f"-p {p}" for p in props)
    out = host.check_output(f"systemctl show {args} {unit}")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def seconds(timespan: str) -> float:
    """systemd timespan ('5min 30s', '1h', '330ms') to seconds."""
    units = {"h": 3600, "min": 60, "s": 1, "ms": 0.001, "us": 0.000001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)\s*(h|min|ms|us|s)", timespan))


def test_target_active_and_enabled(host):
    target = host.service("celery.target")
    assert target.is_running, journal(host, "celery.target")
    assert target.is_enabled


@pytest.mark.parametrize("queue", QUEUES)
def test_instance_active_and_enabled(host, queue):
    unit = f"celery-worker@{queue}.service"
    svc = host.service(unit)
    assert svc.is_running, journal(host, unit)
    assert svc.is_enabled, journal(host, unit)
    props = show(host, unit, "PartOf", "NRestarts")
    assert "celery.target" in props["PartOf"]
    assert props["NRestarts"] == "0", journal(host, unit)


@pytest.mark.parametrize("queue", QUEUES)
def test_instance_hardening(host, queue):
    unit = f"celery-worker@{queue}.service"
    props = show(
        host,
        unit,
        *HARDENING,
        "ReadWritePaths",
        "RestrictAddressFamilies",
        "SystemCallArchitectures",
    )
    for name, expected in HARDENING.items():
        assert props.get(name) == expected, f"{unit}: {name}={props.get(name)!r}"
    assert "/var/lib/celery-fleet" in props["ReadWritePaths"].split()
    assert set(props["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert props["SystemCallArchitectures"] == "native"


@pytest.mark.parametrize("queue", QUEUES)
def test_stop_timeout_exceeds_task_time_limit(host, queue):
    props = show(host, f"celery-worker@{queue}.service", "TimeoutStopUSec")
    limit = int(host.ansible.get_variables().get("fleet_task_time_limit", 300))
    assert seconds(props["TimeoutStopUSec"]) > limit


@pytest.mark.parametrize("queue", QUEUES)
def test_open_files_limit_holds_a_socket_per_greenlet(host, queue):
    """systemd's default soft limit (1024) would cap a gevent pool of 1,000 running fetches."""
    props = show(host, f"celery-worker@{queue}.service", "LimitNOFILESoft")
    assert int(props["LimitNOFILESoft"]) >= 65536


@pytest.mark.parametrize("queue", QUEUES)
def test_instance_config(host, queue):
    env = host.file(f"/etc/celery-fleet/worker-{queue}.env")
    assert env.is_file
    assert (env.user, env.group, env.mode) == ("root", "celery", 0o640)
    assert f"--pool={POOLS[queue]}" in env.content_string
    assert f"--queues={queue}" in env.content_string


@pytest.mark.parametrize("queue", QUEUES)
def test_node_name_answers_ping(host, queue):
    node = f"{queue}@{host.check_output('hostname')}"
    cmd = host.run(
        f"FLEET_ENV_FILE=/etc/celery-fleet/app.env {VENV}/bin/fleet-celery --app={APP}"
        f" inspect ping --destination={node} --timeout=10"
    )
    assert cmd.rc == 0 and node in cmd.stdout, cmd.stdout + cmd.stderr


def test_system_user(host):
    celery = host.user("celery")
    assert celery.exists
    assert celery.home == "/var/lib/celery-fleet"
    assert celery.shell in ("/usr/sbin/nologin", "/sbin/nologin")
    assert celery.uid < 1000


@pytest.mark.parametrize("package", ["fleetapp", "gevent", "celery-fleet-runtime"])
def test_venv_packages(host, package):
    out = host.check_output(
        f"{VENV}/bin/python -c 'import importlib.metadata as m; print(m.version(\"{package}\"))'"
    )
    if package == "fleetapp":
        assert out.strip() == app_version()


@pytest.mark.parametrize("queue", QUEUES)
def test_workers_run_with_the_fleets_settings(host, queue):
    """The app sets none of these: the runtime gives them as defaults (celery inspect conf)."""
    node = f"{queue}@{host.check_output('hostname')}"
    cmd = host.run(
        f"FLEET_ENV_FILE=/etc/celery-fleet/app.env {VENV}/bin/fleet-celery --app={APP}"
        f" inspect conf --destination={node} --timeout=10 --json"
    )
    assert cmd.rc == 0, cmd.stdout + cmd.stderr
    conf = json.loads(cmd.stdout)[node]
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["accept_content"] == ["json"]
    assert conf["broker_transport_options"]["visibility_timeout"] == 30
    assert conf["task_time_limit"] == 60


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("net.ipv4.ip_local_port_range", "10240\t65535"),
        ("net.ipv4.tcp_tw_reuse", 1),
        ("net.core.somaxconn", 4096),
    ],
)
def test_network_sysctls(host, key, expected):
    assert host.sysctl(key) == expected


@pytest.mark.parametrize("queue", QUEUES)
def test_systemd_rates_the_worker_sandbox_ok(host, queue):
    assert sandbox_exposure(host, f"celery-worker@{queue}.service") <= 2.5
