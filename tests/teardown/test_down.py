"""`lab down` leaves nothing behind: no namespace, veth, bridge, nspawn, mirror, mount or cgroup."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, lab

pytestmark = pytest.mark.timeout(180)

STATE_DIR = Path("/var/lib/celery-fleet-lab")


def live_processes(word: str) -> list[str]:
    listing = subprocess.run(
        ["ps", "-eo", "stat=,args="], capture_output=True, text=True, check=True
    ).stdout
    # Zombies are only process-table entries: this box's PID 1 does not reap orphans.
    return [line for line in listing.splitlines() if word in line and not line.startswith("Z")]


def assert_nothing_left() -> None:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "fleet-" not in netns
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "fv-" not in links and "fleetbr0" not in links
    assert live_processes("systemd-nspawn") == []
    assert live_processes("198.18.0.1") == []  # the mirrors bind to the bridge address
    assert str(STATE_DIR) not in Path("/proc/self/mounts").read_text()
    assert not STATE_DIR.exists()
    assert not list(Path("/sys/fs/cgroup").glob("*/celery-fleet-lab"))
    assert not (REPO / "inventory/lab/hosts.yml").exists()


def test_down_leaves_nothing_behind():
    lab("down")
    assert_nothing_left()


def test_up_after_down_works_and_down_again_is_clean():
    lab("up", "--workers", "1")
    lab("down")
    assert_nothing_left()
