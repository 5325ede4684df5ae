"""A worker and a client through Sentinel on loopback: a real primary, replica and Sentinel.
The lab suite (tests/sentinel) does the same across machines, under load, with the ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from fleettest.commands import BIN, run
from fleettest.local import (
    start_redis,
    start_replica,
    start_sentinel,
    start_worker,
    wait_for,
    wait_ready,
)
from fleettest.sample import fleet_env, run_cli

MASTER = "fleet"


def named_primary(sentinel_port: int, username: str, password: str) -> int | None:
    client = redis.Redis(port=sentinel_port, username=username, password=password)
    try:
        return int(client.sentinel_get_master_addr_by_name(MASTER)[1])
    except (redis.RedisError, TypeError):
        return None
    finally:
        client.close()


@pytest.mark.timeout(120)
def test_a_worker_and_a_client_follow_a_failover_without_a_restart(tmp_path: Path, empty_env_file):
    primary = start_redis(tmp_path / "primary")
    replica = start_replica(tmp_path / "replica", primary)
    sentinel = start_sentinel(tmp_path / "sentinel", primary)
    worker = None
    try:
        user, secret = primary.username, primary.password
        admin = redis.Redis(port=replica.port, username=user, password=secret)
        wait_for(lambda: admin.info("replication")["master_link_status"] == "up", 15, "replica")
        wait_for(
            lambda: (
                redis.Redis(port=sentinel.port, username=user, password=secret).sentinel_master(
                    MASTER
                )["num-slaves"]
                == 1
            ),
            15,
            "the Sentinel to find the replica",
        )
        env = fleet_env(
            primary,
            empty_env_file,
            FLEETAPP_BROKER_URL=f"sentinel://127.0.0.1:{sentinel.port}/0",
            FLEET_REDIS_MASTER_NAME=MASTER,
        )
        worker = start_worker(env, tmp_path, "follower", queues="default")
        wait_ready(worker)
        before = run_cli(env, "add", "2", "3", "--json")
        assert json.loads(before.stdout)["result"] == 5, before.stderr

        primary.proc.kill()  # a power cut: the Sentinel promotes the replica
        primary.proc.wait(5)
        wait_for(
            lambda: named_primary(sentinel.port, user, secret) == replica.port,
            30,
            "the Sentinel to promote the replica",
        )
        after = run_cli(env, "add", "4", "5", "--json", timeout=90)
        assert after.returncode == 0, after.stderr
        assert json.loads(after.stdout)["result"] == 9
        assert worker.alive(), "the worker followed the new primary without a restart"

        doctor = run(
            [str(BIN / "fleet-doctor"), "-A", "fleetapp.celery:app", "--json"], env=env, timeout=60
        )
        view = json.loads(doctor.stdout)["sentinel"]
        assert view["primary"] == f"127.0.0.1:{replica.port}", doctor.stdout
        assert view["named_by"] == 1 and view["sentinels"][0]["quorum"] == 1
        assert secret not in doctor.stdout
    finally:
        if worker is not None:
            worker.stop()
        sentinel.stop()
        replica.stop()
        primary.stop()
