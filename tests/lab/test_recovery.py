"""`lab up` recovers a lab whose processes were killed from outside (e.g. a session ended)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import pytest

from tests.conftest import LAB_NAMES, lab, lab_status, on

pytestmark = pytest.mark.timeout(300)


def lab_processes() -> list[int]:
    """nspawn, every process inside the machines, and the mirrors."""
    pids = []
    for name in LAB_NAMES:
        netns = subprocess.run(
            ["ip", "netns", "pids", f"fleet-{name}"], capture_output=True, text=True, check=True
        )
        pids += [int(pid) for pid in netns.stdout.split()]
    listing = subprocess.run(
        ["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True
    )
    for line in listing.stdout.splitlines():
        pid, _, args = line.strip().partition(" ")
        if "systemd-nspawn" in args or "198.18.0.1" in args:
            pids.append(int(pid))
    return pids


def test_up_recovers_after_every_lab_process_was_killed():
    addresses = {name: row["address"] for name, row in lab_status().items()}
    victims = lab_processes()
    assert victims
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # Namespaces, veths, the bridge and the overlay mounts are left behind.
    assert all(row["state"] == "stopped" for row in lab_status().values())

    lab("up")

    after = lab_status()
    assert {name: row["address"] for name, row in after.items()} == addresses
    assert all(row["state"] == "running" for row in after.values())
    for name in LAB_NAMES:
        assert on(name, "systemctl is-system-running --wait").stdout.strip() == "running"
    probe = "curl -fsS -o /dev/null -w '%{http_code}' http://198.18.0.1:8080/status/200"
    assert on("client1", probe).stdout == "200"
