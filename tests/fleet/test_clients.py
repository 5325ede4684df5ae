"""Client hosts: the fleetapp CLI works for root against the fleet."""

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
