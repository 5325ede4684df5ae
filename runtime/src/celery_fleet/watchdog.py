"""A consumer watchdog: systemd restarts a worker that is alive but has stopped consuming.

Celery has a history of workers that stay connected, answer pings and send heartbeats, yet take
no message any more (after a broker restart: celery #9054, #10205, #10302). Their queue grows
and nothing says why. The worker's unit sets ``WatchdogSec=``; systemd then passes
``WATCHDOG_USEC`` and ``NOTIFY_SOCKET`` and kills the worker (and ``Restart=always`` starts it
again) unless it hears ``WATCHDOG=1`` within that time. A thread (a greenlet under gevent) in
the worker's main process sends it every quarter of that time, only while the consumer is well:

* it asked Redis for a message (BLMOVE/BRPOP) within half the watchdog time: an idle worker
  asks again every second, a busy one whenever a slot frees;
* or its ask is still waiting for Redis' answer (a partition: kombu drops a connection whose
  answer is overdue, and the consumer reconnects); an answer that arrived and is not read is
  the failure itself;
* or every slot it may fill is taken (its prefetch window is full) by requests it really runs
  or holds: it has no reason to ask;
* or it has no broker connection: it is starting, reconnecting or shutting down, and Celery's
  own retry loop is at work (a restart would not bring Redis back; the lease keeper fences
  running tasks when Redis stays away).

A worker that is killed leaves its messages in ``unacked``; its lease keeper in the next process
(and the other workers' sweeps) give them back. ``FLEET_TEST_STOP_POLLING_AFTER=<seconds>`` makes
a worker stop asking for messages that long after its consumer starts, while everything else
keeps running: the failure this guards against, for the tests.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from typing import Any

from celery import bootsteps
from celery.signals import celeryd_init
from celery.worker import state

from celery_fleet import transport

logger = logging.getLogger("celery_fleet.watchdog")

_watchdog: Watchdog | None = None


def watchdog_seconds(environ: dict[str, str] | None = None) -> float | None:
    """systemd's watchdog time for this process, or None when there is none (or not ours)."""
    env = os.environ if environ is None else environ
    usec, address = env.get("WATCHDOG_USEC", ""), env.get("NOTIFY_SOCKET", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or not address:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1e6


def install() -> None:
    celeryd_init.connect(_on_worker_init, weak=False, dispatch_uid="celery_fleet.watchdog")
    stop_after = os.environ.get("FLEET_TEST_STOP_POLLING_AFTER", "").strip()
    if stop_after:
        _stop_polling_after(float(stop_after))


def _on_worker_init(sender: Any = None, instance: Any = None, **kwargs: Any) -> None:
    global _watchdog
    seconds = watchdog_seconds()
    if seconds is None or _watchdog is not None:
        return
    # Prefork children inherit the environment; only this (the main) process may notify.
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)
    _watchdog = Watchdog(os.environ["NOTIFY_SOCKET"], seconds)
    _watchdog.start()
    instance.app.steps["consumer"].add(WatchdogStep)


class WatchdogStep(bootsteps.StartStopStep):
    """Shows the watchdog the consumer (again after each reconnection)."""

    label = "Watchdog"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        if _watchdog is not None:
            _watchdog.consumer = c

    def shutdown(self, c: Any) -> None:
        if _watchdog is not None:
            _watchdog.stop()


class Watchdog:
    def __init__(self, address: str, seconds: float) -> None:
        # An abstract socket's name starts with "@" in the environment, NUL on the wire.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.seconds = seconds
        self.stale_after = seconds / 2
        self.consumer: Any = None
        self._channel: Any = None
        self._channel_seen = time.monotonic()
        self._complaining = False
        self._stopping = threading.Event()

    def start(self) -> None:
        self.notify(b"WATCHDOG=1")  # the consumer may take a while to connect
        threading.Thread(target=self._loop, name="fleet-watchdog", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()

    def _loop(self) -> None:
        while not self._stopping.wait(self.seconds / 4):
            problem = self.problem()
            if problem is None:
                self.notify(b"WATCHDOG=1")
                if self._complaining:
                    logger.warning("consumer watchdog: the consumer is well again")
                self._complaining = False
            elif not self._complaining:
                logger.error(
                    "consumer watchdog: %s; systemd restarts this worker within %g s unless"
                    " it recovers",
                    problem,
                    self.seconds,
                )
                self._complaining = True

    def problem(self) -> str | None:
        """Why the consumer is not well, or None."""
        consumer = self.consumer
        task_consumer = getattr(consumer, "task_consumer", None)
        channel = getattr(task_consumer, "channel", None)
        if consumer is None or consumer.connection is None or channel is None or channel.closed:
            return None  # starting, reconnecting or stopping: Celery is at work
        if state.should_stop is not None or state.should_terminate is not None:
            return None
        now = time.monotonic()
        if channel is not self._channel:  # a new connection: give it time for its first ask
            self._channel, self._channel_seen = channel, now
        asked = max(getattr(channel, "_brpop_sent_at", None) or 0.0, self._channel_seen)
        if now - asked < self.stale_after:
            return None
        waiting_on = getattr(channel, "_in_poll", None)
        if waiting_on:
            sock = getattr(waiting_on, "_sock", None)
            if sock is None or not _readable(sock):
                # Asked, no answer yet: Redis is away (a partition). kombu drops a connection
                # whose answer is overdue and the consumer reconnects; a restart would not help.
                return None
            return f"Redis answered the consumer's ask of {now - asked:.0f} s ago; nobody reads it"
        qos = getattr(channel, "qos", None)
        held = len(state.active_requests) + len(state.reserved_requests)
        if qos is not None and not qos.can_consume() and held:
            return None  # every slot taken by what it runs or holds
        return (
            f"the consumer has not asked Redis for a message for {now - asked:.0f} s"
            f" although it has room (holding {held})"
        )

    def notify(self, message: bytes) -> None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:
            logger.warning("consumer watchdog: cannot notify systemd (%r)", exc)


def _readable(sock: socket.socket) -> bool:
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):  # closed meanwhile: the consumer is reconnecting
        return False
    return bool(readable)


def _stop_polling_after(seconds: float) -> None:
    """The tests' failure: past this many seconds of the first ask, the worker's channels send
    no more asks; its connection, heartbeats and lease keeper go on."""
    start_pop = transport.Channel._brpop_start
    first: list[float] = []

    def stalled_start(self: Any, timeout: float | None = None) -> None:
        if not first:
            first.append(time.monotonic())
        if time.monotonic() - first[0] > seconds:
            if not getattr(self, "_fleet_stopped_polling", False):
                logger.warning("FLEET_TEST_STOP_POLLING_AFTER: no more asks for messages")
                self._fleet_stopped_polling = True
            return
        start_pop(self, timeout)

    transport.Channel._brpop_start = stalled_start  # type: ignore[method-assign]
