"""The lab is a small data centre: real machines, each its own host on one bridge."""

from __future__ import annotations

import ipaddress
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, LAB_NAMES, REPO, lab, lab_status, on, ssh

pytestmark = pytest.mark.timeout(300)

HOST = "198.18.0.1"
INVENTORY = REPO / "inventory" / "lab" / "hosts.yml"


def inventory_groups() -> dict[str, list[str]]:
    children = yaml.safe_load(INVENTORY.read_text())["all"]["children"]
    return {group: sorted((body or {}).get("hosts", {})) for group, body in children.items()}


@pytest.mark.parametrize("name", LAB_NAMES)
def test_machine_boots_systemd_to_running(name):
    result = on(name, "systemctl is-system-running --wait", check=False)
    failed = on(name, "systemctl --failed --no-legend", check=False).stdout
    assert result.stdout.strip() == "running", f"{name}: {result.stdout} failed units: {failed}"
    assert on(name, "cat /proc/1/comm").stdout.strip() == "systemd"


def test_hostnames_and_addresses_are_distinct():
    seen = {}
    for name in LAB_NAMES:
        result = ssh(name, "hostname; ip -4 -o addr show dev eth0")
        assert result.returncode == 0, result.stderr
        hostname, addr_line = result.stdout.strip().splitlines()
        seen[name] = (hostname, addr_line.split()[3].split("/")[0])
    assert [hostname for hostname, _ in seen.values()] == LAB_NAMES
    addresses = [address for _, address in seen.values()]
    assert len(set(addresses)) == len(addresses)
    assert all(
        ipaddress.IPv4Address(a) in ipaddress.IPv4Network("198.18.0.0/24") for a in addresses
    )


def test_each_machine_has_its_own_filesystem():
    marker = f"/root/marker-{uuid.uuid4().hex}"
    on("worker1", f"touch {marker}")
    assert on("worker1", f"test -e {marker}", check=False).returncode == 0
    assert on("worker2", f"test -e {marker}", check=False).returncode != 0
    assert not Path(marker).exists()
    on("worker1", f"rm {marker}")


@pytest.mark.parametrize("target", [n for n in LAB_NAMES if n != "client1"])
def test_machines_reach_each_other(target):
    address = lab_status()[target]["address"]
    probe = f"import socket; socket.create_connection(('{address}', 22), timeout=3)"
    assert on("client1", f'python3 -c "{probe}"', check=False).returncode == 0


@pytest.mark.parametrize(
    "curl_args",
    [
        # The apt proxy, used the way apt uses it.
        f"-x http://{HOST}:3142 http://deb.debian.org/debian/dists/bookworm/Release",
        f"http://{HOST}:3141/index/six/",
        f"http://{HOST}:8080/status/200",
    ],
)
def test_machines_reach_the_mirrors(curl_args):
    result = on("client1", f"curl -fsS -o /dev/null -w '%{{http_code}}' {curl_args}")
    assert result.stdout == "200"


def test_apt_get_install_works_on_a_machine():
    result = on(
        "client1",
        "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq >/dev/null"
        " && jq --version",
        timeout=240,
    )
    assert result.stdout.startswith("jq-")


def test_pip_install_works_on_a_machine():
    result = on(
        "client1",
        "apt-get install -y -qq python3-venv >/dev/null && python3 -m venv /tmp/piptest"
        " && /tmp/piptest/bin/pip install -q six==1.17.0"
        " && /tmp/piptest/bin/python -c 'import six; print(six.__version__)'",
        timeout=240,
    )
    assert result.stdout.strip().endswith("1.17.0")


def test_machines_cannot_reach_outside_the_lab():
    # Only the host's mirrors are reachable; there is no route beyond the bridge.
    probe = "import socket; socket.create_connection(('198.51.100.1', 80), timeout=2)"
    assert on("client1", f'python3 -c "{probe}"', check=False).returncode != 0


