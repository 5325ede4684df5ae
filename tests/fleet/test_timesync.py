"""Every host keeps its clock synchronised: leases and ETAs compare the hosts' clocks."""

from __future__ import annotations

testinfra_hosts = ["ansible://all"]


def test_chrony_is_installed_and_enabled(host):
    assert host.package("chrony").is_installed
    assert host.service("chrony").is_enabled


def test_on_a_shared_kernel_the_clock_is_left_to_the_host(host):
    # The lab's machines share the box's kernel: systemd skips chrony (no CAP_SYS_TIME) instead
    # of letting it fail, and nothing else tries to set the clock.
    chrony = host.run("systemctl show -p ActiveState -p ConditionResult chrony").stdout.split()
    assert sorted(chrony) == ["ActiveState=inactive", "ConditionResult=no"]
