"""What celery_fleet.activate() changes in a process, checked in one run by fleet-python."""

from __future__ import annotations

from fleettest.commands import BIN, run

OOM_IS_A_LOST_CONNECTION = """
from celery import Celery
from redis.exceptions import OutOfMemoryError
app = Celery(broker="redis://127.0.0.1:1/0", backend="redis://127.0.0.1:1/1")
connection = app.connection_for_read()
print(
    OutOfMemoryError in connection.connection_errors,
    OutOfMemoryError in connection.recoverable_connection_errors,
    OutOfMemoryError in app.backend.connection_errors,
)
"""


def test_redis_out_of_memory_counts_as_a_lost_connection():
    """Fix 6: kombu's consumer and publisher and Celery's result backend retry an OOM answer."""
    proc = run([str(BIN / "fleet-python"), "-c", OOM_IS_A_LOST_CONNECTION])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "True"]
