"""The lab: machines (nspawn containers in their own network namespaces) on one bridge."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import image, inventory, mirrors
from .config import LabConfig, LabError, groups_for, validate_name
from .system import (
    CLEAN_PATH,
    addresses,
    all_pids,
    cmdline,
    is_mounted,
    kill,
    links,
    mounts_under,
    netns_list,
    netns_pids,
    parent_pid,
    pid_alive,
    process_age_seconds,
    remove_cgroups,
    require_disk,
    require_root,
    require_tools,
    run,
    spawn_detached,
    tcp_open,
    unmount_all,
    wait_gone,
)

REQUIRED_TOOLS = ("systemd-nspawn", "debootstrap", "ip", "nsenter", "ssh", "ssh-keygen", "mount")
FIRST_HOST_OFFSET = 10
BOOT_TIMEOUT = 120


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


class Lab:
    def __init__(self, config: LabConfig, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.log = log

    # ---- state -------------------------------------------------------------------------

    def machines(self) -> dict[str, Machine]:
        try:
            raw = json.loads(self.config.state_file.read_text())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as error:
            raise LabError(
                f"{self.config.state_file} is corrupt ({error}); run `lab down`"
            ) from None
        return {name: Machine(name=name, **data) for name, data in raw["machines"].items()}

    def inventories(self) -> list[str]:
        """Every inventory file the lab has written (one per checkout that ran `lab up`)."""
        try:
            raw = json.loads(self.config.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return []
        return [str(path) for path in raw.get("inventories", [])]

    def _save(self, machines: dict[str, Machine]) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        written = str(self.config.inventory_file)
        data = {
            "machines": {
                m.name: {"address": m.address, "groups": m.groups}
                for m in sorted(machines.values(), key=lambda m: ipaddress.IPv4Address(m.address))
            },
            # `lab down` removes them all, so no checkout keeps an inventory of a gone lab.
            "inventories": sorted({*self.inventories(), written}),
        }
        tmp = self.config.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.config.state_file)
        inventory.write(self.config, list(machines.values()))
        self._write_known_hosts(machines)

    def get(self, name: str) -> Machine:
        machine = self.machines().get(name)
        if machine is None:
            raise LabError(f"no machine named {name!r} in the lab (see `lab status`)")
        return machine

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One mutating lab command at a time."""
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.config.state_dir / ".lock").open("w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.log("waiting for another lab command to finish")
                fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    # ---- preflight -----------------------------------------------------------------------

    def preflight(self) -> None:
        require_root()
        require_tools(*REQUIRED_TOOLS)
        require_disk(self.config.state_dir, 1000)
        # The lab's subnet must not already be someone else's.
        for ifname, addrs in addresses().items():
            if ifname == self.config.bridge:
                continue
            for cidr in addrs:
                if ipaddress.IPv4Interface(cidr).network.overlaps(self.config.subnet):
                    raise LabError(
                        f"address conflict: {cidr} on {ifname} overlaps the lab's subnet "
                        f"{self.config.subnet} (set FLEET_LAB_SUBNET to another one)"
                    )

    # ---- host network ----------------------------------------------------------------------

    def ensure_bridge(self) -> None:
        bridge = self.config.bridge
        if bridge not in links():
            run(["ip", "link", "add", bridge, "type", "bridge"])
        want = f"{self.config.host_address}/{self.config.subnet.prefixlen}"
        if want not in addresses().get(bridge, []):
            run(["ip", "addr", "add", want, "dev", bridge])
        run(["ip", "link", "set", bridge, "up"])

    # ---- lifecycle -------------------------------------------------------------------------

    def up(self, workers: int | None = None) -> None:
        self.preflight()
        with self.locked():
            self._sweep_strays()
            self.ensure_bridge()
            mirrors.ensure_mirrors(self.config, self.log)
            base = image.ensure_image(self.config, self.log)
            self._ensure_ssh_key()
            current = self.machines()
            wanted = default_topology(workers if workers is not None else 2)
            if workers is None:
                # Without --workers, keep whatever workers were added since.
                wanted += [n for n in current if n not in wanted]
            else:
                for name in list(current):
                    if name.startswith("worker") and name not in wanted:
                        self._remove(name)
                current = self.machines()
            to_start = []
            for name in wanted:
                if name in current:
                    to_start.append(current[name])
                else:
                    to_start.append(self._create(name, base, None, None))
            self._boot_all(to_start)
            # Also when nothing was created: a lab started from another checkout becomes this
            # checkout's too, and site.yml here deploys the machines it runs.
            others = [p for p in self.inventories() if p != str(self.config.inventory_file)]
            self._save(self.machines())
            if others:
                self.log(
                    f"inventory written to {self.config.inventory_file}"
                    f" (this lab's inventory is also at {', '.join(others)})"
                )

    def add(self, name: str, address: str | None = None, group: str | None = None) -> Machine:
        self.preflight()
        validate_name(name)
        with self.locked():
            if name in self.machines():
                raise LabError(f"a machine named {name!r} already exists")
            # Refuse a bad address before anything is touched.
            self._pick_address(self.machines(), address)
            self.ensure_bridge()
            mirrors.ensure_mirrors(self.config, self.log)
            base = image.ensure_image(self.config, self.log)
            self._ensure_ssh_key()
            machine = self._create(name, base, address, group)
            try:
                self._boot_all([machine])
            except BaseException:
                self._remove(name)
                raise
            return machine

    def remove(self, name: str) -> None:
        require_root()
        with self.locked():
            self.get(name)
            self._remove(name)

    def start(self, name: str) -> None:
        require_root()
        with self.locked():
            machine = self.get(name)
            self._boot_all([machine])

    def stop(self, name: str, timeout: float = 60) -> None:
        """Clean power-off: the machine's systemd stops its services."""
        require_root()
        with self.locked():
            self.get(name)
            self._poweroff(name, timeout)

    def kill(self, name: str) -> None:
        """Power cut: every process of the machine dies at once."""
        require_root()
        with self.locked():
            self.get(name)
            init = self.init_pid(name)
            if init:
                kill(init, signal.SIGKILL)
                wait_gone([init], 15)
            self._reap_nspawn(name)

    def cut(self, name: str) -> None:
        """Network partition: the machine's link to the bridge goes down; it keeps running."""
        require_root()
        self.get(name)
        run(["ip", "link", "set", self.config.veth(name), "down"])

    def heal(self, name: str) -> None:
        require_root()
        self.get(name)
        run(["ip", "link", "set", self.config.veth(name), "up"])

    def down(self) -> None:
        require_root()
        with self.locked():
            self._poweroff_all(list(self.machines()), 30)
            self._sweep_strays(keep=set())
            mirrors.stop_mirrors(self.config)
            if self.config.bridge in links():
                run(["ip", "link", "del", self.config.bridge], check=False)
            unmount_all(self.config.state_dir)
            remove_cgroups("celery-fleet-lab")
            for path in self.inventories():
                Path(path).unlink(missing_ok=True)
            inventory.remove(self.config)
            for entry in self.config.state_dir.iterdir():
                if entry.name != ".lock":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        shutil.rmtree(self.config.state_dir, ignore_errors=True)

    # ---- queries ------------------------------------------------------------------------------

    def init_pid(self, name: str) -> int | None:
        """The machine's PID 1 seen from the host: the process in its netns whose parent is not."""
        pids = netns_pids(self.config.netns(name))
        inside = set(pids)
        for pid in pids:
            if parent_pid(pid) not in inside and cmdline(pid)[:1] in (
                ["/sbin/init"],
                ["/lib/systemd/systemd"],
                ["/usr/lib/systemd/systemd"],
            ):
                return pid
        for pid in pids:
            if parent_pid(pid) not in inside and Path(f"/proc/{pid}/comm").read_text().strip() in (
                "systemd",
                "init",
            ):
                return pid
        return None

    def status(self) -> list[MachineStatus]:
        link_state = links()
        result = []
        for machine in self.machines().values():
            init = self.init_pid(machine.name)
            if not init:
                state, uptime = "stopped", None
            else:
                uptime = process_age_seconds(init)
                state = (
                    "running" if link_state.get(self.config.veth(machine.name)) == "up" else "cut"
                )
            result.append(MachineStatus(machine, state, uptime))
        return result

    def exec(
        self, name: str, command: list[str], capture: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the machine's namespaces (works even when it is cut off)."""
        require_root()
        self.get(name)
        init = self.init_pid(name)
        if not init:
            raise LabError(f"{name} is not running (`lab start {name}`)")
        args = [
            "nsenter",
            "-t",
            str(init),
            "-a",
            "env",
            "-i",
            f"PATH={CLEAN_PATH}",
            "HOME=/root",
            *command,
        ]
        return subprocess.run(args, capture_output=capture, text=True, check=False)

    def ssh_args(self, name: str) -> list[str]:
        machine = self.get(name)
        return [
            "ssh",
            "-i",
            str(self.config.ssh_key),
            "-o",
            f"UserKnownHostsFile={self.config.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            f"root@{machine.address}",
        ]

    # ---- internals ------------------------------------------------------------------------------

    def _machine_dir(self, name: str) -> Path:
        return self.config.machines_dir / name

    def _cgroup(self, name: str) -> str:
        return f"celery-fleet-lab/{name}"

    def _root(self, name: str) -> Path:
        return self._machine_dir(name) / "root"

    def _ensure_ssh_key(self) -> None:
        key = self.config.ssh_key
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "celery-fleet-lab",
                    "-f",
                    str(key),
                ]
            )

    def _write_known_hosts(self, machines: dict[str, Machine]) -> None:
        lines = []
        for machine in machines.values():
            pub = self._root(machine.name) / "etc/ssh/ssh_host_ed25519_key.pub"
            with contextlib.suppress(OSError):
                key_type, key_data = pub.read_text().split()[:2]
                lines.append(f"{machine.name},{machine.address} {key_type} {key_data}\n")
        if self.config.known_hosts.parent.exists():
            self.config.known_hosts.write_text("".join(lines))

    def _pick_address(self, machines: dict[str, Machine], requested: str | None) -> str:
        taken = {m.address: m.name for m in machines.values()}
        taken[self.config.host_address] = "the host"
        if requested:
            try:
                address = ipaddress.IPv4Address(requested)
            except ValueError:
                raise LabError(f"{requested!r} is not an IPv4 address") from None
            if address not in self.config.subnet or address in (
                self.config.subnet.network_address,
                self.config.subnet.broadcast_address,
            ):
                raise LabError(f"address {requested} is not a host address in {self.config.subnet}")
            if requested in taken:
                raise LabError(
                    f"address conflict: {requested} is already used by {taken[requested]}"
                )
            return requested
        for offset, address in enumerate(self.config.subnet.hosts()):
            if offset + 1 >= FIRST_HOST_OFFSET and str(address) not in taken:
                return str(address)
        raise LabError(f"no free address left in {self.config.subnet}")

    def _create(self, name: str, base: Path, address: str | None, group: str | None) -> Machine:
        validate_name(name)
        machines = self.machines()
        machine = Machine(
            name=name,
            address=self._pick_address(machines, address),
            groups=[group] if group else groups_for(name),
        )
        self.log(f"creating {name} ({machine.address})")
        try:
            self._prepare_root(machine, base)
            self._plug(machine)
        except BaseException:
            self._destroy(name)
            raise
        machines[name] = machine
        self._save(machines)
        return machine

    def _prepare_root(self, machine: Machine, base: Path) -> None:
        mdir = self._machine_dir(machine.name)
        for sub in ("upper", "work", "root"):
            (mdir / sub).mkdir(parents=True, exist_ok=True)
        self._mount_root(machine.name, base)
        root = self._root(machine.name)
        (root / "etc/hostname").write_text(f"{machine.name}\n")
        (root / "etc/hosts").write_text(
            f"127.0.0.1\tlocalhost\n{machine.address}\t{machine.name}\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n"
        )
        (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        ssh_dir = root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        authorized = ssh_dir / "authorized_keys"
        authorized.write_text(self.config.ssh_key.with_suffix(".pub").read_text())
        authorized.chmod(0o600)
        run(
            [
                "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{machine.name}",
                "-f", str(root / "etc/ssh/ssh_host_ed25519_key"),
            ]
        )  # fmt: skip

    def _mount_root(self, name: str, base: Path | None = None) -> None:
        root = self._root(name)
        if is_mounted(root):
            return
        base = base or image.image_dir(self.config)
        if not (base / ".complete").exists():
            raise LabError(f"base image {base} is missing; run `lab up`")
        mdir = self._machine_dir(name)
        options = f"lowerdir={base},upperdir={mdir / 'upper'},workdir={mdir / 'work'}"
        run(["mount", "-t", "overlay", "overlay", "-o", options, str(root)])

    def _plug(self, machine: Machine) -> None:
        """Network namespace + veth on the bridge; idempotent, so it also repairs leftovers."""
        netns, veth = self.config.netns(machine.name), self.config.veth(machine.name)
        if netns not in netns_list():
            run(["ip", "netns", "add", netns])
        if veth not in links():
            run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns])
        run(["ip", "link", "set", veth, "master", self.config.bridge, "up"])
        cidr = f"{machine.address}/{self.config.subnet.prefixlen}"
        existing = run(["ip", "-n", netns, "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
        if cidr not in existing:
            run(["ip", "-n", netns, "addr", "add", cidr, "dev", "eth0"])
        run(["ip", "-n", netns, "link", "set", "lo", "up"])
        run(["ip", "-n", netns, "link", "set", "eth0", "up"])
        route = run(["ip", "-n", netns, "route", "show", "default"]).stdout
        if not route.strip():
            run(["ip", "-n", netns, "route", "add", "default", "via", self.config.host_address])

    def _launch(self, machine: Machine) -> None:
        if self.init_pid(machine.name):
            return
        self._mount_root(machine.name)
        self._plug(machine)
        env = {
            "PATH": CLEAN_PATH,
            # Lets the machine set per-namespace network sysctls (somaxconn, keepalive).
            "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network",
        }
        args = [
            "systemd-nspawn",
            "--quiet",
            "--keep-unit",
            "--register=no",
            f"--directory={self._root(machine.name)}",
            f"--machine={machine.name}",
            f"--network-namespace-path=/run/netns/{self.config.netns(machine.name)}",
            # nspawn drops CAP_NET_ADMIN with a foreign netns; nftables inside needs it.
            "--capability=CAP_NET_ADMIN",
            "--resolv-conf=off",
            "--timezone=off",
            "--link-journal=no",
            "--boot",
        ]
        pid = spawn_detached(
            args,
            self._machine_dir(machine.name) / "console.log",
            env=env,
            cgroup=self._cgroup(machine.name),
        )
        (self._machine_dir(machine.name) / "nspawn.pid").write_text(str(pid))

    def _boot_all(self, machines: list[Machine]) -> None:
        for machine in machines:
            self._launch(machine)
        self._write_known_hosts(self.machines())
        with ThreadPoolExecutor(max_workers=max(1, len(machines))) as pool:
            failures = [
                error for error in pool.map(self._wait_ready, machines) if error is not None
            ]
        if failures:
            raise LabError("; ".join(failures))

    def _wait_ready(self, machine: Machine) -> str | None:
        """Ready = sshd accepts the lab key. Returns an error message or None."""
        deadline = time.monotonic() + BOOT_TIMEOUT
        ssh = self.ssh_args(machine.name)
        while time.monotonic() < deadline:
            if not self.init_pid(machine.name) and not self._nspawn_alive(machine.name):
                log = self._machine_dir(machine.name) / "console.log"
                tail = (
                    log.read_text(errors="replace").strip().splitlines()[-1:]
                    if log.exists()
                    else []
                )
                last = " ".join(tail) or "no output"
                return f"{machine.name} exited while booting: {last} (see {log})"
            if tcp_open(machine.address, 22, timeout=1):
                result = subprocess.run(
                    [*ssh, "true"], capture_output=True, check=False, timeout=30
                )
                if result.returncode == 0:
                    return None
            time.sleep(0.5)
        return f"{machine.name} did not answer SSH within {BOOT_TIMEOUT} s"

    def _nspawn_pid(self, name: str) -> int | None:
        try:
            pid = int((self._machine_dir(name) / "nspawn.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) and "systemd-nspawn" in " ".join(cmdline(pid)[:1]) else None

    def _nspawn_alive(self, name: str) -> bool:
        return self._nspawn_pid(name) is not None

    def _reap_nspawn(self, name: str) -> None:
        pid = self._nspawn_pid(name)
        if pid and not wait_gone([pid], 10):
            kill(pid, signal.SIGKILL)
            wait_gone([pid], 5)

    def _poweroff(self, name: str, timeout: float) -> None:
        self._poweroff_all([name], timeout)

    def _poweroff_all(self, names: list[str], timeout: float) -> None:
        inits = {name: self.init_pid(name) for name in names}
        for init in inits.values():
            if init:
                # SIGRTMIN+4 asks systemd for a clean poweroff.
                kill(init, signal.SIGRTMIN + 4)
        live = [pid for pid in inits.values() if pid]
        if not wait_gone(live, timeout):
            for name, init in inits.items():
                if init and pid_alive(init):
                    self.log(f"{name} did not power off within {timeout:.0f} s; killing it")
                    kill(init, signal.SIGKILL)
            wait_gone(live, 10)
        for name in names:
            self._reap_nspawn(name)

    def _destroy(self, name: str) -> None:
        """Remove every trace of one machine; safe on partial state."""
        netns = self.config.netns(name)
        pids = netns_pids(netns) if netns in netns_list() else []
        for pid in pids:
            kill(pid, signal.SIGKILL)
        wait_gone(pids, 10)
        self._reap_nspawn(name)
        unmount_all(self._machine_dir(name))
        if netns in netns_list():
            run(["ip", "netns", "del", netns], check=False)
        if self.config.veth(name) in links():
            run(["ip", "link", "del", self.config.veth(name)], check=False)
        shutil.rmtree(self._machine_dir(name), ignore_errors=True)
        remove_cgroups(self._cgroup(name))

    def _remove(self, name: str) -> None:
        self.log(f"removing {name}")
        self._poweroff(name, 20)
        self._destroy(name)
        machines = self.machines()
        machines.pop(name, None)
        self._save(machines)

    def _sweep_strays(self, keep: set[str] | None = None) -> None:
        """Clean up what an earlier lab left behind when it was killed from outside.

        keep: machine names whose namespaces and mounts are in use; None = those in the state.
        """
        keep = set(self.machines()) if keep is None else keep
        prefix = self.config.netns_prefix
        for netns in netns_list():
            if netns.startswith(prefix) and netns[len(prefix) :] not in keep:
                self._destroy(netns[len(prefix) :])
        for ifname in links():
            if (
                ifname.startswith(self.config.veth_prefix)
                and ifname[len(self.config.veth_prefix) :] not in keep
            ):
                run(["ip", "link", "del", ifname], check=False)
        # nspawn processes whose machine init already died, or whose machine is not kept.
        for pid in all_pids():
            args = cmdline(pid)
            if args[:1] == ["systemd-nspawn"] and any(
                str(self.config.machines_dir) in a for a in args
            ):
                name = next((a.split("=", 1)[1] for a in args if a.startswith("--machine=")), "")
                if name not in keep:
                    kill(pid, signal.SIGKILL)
        if self.config.machines_dir.exists():
            for mdir in self.config.machines_dir.iterdir():
                if mdir.name not in keep:
                    unmount_all(mdir)
                    shutil.rmtree(mdir, ignore_errors=True)
        for point in mounts_under(self.config.machines_dir):
            if Path(point).parent.name not in keep:
                run(["umount", "--lazy", point], check=False)
        for pid in self._orphan_inits(keep):
            kill(pid, signal.SIGKILL)

    def _orphan_inits(self, keep: set[str]) -> list[int]:
        """Machine inits still running whose namespace was deleted under them."""
        found = []
        for pid in all_pids():
            with contextlib.suppress(OSError):
                root = os.readlink(f"/proc/{pid}/root")
                if root.startswith(str(self.config.machines_dir)) and parent_pid(pid) in (1, 0):
                    name = Path(root).parent.name
                    if name not in keep:
                        found.append(pid)
        return found
