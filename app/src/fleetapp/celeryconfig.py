"""Celery settings derived from fleetapp.config.Settings (the tutorial's "config in its own
module", minus the hard-coded broker): importing this has no side effects.
"""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue

from fleetapp.config import Settings

# Task names that spend their time waiting on the network: routed to the (gevent) network queue.
NETWORK_TASKS = ("fleetapp.fetch_url",)

# Bounded socket behaviour, so neither a client nor a worker blocks for minutes when Redis
# vanishes (defaults: no socket timeout on the broker, 120 s on the backend).
SOCKET_TIMEOUT = 15.0
SOCKET_CONNECT_TIMEOUT = 5.0
HEALTH_CHECK_INTERVAL = 10


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for these settings (a plain dict, easy to inspect in tests)."""
    ssl_options = settings.ssl_options
    routes = {name: {"queue": settings.network_queue} for name in NETWORK_TASKS}
    # One direct exchange per queue, bound by the queue's name: a bare Queue(name) would be
    # bound to the default exchange with the default routing key, so a message routed to one
    # queue would be copied into the other.
    names = dict.fromkeys([settings.default_queue, settings.network_queue])
    queues = [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in names]
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        # JSON only: a pickle message must never be deserialized (remote code execution).
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Flower (on the monitor host) needs the events.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        # Store the worker's hostname with each result, so the client can say who ran it.
        "result_extended": True,
        # At-least-once: ack after the task ran, requeue if the worker died mid-task, and
        # take one message at a time so a long task does not hold others hostage.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # A task running when the broker connection drops keeps running and acknowledges
        # once Redis answers: with the Redis transport a message is not tied to a connection,
        # and celery-fleet's lease keeper holds it meanwhile (cancelling would run it twice).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # A result that cannot be stored while Redis restarts is stored when it is back,
        # instead of turning a task that ran into a FAILURE (about five minutes of tries).
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            "socket_timeout": SOCKET_TIMEOUT,
            "socket_connect_timeout": SOCKET_CONNECT_TIMEOUT,
            "socket_keepalive": True,
            "health_check_interval": HEALTH_CHECK_INTERVAL,
            # The lease on a delivered message (renewed by the worker that holds it): a message
            # whose worker vanished comes back once it expires; sweep every 10 s, not ~100 s.
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            # The sweep's lock. A worker cut off while holding it (a Redis restart) blocks
            # every sweep until it expires: kombu's 300 s would add five minutes. Restores are
            # WATCH transactions, so a second sweeper cannot restore a message twice.
            "unacked_mutex_expire": 30,
            # One list per queue (no priority sub-lists), so a worker can take a message with
            # one atomic BLMOVE (celery-fleet's runtime: no message lost between pop and record).
            "priority_steps": [0],
        },
        "result_backend_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            "retry_policy": {"timeout": SOCKET_TIMEOUT},
        },
        "redis_socket_timeout": SOCKET_TIMEOUT,
        "redis_socket_connect_timeout": SOCKET_CONNECT_TIMEOUT,
        "redis_socket_keepalive": True,
        "redis_backend_health_check_interval": HEALTH_CHECK_INTERVAL,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": SOCKET_CONNECT_TIMEOUT,
        # A client publishing while Redis is down fails in seconds instead of retrying forever.
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        "broker_use_ssl": ssl_options,
        "redis_backend_use_ssl": ssl_options,
        "result_expires": 24 * 3600,
        "task_time_limit": settings.task_time_limit,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_default_queue": settings.default_queue,
        "task_queues": queues,
        "task_routes": routes,
        # Workers started with -Q <other name> still get that queue declared.
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": True,
    }
