"""Which remote-control commands a worker obeys.

Celery sends every control and inspect command on one broadcast channel (the pidbox), so Redis'
ACL can say who may broadcast (workers, Flower and clients, which revoke tasks) but not what. The
worker decides: it answers every ``inspect`` command and obeys only the ``control`` commands
named in ``FLEET_WORKER_CONTROL_COMMANDS`` (comma-separated); any other (``shutdown``,
``pool_restart``, ``rate_limit``, ...) is refused with a reply that says so and a warning in its
journal.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from celery.signals import celeryd_init

from celery_fleet.config import ConfigError

logger = logging.getLogger("celery_fleet.control")

# Events for Flower, gossip between workers, and revoking a task: nothing that stops a worker.
DEFAULT_ALLOWED = ("enable_events", "heartbeat", "election", "revoke")


def control_commands() -> dict[str, Any]:
    """Celery's control commands (not inspect commands): {name: handler}."""
    from celery.worker.control import Panel

    return {name: Panel.data[name] for name, meta in Panel.meta.items() if meta.type == "control"}


def allowed(environ: Mapping[str, str] | None = None) -> set[str]:
    """The control commands this worker obeys (raises ConfigError for an unknown name)."""
    env = os.environ if environ is None else environ
    raw = env.get("FLEET_WORKER_CONTROL_COMMANDS")
    if raw is None:
        names: tuple[str, ...] = DEFAULT_ALLOWED
    else:
        names = tuple(name.strip() for name in raw.split(",") if name.strip())
    known = control_commands()
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ConfigError(
            f"FLEET_WORKER_CONTROL_COMMANDS: unknown control command(s) {', '.join(unknown)};"
            f" known: {', '.join(sorted(known))}"
        )
    return set(names)


def _refused(name: str) -> Any:
    def refuse(state: Any, **kwargs: Any) -> dict[str, str]:
        logger.warning("refused control command %r: not in FLEET_WORKER_CONTROL_COMMANDS", name)
        return {"error": f"control command {name!r} is not enabled on this worker"}

    return refuse


def restrict(names: set[str]) -> None:
    """Replace every control command outside ``names`` by a refusal (this process only)."""
    from celery.worker.control import Panel

    for name in control_commands():
        if name not in names:
            Panel.data[name] = _refused(name)


def _on_worker_init(**kwargs: Any) -> None:
    restrict(allowed())


def install() -> None:
    celeryd_init.connect(_on_worker_init, weak=False, dispatch_uid="celery_fleet.control")
