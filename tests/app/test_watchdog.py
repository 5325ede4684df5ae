"""celery_fleet.watchdog with a real worker and a real Redis: the test holds the notify socket
systemd would hold (WATCHDOG_USEC, NOTIFY_SOCKET) and counts what the worker tells it. That
systemd kills and restarts a worker that goes quiet is tested on the lab
(tests/fleet/test_durability.py)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleettest.local import start_worker, wait_for, wait_ready
from fleettest.sample import fleet_env

from tests.app.test_deadletter import HERE, call, result_of

DB = 11
WATCHDOG = 4.0  # seconds: notified every second while well, quiet after 2 s without an ask


class NotifySocket:
    """The receiving end of sd_notify: every WATCHDOG=1, with when it came."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.pings: list[float] = []
        self._closed = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while not self._closed:
            try:
                message = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if message == b"WATCHDOG=1":
                self.pings.append(time.monotonic())

    def pings_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.pings if start <= t <= end)

    def close(self) -> None:
        self._closed = True
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify")
    yield sock
    sock.close()


def watched_env(redis_server, empty_env_file, notify: NotifySocket, **extra: str):
    return fleet_env(
        redis_server,
        empty_env_file,
        db=DB,
        NOTIFY_SOCKET=str(notify.path),
        WATCHDOG_USEC=str(int(WATCHDOG * 1e6)),
        **extra,
    )


@pytest.mark.timeout(60)
def test_a_consuming_worker_feeds_the_watchdog_idle_and_busy(
    redis_server, empty_env_file, notify, tmp_path
):
    env = watched_env(redis_server, empty_env_file, notify)
    worker = start_worker(env, tmp_path, "fed", queues="default", cwd=HERE, app="poison")
    try:
        wait_ready(worker)
        idle = time.monotonic()
        time.sleep(WATCHDOG)
        assert notify.pings_between(idle, idle + WATCHDOG) >= 3, "idle: not fed"
        # solo pool: the task holds the only slot and the consumer loop for 2 x WATCHDOG.
        task_id = call(env, "poison.hold", 2 * WATCHDOG)
        busy = time.monotonic()
        assert result_of(env, task_id) == str(2 * WATCHDOG)
        assert notify.pings_between(busy + 1, busy + 2 * WATCHDOG) >= 6, "busy: not fed"
        assert "consumer watchdog" not in worker.text()
    finally:
        worker.stop()


@pytest.mark.timeout(60)
def test_a_worker_that_stops_asking_for_messages_stops_feeding_the_watchdog(
    redis_server, empty_env_file, notify, tmp_path
):
    env = watched_env(redis_server, empty_env_file, notify, FLEET_TEST_STOP_POLLING_AFTER="3")
    worker = start_worker(env, tmp_path, "quiet", queues="default", cwd=HERE, app="poison")
    try:
        wait_ready(worker)
        wait_for(lambda: "no more asks for messages" in worker.text(), 20, "the stall")
        stalled = time.monotonic()
        wait_for(
            lambda: "consumer watchdog: the consumer has not asked" in worker.text(),
            10,
            "the watchdog's complaint",
        )
        complained = time.monotonic()
        time.sleep(WATCHDOG)
        # Alive and connected, yet systemd hears nothing from it any more.
        assert worker.alive()
        assert notify.pings_between(complained, complained + WATCHDOG) == 0
        assert complained - stalled < WATCHDOG
    finally:
        worker.stop()