def test_ansible_pings_every_host_over_the_generated_inventory():
    assert inventory_groups() == {
        "redis": ["redis1"],
        "workers": ["worker1", "worker2"],
        "clients": ["client1"],
        "monitor": ["monitor1"],
    }
    result = subprocess.run(
        [str(BIN / "ansible"), "all", "-m", "ansible.builtin.ping"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(LAB_NAMES)


def test_cut_makes_a_host_unreachable_and_heal_restores_it():
    lab("cut", "worker2")
    try:
        assert lab_status()["worker2"]["state"] == "cut"
        assert ssh("worker2", "true").returncode != 0
        address = lab_status()["worker2"]["address"]
        probe = f"import socket; socket.create_connection(('{address}', 22), timeout=2)"
        assert on("client1", f'python3 -c "{probe}"', check=False).returncode != 0
        # The machine itself keeps running behind the partition.
        assert on("worker2", "systemctl is-system-running").stdout.strip() == "running"
    finally:
        lab("heal", "worker2")
    assert lab_status()["worker2"]["state"] == "running"
    assert ssh("worker2", "true").returncode == 0


def test_kill_is_a_power_cut_and_start_brings_the_machine_back():
    on("worker2", "systemd-run --unit=canary sleep infinity")
    lab("kill", "worker2")
    assert lab_status()["worker2"]["state"] == "stopped"
    assert ssh("worker2", "true", timeout=20).returncode != 0
    lab("start", "worker2")
    assert lab_status()["worker2"]["state"] == "running"
    assert on("worker2", "systemctl is-system-running --wait").stdout.strip() == "running"
    # A fresh boot: the transient unit from before the power cut is gone.
    assert on("worker2", "systemctl is-active canary", check=False).stdout.strip() != "active"


def test_stop_powers_off_cleanly_and_start_boots_again():
    lab("stop", "worker2")
    assert lab_status()["worker2"]["state"] == "stopped"
    lab("start", "worker2")
    assert on("worker2", "systemctl is-system-running --wait").stdout.strip() == "running"


def test_add_and_remove_update_the_inventory_while_others_keep_running():
    before = {name: row["uptime"] for name, row in lab_status().items()}
    added = lab("add", "worker3")
    try:
        assert "worker3" in added.stdout
        assert inventory_groups()["workers"] == ["worker1", "worker2", "worker3"]
        assert ssh("worker3", "hostname").stdout.strip() == "worker3"
        after = lab_status()
        for name, uptime in before.items():
            # Not rebooted: uptime only grew.
            assert after[name]["uptime"] >= uptime, name
    finally:
        lab("remove", "worker3")
    assert inventory_groups()["workers"] == ["worker1", "worker2"]
    assert "worker3" not in lab_status()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert "fleet-worker3" not in netns.stdout


def test_a_machine_of_another_release_joins_the_lab_next_to_the_default_one():
    """Debian 13 by default; a Debian 12 machine added beside them boots from its own image."""
    assert {row["release"] for row in lab_status().values()} == {"trixie"}
    added = lab("add", "worker3", "--release", "bookworm", timeout=900)
    try:
        assert added.stdout.split()[-1] == "bookworm"
        assert lab_status()["worker3"]["release"] == "bookworm"
        assert on("worker3", "systemctl is-system-running --wait").stdout.strip() == "running"
        for name, version in (("worker3", "12"), ("worker1", "13")):
            said = on(name, ". /etc/os-release; echo $VERSION_ID").stdout.strip()
            assert said == version, name
    finally:
        lab("remove", "worker3")


def test_up_twice_is_harmless():
    before = lab_status()
    lab("up")
    after = lab_status()
    assert set(after) == set(before)
    for name in before:
        assert after[name]["uptime"] >= before[name]["uptime"], f"{name} was restarted"


def test_up_from_another_checkout_writes_that_checkouts_inventory(tmp_path):
    """A running lab, `lab up` from a second checkout: its inventory now lists the machines."""
    other = tmp_path / "checkout"
    (other / "inventory" / "lab").mkdir(parents=True)
    before = lab_status()
    result = subprocess.run(
        [str(BIN / "lab"), "up"], cwd=other, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    written = other / "inventory" / "lab" / "hosts.yml"
    hosts = yaml.safe_load(written.read_text())["all"]["children"]
    assert set(hosts["redis"]["hosts"]) == {"redis1"}
    assert set(hosts["workers"]["hosts"]) >= {"worker1", "worker2"}
    # It says where else the inventory of this lab is.
    assert str(REPO / "inventory" / "lab" / "hosts.yml") in result.stderr.replace("\n", "")
    status = lab("status").stdout
    assert f"inventory: {written}" in status
    assert f"inventory: {REPO / 'inventory' / 'lab' / 'hosts.yml'}" in status
    # Nothing was restarted for it.
    assert all(lab_status()[n]["uptime"] >= before[n]["uptime"] for n in before)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "worker1"], "already exists"),
        (["add", "Bad_Name"], "invalid machine name"),
        (["add", "extra1", "--address", "198.18.0.10"], "address conflict"),
        (["add", "extra1", "--address", "10.9.9.9"], "not a host address"),
        (["start", "nosuch"], "no machine named"),
        (["up", "--release", "bookworm"], "run another release than bookworm; `lab down` first"),
    ],
)
def test_bad_requests_fail_with_one_clear_line_and_change_nothing(args, message):
    before = lab_status()
    result = lab(*args, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert set(lab_status()) == set(before)


def test_not_root_is_refused():
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            str(BIN / "lab"),
            "add",
            "x1",
        ],
        cwd="/",
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "must run as root" in result.stderr


def test_missing_nspawn_is_named(tmp_path):
    result = subprocess.run(
        [str(BIN / "python"), "-m", "fleetlab.cli", "add", "x1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": str(tmp_path)},
    )
    assert result.returncode == 1
    assert "systemd-nspawn not found" in result.stderr


def test_full_disk_is_refused_before_anything_is_built(tmp_path):
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(tiny)], check=True)
    try:
        result = subprocess.run(
            [str(BIN / "lab"), "add", "x1"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "FLEET_LAB_DIR": str(tiny / "lab")},
        )
        assert result.returncode == 1
        assert "not enough disk space" in result.stderr
        assert not (tiny / "lab").exists()
    finally:
        subprocess.run(["umount", str(tiny)], check=True)
