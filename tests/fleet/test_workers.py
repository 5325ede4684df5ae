"""Worker hosts: celery-worker@<queue> instances, their config, hardening and node names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

testinfra_hosts = ["ansible://workers"]

REPO = Path(__file__).resolve().parents[2]
VENV = "/opt/fleetapp/venv"
APP = "fleetapp.celery:app"
QUEUES = ["network", "default"]  # roles/celery_worker/defaults/main.yml
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
    assert "/var/lib/celery" in props["ReadWritePaths"].split()
    assert set(props["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert props["SystemCallArchitectures"] == "native"


@pytest.mark.parametrize("queue", QUEUES)
def test_stop_timeout_exceeds_task_time_limit(host, queue):
    props = show(host, f"celery-worker@{queue}.service", "TimeoutStopUSec")
    limit = int(host.ansible.get_variables().get("fleet_task_time_limit", 300))
    assert seconds(props["TimeoutStopUSec"]) > limit


@pytest.mark.parametrize("queue", QUEUES)
def test_instance_config(host, queue):
    env = host.file(f"/etc/fleetapp/worker-{queue}.env")
    assert env.is_file
    assert (env.user, env.group, env.mode) == ("root", "celery", 0o640)
    assert f"--pool={POOLS[queue]}" in env.content_string


@pytest.mark.parametrize("queue", QUEUES)
def test_node_name_answers_ping(host, queue):
    node = f"{queue}@{host.check_output('hostname')}"
    cmd = host.run(f"{VENV}/bin/celery --app={APP} inspect ping --destination={node} --timeout=10")
    assert cmd.rc == 0 and node in cmd.stdout, cmd.stdout + cmd.stderr


def test_system_user(host):
    celery = host.user("celery")
    assert celery.exists
    assert celery.home == "/var/lib/celery"
    assert celery.shell in ("/usr/sbin/nologin", "/sbin/nologin")
    assert celery.uid < 1000


@pytest.mark.parametrize("package", ["fleetapp", "gevent"])
def test_venv_packages(host, package):
    out = host.check_output(
        f"{VENV}/bin/python -c 'import importlib.metadata as m; print(m.version(\"{package}\"))'"
    )
    if package == "fleetapp":
        assert out.strip() == app_version()


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
