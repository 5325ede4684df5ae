"""Helpers shared by the suites that drive the lab."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from fleettest.commands import BIN, run

REPO = Path(__file__).resolve().parents[1]
LAB_NAMES = ["redis1", "worker1", "worker2", "client1", "monitor1"]


def lab(
    *args: str, check: bool = True, timeout: float = 300, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the `lab` command as a user would, from the repository root."""
    result = run([str(BIN / "lab"), *args], cwd=REPO, timeout=timeout, input=input)
    if check and result.returncode != 0:
        pytest.fail(
            f"lab {' '.join(args)} failed ({result.returncode}):\n{result.stderr}{result.stdout}"
        )
    return result


def lab_status() -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(lab("status", "--json").stdout)}


def on(
    host: str, command: str, check: bool = True, timeout: float = 120, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a shell command inside a lab machine (nsenter: works even when it is cut off).

    Secrets go through ``input`` (the command's stdin), never into the command line.
    """
    result = lab("exec", host, "--", "sh", "-c", command, check=False, timeout=timeout, input=input)
    if check and result.returncode != 0:
        pytest.fail(f"{host}$ {command} -> {result.returncode}:\n{result.stderr}{result.stdout}")
    return result


def address(name: str) -> str:
    """A lab machine's address on the bridge."""
    return str(lab_status()[name]["address"])


def reaches(source: str, address: str, port: int) -> bool:
    """Whether a TCP connection from a lab machine to address:port is accepted within 3 s."""
    probe = f"timeout 3 bash -c '</dev/tcp/{address}/{port}'"
    return on(source, probe, check=False).returncode == 0


def ssh(host: str, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command over SSH, the way Ansible reaches the machine."""
    return lab("ssh", host, "--", command, check=False, timeout=timeout)
