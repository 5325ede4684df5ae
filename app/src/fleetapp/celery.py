"""The Celery app: ``celery -A fleetapp.celery worker``.

Configured entirely from the environment (see fleetapp.config). Task modules are listed
explicitly so a worker registers exactly the names a client sends (the tutorial's
"Received unregistered task" trap came from names derived from module paths).
"""

from __future__ import annotations

import sys

from celery import Celery

from fleetapp.celeryconfig import celery_config
from fleetapp.config import ConfigError, Settings, load_settings

TASK_MODULES = ["fleetapp.tasks.web", "fleetapp.tasks.arith"]

__all__ = ["TASK_MODULES", "app", "celery_config", "create_app"]


def create_app(settings: Settings | None = None) -> Celery:
    """A configured app; tests build their own with a different environment."""
    settings = settings or load_settings()
    celery_app = Celery("fleetapp", include=TASK_MODULES)
    celery_app.config_from_object(celery_config(settings))
    celery_app.fleet_settings = settings  # type: ignore[attr-defined]
    # Import the task modules now, so a client knows the same names a worker registers.
    celery_app.loader.import_default_modules()
    return celery_app


try:
    app = create_app()
except ConfigError as exc:
    # A worker started by systemd shows this one line in the journal instead of a traceback.
    sys.exit(f"fleetapp: configuration error: {exc}")
