"""Fixes for Celery 5.7 / kombu 5.7 windows that lose or stall tasks on the Redis transport.

Each was found on the lab with the fault suite's ledger (tests/fleet/faults) and is applied by
``activate()`` in every process ``fleet-celery`` starts. They are small and replace no public
API; each names the upstream code it corrects, so it can go when upstream fixes it.

1. gevent: a task killed by ``terminate_job`` counts as a success. Celery's gevent pool
   (celery PR #9083) turns ``GreenletExit`` into the return value ``(False, None, None)``,
   which the request reads as "succeeded", so a late-ack task cancelled after a connection
   loss is *acknowledged* and its message deleted, although it never ran to the end. Seen:
   40-70 of 400 tasks lost on each Redis restart, stuck in state RETRY. Fixed: a killed
   greenlet reports ``Terminated``, as a killed prefork child does.
2. ``Request.cancel`` kills the task before it marks the request cancelled (the mark comes
   after a result-backend write, which switches greenlets or fails while Redis is away: celery
   PR #10382 / issue #7185). The killed task then reports in first, is taken for a revoke and
   acknowledged. Seen: tasks lost in state REVOKED. Fixed: the mark comes first.
3. On a lost broker connection Celery closes the old channels, and kombu's channel close
   requeues every unacknowledged message of that channel, the ones still running included
   (they then run twice), or crashes the worker with ``AttributeError`` when the connection is
   already collected (the worker exits; seen on the lab). Fixed: channels closed because the
   connection was lost do not requeue anything; the lease keeper (celery_fleet.lease) returns
   what the worker dropped, and nothing it still runs.
4. kombu stamps deliveries and sweeps for expired ones with each host's own clock; both use
   the Redis server's clock instead (celery_fleet.clock).
5. An acknowledgement that cannot reach Redis (connection lost, pool exhausted) is logged by
   kombu and forgotten, so a finished task runs again after the visibility timeout. It is kept
   and delivered by the lease keeper once Redis answers, and acks on a channel that was closed
   by a connection loss go the same way.
6. Redis at ``maxmemory`` (``noeviction``) answers writes with ``OOM``, and Redis whose disk is
   full (it cannot append to its AOF) with ``MISCONF``: ``ResponseError``s that kombu and
   Celery's result backend treat as permanent. The worker's consumer died with "Unrecoverable
   error" and the running tasks, whose results could not be stored, ran again one lease later
   (seen: every task of the fault suite's maxmemory scenario ran twice; both workers restarted
   by systemd in the disk-full one). Both end when memory or disk frees, so both count as
   connection errors: the consumer reconnects, running tasks keep running, results and
   publishes are retried (a publish still fails once its retry policy is spent). redis-py has
   no class for ``MISCONF``; ``PersistenceError`` is registered for it. With Sentinel, the same
   holds for ``NOREPLICAS`` (a primary without enough replicas refuses writes: right after a
   failover, or cut off) and ``UNBLOCKED`` (a pop ended because its server became a replica):
   both pass once the connection follows the new primary.
7. A client waiting for results (``AsyncResult.get``, ``GroupResult.iter_native``) hears them on
   pub/sub. When that connection is lost, Celery's ``ResultConsumer._reconnect_pubsub`` reads
   the stored results (MGET) and only then subscribes again: a result stored between the two
   is neither read nor heard, and its caller waits until its timeout (tests/app/test_runtime.py
   stores a result in that window; seen in CI, most likely through it: 6 of 400 URLs of
   ``fleetapp fetch`` timed out after a Redis restart). Fixed: the stored results are read once
   more after the subscription (a result both read and heard is taken once).
8. A client whose Redis password is wrong (a stale env file, a rotation it slept through)
   waited about 15 s in ``send_task`` and then got ``RuntimeError: Retry limit exceeded while
   trying to reconnect to the Celery result store backend``: Celery's result consumer takes
   redis-py's ``AuthenticationError`` (a ``ConnectionError``) for a lost connection and retries
   it. Redis never accepts a refused password later, so it is raised at once, as an
   ``AuthenticationError`` that names the user and where its password comes from.
9. ``Task.retry`` publishes the retry and, when that publish fails (Redis unreachable, out of
   memory, a partition), raises ``Reject(requeue=False)`` (celery/app/task.py): the running
   message is acknowledged and dropped, and the retry was never stored, so the task is gone.
   tests/app/test_deadletter.py makes Redis refuse writes while a task retries: it never ran
   again. Fixed: when the publish failed for a reason that passes (the broker unreachable, out
   of memory or disk) and the task is acknowledged late, the message goes back to its queue
   (``requeue=True``) and runs again. Any other failure (arguments that do not serialize) keeps
   Celery's reject: requeued, it would fail the same way forever.
10. Each time a worker's configuration is read remotely (the ``conf`` control command, which
    Flower sends when it starts), Celery masks the broker URL by building a kombu
    ``Connection`` from it alone; for a ``rediss://`` URL kombu then logs "Secure redis scheme
    specified (rediss) with no ssl options, defaulting to insecure SSL behaviour" although no
    connection is made (seen in every worker's journal on the lab). A security warning that is
    false hides a true one: the broker URLs are masked like the backend's (``sanitize_url``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import ResponseError

logger = logging.getLogger("celery_fleet")

_applied = False


def apply() -> None:
    """Apply every fix once per process."""
    global _applied
    if _applied:
        return
    _patch_gevent_terminate()
    _patch_request_cancel()
    _patch_connection_loss_restore()
    _patch_kombu_clock()
    _patch_redis_ack()
    _patch_out_of_memory_is_transient()
    _patch_result_resubscribe()
    _patch_result_auth_fails_fast()
    _patch_retry_publish_failure_requeues()
    _patch_conf_censor_without_connection()
    _applied = True


def _patch_gevent_terminate() -> None:
    try:
        from celery.concurrency import gevent as gevent_pool
    except ImportError:  # gevent not installed: nothing to fix
        return

    def _make_killable_target(target: Callable[..., Any]) -> Callable[..., Any]:
        def killable_target(*args: Any, **kwargs: Any) -> Any:
            from billiard.einfo import ExceptionInfo
            from celery.exceptions import Terminated
            from greenlet import GreenletExit

            try:
                return target(*args, **kwargs)
            except GreenletExit:
                try:
                    raise Terminated("killed by terminate_job") from None
                except Terminated:
                    # (failed, retval, runtime): the request's on_failure sees Terminated.
                    return (True, ExceptionInfo(), None)

        return killable_target

    # A private staticmethod (celery PR #9083), not in the type stubs.
    gevent_pool.TaskPool._make_killable_target = staticmethod(_make_killable_target)  # type: ignore[attr-defined]


def _patch_request_cancel() -> None:
    from celery.worker.request import Request

    original = Request.cancel

    def cancel(self: Any, pool: Any, signal: Any = None, emit_retry: bool = True) -> Any:
        # Marked first: the killed task may report before cancel() returns.
        if self.time_start:
            self._already_cancelled = True
        return original(self, pool, signal=signal, emit_retry=emit_retry)

    Request.cancel = cancel  # type: ignore[method-assign]


def _patch_connection_loss_restore() -> None:
    from celery.worker.consumer.consumer import Consumer

    original = Consumer.on_connection_error_after_connected

    def on_connection_error_after_connected(self: Any, exc: Exception) -> Any:
        transport = getattr(self.connection, "_transport", None)
        for channel in list(getattr(transport, "channels", None) or []):
            channel.do_restore = False
        return original(self, exc)

    Consumer.on_connection_error_after_connected = on_connection_error_after_connected  # type: ignore[method-assign]


def _patch_kombu_clock() -> None:
    from kombu.transport import redis as kombu_redis

    from celery_fleet import clock

    # The module's `from time import time`, used for stamps only (not in the type stubs).
    kombu_redis.time = clock.now  # type: ignore[attr-defined]


def _patch_redis_ack() -> None:
    from kombu.transport import redis as kombu_redis
    from kombu.transport.virtual import QoS as VirtualQoS

    from celery_fleet import lease

    def remove(qos: Any, delivery_tag: str) -> None:
        # Removed now or by the keeper: either way not a message to give back.
        lease.settled(delivery_tag)
        if qos.channel.closed:
            lease.defer_ack(delivery_tag)
            return
        try:
            qos._remove_from_indices(delivery_tag).execute()
        except Exception as exc:  # whatever failed, the keeper retries it
            logger.warning("ack of %s deferred until Redis answers (%r)", delivery_tag, exc)
            lease.defer_ack(delivery_tag)

    def ack(self: Any, delivery_tag: str) -> None:
        remove(self, delivery_tag)
        VirtualQoS.ack(self, delivery_tag)

    def reject(self: Any, delivery_tag: str, requeue: bool = False) -> None:
        if not requeue:
            remove(self, delivery_tag)
        elif not self.channel.closed:
            try:
                self.restore_by_tag(delivery_tag, leftmost=True)
                lease.settled(delivery_tag)
            except Exception as exc:
                # Still in unacked and no longer held here: the keeper requeues it.
                logger.warning("requeue of %s left to the lease keeper (%r)", delivery_tag, exc)
        VirtualQoS.ack(self, delivery_tag)

    kombu_redis.QoS.ack = ack  # type: ignore[method-assign]
    kombu_redis.QoS.reject = reject  # type: ignore[method-assign]


class PersistenceError(ResponseError):
    """``MISCONF``: Redis refuses writes because it cannot persist them (e.g. its disk is full)."""


class ReplicasMissingError(ResponseError):
    """``NOREPLICAS``: a primary refuses writes while too few replicas follow it (after a
    failover until a replica has caught up, or cut off from them)."""


class UnblockedError(ResponseError):
    """``UNBLOCKED``: a blocking pop was ended because its server stopped being the primary."""


def _patch_out_of_memory_is_transient() -> None:
    import celery.backends.redis as celery_redis
    from kombu.transport import redis as kombu_redis
    from redis._parsers.base import BaseParser
    from redis.exceptions import OutOfMemoryError

    # Every parser (Python and hiredis) maps error prefixes through this class attribute.
    BaseParser.EXCEPTION_CLASSES["MISCONF"] = PersistenceError
    BaseParser.EXCEPTION_CLASSES["NOREPLICAS"] = ReplicasMissingError
    BaseParser.EXCEPTION_CLASSES["UNBLOCKED"] = UnblockedError
    transient = (OutOfMemoryError, PersistenceError, ReplicasMissingError, UnblockedError)
    original = kombu_redis.get_redis_error_classes

    def get_redis_error_classes() -> Any:
        classes = original()
        # Checked before the channel errors (ResponseError, their base class) by kombu and Celery.
        return classes._replace(connection_errors=(*classes.connection_errors, *transient))

    # Celery's RedisBackend calls it when created; kombu's Transport (and the Sentinel one, its
    # subclass) read it once, into class attributes, when kombu's module was imported.
    kombu_redis.get_redis_error_classes = get_redis_error_classes
    celery_redis.get_redis_error_classes = get_redis_error_classes  # type: ignore[attr-defined]
    transport = kombu_redis.Transport
    missing = tuple(error for error in transient if error not in transport.connection_errors)
    transport.connection_errors = (*transport.connection_errors, *missing)


def _patch_result_resubscribe() -> None:
    from celery.backends.redis import ResultConsumer  # type: ignore[attr-defined]  # not in the stubs

    original = ResultConsumer._reconnect_pubsub

    def _reconnect_pubsub(self: Any) -> None:
        # Under the consumer's lock, as Celery's own: no drain or subscribe runs in between.
        with self._locked():
            original(self)
            keys = list(self.subscribed_to)  # results read by the first MGET are unsubscribed
            if not keys:
                return
            for meta in self.backend.client.mget(keys):
                if meta:
                    self.on_state_change(self._decode_result(meta), None)

    ResultConsumer._reconnect_pubsub = _reconnect_pubsub


def refused_password(exc: Exception, username: str | None) -> Exception:
    """The error a client gets when Redis refuses its password: who, and where it came from."""
    from redis.exceptions import AuthenticationError

    return AuthenticationError(
        f"Redis refused the password of user {username or 'default'!r} ({exc}): the application's"
        " settings (CELERY_RESULT_BACKEND / CELERY_BROKER_URL, on a fleet host"
        " /etc/celery-fleet/app.env) hold a password Redis does not accept; deploy again"
        " (site.yml), or finish playbooks/rotate-secrets.yml"
    )


def _patch_result_auth_fails_fast() -> None:
    import contextlib
    import importlib
    from collections.abc import Iterator

    from redis.exceptions import AuthenticationError

    # Not in celery-types' stubs.
    asynchronous: Any = importlib.import_module("celery.backends.asynchronous")

    # Celery 5.7's own, with the refused password raised before the reconnection attempts.
    @contextlib.contextmanager
    def reconnect_on_error(self: Any) -> Iterator[None]:
        try:
            yield
        except TimeoutError:  # socket.timeout: drain_events(timeout=N) polling, not an error
            raise
        except AuthenticationError as exc:
            raise refused_password(exc, self.backend.connparams.get("username")) from exc
        except self._connection_errors:
            try:
                self._reconnect()
            except self._connection_errors as exc:
                logger.critical(asynchronous.E_RETRY_LIMIT_EXCEEDED)
                raise RuntimeError(asynchronous.E_RETRY_LIMIT_EXCEEDED) from exc

    asynchronous.BaseResultConsumer.reconnect_on_error = reconnect_on_error


def _patch_retry_publish_failure_requeues() -> None:
    from celery.app.task import Task
    from celery.exceptions import Reject
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import OutOfMemoryError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    # What passes: the broker away or refusing writes for now. A publish that can never succeed
    # (arguments that do not serialize) keeps Celery's reject, or it would run again forever.
    transient = (
        OperationalError,
        RedisConnectionError,
        RedisTimeoutError,
        OutOfMemoryError,
        PersistenceError,
    )
    original = Task.retry

    def retry(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        except Reject as rejected:
            # Only the Reject of a failed publish: its reason is the publish's exception.
            # (Reject's attributes are not in the type stubs.) A task acknowledged when it
            # started cannot go back to its queue: it keeps Celery's outcome (a failure).
            reason, requeue = getattr(rejected, "reason", None), getattr(rejected, "requeue", None)
            if (
                requeue
                or not isinstance(reason, transient)
                or not getattr(self, "acks_late", False)
            ):
                raise
            logger.warning(
                "retry of %s[%s] could not be published (%r): the task goes back to its queue",
                self.name,
                self.request.id,
                reason,
            )
            raise Reject(reason, requeue=True) from rejected

    Task.retry = retry  # type: ignore[method-assign]


def _patch_conf_censor_without_connection() -> None:
    from celery.app import utils as app_utils

    original = app_utils.filter_hidden_settings
    sanitize_url = app_utils.sanitize_url  # type: ignore[attr-defined]  # not in the stubs
    broker_urls = ("broker_url", "broker_read_url", "broker_write_url")

    def masked(value: Any) -> Any:
        if isinstance(value, str):
            return sanitize_url(value)
        if isinstance(value, list | tuple):  # failover: each URL masked
            return type(value)(masked(url) for url in value)
        return value

    def urls_only(value: Any) -> bool:
        if isinstance(value, list | tuple):
            return all(isinstance(url, str) for url in value)
        return isinstance(value, str)

    def filter_hidden_settings(conf: Any) -> Any:
        # Strings and lists of them only; anything else goes through Celery's own filter.
        urls = {k: v for k, v in conf.items() if str(k).lower() in broker_urls and urls_only(v)}
        rest = original({key: value for key, value in conf.items() if key not in urls})
        return {**rest, **{key: masked(value) for key, value in urls.items()}}

    # Read from the module's globals by Settings.table (the conf command).
    app_utils.filter_hidden_settings = filter_hidden_settings
