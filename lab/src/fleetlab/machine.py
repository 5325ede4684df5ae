"""What the lab knows about a machine: plain data, imported by every other module."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import DEFAULT_RELEASE


@dataclass
class Machine:
    name: str
    address: str
    groups: list[str] = field(default_factory=list)
    release: str = DEFAULT_RELEASE  # the Debian codename its image was built from


@dataclass
class MachineStatus:
    machine: Machine
    state: str  # running | cut | stopped
    uptime: float | None


def default_topology(workers: int, redis: int = 1) -> list[str]:
    return [
        *(f"redis{i}" for i in range(1, redis + 1)),
        *(f"worker{i}" for i in range(1, workers + 1)),
        "client1",
        "monitor1",
    ]
