"""Who may read Flower's /metrics (celery_fleet.flower); the lab's test_flower checks it served."""

from __future__ import annotations

import pytest
from celery_fleet.cli import _subcommand
from celery_fleet.flower import admits, metrics_allowed


@pytest.mark.parametrize(
    ("setting", "remote_ip", "admitted"),
    [
        ("", "127.0.0.1", True),
        ("", "::1", True),
        ("", "198.18.0.14", False),
        ("198.18.0.14", "198.18.0.14", True),
        ("198.18.0.14", "198.18.0.15", False),
        ("10.0.0.0/8, 198.18.0.14", "10.2.3.4", True),
        ("198.18.0.14", "::ffff:198.18.0.14", True),
        ("198.18.0.14,", "not-an-address", False),
        ("198.18.0.14", None, False),
    ],
)
def test_metrics_answer_loopback_and_the_named_addresses_only(
    setting: str, remote_ip: str | None, admitted: bool
) -> None:
    assert admits(metrics_allowed(setting), remote_ip) is admitted


def test_a_malformed_setting_is_an_error() -> None:
    with pytest.raises(ValueError):
        metrics_allowed("999.1.1.1")


@pytest.mark.parametrize(
    ("argv", "subcommand"),
    [
        (["--app=fleetapp.celery:app", "flower"], "flower"),
        (["-A", "fleetapp.celery:app", "flower"], "flower"),
        (["--app=x", "worker", "-Q", "flower"], "worker"),
        (["-A", "flower", "worker"], "worker"),
        (["--workdir", "/tmp", "inspect", "ping"], "inspect"),
        (["--version"], None),
    ],
)
def test_only_the_flower_subcommand_restricts_metrics(
    argv: list[str], subcommand: str | None
) -> None:
    """fleet-celery restricts /metrics for `flower` alone: a queue named flower is no Flower
    (and a worker host need not have Flower installed)."""
    assert _subcommand(argv) == subcommand
