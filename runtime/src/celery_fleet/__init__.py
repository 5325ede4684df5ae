"""celery-fleet's runtime: loaded into every Celery process the fleet starts.

``fleet-celery`` (the ``celery`` command) and ``fleet-python`` (the Python interpreter) activate
it before the application is imported; it changes no application code. ``activate()`` gives every
Celery app the fleet's settings as defaults (:mod:`celery_fleet.config`), applies the fixes in
:mod:`celery_fleet.patches` and :mod:`celery_fleet.transport`, and, in a worker, adds the lease
keeper (:mod:`celery_fleet.lease`) to the consumer, obeys only the remote-control commands the
deployment enables (:mod:`celery_fleet.control`), parks tasks that keep killing their
worker (:mod:`celery_fleet.deadletter`) and feeds systemd's watchdog while the consumer consumes
(:mod:`celery_fleet.watchdog`).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "activate"]


def activate() -> None:
    """Apply the fleet's fixes and hooks to this process (idempotent)."""
    from celery_fleet import config, control, deadletter, lease, patches, transport, watchdog

    config.fleet_settings()  # a bad FLEET_* value fails here, in one line, not at first use
    control.allowed()
    config.install()
    patches.apply()
    transport.install()
    lease.install()
    deadletter.install()
    control.install()
    watchdog.install()
