"""``fleetapp doctor`` and the pre-flight of ``fetch``/``add``: celery-fleet's doctor, with the
sample's exit codes. Every network call is bounded, so a dead Redis never hangs the CLI.
"""

from __future__ import annotations

from celery import Celery
from celery_fleet import doctor as fleet_doctor
from celery_fleet.doctor import Report, explain_missing

from fleetapp.config import Settings

# Exit codes (documented in the CLI's --help and the README); keep them stable.
EXIT_OK = 0
EXIT_FAILED = 1  # some fetches failed, a task raised, or doctor found another problem
EXIT_USAGE = 2  # bad arguments (argparse's own code too), including a bad URL
EXIT_CONFIG = 3  # invalid FLEETAPP_* setting
EXIT_BROKER_DOWN = 4  # Redis unreachable (refused, timeout, DNS)
EXIT_AUTH = 5  # Redis rejected the credentials (wrong/missing password, ACL)
EXIT_NO_WORKERS = 6  # no worker answered, or none consumes a queue a task is routed to
EXIT_UNKNOWN_TASK = 7  # the workers do not know a task the client sends
EXIT_TIMEOUT = 8  # results did not arrive within --timeout

__all__ = [
    "EXIT_AUTH",
    "EXIT_BROKER_DOWN",
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_NO_WORKERS",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_UNKNOWN_TASK",
    "EXIT_USAGE",
    "FleetError",
    "Report",
    "diagnose",
    "explain_missing",
    "preflight",
]


class FleetError(Exception):
    """An expected failure: printed as one line, mapped to an exit code, no traceback."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


def diagnose(app: Celery, settings: Settings, timeout: float = 2.0) -> Report:
    """Broker, workers, task names and queues; never raises for expected failures."""
    return fleet_doctor.diagnose(app, timeout=timeout)


def preflight(app: Celery, settings: Settings, names: list[str], timeout: float = 1.5) -> None:
    """Fail fast (FleetError) before sending: broker, auth, workers, task names."""
    try:
        fleet_doctor.preflight(app, names, timeout=timeout)
    except fleet_doctor.DoctorError as exc:
        raise FleetError(exc.exit_code, exc.message) from None
