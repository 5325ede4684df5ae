"""A worker app with the poison pill: a task that kills the process running it, every time.

Borrows fleetapp's configuration (broker, queues) like trap_blog; run as ``-A poison``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from celery import Celery, Task
from fleetapp.celeryconfig import celery_config
from fleetapp.config import load_settings

app = Celery("poison")
app.config_from_object(celery_config(load_settings()))


@app.task(name="poison.crash")
def crash(marker: str) -> None:
    with Path(marker).open("a") as starts:
        starts.write(f"{os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)  # as a segfault or the OOM killer would


@app.task(name="poison.echo")
def echo(value: int) -> int:
    return value


@app.task(name="poison.hold")
def hold(seconds: float) -> float:
    """Holds its worker's only slot (solo pool: the consumer loop too)."""
    time.sleep(seconds)
    return seconds


@app.task(bind=True, name="poison.retry_once", acks_late=True)
def retry_once(self: Task[Any, Any], marker: str, go: str) -> str:
    """First start: wait for the test's go (it makes Redis refuse writes), then retry. After that:
    done. A retry whose publish failed must not lose the task (celery_fleet.patches, fix 9)."""
    with Path(marker).open("a") as starts:
        starts.write(f"{self.request.retries}\n")
    if len(Path(marker).read_text().split()) > 1:
        return "done"
    deadline = time.monotonic() + 30
    while not Path(go).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    raise self.retry(countdown=0)


@app.task(bind=True, name="poison.retry_unserializable", acks_late=True)
def retry_unserializable(self: Task[Any, Any], marker: str) -> None:
    """A retry that can never be published (its arguments are not JSON): it must not loop."""
    with Path(marker).open("a") as starts:
        starts.write(f"{self.request.retries}\n")
    raise self.retry(args=(marker, object()))
