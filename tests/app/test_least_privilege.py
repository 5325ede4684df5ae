"""The sample app under the fleet's own Redis ACL presets (roles/redis), on a local redis-server.

Workers, a client and the doctor run with the users the fleet deploys (no Lua: chords off), and
Redis' ACL log must stay empty: every command Celery, kombu and the runtime send is granted, and
nothing more is needed. The lab tests (tests/fleet/test_acl.py) try the forbidden side.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fleettest.acl import rules
from fleettest.commands import BIN, run
from fleettest.local import PASSWORD, RedisServer, Worker, start_redis, start_worker, wait_ready
from fleettest.sample import fleet_env, run_cli
from fleettest.webfarm import WebFarm

PREFIX = "fleetapp:"
QUEUES = ["network", "default"]

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(
        tmp_path_factory.mktemp("acl-redis"), users=rules(PREFIX, QUEUES, chords=False)
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def admin(acl_redis: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(
        port=acl_redis.port, username=acl_redis.username, password=acl_redis.password
    )
    yield client
    client.close()


def tier_env(server: RedisServer, env_file: Path, tier: str, **extra: str) -> dict[str, str]:
    env = fleet_env(server, env_file, FLEET_REDIS_KEY_PREFIX=PREFIX, **extra)
    env.update(FLEETAPP_REDIS_USERNAME=tier, FLEETAPP_REDIS_PASSWORD=PASSWORD)
    return env


@pytest.fixture(scope="module")
def workers(
    acl_redis: RedisServer,
    empty_env_file: Path,
    webfarm: WebFarm,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[Worker]]:
    logdir = tmp_path_factory.mktemp("acl-workers")
    env = tier_env(
        acl_redis, empty_env_file, "worker", FLEETAPP_FETCH_ALLOW_NETWORKS="127.0.0.1/32"
    )
    started = [
        start_worker(env, logdir, "net", pool="gevent", concurrency=10, queues="network"),
        start_worker(env, logdir, "default", pool="solo", queues="default"),
    ]
    try:
        wait_ready(*started)
        yield started
    finally:
        for worker in started:
            worker.stop()


def refusals(admin: redis.Redis) -> list[dict[str, object]]:
    return [
        {k: entry.get(k) for k in ("username", "reason", "object")}
        for entry in admin.acl_log(count=100)
    ]


def test_the_sample_app_needs_nothing_its_users_lack(
    acl_redis: RedisServer,
    admin: redis.Redis,
    workers: list[Worker],
    empty_env_file: Path,
    webfarm: WebFarm,
) -> None:
    client = tier_env(acl_redis, empty_env_file, "client")
    urls = [f"{webfarm.url}/delay/0.1?k={n}" for n in range(6)]
    fetched = run_cli(client, "fetch", "--json", *urls)
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    assert all(r["ok"] for r in json.loads(fetched.stdout)["results"])
    added = run_cli(client, "add", "2", "3")
    assert added.returncode == 0, added.stdout + added.stderr
    doctor = run_cli(client, "doctor", "--json")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    # What a client's own code does with results: a group, then forget one.
    code = (
        "from celery import group; from fleetapp.celery import app; "
        "r = group(app.signature('fleetapp.add', (i, i)) for i in range(4)).apply_async(); "
        "print(r.get(timeout=30)); r.results[0].forget()"
    )
    grouped = run([str(BIN / "fleet-python"), "-c", code], env=client, timeout=60)
    assert grouped.stdout.strip() == "[0, 2, 4, 6]", grouped.stderr[-2000:]
    # A fetch that times out revokes what is left (a broadcast the workers obey).
    late = run_cli(client, "fetch", "--json", "--timeout", "1", f"{webfarm.url}/delay/4")
    assert late.returncode not in (4, 5), late.stdout + late.stderr
    assert refusals(admin) == []


def test_an_app_with_its_own_transport_options_keeps_the_prefix(
    acl_redis: RedisServer, admin: redis.Redis, workers: list[Worker], empty_env_file: Path
) -> None:
    """Celery does not merge the fleet's defaults into a dict the app sets itself."""
    code = (
        "from fleetapp.celery import app; "
        "app.conf.update(broker_transport_options={'visibility_timeout': 60},"
        " result_backend_transport_options={}); "
        "print(app.send_task('fleetapp.add', (20, 22)).get(timeout=30))"
    )
    client = tier_env(acl_redis, empty_env_file, "client")
    added = run([str(BIN / "fleet-python"), "-c", code], env=client, timeout=60)
    assert added.stdout.strip() == "42", added.stderr[-2000:]
    assert refusals(admin) == []


def test_workers_announce_themselves_where_a_client_may_read(
    acl_redis: RedisServer, admin: redis.Redis, workers: list[Worker]
) -> None:
    entries = {
        name.decode(): json.loads(value)
        for name, value in admin.hgetall(f"{PREFIX}_fleet.workers").items()
    }
    queues = {name.split("@")[0]: entry["queues"] for name, entry in entries.items()}
    assert queues == {"net": ["network"], "default": ["default"]}
    assert all("fleetapp.add" in entry["tasks"] for entry in entries.values())
    client = redis.Redis(port=acl_redis.port, username="client", password=PASSWORD)
    assert client.hgetall(f"{PREFIX}_fleet.workers")
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.delete(f"{PREFIX}network")
    admin.acl_log_reset()


def test_the_doctor_names_a_refusal_instead_of_calling_redis_down(
    acl_redis: RedisServer, admin: redis.Redis, empty_env_file: Path
) -> None:
    """A client whose settings name another prefix than its ACL allows: Redis is up and takes
    the password, but refuses the reads; the doctor says so (exit 5), not "broker unreachable"."""
    client = tier_env(acl_redis, empty_env_file, "client")
    client["FLEET_REDIS_KEY_PREFIX"] = "otherapp:"
    doctor = run([str(BIN / "fleet-doctor"), "-A", "fleetapp.celery:app", "--json"], env=client)
    report = json.loads(doctor.stdout)
    assert doctor.returncode == 5, doctor.stdout + doctor.stderr
    assert any("Redis refused this host's user" in p for p in report["problems"]), report
    admin.acl_log_reset()
