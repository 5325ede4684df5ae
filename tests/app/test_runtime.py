"""What celery_fleet.activate() changes in a process, checked in one run by fleet-python."""

from __future__ import annotations

from fleettest.commands import BIN, run

TRANSIENT_REFUSALS_ARE_LOST_CONNECTIONS = """
from celery import Celery
from redis._parsers.base import BaseParser
app = Celery(broker="redis://127.0.0.1:1/0", backend="redis://127.0.0.1:1/1")
connection = app.connection_for_read()
for answer in ("OOM command not allowed", "MISCONF Errors writing to the AOF file: No space left"):
    error = type(BaseParser.parse_error(answer))
    print(
        error.__name__,
        error in connection.connection_errors,
        error in connection.recoverable_connection_errors,
        error in app.backend.connection_errors,
    )
"""


def test_redis_refusing_writes_for_memory_or_disk_counts_as_a_lost_connection():
    """Fix 6: kombu's consumer and publisher and Celery's result backend retry OOM and MISCONF."""
    proc = run([str(BIN / "fleet-python"), "-c", TRANSIENT_REFUSALS_ARE_LOST_CONNECTIONS])
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert lines == [
        ["OutOfMemoryError", "True", "True", "True"],
        ["PersistenceError", "True", "True", "True"],
    ]
