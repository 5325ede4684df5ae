"""What the lab knows about a machine: plain data, imported by every other module."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Machine:
    name: str
    address: str
    groups: list[str] = field(default_factory=list)


@dataclass
class MachineStatus:
    machine: Machine
    state: str  # running | cut | stopped
    uptime: float | None


def default_topology(workers: int) -> list[str]:
    return ["redis1", *(f"worker{i}" for i in range(1, workers + 1)), "client1", "monitor1"]
