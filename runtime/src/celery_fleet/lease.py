"""Leases on delivered messages, kept by each worker for exactly what it holds.

kombu's Redis transport records every delivered message in ``unacked`` with a time stamp and
sends it back to its queue once the stamp is older than the visibility timeout, whoever holds
it. That makes the visibility timeout both the longest a task may run (or wait for its ETA)
and the shortest a lost message waits: one hour by default, so every task a lost connection
interrupts waits an hour, and a longer task runs twice.

The lease keeper turns the time stamp into a lease. A thread (a greenlet under gevent) in each
worker, with a Redis connection of its own:

* renews, every tenth of the visibility timeout, the stamps of what this worker holds
  (delivered and not acknowledged: reserved, waiting for an ETA, or running, also across a
  reconnection), with the Redis server's clock;
* gives back at once what this worker held and let go without acknowledging: the messages
  Celery drops when its connection is lost, and tasks cancelled, whose messages it requeues,
  provided the stamp is still the one it wrote (nobody else took the message since). It knows
  every stamp from the moment it is written (``stamped``), not from its first renewal: a
  delivery whose record in ``unacked`` ran on a Redis that restarted before answering is in
  no queue and reached no task, and would otherwise wait a whole lease;
* delivers acknowledgements that could not reach Redis (celery_fleet.patches, fix 5);
* sweeps for expired leases itself, so a busy gevent worker sweeps too;
* fences: when it has not renewed for three quarters of the lease (Redis unreachable for that
  long), it cancels this worker's running tasks, without acknowledging them, before anyone
  else may take their messages, so a task never runs on two hosts at once.

The visibility timeout is therefore only the lease: how long a message held by a worker that
vanished (power cut, partition) waits before another worker takes it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from celery import bootsteps
from celery.signals import celeryd_init
from celery.worker import state
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from kombu.utils.objects import cached_property

from celery_fleet import clock, registry, transport

logger = logging.getLogger("celery_fleet.lease")

# Tags whose acknowledgement could not be delivered; the keeper delivers them. Set operations
# are atomic under the GIL, and acks may come from any thread.
_deferred_acks: set[str] = set()
# Processing lists this process no longer pops into (a closed channel, an unanswered BLMOVE:
# celery_fleet.transport), with when it let them go: the keeper moves their messages back to the
# queue for a while, since a BLMOVE lost in a partition may still reach Redis after that.
_closed_processing: dict[str, float] = {}
# Deliveries this worker stamped in unacked and has not settled yet: tag -> (the stamp, when,
# on this host's monotonic clock). Written by the consumer, taken over by the keeper's next
# tick once a renewal old (a fresh one may still be on its way to Celery).
_stamped: dict[str, tuple[float, float]] = {}
_keeper: LeaseKeeper | None = None


def defer_ack(delivery_tag: str) -> None:
    _deferred_acks.add(delivery_tag)


def stamped(delivery_tag: str, stamp: float) -> None:
    """Called before the delivery's record is sent: whatever happens to its reply."""
    if _keeper is not None:
        _stamped[delivery_tag] = (stamp, time.monotonic())


def settled(delivery_tag: str) -> None:
    """Acknowledged, rejected or requeued: nothing left for the keeper to give back."""
    _stamped.pop(delivery_tag, None)


def forget_processing(processing_key: str) -> None:
    _closed_processing.setdefault(processing_key, time.monotonic())


def install() -> None:
    """Add the keeper to every worker this process starts."""
    celeryd_init.connect(_on_worker_init, weak=False, dispatch_uid="celery_fleet.lease")


def _on_worker_init(sender: Any = None, instance: Any = None, **kwargs: Any) -> None:
    global _keeper
    app = instance.app
    if not LeaseKeeper.applies_to(app):
        return
    _keeper = LeaseKeeper(app)
    # Before the first delivery is stamped: clocks may differ by more than a lease. This also
    # marks the process alive, before its first move into a processing list.
    _keeper.sync_clock()
    transport.Channel.atomic_pop = True
    app.steps["consumer"].add(LeaseStep)


class LeaseStep(bootsteps.StartStopStep):
    """Attaches the (process-wide) keeper to the consumer; survives reconnections."""

    label = "Lease"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        if _keeper is not None:
            _keeper.attach(c)

    def stop(self, c: Any) -> None:
        # Called on every reconnection too: the keeper keeps renewing what is still running.
        pass

    def shutdown(self, c: Any) -> None:
        if _keeper is not None:
            _keeper.stop()


