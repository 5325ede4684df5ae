"""The lab's network on the host: one bridge, and per machine a namespace and a veth pair."""

from __future__ import annotations

import ipaddress

from .config import LabConfig, LabError
from .machine import Machine
from .system import addresses, links, netns_list, run

# Addresses below .10 stay free for the host and whatever else a user runs on the bridge.
FIRST_HOST_OFFSET = 10


def check_subnet_free(config: LabConfig) -> None:
    """The lab's subnet must not already be someone else's."""
    for ifname, addrs in addresses().items():
        if ifname == config.bridge:
            continue
        for cidr in addrs:
            if ipaddress.IPv4Interface(cidr).network.overlaps(config.subnet):
                raise LabError(
                    f"address conflict: {cidr} on {ifname} overlaps the lab's subnet "
                    f"{config.subnet} (set FLEET_LAB_SUBNET to another one)"
                )


def ensure_bridge(config: LabConfig) -> None:
    bridge = config.bridge
    if bridge not in links():
        run(["ip", "link", "add", bridge, "type", "bridge"])
    want = f"{config.host_address}/{config.subnet.prefixlen}"
    if want not in addresses().get(bridge, []):
        run(["ip", "addr", "add", want, "dev", bridge])
    run(["ip", "link", "set", bridge, "up"])


def remove_bridge(config: LabConfig) -> None:
    if config.bridge in links():
        run(["ip", "link", "del", config.bridge], check=False)


def pick_address(config: LabConfig, machines: dict[str, Machine], requested: str | None) -> str:
    taken = {m.address: m.name for m in machines.values()}
    taken[config.host_address] = "the host"
    if requested:
        try:
            address = ipaddress.IPv4Address(requested)
        except ValueError:
            raise LabError(f"{requested!r} is not an IPv4 address") from None
        if address not in config.subnet or address in (
            config.subnet.network_address,
            config.subnet.broadcast_address,
        ):
            raise LabError(f"address {requested} is not a host address in {config.subnet}")
        if requested in taken:
            raise LabError(f"address conflict: {requested} is already used by {taken[requested]}")
        return requested
    for offset, address in enumerate(config.subnet.hosts()):
        if offset + 1 >= FIRST_HOST_OFFSET and str(address) not in taken:
            return str(address)
    raise LabError(f"no free address left in {config.subnet}")


def plug(config: LabConfig, machine: Machine) -> None:
    """Network namespace + veth on the bridge; idempotent, so it also repairs leftovers."""
    netns, veth = config.netns(machine.name), config.veth(machine.name)
    if netns not in netns_list():
        run(["ip", "netns", "add", netns])
        if veth in links():
            # The peer of a deleted namespace: the kernel removes it lazily.
            run(["ip", "link", "del", veth], check=False)
    if veth not in links():
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns])
    run(["ip", "link", "set", veth, "master", config.bridge, "up"])
    cidr = f"{machine.address}/{config.subnet.prefixlen}"
    existing = run(["ip", "-n", netns, "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
    if cidr not in existing:
        run(["ip", "-n", netns, "addr", "add", cidr, "dev", "eth0"])
    run(["ip", "-n", netns, "link", "set", "lo", "up"])
    run(["ip", "-n", netns, "link", "set", "eth0", "up"])
    route = run(["ip", "-n", netns, "route", "show", "default"]).stdout
    if not route.strip():
        run(["ip", "-n", netns, "route", "add", "default", "via", config.host_address])


def unplug(config: LabConfig, name: str) -> None:
    netns = config.netns(name)
    if netns in netns_list():
        run(["ip", "netns", "del", netns], check=False)
    if config.veth(name) in links():
        run(["ip", "link", "del", config.veth(name)], check=False)


def set_link(config: LabConfig, name: str, *, up: bool) -> None:
    """A partition (down) or its end (up): the machine keeps running either way."""
    run(["ip", "link", "set", config.veth(name), "up" if up else "down"])


def is_cut(config: LabConfig, name: str) -> bool:
    return links().get(config.veth(name)) != "up"
