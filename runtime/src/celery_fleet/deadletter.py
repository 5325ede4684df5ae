"""Dead letters: a task that keeps killing the worker running it is parked, not run forever.

With late acknowledgement and ``task_reject_on_worker_lost``, a task whose execution kills its
process (a segfault in a C extension, the kernel's OOM killer, ``os._exit``) goes back to its
queue each time, and kills the next worker that takes it, for ever. So:

* a prefork pool child counts each *start* of a redelivered task in ``_fleet.starts.<task id>``
  (the first delivery of a message costs no round trip; the count expires after a week). Only
  prefork: a child runs one task, so its death is that task's; when a gevent, threads or solo
  worker dies, every task it ran dies with it, and counting them would park the innocent ones
  (run native code that may crash in a prefork queue);
* when such a message reaches a worker again after it has started ``FLEET_MAX_TASK_STARTS``
  times (5 by default) without finishing, the worker moves it, atomically, from its processing
  list to ``_fleet.dead.<queue>`` instead of running it, and logs an error.

``fleet-doctor`` lists what is parked. An operator who fixed the cause puts a message back with
``LMOVE _fleet.dead.<queue> <queue> RIGHT LEFT`` (and ``DEL _fleet.starts.<task id>``).
A task that finishes, fails or retries is never parked: only starts that never ended count.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import task_postrun, task_prerun

from celery_fleet.config import max_task_starts

STARTS_PREFIX = "_fleet.starts."
DEAD_PREFIX = "_fleet.dead."
STARTS_TTL = 7 * 24 * 3600

logger = logging.getLogger(__name__)


def starts_key(task_id: str) -> str:
    return STARTS_PREFIX + task_id


def dead_key(queue: str) -> str:
    return DEAD_PREFIX + queue


def install() -> None:
    task_prerun.connect(_count_start, weak=False, dispatch_uid="celery_fleet.deadletter.start")
    task_postrun.connect(_forget_starts, weak=False, dispatch_uid="celery_fleet.deadletter.end")


def _redelivered(task: Any) -> bool:
    return bool((getattr(task.request, "delivery_info", None) or {}).get("redelivered"))


def _in_prefork_child() -> bool:
    from billiard.process import current_process

    return str(current_process().name).startswith("ForkPoolWorker")


def _with_client(task: Any, action: str, do: Any) -> None:
    """Run do(client, prefix) on a short-lived broker connection; never fails the task."""
    options = dict(task.app.conf.broker_transport_options or {})
    options["max_retries"] = 0  # one attempt: Redis down must not hold the task up
    try:
        with task.app.connection_for_write(transport_options=options) as connection:
            channel = connection.default_channel
            do(channel.client, channel.global_keyprefix)
    except Exception as exc:
        logger.warning("dead letters: could not %s for %s (%r)", action, task.request.id, exc)


def _count_start(sender: Any = None, task_id: str | None = None, **kwargs: Any) -> None:
    # Only redelivered messages pay a round trip: a first delivery is the implicit first start.
    if sender is None or task_id is None or not _redelivered(sender) or not _in_prefork_child():
        return
    key = starts_key(task_id)

    def count(client: Any, prefix: str) -> None:
        # INCR and EXPIRE are not among the commands kombu's client prefixes.
        client.pipeline().incr(prefix + key).expire(prefix + key, STARTS_TTL).execute()

    _with_client(sender, "count a start", count)


def _forget_starts(sender: Any = None, task_id: str | None = None, **kwargs: Any) -> None:
    # It ended (success, failure or retry): earlier starts that died are no longer a pattern.
    if sender is None or task_id is None or not _redelivered(sender):
        return
    key = starts_key(task_id)
    # DEL is among the commands kombu's client prefixes.
    _with_client(sender, "forget its starts", lambda client, prefix: client.delete(key))


def should_park(client: Any, prefix: str, payload: dict[str, Any]) -> str | None:
    """The task id, when this delivery must be parked instead of run."""
    headers = payload.get("headers") or {}
    task_id = headers.get("id")
    if not headers.get("redelivered") or not task_id:
        return None
    counted = int(client.get(prefix + starts_key(task_id)) or 0)
    # counted: starts of redeliveries; the first delivery started once more, uncounted.
    return str(task_id) if counted + 1 >= max_task_starts() else None


def park(client: Any, queue: str, processing_key: str, raw: bytes, task_id: str, name: str) -> None:
    """Out of the worker's processing list and into the queue's dead letters, in one MULTI."""
    # LPUSH and DEL are prefixed by kombu's client; processing_key is already a full key.
    client.pipeline().lpush(dead_key(queue), raw).lrem(processing_key, 1, raw).delete(
        starts_key(task_id)
    ).execute()
    logger.error(
        "parked %s[%s] in %s: it started %d times and never finished (its worker died each time)",
        name,
        task_id,
        dead_key(queue),
        max_task_starts(),
    )
