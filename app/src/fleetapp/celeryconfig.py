"""Celery settings derived from fleetapp.config.Settings (the tutorial's "config in its own
module", minus the hard-coded broker): importing this has no side effects.

Only what belongs to the application is here: names, queues, routes, serialization, events.
"""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue

from fleetapp.config import Settings

# Task names that spend their time waiting on the network: routed to the (gevent) network queue.
NETWORK_TASKS = ("fleetapp.fetch_url",)


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for these settings (a plain dict, easy to inspect in tests)."""
    ssl_options = settings.ssl_options
    routes = {name: {"queue": settings.network_queue} for name in NETWORK_TASKS}
    # One direct exchange per queue, bound by the queue's name: a bare Queue(name) would be
    # bound to the default exchange with the default routing key, so a message routed to one
    # queue would be copied into the other.
    names = dict.fromkeys([settings.default_queue, settings.network_queue])
    queues = [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in names]
    config: dict[str, Any] = {
        # Celery prefers CELERY_BROKER_URL / CELERY_RESULT_BACKEND from the environment, which is
        # how celery-fleet hands a deployed app its broker; these are for running it elsewhere.
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        # JSON only and task events come from celery-fleet's runtime (celery_fleet.config), which
        # every fleet host runs the app under; Celery's own defaults are JSON too.
        # Store the worker's hostname with each result, so the client can say who ran it.
        "result_extended": True,
        "task_default_queue": settings.default_queue,
        "task_queues": queues,
        "task_routes": routes,
        # Workers started with -Q <other name> still get that queue declared.
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": True,
    }
    # Deployment settings (acknowledgement, leases, timeouts, retries, time limits) are left to
    # the deployment: celery-fleet's runtime gives them as defaults, so they are not set here.
    if ssl_options is not None:
        config["broker_use_ssl"] = ssl_options
        config["redis_backend_use_ssl"] = ssl_options
    return config
