"""The base images machines boot from, one per Debian release: built once, cached by recipe."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from .config import LabConfig, LabError
from .system import require_disk, run

# Changing anything here (or in _customize) changes the image's hash and rebuilds it.
IMAGE_PACKAGES = [
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "python3-apt",
    "iproute2",
    "sudo",
    "ca-certificates",
    "curl",
]
IMAGE_REVISION = 1


def recipe(config: LabConfig, release: str) -> dict[str, object]:
    return {
        "suite": release,
        "mirror": config.debian_mirror,
        "packages": IMAGE_PACKAGES,
        "revision": IMAGE_REVISION,
        "apt_proxy": f"http://{config.host_address}:{config.apt_port}",
        "pip_index": f"http://{config.host_address}:{config.pypi_port}/index/",
    }


def image_dir(config: LabConfig, release: str) -> Path:
    digest = hashlib.sha256(json.dumps(recipe(config, release), sort_keys=True).encode())
    return config.cache_dir / "images" / f"debian-{release}-{digest.hexdigest()[:12]}"


def ensure_image(config: LabConfig, release: str, log: Callable[[str], None]) -> Path:
    target = image_dir(config, release)
    if (target / ".complete").exists():
        return target
    require_disk(config.cache_dir, 1500)
    building = target.with_name(target.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    log(f"building the {release} base image {target.name} with debootstrap (once; cached)")
    try:
        run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(IMAGE_PACKAGES)}",
                release,
                str(building),
                config.debian_mirror,
            ],
            timeout=900,
        )
        _customize(building, config)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    (building / ".complete").write_text(json.dumps(recipe(config, release), sort_keys=True))
    shutil.rmtree(target, ignore_errors=True)
    building.rename(target)
    # Older images of this release (other recipes) are dead weight; other releases are not.
    for stale in target.parent.iterdir():
        if stale != target and stale.name.startswith(f"debian-{release}-"):
            shutil.rmtree(stale, ignore_errors=True)
    return target


def _customize(root: Path, config: LabConfig) -> None:
    host = config.host_address
    # Lab machines reach packages only through the host's mirrors, as a production host
    # reaches its site mirror or proxy.
    (root / "etc/apt/apt.conf.d/01fleet-lab-proxy").write_text(
        f'Acquire::http::Proxy "http://{host}:{config.apt_port}";\n'
    )
    (root / "etc/apt/apt.conf.d/02fleet-lab-no-recommends").write_text(
        'APT::Install-Recommends "false";\n'
    )
    (root / "etc/pip.conf").write_text(
        f"[global]\nindex-url = http://{host}:{config.pypi_port}/index/\ntrusted-host = {host}\n"
    )
    (root / "etc/ssh/sshd_config.d/fleet-lab.conf").write_text(
        "PasswordAuthentication no\nPermitRootLogin prohibit-password\nUseDNS no\n"
    )
    # Identity is per machine: host keys, machine-id and hostname are written when one is made.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").unlink(missing_ok=True)
    # No DNS in the lab: resolution fails at once instead of timing out.
    resolv = root / "etc/resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    resolv.write_text("# celery-fleet lab: no DNS\n")
    (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
    apt_cache = root / "var/cache/apt/archives"
    for deb in apt_cache.glob("*.deb"):
        deb.unlink()
    if not (root / "usr/bin/python3").exists():
        raise LabError("debootstrap produced an image without python3")
