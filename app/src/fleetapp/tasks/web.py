"""Network-bound tasks (routed to the network queue, run by gevent workers)."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task, shared_task
from celery.result import AsyncResult

from fleetapp.config import IPNetwork, Settings, load_settings
from fleetapp.fetching import (
    DEFAULT_MAX_BYTES,
    DEFAULT_TIMEOUT,
    RETRIES,
    FetchResult,
    backoff,
    fetch_once,
    validate_url,
)


def _allowed_networks(app: Celery) -> tuple[IPNetwork, ...]:
    """FLEETAPP_FETCH_ALLOW_NETWORKS as the worker's app was configured with it."""
    settings = getattr(app, "fleet_settings", None)  # set by fleetapp.celery.create_app
    if not isinstance(settings, Settings):
        # Another app that includes these tasks: the same variables, read now.
        settings = load_settings()
    return settings.fetch_allow_networks


class FetchTask(Task[Any, Any]):
    """Validates the URL on the sending side too, so a bad URL never gets enqueued."""

    def apply_async(
        self,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        *rest: Any,
        **options: Any,
    ) -> AsyncResult[Any]:
        # *rest: Task.apply_async's other positional parameters (task_id, producer, ...).
        url = args[0] if args else (kwargs or {}).get("url")
        validate_url(url)
        return super().apply_async(args, kwargs, *rest, **options)


@shared_task(bind=True, base=FetchTask, name="fleetapp.fetch_url", max_retries=RETRIES)
def fetch_url(
    self: Task[Any, Any],
    url: str,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> FetchResult:
    """Fetch one URL; returns a FetchResult dict (errors included), never raises for bad input.

    Connects only to public addresses and FLEETAPP_FETCH_ALLOW_NETWORKS (fleetapp.egress).
    """
    worker = self.request.hostname or "unknown"
    result, retryable = fetch_once(
        url,
        timeout=timeout,
        max_bytes=max_bytes,
        worker=worker,
        allow_networks=_allowed_networks(self.app),
    )
    # max_retries None is Celery's "retry forever" (this task sets RETRIES).
    if retryable and (self.max_retries is None or self.request.retries < self.max_retries):
        # Re-queued with a countdown: the pool slot is free while we wait.
        raise self.retry(countdown=backoff(self.request.retries))
    return result
