"""Fixtures for tests/app. Nothing runs in eager mode: a real ACL-protected redis-server,
real Celery worker processes and the webfarm, all on 127.0.0.1 and free ports.
"""

from __future__ import annotations

import gc
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleettest.local import RedisServer, start_redis, start_worker, wait_ready
from fleettest.sample import Fleet, fleet_env
from fleettest.webfarm import WebFarm, serve

HERE = Path(__file__).resolve().parent
# The loopback webfarm's address: fetches are refused anywhere not public unless allowed
# (FLEETAPP_FETCH_ALLOW_NETWORKS). Only this address, so the rest of 127/8 stays refused.
LOOPBACK_WEBFARM = "127.0.0.1/32"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test here gets a timeout, even if it forgets to ask for one. (This hook sees the
    # whole session's items: leave other test trees alone.)
    for item in items:
        if HERE in item.path.parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(60))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def webfarm() -> Iterator[WebFarm]:
    server = serve("127.0.0.1", 0)
    yield server
    server.close()


@pytest.fixture(scope="session")
def webfarm_allowed() -> tuple[ipaddress.IPv4Network, ...]:
    """allow_networks for in-process fetches from the webfarm (what the workers are given)."""
    return (ipaddress.IPv4Network(LOOPBACK_WEBFARM),)


@pytest.fixture(scope="session")
def empty_env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Isolate from a developer's /etc/fleetapp/fleetapp.env.
    path = tmp_path_factory.mktemp("envfile") / "empty.env"
    path.write_text("")
    return path


@pytest.fixture(scope="session")
def fleet(
    redis_server: RedisServer, empty_env_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """Two real workers on db 0: gevent on the network queue, solo on the default queue."""
    logdir = tmp_path_factory.mktemp("workers")
    env = fleet_env(redis_server, empty_env_file, FLEETAPP_FETCH_ALLOW_NETWORKS=LOOPBACK_WEBFARM)
    net = start_worker(env, logdir, "net", pool="gevent", concurrency=20, queues="network")
    default = start_worker(env, logdir, "default", pool="solo", queues="default")
    try:
        wait_ready(net, default)
        yield Fleet(env=env, net=net, default=default, logdir=logdir)
    finally:
        for w in (net, default):
            w.stop()


@pytest.fixture(scope="session")
def client_app(fleet: Fleet):
    """An in-process client app configured exactly like the deployed one, for db 0."""
    from fleetapp.celery import create_app
    from fleetapp.config import load_settings

    app = create_app(load_settings(fleet.env))
    yield app
    # Drop pending AsyncResults while Redis is still up (their __del__ talks to it).
    gc.collect()
    app.close()
