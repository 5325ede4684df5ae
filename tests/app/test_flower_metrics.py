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


def test_flower_exports_when_it_last_heard_from_each_worker() -> None:
    """celery_fleet_worker_last_heartbeat_timestamp_seconds: set on each heartbeat (Flower's
    clock), left alone by task events, removed with the worker when Flower purges it."""
    import time

    from celery_fleet.flower import record_heartbeats
    from flower import events  # type: ignore[import-untyped]
    from prometheus_client import REGISTRY

    record_heartbeats()
    metrics = events.get_prometheus_metrics()
    name = "celery_fleet_worker_last_heartbeat_timestamp_seconds"

    def last(worker: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"worker": worker})

    before = time.time()
    metrics.observe_worker("default@worker1", {"type": "worker-heartbeat", "active": 0})
    seen = last("default@worker1")
    assert seen is not None and before <= seen <= time.time()
    metrics.observe_worker("default@worker1", {"type": "worker-offline"})
    assert last("default@worker1") == seen  # a goodbye is no heartbeat
    assert last("network@worker2") is None
    metrics.remove_workers(["default@worker1"])
    assert last("default@worker1") is None
