"""Real workers over a real, password-protected Redis: tasks, routing, bad input, JSON only."""

from __future__ import annotations

import pickle
import re
import time
from pathlib import Path

import pytest
from celery.exceptions import TimeoutError as CeleryTimeoutError
from fleetapp.fanout import fetch_many
from fleetapp.fetching import InvalidURLError
from fleettest.local import free_port


def test_add_round_trip_runs_on_the_default_queue_worker(client_app):
    result = client_app.tasks["fleetapp.add"].delay(2, 3.5)
    assert result.get(timeout=10) == 5.5
    assert result.worker.startswith("default@")


@pytest.mark.parametrize("bad", [["1", 2], [True, 2], [None, 1], [[1], 2]])
def test_add_rejects_non_numbers(client_app, bad):
    result = client_app.send_task("fleetapp.add", args=bad)
    with pytest.raises(TypeError, match="must be a number"):
        result.get(timeout=10)


def test_fanout_fetches_on_the_network_workers(client_app, webfarm):
    urls = [f"{webfarm.url}/delay/1" for _ in range(10)]
    urls += [f"{webfarm.url}/status/404", f"{webfarm.url}/bytes/3000"]
    started = time.monotonic()
    results = list(fetch_many(urls, timeout=20, app=client_app))
    wall = time.monotonic() - started
    assert len(results) == len(urls)
    assert wall < 4, f"10 x 1 s fetches took {wall:.1f} s: not concurrent"
    assert all(r["worker"].startswith("net@") for r in results)
    by_url = {r["url"]: r for r in results}
    assert by_url[f"{webfarm.url}/status/404"]["status"] == 404
    assert by_url[f"{webfarm.url}/status/404"]["error"]["code"] == "http_status"
    assert by_url[f"{webfarm.url}/bytes/3000"]["bytes"] == 3000
    assert sum(1 for r in results if r["ok"]) == 11


def test_a_fan_out_that_times_out_names_each_unanswered_task(client_app, webfarm):
    # The page never answers, so the fetch outlives the fan-out's own deadline.
    [result] = fetch_many([f"{webfarm.url}/hang"], timeout=1, fetch_timeout=5, app=client_app)
    assert result["error"]["code"] == "timeout" and result["worker"] == "?"
    task_id = re.search(r"\(task ([0-9a-f-]{36})\)", result["error"]["message"])
    assert task_id, result


def test_client_side_validation_enqueues_nothing(client_app, redis_server):
    import redis

    client = redis.Redis.from_url(client_app.conf.broker_url)
    before = client.llen("network")
    for bad in ["ftp://example.org/", "not a url", "http://"]:
        with pytest.raises(InvalidURLError):
            list(fetch_many([bad], app=client_app))
        with pytest.raises(InvalidURLError):
            client_app.tasks["fleetapp.fetch_url"].delay(bad)
    assert client.llen("network") == before
    client.close()


@pytest.mark.timeout(60)
def test_bad_inputs_give_structured_errors_and_the_worker_survives(client_app, webfarm, fleet):
    closed = free_port()
    cases = {
        "not a url": "invalid_url",
        "gopher://example.org/": "unsupported_scheme",
        "http://no-such-host.invalid/": "dns",
        f"http://127.0.0.1:{closed}/": "refused",
        f"{webfarm.url}/hang": "timeout",
        f"{webfarm.url}/bytes/100000": "too_large",
    }
    # send_task bypasses the client-side validation: what a buggy or hostile client would do.
    sent = {
        url: client_app.send_task(
            "fleetapp.fetch_url", args=[url], kwargs={"timeout": 2, "max_bytes": 50000}
        )
        for url in cases
    }
    sent[123] = client_app.send_task("fleetapp.fetch_url", args=[123])
    sent["timeout-bool"] = client_app.send_task(
        "fleetapp.fetch_url", args=[f"{webfarm.url}/delay/0"], kwargs={"timeout": True}
    )
    for key, result in sent.items():
        value = result.get(timeout=30)
        assert value["ok"] is False, (key, value)
        expected = {123: "invalid_url", "timeout-bool": "invalid_timeout"}.get(key, cases.get(key))
        assert value["error"]["code"] == expected, (key, value)
        assert value["worker"].startswith("net@")
    # Still alive and serving.
    assert fleet.net.alive() and fleet.default.alive()
    ok = client_app.tasks["fleetapp.fetch_url"].delay(f"{webfarm.url}/delay/0.1").get(timeout=10)
    assert ok["ok"] and ok["status"] == 200
    replies = client_app.control.ping(timeout=1)
    assert {name.split("@")[0] for reply in replies for name in reply} >= {"net", "default"}


def test_pickle_message_is_rejected_not_executed(client_app, fleet, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    # A hand-made pickle message: if the worker unpickled it, Path.touch would run.
    payload = pickle.dumps(((Evil(),), {}, {"callbacks": None, "errbacks": None}))
    with client_app.producer_or_acquire() as producer:
        producer.publish(
            payload,
            routing_key="default",
            exchange="default",
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"lang": "py", "task": "fleetapp.add", "id": "evil-1", "argsrepr": "()"},
            serializer=None,
        )
    result = client_app.AsyncResult("evil-1")
    with pytest.raises(CeleryTimeoutError):
        result.get(timeout=3)
    result.forget()  # stop waiting for it (else its __del__ runs after Redis is gone)
    assert not marker.exists()
    assert "ContentDisallowed" in fleet.default.text() or "untrusted" in fleet.default.text()
    assert client_app.tasks["fleetapp.add"].delay(1, 1).get(timeout=10) == 2


@pytest.mark.timeout(150)
def test_urls_not_sent_while_the_broker_stays_away_come_back_as_errors(fleet, webfarm):
    """A publish rides out a restart (about 20 s of tries); a broker that stays away past that
    turns the URLs into not_sent errors, without trying the rest, instead of a crash."""
    from fleetapp.celery import create_app
    from fleetapp.config import load_settings

    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    env = {**fleet.env, "CELERY_BROKER_URL": nowhere, "CELERY_RESULT_BACKEND": nowhere}
    app = create_app(load_settings(env))
    urls = [f"{webfarm.url}/delay/0?n={n}" for n in range(3)]
    started = time.monotonic()
    results = list(fetch_many(urls, timeout=5, app=app))
    assert [(r["url"], r["error"]["code"]) for r in results] == [(u, "not_sent") for u in urls]
    assert "unreachable" in results[0]["error"]["message"]
    assert time.monotonic() - started > 15  # it did ride for a while
    app.close()
