"""Sweeping up what an earlier lab left behind when it was killed from outside."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

from . import lifecycle
from .config import LabConfig
from .system import (
    all_pids,
    cmdline,
    kill,
    links,
    mounts_under,
    netns_list,
    parent_pid,
    run,
    unmount_all,
)


def sweep_strays(config: LabConfig, keep: set[str]) -> None:
    """Remove namespaces, links, nspawn processes, mounts and machine dirs not in keep."""
    prefix = config.netns_prefix
    for netns in netns_list():
        if netns.startswith(prefix) and netns[len(prefix) :] not in keep:
            lifecycle.destroy(config, netns[len(prefix) :])
    for ifname in links():
        if ifname.startswith(config.veth_prefix) and ifname[len(config.veth_prefix) :] not in keep:
            run(["ip", "link", "del", ifname], check=False)
    # nspawn processes whose machine init already died, or whose machine is not kept.
    for pid in all_pids():
        args = cmdline(pid)
        if args[:1] == ["systemd-nspawn"] and any(str(config.machines_dir) in a for a in args):
            name = next((a.split("=", 1)[1] for a in args if a.startswith("--machine=")), "")
            if name not in keep:
                kill(pid, signal.SIGKILL)
    if config.machines_dir.exists():
        for mdir in config.machines_dir.iterdir():
            if mdir.name not in keep:
                unmount_all(mdir)
                shutil.rmtree(mdir, ignore_errors=True)
    for point in mounts_under(config.machines_dir):
        if Path(point).parent.name not in keep:
            run(["umount", "--lazy", point], check=False)
    for pid in orphan_inits(config, keep):
        kill(pid, signal.SIGKILL)


def orphan_inits(config: LabConfig, keep: set[str]) -> list[int]:
    """Machine inits still running whose namespace was deleted under them."""
    found = []
    for pid in all_pids():
        with contextlib.suppress(OSError):
            root = os.readlink(f"/proc/{pid}/root")
            if root.startswith(str(config.machines_dir)) and parent_pid(pid) in (1, 0):
                name = Path(root).parent.name
                if name not in keep:
                    found.append(pid)
    return found
