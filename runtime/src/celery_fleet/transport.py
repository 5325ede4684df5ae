"""kombu's Redis channel, with a pop that cannot lose the message it pops.

kombu takes a message with ``BRPOP`` on one connection and records it in ``unacked`` with a
``MULTI`` on another (kombu issue #305, open upstream). A worker killed, or a connection lost,
between the two loses the message: it is in no queue and not in ``unacked``. The fault suite saw
it on the lab (``systemctl kill -s KILL`` of a worker under load: one task of 100 lost).

In a worker, this channel moves the message instead, atomically, with ``BLMOVE`` into a
processing list of its own (``_fleet.processing.<host>.<pid>.<n>.<queue>``), and removes it from
there in the same ``MULTI`` that records it in ``unacked``. A message is therefore always in its
queue, in a processing list, or in ``unacked``. Processing lists are listed in the hash
``_fleet.processing``; the lease keeper moves a list's messages back to its queue once its
owner is gone (its ``_fleet.alive.<host>.<pid>`` key expired, or the channel closed).

A ``BLMOVE`` whose reply never came (kombu drops a connection whose blocking pop got no answer,
e.g. a partition) may still have moved a message: the server ran it and its answer was lost, or
the request reaches the server later. The worker never saw that message, and the channel, still
open, would keep its processing list to itself forever (found on the lab: a 10 s partition of a
worker left one task unrun until that worker restarted). So the next pop uses a new processing
list, and the keeper moves the old one's messages back to the queue (``lease.forget_processing``).

No Lua from kombu: the clients' and Flower's Redis users may not run scripts (the workers' may,
only for Celery's chords), so the three
scripts kombu runs are replaced here by transactions: the release of the ``unacked_mutex`` (a
redis-py ``Lock``), and the refresh and sweep of binding tables for queues that expire (Celery's
pidbox reply queues and Flower's event queue). Only workers sweep expired leases and binding
tables: a client or Flower may neither move messages between queues nor delete a table.

``BLMOVE`` takes one source list, so the channel uses it when it polls one list at a time: one
queue per worker and kombu's priority steps reduced to one (celery-fleet's configuration does
both). Otherwise, and for consumers without acknowledgements (replies), it keeps ``BRPOP``.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from typing import TYPE_CHECKING, Any

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import QoS as VirtualQoS
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis.client import Pipeline
from redis.exceptions import WatchError

from celery_fleet import clock, config, deadletter

PROCESSING_INDEX = "_fleet.processing"
PROCESSING_PREFIX = "_fleet.processing."
ALIVE_PREFIX = "_fleet.alive."

_channel_numbers = itertools.count(1)

if TYPE_CHECKING:

    class _RedisChannel(kombu_redis.Channel):
        # The private part of kombu's Redis channel (kombu 5.7) that Channel below overrides or
        # uses: the type stubs describe only the public part.
        connection_errors: tuple[type[BaseException], ...]
        _in_poll: Any
        _brpop_sent_at: float | None
        keyprefix_binding_deadlines: str

        def sweep_bindings(self, limit: int = 100) -> int: ...

        def _brpop_start(self, timeout: float | None = None) -> None: ...
        def _brpop_read(self, **options: Any) -> bool: ...
        def _q_for_pri(self, queue: str, pri: int) -> str: ...
        def _flush_brpop_reauth(self) -> None: ...
        def _connparams(self, asynchronous: bool = False) -> dict[str, Any]: ...

    class _RedisSentinelChannel(kombu_redis.SentinelChannel):
        def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any: ...

else:
    _RedisChannel = kombu_redis.Channel
    _RedisSentinelChannel = kombu_redis.SentinelChannel


def owner_id() -> str:
    """This process, as named in processing lists and alive keys."""
    return f"{socket.gethostname()}.{os.getpid()}"


class QoS(kombu_redis.QoS):
    channel: Channel  # only the Channel below creates this QoS

    def append(self, message: Any, delivery_tag: str) -> None:
        # kombu's append, and for a message popped into a processing list, out of that list in
        # the same transaction.
        popped = self.channel._fleet_popped.pop(delivery_tag, None)
        delivery = message.delivery_info
        # kombu_redis.time: kombu's `from time import time` (patched to clock.now), not stubbed.
        stamp = kombu_redis.time()  # type: ignore[attr-defined]
        if self.channel.atomic_pop:
            # Known to the lease keeper first: a Redis that restarts may run the transaction
            # below and never answer, leaving the message recorded here and delivered nowhere.
            from celery_fleet import lease  # lease imports this module

            lease.stamped(delivery_tag, stamp)
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: stamp}).hset(
                self.unacked_key,
                delivery_tag,
                dumps([message._raw, delivery["exchange"], delivery["routing_key"]]),
            )
            if popped is not None:
                processing_key, raw = popped
                pipe.lrem(processing_key, 1, raw)
            pipe.execute()
        VirtualQoS.append(self, message, delivery_tag)

    def restore_visible(self, start: int = 0, num: int | None = 10, interval: int = 10) -> None:
        # Workers sweep expired leases (and hold the right to); a client or Flower consumes only
        # replies and events, which are never leased.
        if self.channel.atomic_pop:
            super().restore_visible(start, num, interval)  # type: ignore[arg-type]


@contextmanager
def mutex(client: Any, name: str, expire: float) -> Iterator[None]:
    """kombu's ``Mutex`` without redis-py's ``Lock``, whose release is a Lua script."""
    token = uuid.uuid4().hex
    if not client.set(name, token, nx=True, px=int(expire * 1000)):
        raise kombu_redis.MutexHeld()
    try:
        yield
    finally:
        # GET is not among the commands kombu's client prefixes; WATCH and DEL are.
        full = getattr(client, "global_keyprefix", "") + name
        with client.pipeline() as pipe:
            try:
                pipe.watch(name)
                if bytes_to_str(pipe.execute_command("GET", full) or b"") == token:
                    pipe.multi()
                    pipe.delete(name)
                    pipe.execute()
            except WatchError:
                pass  # expired and taken by another sweeper meanwhile: not ours to release


class Channel(_RedisChannel):
    QoS = QoS
    #: Set in worker processes (by the lease keeper, which reclaims processing lists).
    atomic_pop = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._fleet_popped: dict[str, tuple[str, bytes]] = {}
        self._fleet_no_ack_queues: set[str] = set()
        self._fleet_number = next(_channel_numbers)
        self._fleet_moving: str | None = None
        # Bumped when a BLMOVE went unanswered: the next pop moves into a new processing list.
        self._fleet_epoch = 0
        self._fleet_unanswered = False
        # An app that sets broker_transport_options itself replaces the fleet's whole dict
        # (Celery's defaults are merged setting by setting): the fleet's options (key prefix,
        # lease, timeouts, one priority step) fill in what the app's dict leaves out.
        connection = args[0] if args else kwargs["connection"]
        options = connection.client.transport_options
        fleet = config.fleet_settings()
        for name, value in fleet["broker_transport_options"].items():
            options.setdefault(name, value)
        # Likewise TLS: an app's own broker_use_ssl that names no CA verifies the fleet's Redis
        # with the fleet's CA (Celery's setting is the dict kombu's Connection holds).
        ssl_options = connection.client.ssl
        if isinstance(ssl_options, dict):
            for name, value in (fleet.get("broker_use_ssl") or {}).items():
                ssl_options.setdefault(name, value)
        super().__init__(*args, **kwargs)

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._fleet_no_ack_queues.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def processing_key(self, queue: str) -> str:
        return f"{self._processing_prefix()}{queue}"

    def _processing_prefix(self) -> str:
        return f"{PROCESSING_PREFIX}{owner_id()}.{self._fleet_number}.{self._fleet_epoch}."

    def _full_key(self, key: str) -> str:
        # For commands kombu's client does not prefix (BLMOVE, LREM, HSET of the index).
        return self.global_keyprefix + key

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = list(self.active_queues)
        if (
            not self.atomic_pop
            or len(queues) != 1
            or len(self.priority_steps) != 1
            or queues[0] in self._fleet_no_ack_queues
        ):
            # Popped into no more; a BLMOVE of it may still have been unanswered.
            _retire(self._fleet_moving)
            self._fleet_moving = None
            self._fleet_unanswered = False
            return super()._brpop_start(timeout)
        if timeout is None:
            timeout = self.brpop_timeout
        queue = queues[0]
        if self._fleet_unanswered and self._fleet_moving is not None:
            # The last BLMOVE's fate is unknown (see the module's docstring).
            _retire(self._fleet_moving)
            self._fleet_epoch += 1
            self._fleet_moving = None
        processing = self.processing_key(queue)
        if self._fleet_moving != processing:
            # Listed before the first move, so a reclaimer can find it whatever happens next.
            self.client.hset(
                PROCESSING_INDEX, processing, dumps({"owner": owner_id(), "queue": queue})
            )
            self._fleet_moving = processing
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        source = self._full_key(self._q_for_pri(queue, self.priority_steps[0]))
        self._fleet_unanswered = True
        self.client.connection.send_command(
            "BLMOVE", source, self._full_key(processing), "RIGHT", "LEFT", timeout or 0
        )

    def _brpop_read(self, **options: Any) -> Any:
        processing = self._fleet_moving
        if processing is None:
            return super()._brpop_read(**options)
        try:
            try:
                raw = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            self._fleet_unanswered = False
            if raw is None:
                raise Empty()
            queue = self._queue_of(processing)
            payload = loads(bytes_to_str(raw))
            parked = deadletter.should_park(self.client, self.global_keyprefix, payload)
            if parked is not None:
                name = str((payload.get("headers") or {}).get("task", "?"))
                deadletter.park(self.client, queue, self._full_key(processing), raw, parked, name)
                raise Empty()
            tag = payload["properties"]["delivery_tag"]
            self._fleet_popped[tag] = (self._full_key(processing), raw)
            self.connection._deliver(payload, queue)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    # -- binding tables of expiring queues, without kombu's scripts ---------------------------

    def _refresh_binding(self, keys: list[str], args: list[Any], client: Any) -> None:
        """kombu's REFRESH_BINDING: add the member, push the exchange's deadline (ms) out."""
        table = keys[0]
        member, exchange, ttl = args
        # Queued in the caller's transaction (kombu passes one) or in one of its own.
        pipe = client if isinstance(client, Pipeline) else client.pipeline()
        # In a pipeline no round trip for TIME: the clock measured last (the keeper's, in workers).
        now = clock.now() if pipe is client else _server_now(client)
        pipe.sadd(table, member)
        pipe.zadd(self.keyprefix_binding_deadlines, {exchange: int(now * 1000) + int(ttl)}, gt=True)
        if pipe is not client:
            pipe.execute()

    def sweep_bindings(self, limit: int = 100) -> int:
        # Workers sweep; a client or Flower only refreshes its own tables (no right to delete).
        return int(super().sweep_bindings(limit)) if self.atomic_pop else 0

    def _sweep_bindings(self, keys: list[str], args: list[Any], client: Any) -> int:
        """kombu's SWEEP_BINDINGS: drop binding tables whose deadline passed, unless a queue
        without x-expires still uses the exchange. One transaction per table."""
        deadlines = keys[0]
        table_prefix, permanent_prefix, limit = args
        now_ms = int(_server_now(client) * 1000)
        overdue = client.zrange(deadlines, "-inf", now_ms, byscore=True, offset=0, num=int(limit))
        bare = len(self.global_keyprefix)
        swept = 0
        for raw in overdue or []:
            exchange = bytes_to_str(raw)
            with client.pipeline() as pipe:
                try:
                    # A refresh or a bind meanwhile changes one of these: the transaction then
                    # does nothing (WATCH is among the commands kombu's client prefixes).
                    pipe.watch(
                        deadlines,
                        (table_prefix + exchange)[bare:],
                        (permanent_prefix + exchange)[bare:],
                    )
                    score = pipe.execute_command("ZSCORE", self._full_key(deadlines), exchange)
                    if score is None or float(score) > now_ms:
                        continue
                    kept = pipe.execute_command("EXISTS", permanent_prefix + exchange)
                    pipe.multi()
                    if not kept:
                        pipe.delete((table_prefix + exchange)[bare:])
                    pipe.zrem(deadlines, exchange)
                    pipe.execute()
                    swept += 1
                except WatchError:
                    continue
        return swept

    def _queue_of(self, processing: str) -> str:
        return processing[len(self._processing_prefix()) :]

    def close(self) -> None:
        processing = self._fleet_moving
        try:
            super().close()
        finally:
            _retire(processing)


class SentinelChannel(Channel, _RedisSentinelChannel):
    """The channel above, its connections to the primary the Sentinels name (kombu's
    ``sentinel://`` transport), which follow it through a failover."""

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        # kombu gives the Sentinels only sentinel_kwargs: the URL's credentials reach the
        # primary alone, and the fleet's Sentinels require them too.
        params = self._connparams(asynchronous)
        self.sentinel_kwargs = config.sentinel_kwargs_with_credentials(
            getattr(self, "sentinel_kwargs", None), params
        )
        return super()._sentinel_managed_pool(asynchronous)


def _retire(processing: str | None) -> None:
    """Hand a processing list this channel no longer pops into to the lease keeper."""
    if processing is not None:
        from celery_fleet import lease  # lease imports this module

        lease.forget_processing(processing)


def _server_now(client: Any) -> float:
    sent = time.time()
    seconds, microseconds = client.time()
    clock.observe(seconds, microseconds, sent, time.time())
    return clock.now()


def install() -> None:
    kombu_redis.Transport.Channel = Channel
    kombu_redis.SentinelTransport.Channel = SentinelChannel
    kombu_redis.Mutex = mutex
