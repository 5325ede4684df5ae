"""Where the lab lives and how it is wired. Every path can be moved with an environment variable."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path


class LabError(Exception):
    """An expected failure: printed as one line, exit status 1."""


# Machine names become parts of interface names (IFNAMSIZ is 15): "fv-" + 12 characters.
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,11}$")

# Debian releases a machine can run, by codename; the first is what `lab up` makes by default.
RELEASES = ("trixie", "bookworm")
DEFAULT_RELEASE = RELEASES[0]

# Inventory group for each name prefix; a machine with another name joins no group.
GROUP_BY_PREFIX = {"redis": "redis", "worker": "workers", "client": "clients", "monitor": "monitor"}


@dataclass(frozen=True)
class LabConfig:
    state_dir: Path
    cache_dir: Path
    inventory_file: Path
    subnet: ipaddress.IPv4Network
    bridge: str = "fleetbr0"
    netns_prefix: str = "fleet-"
    veth_prefix: str = "fv-"
    apt_port: int = 3142
    pypi_port: int = 3141
    web_port: int = 8080
    debian_mirror: str = "http://deb.debian.org/debian"

    @property
    def host_address(self) -> str:
        return str(next(self.subnet.hosts()))

    @property
    def machines_dir(self) -> Path:
        return self.state_dir / "machines"

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def ssh_key(self) -> Path:
        return self.state_dir / "ssh" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.state_dir / "ssh" / "known_hosts"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    def netns(self, name: str) -> str:
        return f"{self.netns_prefix}{name}"

    def machine_dir(self, name: str) -> Path:
        return self.machines_dir / name

    def machine_root(self, name: str) -> Path:
        """The machine's root filesystem (an overlay on the base image)."""
        return self.machine_dir(name) / "root"

    def cgroup(self, name: str) -> str:
        return f"celery-fleet-lab/{name}"

    def veth(self, name: str) -> str:
        return f"{self.veth_prefix}{name}"


def _find_inventory_dir() -> Path | None:
    """The repository's inventory/lab, searched upward from the working directory."""
    here = Path.cwd().resolve()
    for directory in (here, *here.parents):
        candidate = directory / "inventory" / "lab"
        if candidate.is_dir():
            return candidate
    return None


def load_config() -> LabConfig:
    state_dir = Path(os.environ.get("FLEET_LAB_DIR", "/var/lib/celery-fleet-lab"))
    cache_dir = Path(os.environ.get("FLEET_LAB_CACHE", "/var/cache/celery-fleet-lab"))
    if "FLEET_LAB_INVENTORY" in os.environ:
        inventory_file = Path(os.environ["FLEET_LAB_INVENTORY"])
    else:
        inventory_dir = _find_inventory_dir()
        inventory_file = (inventory_dir or state_dir) / "hosts.yml"
    try:
        subnet = ipaddress.IPv4Network(os.environ.get("FLEET_LAB_SUBNET", "198.18.0.0/24"))
    except ValueError as error:
        raise LabError(f"FLEET_LAB_SUBNET is not an IPv4 network: {error}") from None
    return LabConfig(
        state_dir=state_dir,
        cache_dir=cache_dir,
        inventory_file=inventory_file.resolve(),
        subnet=subnet,
    )


def groups_for(name: str) -> list[str]:
    prefix = name.rstrip("0123456789")
    group = GROUP_BY_PREFIX.get(prefix)
    return [group] if group else []


def validate_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise LabError(
            f"invalid machine name {name!r}: use 1-12 lowercase letters, digits or '-', "
            "starting with a letter"
        )


def validate_release(release: str) -> None:
    if release not in RELEASES:
        raise LabError(f"unknown release {release!r}: the lab makes {' or '.join(RELEASES)}")
