"""Client hosts: the application's own code runs there with the fleet's settings."""

from __future__ import annotations

import json
import re
from pathlib import Path

testinfra_hosts = ["ansible://clients"]

REPO = Path(__file__).resolve().parents[2]


def app_version() -> str:
    text = (REPO / "app" / "src" / "fleetapp" / "__init__.py").read_text(encoding="utf-8")
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def test_cli_wrapper(host):
    wrapper = host.file("/usr/local/bin/fleetapp")
    assert wrapper.is_file
    assert (wrapper.user, wrapper.mode) == ("root", 0o755)
    assert host.check_output("fleetapp --version").strip() == f"fleetapp {app_version()}"


def test_fleet_commands(host):
    for command in ("fleet-python", "fleet-celery", "fleet-doctor"):
        wrapper = host.file(f"/usr/local/bin/{command}")
        assert (wrapper.user, wrapper.mode) == ("root", 0o755), command
    cmd = host.run("fleet-doctor --timeout 10")
    assert cmd.rc == 0, cmd.stdout + cmd.stderr
    cmd = host.run(
        "fleet-python -c 'import fleetapp.celery; from fleetapp.tasks.arith import add;"
        " print(add.delay(4, 5).get(timeout=60))'"
    )
    assert cmd.rc == 0 and cmd.stdout.strip() == "9", cmd.stdout + cmd.stderr
    cmd = host.run("fleet-celery call fleetapp.add --args '[1, 2]'")
    assert cmd.rc == 0, cmd.stdout + cmd.stderr


def test_no_workers_on_clients(host):
    assert not host.file("/etc/systemd/system/celery-worker@.service").exists


def test_doctor_is_healthy(host):
    cmd = host.run("fleetapp doctor --timeout 10")
    assert cmd.rc == 0, cmd.stdout + cmd.stderr


def test_add_runs_on_a_worker(host):
    cmd = host.run("fleetapp add 2 3 --json --timeout 60")
    assert cmd.rc == 0, cmd.stdout + cmd.stderr
    out = json.loads(cmd.stdout)
    assert out["result"] == 5
    assert out["worker"].startswith("default@")
