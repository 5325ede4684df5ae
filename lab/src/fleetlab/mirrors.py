"""Services the host runs on the bridge address: the apt proxy, the Python index, a fake web.

Lab machines reach nothing but the host, so these are their only way to packages (as a
production host uses its site's mirror) and to "the internet" the sample app fetches from.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import LabConfig, LabError
from .system import (
    all_pids,
    cmdline,
    kill,
    parent_pid,
    pid_alive,
    spawn_detached,
    tcp_open,
    wait_gone,
)


@dataclass(frozen=True)
class Mirror:
    name: str
    port: int
    args: list[str]
    env: dict[str, str]
    # A command-line word that identifies the running process, whatever interpreter runs it.
    marker: str
    former_markers: tuple[str, ...] = ()


def _venv_bin(tool: str) -> str:
    return str(Path(sys.executable).parent / tool)


def mirrors(config: LabConfig) -> list[Mirror]:
    host = config.host_address
    acng_dir = config.state_dir / "acng"
    return [
        Mirror(
            name="apt-cacher-ng",
            port=config.apt_port,
            args=[
                "/usr/sbin/apt-cacher-ng",
                "-c",
                str(acng_dir),
                "ForeGround=1",
                f"BindAddress={host}",
                f"Port={config.apt_port}",
                f"CacheDir={config.cache_dir / 'apt'}",
                f"LogDir={acng_dir / 'log'}",
                f"PidFile={config.run_dir / 'apt-cacher-ng.acng-pid'}",
                f"SocketPath={config.run_dir / 'acng.socket'}",
            ],
            env={},
            marker="/usr/sbin/apt-cacher-ng",
        ),
        Mirror(
            name="proxpi",
            port=config.pypi_port,
            args=[
                _venv_bin("gunicorn"),
                "--bind",
                f"{host}:{config.pypi_port}",
                "--threads",
                "16",
                "--timeout",
                "300",
                "proxpi.server:app",
            ],
            env={
                "PROXPI_CACHE_DIR": str(config.cache_dir / "pypi"),
                # By default proxpi redirects to the upstream file host when a download takes
                # over 0.9 s; lab machines cannot reach it, so always wait and serve it.
                "PROXPI_DOWNLOAD_TIMEOUT": "600",
            },
            marker="proxpi.server:app",
        ),
        Mirror(
            name="webfarm",
            port=config.web_port,
            args=[
                sys.executable,
                "-m",
                "fleettest.webfarm",
                "--host",
                host,
                "--port",
                str(config.web_port),
            ],
            env={},
            marker="fleettest.webfarm",
            # Started by a lab from before the webfarm moved to fleettest: still this mirror.
            former_markers=("fleetlab.webfarm",),
        ),
    ]


def _write_acng_config(config: LabConfig) -> None:
    acng_dir = config.state_dir / "acng"
    (acng_dir / "log").mkdir(parents=True, exist_ok=True)
    (config.cache_dir / "apt").mkdir(parents=True, exist_ok=True)
    # The stock backend list is empty here: apt-cacher-ng then answers 503 "Host not found".
    (acng_dir / "backends_debian").write_text(f"{config.debian_mirror}/\n")
    (acng_dir / "acng.conf").write_text(
        "SupportDir: /usr/lib/apt-cacher-ng\n"
        "Remap-debrep: file:deb_mirror*.gz /debian ; file:backends_debian\n"
        "ExThreshold: 4\n"
        "PassThroughPattern: .*\n"
    )


def _pid_file(config: LabConfig, mirror: Mirror) -> Path:
    return config.run_dir / f"{mirror.name}.pid"


def _matching_pids(config: LabConfig, mirror: Mirror) -> list[int]:
    """This lab's processes of one mirror, found by command line (pid files can be lost)."""
    listen = f"{config.host_address}"
    found = []
    for pid in all_pids():
        args = cmdline(pid)
        ours = any(m in args for m in (mirror.marker, *mirror.former_markers))
        if pid != os.getpid() and ours and any(listen in a for a in args):
            found.append(pid)
    return found


def _running_pid(config: LabConfig, mirror: Mirror) -> int | None:
    """The mirror's main process (adopted if an earlier `lab` started it), or None."""
    pids = [pid for pid in _matching_pids(config, mirror) if pid_alive(pid)]
    main = [pid for pid in pids if parent_pid(pid) not in pids]
    if not main:
        return None
    _pid_file(config, mirror).write_text(str(main[0]))
    return main[0]


def ensure_mirrors(config: LabConfig, log: Callable[[str], None]) -> None:
    _write_acng_config(config)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    (config.cache_dir / "pypi").mkdir(parents=True, exist_ok=True)
    started = []
    for mirror in mirrors(config):
        if _running_pid(config, mirror):
            continue
        log(f"starting {mirror.name} on {config.host_address}:{mirror.port}")
        env = {**os.environ, **mirror.env}
        pid = spawn_detached(mirror.args, config.run_dir / f"{mirror.name}.log", env=env)
        _pid_file(config, mirror).write_text(str(pid))
        started.append((mirror, pid))
    deadline = time.monotonic() + 30
    for mirror, pid in started:
        while not tcp_open(config.host_address, mirror.port):
            if not pid_alive(pid) or time.monotonic() > deadline:
                raise LabError(
                    f"{mirror.name} did not start; see {config.run_dir / (mirror.name + '.log')}"
                )
            time.sleep(0.2)


def stop_mirrors(config: LabConfig) -> None:
    """Stop every mirror process of this lab, whether or not its pid file survived."""
    pids = [pid for mirror in mirrors(config) for pid in _matching_pids(config, mirror)]
    for pid in pids:
        kill(pid, 15)
    if not wait_gone(pids, 10):
        for pid in pids:
            kill(pid, 9)
        wait_gone(pids, 5)
