"""The deployment suite: site.yml converges the lab once, then every test looks at the result."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from fleettest.commands import BIN, run

from tests.conftest import LAB_NAMES, REPO, on

SECRETS = Path(os.environ.get("HOME", "/root")) / ".celery-fleet" / "secrets" / "lab"
RECAP = re.compile(
    r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M
)


def playbook(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}
    return run([str(BIN / "ansible-playbook"), *args], cwd=REPO, env=env, timeout=timeout)


def recap(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, int]]:
    return {
        host: {
            "ok": int(ok),
            "changed": int(changed),
            "unreachable": int(unr),
            "failed": int(failed),
        }
        for host, ok, changed, unr, failed in RECAP.findall(result.stdout)
    }


FLEET_DEFAULTS = yaml.safe_load(
    (REPO / "roles" / "fleet" / "defaults" / "main.yml").read_text(encoding="utf-8")
)


def fleet_default(name: str) -> object:
    """A value the roles share (roles/fleet), for names the inventory does not set."""
    return FLEET_DEFAULTS[name]


def secret(name: str) -> str:
    return (SECRETS / name).read_text().strip()


# `site.yml --check` against machines nothing was deployed to yet (make test's fresh lab), run
# before the converge; None when the session started on a deployed lab.
FRESH_CHECK: dict[str, subprocess.CompletedProcess[str] | None] = {"result": None}


def lab_is_fresh() -> bool:
    probe = "test -e /etc/celery-fleet"  # the first thing any tier's deploy creates
    return all(on(name, probe, check=False).returncode != 0 for name in LAB_NAMES)


@pytest.fixture(scope="session", autouse=True)
def deployed() -> subprocess.CompletedProcess[str]:
    """One converge of the whole topology; every test in this suite depends on it."""
    if lab_is_fresh():
        FRESH_CHECK["result"] = playbook("site.yml", "--check")
    result = playbook("site.yml")
    if result.returncode != 0:
        pytest.fail(f"site.yml failed:\n{result.stdout[-8000:]}\n{result.stderr[-2000:]}")
    return result


def sandbox_exposure(host: Any, unit: str) -> float:
    """systemd's own score of a unit's sandbox (0 = locked down, 10 = exposed; <= 2.5 is "OK")."""
    out = host.check_output(f"systemd-analyze security --no-pager {unit}")
    return float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)[1])
