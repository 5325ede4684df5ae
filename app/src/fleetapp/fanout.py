"""Fan-out: many fetch_url calls at once, results yielded as they arrive.

    for result in fetch_many(urls, timeout=60):
        progress.advance(...)

The calls go out over a single connection and producer, and the results come back over the
result backend's pub/sub as each task finishes, not in input order. A publish rides out a broker
restart (PUBLISH_RETRY_POLICY); when the broker stays away, the URLs not sent come back as
``not_sent`` errors and the ones sent are still collected.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any, cast

from celery import Celery, uuid
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult, GroupResult
from kombu.exceptions import OperationalError

from fleetapp.config import IPNetwork
from fleetapp.fetching import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT, FetchResult, fetch, validate_url

FETCH_TASK = "fleetapp.fetch_url"
# About 20 s of tries per publish: long enough to ride out a Redis restart, so a fan-out under
# way loses no URL to it; the deployment's default (a couple of seconds) suits callers that
# must not block.
PUBLISH_RETRY_POLICY = {
    "max_retries": 12,
    "interval_start": 0.5,
    "interval_step": 0.5,
    "interval_max": 2.0,
}


def _from_meta(url: str, meta: dict[str, Any]) -> FetchResult:
    """A FetchResult from a result-backend meta dict (a failed task becomes an error result)."""
    status = meta.get("status")
    result = meta.get("result")
    if status == "SUCCESS" and isinstance(result, dict):
        return cast(FetchResult, result)  # what fetch_url returns
    if isinstance(result, BaseException):
        exc_type, message = type(result).__name__, f"{type(result).__name__}: {result}"
    elif isinstance(result, dict) and "exc_type" in result:
        exc_type = str(result.get("exc_type"))
        message = f"{exc_type}: {result.get('exc_message')}"
    else:
        exc_type, message = "", f"task ended in state {status}"
    # A worker that does not know the task name stores NotRegistered: the tutorial's trap.
    code = "unregistered" if exc_type == "NotRegistered" else "task_failed"
    return _error_result(url, code, message[:300], worker=str(meta.get("worker") or "?"))


def _error_result(url: str, code: str, message: str, *, worker: str = "?") -> FetchResult:
    return {
        "url": url,
        "final_url": None,
        "status": None,
        "elapsed": 0.0,
        "bytes": 0,
        "ok": False,
        "error": {"code": code, "message": message},
        "worker": worker,
    }


def fetch_many(
    urls: Iterable[str],
    *,
    timeout: float = 60.0,
    fetch_timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    app: Celery | None = None,
) -> Iterator[FetchResult]:
    """Fetch every URL on the workers; yield each result as it arrives.

    Every URL is validated before anything is sent (InvalidURLError, nothing enqueued).
    URLs without a result after ``timeout`` seconds overall are yielded as ``timeout``
    errors with worker "?" and their tasks revoked.
    """
    url_list = [validate_url(url) for url in urls]
    if not url_list:
        return
    if app is None:
        from fleetapp.celery import app as default_app

        app = default_app
    fetch_url = app.tasks[FETCH_TASK]
    children: list[AsyncResult[Any]] = []
    not_sent: list[str] = []
    reason = ""
    with app.producer_or_acquire() as producer:
        for url in url_list:
            if not_sent:  # the broker stayed away: the rest is not tried
                not_sent.append(url)
                continue
            try:
                children.append(
                    fetch_url.apply_async(
                        (url,),
                        {"timeout": fetch_timeout, "max_bytes": max_bytes},
                        producer=producer,
                        retry=True,
                        retry_policy=PUBLISH_RETRY_POLICY,
                    )
                )
            except (OperationalError, RuntimeError) as exc:
                # Before the publish, Celery subscribes to the task's result; when the result
                # store stays away it gives up with this RuntimeError.
                if isinstance(exc, RuntimeError) and "result store" not in str(exc):
                    raise
                not_sent.append(url)
                reason = " ".join(f"not sent, the broker is unreachable: {exc}".split())[:300]
    for url in not_sent:
        yield _error_result(url, "not_sent", reason)
    if not children:
        return
    group_result = GroupResult(uuid(), children, app=app)
    pending: dict[str, str] = {
        child.id: url for child, url in zip(children, url_list, strict=False)
    }
    try:
        for task_id, meta in group_result.iter_native(timeout=timeout, interval=0.1):
            sent_url = pending.pop(task_id, None)
            if sent_url is not None:
                yield _from_meta(sent_url, meta)
    except CeleryTimeoutError:
        pass
    if pending:
        # Nobody is waiting any more: don't let stragglers run later for nothing.
        group_result.revoke()
        for task_id, sent_url in pending.items():
            # The task's id lets a person find it (Flower, the workers' journals).
            yield _error_result(
                sent_url, "timeout", f"no result within {timeout:g} s (task {task_id})"
            )
    group_result.forget()


def fetch_sequential(
    urls: Iterable[str],
    *,
    fetch_timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    allow_networks: Iterable[IPNetwork] = (),
) -> Iterator[FetchResult]:
    """The tutorial's baseline: one URL after another, in this process, no Celery.

    ``allow_networks``: what a worker's FLEETAPP_FETCH_ALLOW_NETWORKS allows (Settings).
    """
    allow = tuple(allow_networks)
    for url in urls:
        yield fetch(
            url, timeout=fetch_timeout, max_bytes=max_bytes, worker="local", allow_networks=allow
        )


def timed(iterator: Iterator[FetchResult]) -> tuple[list[FetchResult], float]:
    """Drain an iterator; (results, wall seconds)."""
    started = time.monotonic()
    results = list(iterator)
    return results, time.monotonic() - started
