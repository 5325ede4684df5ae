"""A machine's life: root filesystem, boot under systemd-nspawn, power-off, power cut, removal."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import access, image, network
from .config import LabConfig, LabError
from .machine import Machine
from .system import (
    CLEAN_PATH,
    cmdline,
    is_mounted,
    kill,
    netns_list,
    netns_pids,
    parent_pid,
    pid_alive,
    remove_cgroups,
    run,
    spawn_detached,
    tcp_open,
    unmount_all,
    wait_gone,
)

BOOT_TIMEOUT = 120
INIT_COMMANDS = (["/sbin/init"], ["/lib/systemd/systemd"], ["/usr/lib/systemd/systemd"])


def prepare_root(config: LabConfig, machine: Machine, base: Path) -> None:
    """The machine's own layer over the base image: identity, the lab's key, a host key."""
    mdir = config.machine_dir(machine.name)
    for sub in ("upper", "work", "root"):
        (mdir / sub).mkdir(parents=True, exist_ok=True)
    mount_root(config, machine, base)
    root = config.machine_root(machine.name)
    (root / "etc/hostname").write_text(f"{machine.name}\n")
    (root / "etc/hosts").write_text(
        f"127.0.0.1\tlocalhost\n{machine.address}\t{machine.name}\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    authorized = ssh_dir / "authorized_keys"
    authorized.write_text(config.ssh_key.with_suffix(".pub").read_text())
    authorized.chmod(0o600)
    run(
        [
            "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{machine.name}",
            "-f", str(root / "etc/ssh/ssh_host_ed25519_key"),
        ]
    )  # fmt: skip


def mount_root(config: LabConfig, machine: Machine, base: Path | None = None) -> None:
    root = config.machine_root(machine.name)
    if is_mounted(root):
        return
    base = base or image.image_dir(config, machine.release)
    if not (base / ".complete").exists():
        raise LabError(f"base image {base} is missing; run `lab up`")
    mdir = config.machine_dir(machine.name)
    options = f"lowerdir={base},upperdir={mdir / 'upper'},workdir={mdir / 'work'}"
    run(["mount", "-t", "overlay", "overlay", "-o", options, str(root)])


def init_pid(config: LabConfig, name: str) -> int | None:
    """The machine's PID 1 seen from the host: the process in its netns whose parent is not."""
    pids = netns_pids(config.netns(name))
    inside = set(pids)
    for pid in pids:
        if parent_pid(pid) not in inside and cmdline(pid)[:1] in INIT_COMMANDS:
            return pid
    for pid in pids:
        if parent_pid(pid) not in inside and Path(f"/proc/{pid}/comm").read_text().strip() in (
            "systemd",
            "init",
        ):
            return pid
    return None


def launch(config: LabConfig, machine: Machine) -> None:
    if init_pid(config, machine.name):
        return
    mount_root(config, machine)
    network.plug(config, machine)
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
        f"--directory={config.machine_root(machine.name)}",
        f"--machine={machine.name}",
        f"--network-namespace-path=/run/netns/{config.netns(machine.name)}",
        # nspawn drops CAP_NET_ADMIN with a foreign netns; nftables inside needs it.
        "--capability=CAP_NET_ADMIN",
        "--resolv-conf=off",
        "--timezone=off",
        "--link-journal=no",
        "--boot",
    ]
    mdir = config.machine_dir(machine.name)
    pid = spawn_detached(args, mdir / "console.log", env=env, cgroup=config.cgroup(machine.name))
    (mdir / "nspawn.pid").write_text(str(pid))


def boot_all(config: LabConfig, machines: list[Machine], known: list[Machine]) -> None:
    """Start the machines and wait until each answers SSH; known: every machine of the lab."""
    for machine in machines:
        launch(config, machine)
    access.write_known_hosts(config, known)
    with ThreadPoolExecutor(max_workers=max(1, len(machines))) as pool:
        failures = [
            error
            for error in pool.map(lambda m: wait_ready(config, m), machines)
            if error is not None
        ]
    if failures:
        raise LabError("; ".join(failures))


def wait_ready(config: LabConfig, machine: Machine) -> str | None:
    """Ready = sshd accepts the lab key. Returns an error message or None."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    ssh = access.ssh_args(config, machine)
    while time.monotonic() < deadline:
        if not init_pid(config, machine.name) and nspawn_pid(config, machine.name) is None:
            log = config.machine_dir(machine.name) / "console.log"
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            last = " ".join(tail) or "no output"
            return f"{machine.name} exited while booting: {last} (see {log})"
        if tcp_open(machine.address, 22, timeout=1):
            result = subprocess.run([*ssh, "true"], capture_output=True, check=False, timeout=30)
            if result.returncode == 0:
                return None
        time.sleep(0.5)
    return f"{machine.name} did not answer SSH within {BOOT_TIMEOUT} s"


def nspawn_pid(config: LabConfig, name: str) -> int | None:
    try:
        pid = int((config.machine_dir(name) / "nspawn.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) and "systemd-nspawn" in " ".join(cmdline(pid)[:1]) else None


def reap_nspawn(config: LabConfig, name: str) -> None:
    pid = nspawn_pid(config, name)
    if pid and not wait_gone([pid], 10):
        kill(pid, signal.SIGKILL)
        wait_gone([pid], 5)


def poweroff_all(
    config: LabConfig, names: list[str], timeout: float, log: Callable[[str], None]
) -> None:
    inits = {name: init_pid(config, name) for name in names}
    for init in inits.values():
        if init:
            # SIGRTMIN+4 asks systemd for a clean poweroff.
            kill(init, signal.SIGRTMIN + 4)
    live = [pid for pid in inits.values() if pid]
    if not wait_gone(live, timeout):
        for name, init in inits.items():
            if init and pid_alive(init):
                log(f"{name} did not power off within {timeout:.0f} s; killing it")
                kill(init, signal.SIGKILL)
        wait_gone(live, 10)
    for name in names:
        reap_nspawn(config, name)


def power_cut(config: LabConfig, name: str) -> None:
    """Every process of the machine dies at once."""
    init = init_pid(config, name)
    if init:
        kill(init, signal.SIGKILL)
        wait_gone([init], 15)
    reap_nspawn(config, name)


def destroy(config: LabConfig, name: str) -> None:
    """Remove every trace of one machine; safe on partial state."""
    netns = config.netns(name)
    pids = netns_pids(netns) if netns in netns_list() else []
    for pid in pids:
        kill(pid, signal.SIGKILL)
    wait_gone(pids, 10)
    reap_nspawn(config, name)
    unmount_all(config.machine_dir(name))
    network.unplug(config, name)
    shutil.rmtree(config.machine_dir(name), ignore_errors=True)
    remove_cgroups(config.cgroup(name))


def exec_in(
    config: LabConfig, name: str, command: list[str], capture: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run a command inside the machine's namespaces (works even when it is cut off)."""
    init = init_pid(config, name)
    if not init:
        raise LabError(f"{name} is not running (`lab start {name}`)")
    args = ["nsenter", "-t", str(init), "-a", "env", "-i", f"PATH={CLEAN_PATH}", "HOME=/root"]
    return subprocess.run([*args, *command], capture_output=capture, text=True, check=False)
