"""The Sentinel suite: the lab's fleet grown from one Redis host to three, then failed over.

Run after the deployment suite, on its lab: ``lab add redis2``, ``lab add redis3`` and
``site.yml``, the README's way from one Redis host to three (a primary, two replicas and a
Sentinel on each). Faults are measured with the fault suite's ledger (tests/fleet/faults).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import lab, lab_status
from tests.fleet.conftest import playbook
from tests.fleet.faults.conftest import loadgen_on_client, pytest_terminal_summary

__all__ = ["loadgen_on_client", "pytest_terminal_summary"]

REDIS_HOSTS = ("redis1", "redis2", "redis3")


@pytest.fixture(scope="session")
def grown() -> Iterator[subprocess.CompletedProcess[str]]:
    """The fleet on three Redis hosts: the lab's missing ones added, site.yml run."""
    machines = lab_status()
    for name in REDIS_HOSTS:
        if name not in machines:
            lab("add", name)
    result = playbook("site.yml")
    assert result.returncode == 0, result.stdout[-6000:]
    yield result
