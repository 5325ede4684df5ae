"""Thin wrappers over the host: commands, processes, mounts, interfaces."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .config import LabError

# nsenter and nspawn inherit the caller's environment; the lab's machines must not.
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run(
    args: Sequence[str], *, check: bool = True, capture: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            list(args), capture_output=capture, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise LabError(f"{args[0]} not found; run `make setup`") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"`{' '.join(args)}` did not finish within {timeout:.0f} s") from None
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout or "").strip().splitlines()
        last = detail[-1] if detail else f"exit status {result.returncode}"
        raise LabError(f"`{' '.join(args)}` failed: {last}")
    return result


def require_tools(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            raise LabError(f"{tool} not found; run `make setup` (it installs the lab's packages)")


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError(
            "must run as root: the lab creates network namespaces, a bridge and containers"
        )


def require_disk(path: Path, need_mb: int) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    free_mb = shutil.disk_usage(probe).free // (1024 * 1024)
    if free_mb < need_mb:
        raise LabError(f"not enough disk space: {free_mb} MB free under {probe}, need {need_mb} MB")


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def parent_pid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def process_age_seconds(pid: int) -> float | None:
    """Seconds since the process started (from /proc, no extra dependency)."""
    try:
        start_ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(pid_alive(pid) for pid in pids):
            return True
        time.sleep(0.2)
    return not any(pid_alive(pid) for pid in pids)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path, deepest first."""
    prefix = str(path).rstrip("/") + "/"
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point == str(path) or point.startswith(prefix):
            points.append(point)
    return sorted(set(points), key=len, reverse=True)


def is_mounted(path: Path) -> bool:
    return str(path) in mounts_under(path)


def unmount_all(path: Path) -> None:
    for point in mounts_under(path):
        if run(["umount", point], check=False).returncode != 0:
            run(["umount", "--lazy", point], check=False)


def netns_list() -> list[str]:
    result = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def netns_pids(netns: str) -> list[int]:
    result = run(["ip", "netns", "pids", netns], check=False)
    return [int(line) for line in result.stdout.split() if line.isdigit()]


def links() -> dict[str, str]:
    """Interface name -> operational state on the host."""
    result = run(["ip", "-o", "link", "show"], check=False)
    found = {}
    for line in result.stdout.splitlines():
        fields = line.split(":", 2)
        if len(fields) < 3:
            continue
        name = fields[1].strip().split("@")[0]
        state = "up" if "state UP" in line or ",UP" in line.split(">")[0] else "down"
        found[name] = state
    return found


def addresses() -> dict[str, list[str]]:
    """Interface name -> IPv4 addresses with prefix length, on the host."""
    result = run(["ip", "-o", "-4", "addr", "show"], check=False)
    found: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        fields = line.split()
        found.setdefault(fields[1], []).append(fields[3])
    return found


def tcp_open(host: str, port: int, timeout: float = 1.0) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def cgroup_dirs(relative: str, managed_only: bool = True) -> list[Path]:
    """The directory for `relative` in the host's cgroup hierarchies.

    managed_only: just those a machine's systemd manages (v2, and v1's name=systemd); v1
    controllers like cpuset refuse tasks until configured. nspawn still mirrors a machine's
    cgroup into every v1 controller, so cleaning up needs them all.
    """
    dirs = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        managed = fields[2] == "cgroup2" or (fields[2] == "cgroup" and "name=systemd" in fields[3])
        if managed or (not managed_only and fields[2] == "cgroup"):
            dirs.append(Path(fields[1]) / relative)
    return dirs


def remove_cgroups(relative: str) -> None:
    """Remove a cgroup subtree, deepest first (only empty cgroups can be removed)."""
    for top in cgroup_dirs(relative, managed_only=False):
        if not top.is_dir():
            continue
        for directory in sorted(
            (p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
        ):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def spawn_detached(
    args: Sequence[str], log: Path, env: dict[str, str] | None = None, cgroup: str | None = None
) -> int:
    """Start a process in its own session, detached from ours, output to a log file.

    cgroup: a cgroup (relative to each hierarchy's root) to start it in. Each machine needs its
    own: nspawn --keep-unit makes the caller's cgroup the machine's root cgroup, and machines
    sharing one would manage (and kill) each other's service cgroups.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    targets = cgroup_dirs(cgroup) if cgroup else []
    for directory in targets:
        directory.mkdir(parents=True, exist_ok=True)

    def enter_cgroup() -> None:
        for directory in targets:
            (directory / "cgroup.procs").write_text("0")

    with log.open("ab") as out:
        process = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=enter_cgroup if targets else None,
        )
    return process.pid
