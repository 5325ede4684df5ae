"""celery-fleet's runtime: loaded into every Celery process the fleet starts (``fleet-celery``).

It changes no application code. ``activate()`` applies the fixes in :mod:`celery_fleet.patches`
and, in a worker, adds the lease keeper (:mod:`celery_fleet.lease`) to the consumer.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "activate"]


def activate() -> None:
    """Apply the fleet's fixes and hooks to this process (idempotent)."""
    from celery_fleet import lease, patches, transport

    patches.apply()
    transport.install()
    lease.install()
