"""The tutorial's trap, reproduced: a worker app whose task is named ``celery_blog.fetch_url``.

A fleetapp client sends ``fleetapp.fetch_url``; this worker answers "Received unregistered
task". Deliberately does not import fleetapp.celery or fleetapp.tasks (their shared tasks would
register the right names here too); it only borrows fleetapp's configuration.
"""

from __future__ import annotations

from celery import Celery
from fleetapp.celeryconfig import celery_config
from fleetapp.config import load_settings

app = Celery("celery_blog")
app.config_from_object(celery_config(load_settings()))


@app.task(name="celery_blog.fetch_url")
def fetch_url(url: str) -> str:
    return url
