"""Event publishing that gives up when Redis is gone, so a worker can still stop.

Celery's worker heartbeat publishes with ``retry=True`` and no retry policy, which kombu treats
as "retry forever"; with Redis unreachable the heartbeat timer then blocks the worker's event
loop and a SIGTERM'd worker hangs for minutes. Bounding those retries lets the heartbeat fail
(logged) and the warm shutdown proceed.
"""

from __future__ import annotations

from typing import Any

from celery.app.events import Events
from celery.events.dispatcher import EventDispatcher

# About three seconds of trying, then the event is dropped (heartbeats repeat anyway).
EVENT_RETRY_POLICY: dict[str, Any] = {
    "max_retries": 3,
    "interval_start": 0,
    "interval_step": 1,
    "interval_max": 1,
}


class BoundedEventDispatcher(EventDispatcher):
    # Not Celery's positional order (utcoffset comes before retry there, Event after
    # retry_policy): every Celery caller passes these by keyword, and **kwargs forwards them.
    def send(  # type: ignore[override]
        self,
        type: str,
        blind: bool = False,
        retry: bool = False,
        retry_policy: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        if retry and not retry_policy:
            retry_policy = EVENT_RETRY_POLICY
        return super().send(type, blind=blind, retry=retry, retry_policy=retry_policy, **kwargs)


class FleetEvents(Events):
    dispatcher_cls = "celery_fleet.events:BoundedEventDispatcher"
