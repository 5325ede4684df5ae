"""The lab's record of its machines (state.json), the inventory written from it, and the lock."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
from collections.abc import Callable, Iterator

from . import access, inventory
from .config import LabConfig, LabError
from .machine import Machine


class State:
    def __init__(self, config: LabConfig) -> None:
        self.config = config

    def machines(self) -> dict[str, Machine]:
        try:
            raw = json.loads(self.config.state_file.read_text())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as error:
            raise LabError(
                f"{self.config.state_file} is corrupt ({error}); run `lab down`"
            ) from None
        # A lab recorded before machines had a release ran bookworm only.
        return {
            name: Machine(name=name, **{"release": "bookworm", **data})
            for name, data in raw["machines"].items()
        }

    def inventories(self) -> list[str]:
        """Every inventory file the lab has written (one per checkout that ran `lab up`)."""
        try:
            raw = json.loads(self.config.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return []
        return [str(path) for path in raw.get("inventories", [])]

    def save(self, machines: dict[str, Machine]) -> None:
        """Record the machines, and rewrite the inventory and known_hosts that follow from them."""
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        written = str(self.config.inventory_file)
        data = {
            "machines": {
                m.name: {"address": m.address, "groups": m.groups, "release": m.release}
                for m in sorted(machines.values(), key=lambda m: ipaddress.IPv4Address(m.address))
            },
            # `lab down` removes them all, so no checkout keeps an inventory of a gone lab.
            "inventories": sorted({*self.inventories(), written}),
        }
        tmp = self.config.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.config.state_file)
        inventory.write(self.config, list(machines.values()))
        access.write_known_hosts(self.config, list(machines.values()))

    def get(self, name: str) -> Machine:
        machine = self.machines().get(name)
        if machine is None:
            raise LabError(f"no machine named {name!r} in the lab (see `lab status`)")
        return machine

    @contextlib.contextmanager
    def locked(self, log: Callable[[str], None]) -> Iterator[None]:
        """One mutating lab command at a time."""
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.config.state_dir / ".lock").open("w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log("waiting for another lab command to finish")
                fcntl.flock(handle, fcntl.LOCK_EX)
            yield
