# The tutorial's fan-out: fetch_url is a task; func sends one per URL and returns at once.
import requests

from celery_config import app


@app.task
def fetch_url(url):
    resp = requests.get(url, timeout=30)
    print(url, resp.status_code)
    return resp.status_code


def func(urls):
    for url in urls:
        fetch_url.delay(url)
