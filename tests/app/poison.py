"""A worker app with the poison pill: a task that kills the process running it, every time.

Borrows fleetapp's configuration (broker, queues) like trap_blog; run as ``-A poison``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from celery import Celery
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
