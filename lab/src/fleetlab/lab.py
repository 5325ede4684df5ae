"""The lab: machines (nspawn containers in their own network namespaces) on one bridge.

`Lab` is what the `lab` command calls; each concern lives in its own module: state (state.json,
the inventory, the lock), network (bridge, namespaces, addresses), lifecycle (boot, power-off,
power cut, removal), cleanup (strays of an earlier lab), access (SSH).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from . import access, cleanup, image, inventory, lifecycle, mirrors, network
from .config import (
    DEFAULT_RELEASE,
    LabConfig,
    LabError,
    groups_for,
    validate_name,
    validate_release,
)
from .machine import Machine, MachineStatus, default_topology
from .state import State
from .system import (
    process_age_seconds,
    remove_cgroups,
    require_disk,
    require_root,
    require_tools,
    unmount_all,
)

REQUIRED_TOOLS = ("systemd-nspawn", "debootstrap", "ip", "nsenter", "ssh", "ssh-keygen", "mount")


class Lab:
    def __init__(self, config: LabConfig, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.log = log
        self.state = State(config)

    # ---- queries -----------------------------------------------------------------------

    def machines(self) -> dict[str, Machine]:
        return self.state.machines()

    def inventories(self) -> list[str]:
        return self.state.inventories()

    def get(self, name: str) -> Machine:
        return self.state.get(name)

    def init_pid(self, name: str) -> int | None:
        return lifecycle.init_pid(self.config, name)

    def status(self) -> list[MachineStatus]:
        result = []
        for machine in self.machines().values():
            init = self.init_pid(machine.name)
            if not init:
                state, uptime = "stopped", None
            else:
                uptime = process_age_seconds(init)
                state = "cut" if network.is_cut(self.config, machine.name) else "running"
            result.append(MachineStatus(machine, state, uptime))
        return result

    def ssh_args(self, name: str) -> list[str]:
        return access.ssh_args(self.config, self.get(name))

    def exec(
        self, name: str, command: list[str], capture: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the machine's namespaces (works even when it is cut off)."""
        require_root()
        self.get(name)
        return lifecycle.exec_in(self.config, name, command, capture)

    # ---- commands that change the lab ------------------------------------------------------

    def preflight(self) -> None:
        require_root()
        require_tools(*REQUIRED_TOOLS)
        require_disk(self.config.state_dir, 1000)
        network.check_subnet_free(self.config)

    def release(self) -> str:
        """The release new machines get unless told: the lab's, when all its machines share one."""
        releases = {machine.release for machine in self.machines().values()}
        return releases.pop() if len(releases) == 1 else DEFAULT_RELEASE

    def up(
        self, workers: int | None = None, redis: int | None = None, release: str | None = None
    ) -> None:
        self.preflight()
        if release is not None:
            validate_release(release)
        with self.state.locked(self.log):
            # A release given is the release wanted, and a machine is not rebuilt silently.
            other = sorted(
                m.name for m in self.machines().values() if release and m.release != release
            )
            if other:
                raise LabError(
                    f"{', '.join(other)} run{'s' if len(other) == 1 else ''} another release than"
                    f" {release}; `lab down` first, or `lab remove` and `lab add --release` them"
                )
            release = release or self.release()
            cleanup.sweep_strays(self.config, keep=set(self.machines()))
            base = self._prepare_host(release)
            # The machines of a mixed lab boot from their own release's image.
            for kept in {m.release for m in self.machines().values()} - {release}:
                image.ensure_image(self.config, kept, self.log)
            current = self.machines()
            wanted = default_topology(
                workers if workers is not None else 2, redis if redis is not None else 1
            )
            # A count given is the count wanted: machines of that kind beyond it are removed.
            # Without one, whatever was added since is kept.
            counted = [kind for kind, n in (("worker", workers), ("redis", redis)) if n is not None]
            for name in list(current):
                if name not in wanted and any(name.startswith(kind) for kind in counted):
                    self._remove(name)
            current = self.machines()
            wanted += [n for n in current if n not in wanted]
            to_start = [
                current[name] if name in current else self._create(name, base, release, None, None)
                for name in wanted
            ]
            lifecycle.boot_all(self.config, to_start, list(self.machines().values()))
            # Also when nothing was created: a lab started from another checkout becomes this
            # checkout's too, and site.yml here deploys the machines it runs.
            others = [p for p in self.inventories() if p != str(self.config.inventory_file)]
            self.state.save(self.machines())
            if others:
                self.log(
                    f"inventory written to {self.config.inventory_file}"
                    f" (this lab's inventory is also at {', '.join(others)})"
                )

    def add(
        self,
        name: str,
        address: str | None = None,
        group: str | None = None,
        release: str | None = None,
    ) -> Machine:
        self.preflight()
        validate_name(name)
        if release is not None:
            validate_release(release)
        with self.state.locked(self.log):
            release = release or self.release()
            if name in self.machines():
                raise LabError(f"a machine named {name!r} already exists")
            # Refuse a bad address before anything is touched.
            network.pick_address(self.config, self.machines(), address)
            base = self._prepare_host(release)
            machine = self._create(name, base, release, address, group)
            try:
                lifecycle.boot_all(self.config, [machine], list(self.machines().values()))
            except BaseException:
                self._remove(name)
                raise
            return machine

    def remove(self, name: str) -> None:
        require_root()
        with self.state.locked(self.log):
            self.get(name)
            self._remove(name)

    def start(self, name: str) -> None:
        require_root()
        with self.state.locked(self.log):
            machine = self.get(name)
            lifecycle.boot_all(self.config, [machine], list(self.machines().values()))

    def stop(self, name: str, timeout: float = 60) -> None:
        """Clean power-off: the machine's systemd stops its services."""
        require_root()
        with self.state.locked(self.log):
            self.get(name)
            lifecycle.poweroff_all(self.config, [name], timeout, self.log)

    def kill(self, name: str) -> None:
        """Power cut: every process of the machine dies at once."""
        require_root()
        with self.state.locked(self.log):
            self.get(name)
            lifecycle.power_cut(self.config, name)

    def cut(self, name: str) -> None:
        """Network partition: the machine's link to the bridge goes down; it keeps running."""
        require_root()
        self.get(name)
        network.set_link(self.config, name, up=False)

    def heal(self, name: str) -> None:
        require_root()
        self.get(name)
        network.set_link(self.config, name, up=True)

    def down(self) -> None:
        require_root()
        with self.state.locked(self.log):
            lifecycle.poweroff_all(self.config, list(self.machines()), 30, self.log)
            cleanup.sweep_strays(self.config, keep=set())
            mirrors.stop_mirrors(self.config)
            network.remove_bridge(self.config)
            unmount_all(self.config.state_dir)
            remove_cgroups("celery-fleet-lab")
            for path in self.inventories():
                Path(path).unlink(missing_ok=True)
            inventory.remove(self.config)
            for entry in self.config.state_dir.iterdir():
                if entry.name != ".lock":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        shutil.rmtree(self.config.state_dir, ignore_errors=True)

    # ---- internals ------------------------------------------------------------------------

    def _prepare_host(self, release: str) -> Path:
        """Bridge, package mirrors, base image and SSH key: what every new machine needs."""
        network.ensure_bridge(self.config)
        mirrors.ensure_mirrors(self.config, self.log)
        base = image.ensure_image(self.config, release, self.log)
        access.ensure_key(self.config)
        return base

    def _create(
        self, name: str, base: Path, release: str, address: str | None, group: str | None
    ) -> Machine:
        validate_name(name)
        machines = self.machines()
        machine = Machine(
            name=name,
            address=network.pick_address(self.config, machines, address),
            groups=[group] if group else groups_for(name),
            release=release,
        )
        self.log(f"creating {name} ({machine.address}, {release})")
        try:
            lifecycle.prepare_root(self.config, machine, base)
            network.plug(self.config, machine)
        except BaseException:
            lifecycle.destroy(self.config, name)
            raise
        machines[name] = machine
        self.state.save(machines)
        return machine

    def _remove(self, name: str) -> None:
        self.log(f"removing {name}")
        lifecycle.poweroff_all(self.config, [name], 20, self.log)
        lifecycle.destroy(self.config, name)
        machines = self.machines()
        machines.pop(name, None)
        self.state.save(machines)
