# A task in a package: Celery names it pack.celery_fetch.fetch_length.
import requests

from celery_config import app


@app.task
def fetch_length(url):
    return len(requests.get(url, timeout=30).content)
