"""How the host reaches the machines: the lab's SSH key, known_hosts and ssh command line."""

from __future__ import annotations

import contextlib

from .config import LabConfig
from .machine import Machine
from .system import run


def ensure_key(config: LabConfig) -> None:
    key = config.ssh_key
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        comment = "celery-fleet-lab"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)])


def write_known_hosts(config: LabConfig, machines: list[Machine]) -> None:
    """Pinned host keys, so Ansible runs with StrictHostKeyChecking=yes."""
    lines = []
    for machine in machines:
        pub = config.machine_root(machine.name) / "etc/ssh/ssh_host_ed25519_key.pub"
        with contextlib.suppress(OSError):
            key_type, key_data = pub.read_text().split()[:2]
            lines.append(f"{machine.name},{machine.address} {key_type} {key_data}\n")
    if config.known_hosts.parent.exists():
        config.known_hosts.write_text("".join(lines))


def ssh_args(config: LabConfig, machine: Machine) -> list[str]:
    return [
        "ssh",
        "-i",
        str(config.ssh_key),
        "-o",
        f"UserKnownHostsFile={config.known_hosts}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=5",
        f"root@{machine.address}",
    ]
