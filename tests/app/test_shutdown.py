"""A worker whose Redis vanished still stops within seconds (default settings took minutes)."""

from __future__ import annotations

import time

import pytest
from fleettest.local import start_redis, start_worker, wait_ready
from fleettest.sample import fleet_env


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("pool", "concurrency"), [("gevent", 20), ("solo", 1)])
def test_worker_stops_quickly_after_redis_died(tmp_path, empty_env_file, pool, concurrency):
    redis = start_redis(tmp_path / "redis")
    env = fleet_env(redis, empty_env_file)
    worker = start_worker(env, tmp_path, f"orphan-{pool}", pool=pool, concurrency=concurrency)
    try:
        wait_ready(worker)
        time.sleep(2)  # a heartbeat or two while Redis is up
        redis.stop()
        time.sleep(4)  # the worker notices, reconnects, and its heartbeat timer fires
        assert worker.alive()
        took = worker.stop(timeout=30)
        assert worker.proc.returncode is not None
        assert took < 12, f"worker took {took:.1f} s to stop without Redis"
    finally:
        worker.stop()
        redis.stop()
