"""The webfarm stand-in for the internet."""

from __future__ import annotations

import threading
import time

import requests
from fleettest import webfarm as farm


def test_endpoints(webfarm):
    base = webfarm.url
    started = time.monotonic()
    r = requests.get(f"{base}/delay/0.3", timeout=5)
    assert r.status_code == 200 and r.json()["delay"] == 0.3
    assert time.monotonic() - started >= 0.3
    assert requests.get(f"{base}/status/418", timeout=5).status_code == 418
    assert len(requests.get(f"{base}/bytes/123456", timeout=5).content) == 123456
    r = requests.get(f"{base}/redirect/3", timeout=5)
    assert r.status_code == 200 and len(r.history) == 3
    assert requests.get(f"{base}/nope", timeout=5).status_code == 404
    assert sum(farm.TUTORIAL_DELAYS) == 7.6


def test_hang_does_not_block_shutdown():
    server = farm.serve("127.0.0.1", 0)
    errors: list[BaseException] = []

    def hang() -> None:
        try:
            requests.get(f"{server.url}/hang", timeout=30)
        except requests.RequestException as exc:
            errors.append(exc)

    thread = threading.Thread(target=hang, daemon=True)
    thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 2
    thread.join(5)
    assert not thread.is_alive()


def test_webhook_records_what_is_posted_and_refuses_what_is_not_json(webfarm):
    hook = f"{webfarm.url}/webhook/alerts"
    assert requests.post(hook, json={"status": "firing"}, timeout=5).status_code == 200
    assert requests.post(hook, data=b"not json", timeout=5).status_code == 400
    received = requests.get(hook, timeout=5).json()["received"]
    assert [entry["body"] for entry in received] == [{"status": "firing"}]
    assert requests.delete(hook, timeout=5).status_code == 200
    assert requests.get(hook, timeout=5).json()["received"] == []