class LeaseKeeper:
    def __init__(self, app: Any) -> None:
        self.app = app
        options = app.conf.broker_transport_options or {}
        self.lease = float(options.get("visibility_timeout", 3600))
        self.renew_every = registry.renew_every(self.lease)
        self.fence_after = self.lease * 0.75
        self.consumer: Any = None
        # Tag -> the stamp this worker last wrote for it.
        self._owned: dict[str, float] = {}
        self._last_renewal = time.monotonic()
        self._fenced = False
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._connection: Any = None

    @staticmethod
    def applies_to(app: Any) -> bool:
        scheme = str(app.conf.broker_url or "").split("://", 1)[0]
        return scheme in ("redis", "rediss", "sentinel")

    # -- lifecycle ------------------------------------------------------------------------

    def attach(self, consumer: Any) -> None:
        self.consumer = consumer
        try:
            # Before "ready": a client's preflight right after sees this worker.
            self._announce(self._channel())
        except Exception as exc:  # the renew loop announces it
            logger.warning("lease keeper: cannot announce this worker yet (%r)", exc)
            self._drop_connection()
        if not self._threads:
            for name, target in (("renew", self._renew_loop), ("fence", self._fence_loop)):
                thread = threading.Thread(target=target, name=f"fleet-lease-{name}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def stop(self) -> None:
        self._stopping.set()
        # A tick still running would announce this worker again after the withdrawal below.
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=self.renew_every)
        if self.consumer is not None and self._connection is not None:
            try:
                self._channel().client.hdel(registry.WORKERS_KEY, self.consumer.hostname)
            except Exception:  # readers drop the entry once it is stale
                logger.debug("lease keeper: cannot withdraw this worker", exc_info=True)
        self._drop_connection()

    # -- the keeper's own Redis connection ---------------------------------------------------

    @cached_property
    def _transport_options(self) -> dict[str, Any]:
        # Short timeouts: a renewal that cannot get through must fail well within the lease.
        timeout = max(1.0, self.renew_every)
        options = dict(self.app.conf.broker_transport_options or {})
        # One connection attempt per tick: the loop retries, kombu's own loop would never return.
        options.update(socket_timeout=timeout, socket_connect_timeout=timeout, max_retries=0)
        return options

    def _channel(self) -> Any:
        if self._connection is None:
            self._connection = self.app.connection_for_write(
                transport_options=self._transport_options
            )
        return self._connection.default_channel

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.collect()
            except Exception:  # already broken; nothing to release
                logger.debug("lease keeper: dropping a broken connection", exc_info=True)

    def sync_clock(self) -> None:
        try:
            client = self._channel().client
            self._observe_clock(client)
            self._mark_alive(client)
        except Exception as exc:  # the renew loop retries
            logger.warning("lease keeper: cannot read the Redis clock yet (%r)", exc)
            self._drop_connection()

    def _mark_alive(self, client: Any) -> None:
        # Processing lists of an owner without this key are moved back by the other workers.
        client.set(transport.ALIVE_PREFIX + transport.owner_id(), "1", px=int(self.lease * 1000))

    @staticmethod
    def _observe_clock(client: Any) -> float:
        sent = time.time()
        seconds, microseconds = client.time()
        clock.observe(seconds, microseconds, sent, time.time())
        return clock.now()

    # -- what this worker holds ------------------------------------------------------------

    def held(self) -> set[str]:
        tags: set[str] = set()
        channel = getattr(getattr(self.consumer, "task_consumer", None), "channel", None)
        if channel is not None and not channel.closed:
            qos = channel.qos
            dirty = set(qos._dirty)
            tags.update(tag for tag in list(qos._delivered) if tag not in dirty)
        for request in tuple(state.active_requests):
            message = request.message
            if message is not None and not request.acknowledged:
                tags.add(message.delivery_tag)
        tags.update(_deferred_acks)
        return tags

    # -- the two loops ---------------------------------------------------------------------

    def _renew_loop(self) -> None:
        while not self._stopping.wait(self.renew_every):
            try:
                self.tick()
            except Exception as exc:  # Redis away: the fence loop watches
                logger.warning("lease keeper: renewal failed (%r)", exc)
                self._drop_connection()

    def _fence_loop(self) -> None:
        while not self._stopping.wait(1.0):
            if time.monotonic() - self._last_renewal > self.fence_after:
                self.fence()

    def tick(self) -> None:
        channel = self._channel()
        client = channel.client
        index, unacked = channel.unacked_index_key, channel.unacked_key
        now = self._observe_clock(client)
        self._mark_alive(client)
        # First: a tick that fails further on must not make this worker look gone.
        self._announce(channel, now)

        acks = list(_deferred_acks)
        if acks:
            pipe = client.pipeline()
            for tag in acks:
                pipe.zrem(index, tag).hdel(unacked, tag)
            pipe.execute()
            for tag in acks:
                _deferred_acks.discard(tag)
                self._owned.pop(tag, None)
            logger.info("lease keeper: delivered %d deferred acknowledgement(s)", len(acks))

        self._take_over_stamps()
        held = self.held()
        let_go = [tag for tag in self._owned if tag not in held]
        requeued = sum(self._requeue_if_ours(channel, tag, self._owned.pop(tag)) for tag in let_go)
        if requeued:
            logger.info("lease keeper: requeued %d message(s) this worker let go", requeued)

        if held:
            # XX: renew only what is still recorded (an ack may have removed it meanwhile).
            client.zadd(index, dict.fromkeys(held, now), xx=True)
            self._owned.update(dict.fromkeys(held, now))
        self._last_renewal = time.monotonic()
        if self._fenced:
            logger.warning("lease keeper: Redis answers again; renewing leases")
            self._fenced = False

        channel.qos.restore_visible(num=None, interval=1)
        self._reclaim_processing(channel)

    def _take_over_stamps(self) -> None:
        settled_before = time.monotonic() - self.renew_every
        for tag, (stamp, at) in list(_stamped.items()):
            if at < settled_before and _stamped.pop(tag, None) is not None:
                self._owned[tag] = stamp

    def _announce(self, channel: Any, now: float | None = None) -> None:
        """Write this worker's registry entry; drop those of workers gone for a lease."""
        client = channel.client
        if now is None:
            now = self._observe_clock(client)
        client.hset(
            registry.WORKERS_KEY,
            self.consumer.hostname,
            registry.entry(self.app, self.consumer, now),
        )
        # HGETALL is not among the commands kombu's client prefixes: name the key in full.
        entries = registry.read(client, channel.global_keyprefix + registry.WORKERS_KEY)
        gone = [name for name, e in entries.items() if e.seen < now - self.lease]
        if gone:
            client.hdel(registry.WORKERS_KEY, *gone)

    def _reclaim_processing(self, channel: Any) -> None:
        """Move back to their queues the messages of processing lists whose owner is gone."""
        client = channel.client
        full = channel.global_keyprefix
        me = transport.owner_id()
        # HGETALL and EXISTS are not among the commands kombu's client prefixes.
        lists = client.execute_command("HGETALL", full + transport.PROCESSING_INDEX) or {}
        if isinstance(lists, list):  # RESP2: a flat list
            lists = dict(zip(lists[::2], lists[1::2], strict=True))
        for raw_key, raw_info in lists.items():
            key, info = bytes_to_str(raw_key), loads(bytes_to_str(raw_info))
            if info["owner"] == me:
                if key not in _closed_processing:
                    continue
            elif client.execute_command("EXISTS", full + transport.ALIVE_PREFIX + info["owner"]):
                continue
            moved = 0
            while client.execute_command(
                "LMOVE", full + key, full + info["queue"], "RIGHT", "RIGHT"
            ):
                moved += 1
            let_go = _closed_processing.get(key)
            if let_go is None or time.monotonic() - let_go > 2 * self.lease:
                client.hdel(transport.PROCESSING_INDEX, key)
                _closed_processing.pop(key, None)
            if moved:
                logger.warning(
                    "lease keeper: moved %d message(s) of %s (no longer popped into) back to %s",
                    moved,
                    key,
                    info["queue"],
                )

    def _requeue_if_ours(self, channel: Any, tag: str, stamp: float) -> bool:
        """Requeue a message this worker let go, unless another worker took it since."""
        client = channel.client
        index, unacked = channel.unacked_index_key, channel.unacked_key
        # ZSCORE is not among the commands kombu's client prefixes: name the key in full.
        index_key = channel.global_keyprefix + index
        requeued = False

        def transaction(pipe: Any) -> None:
            nonlocal requeued
            current = pipe.zscore(index_key, tag)
            if current is None or abs(float(current) - stamp) > 1e-3:
                return  # acknowledged, requeued by someone, or held elsewhere now
            payload = pipe.hget(unacked, tag)
            pipe.multi()
            pipe.zrem(index, tag)
            pipe.hdel(unacked, tag)
            if payload:
                message, exchange, routing_key = loads(bytes_to_str(payload))
                channel._do_restore_message(message, exchange, routing_key, pipe)
                requeued = True

        client.transaction(transaction, index, unacked)
        return requeued

    def fence(self) -> None:
        """Stop running what this worker can no longer prove it holds."""
        if self._fenced or self.consumer is None:
            return
        self._fenced = True
        pool = self.consumer.pool
        cancelled = 0
        for request in tuple(state.active_requests):
            if request.acknowledged or not request.time_start or not request.worker_pid:
                continue
            if not request.task.acks_late:
                continue
            request._already_cancelled = True  # terminated without an acknowledgement
            try:
                pool.terminate_job(request.worker_pid, signal.SIGTERM)
                cancelled += 1
            except Exception:  # one task that cannot be killed must not stop the rest
                logger.exception("lease keeper: cannot cancel %r", request)
        self._owned.clear()
        logger.error(
            "lease keeper: no lease renewed for %.0f s (Redis unreachable); cancelled %d running"
            " task(s) so they are not run twice: each runs again from its queue",
            time.monotonic() - self._last_renewal,
            cancelled,
        )
