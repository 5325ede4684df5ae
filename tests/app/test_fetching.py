"""The in-process fetch logic (what --sequential runs and what the task wraps)."""

from __future__ import annotations

import time

import pytest
from fleetapp import fetching
from fleetapp.fetching import InvalidURLError, fetch, fetch_once, validate_url
from fleettest.local import free_port


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("not a url", "invalid_url"),
        ("example.org/path", "invalid_url"),
        ("http://", "invalid_url"),
        ("http://host:99999/", "invalid_url"),
        ("ftp://example.org/file", "unsupported_scheme"),
        ("file:///etc/passwd", "unsupported_scheme"),
        ("javascript:alert(1)", "unsupported_scheme"),
        ("http://exa mple.org/", "invalid_url"),
        ("http://example.org/" + "a" * 3000, "invalid_url"),
        (123, "invalid_url"),
        (None, "invalid_url"),
    ],
)
def test_bad_urls_are_rejected(url, code):
    with pytest.raises(InvalidURLError) as info:
        validate_url(url)
    assert info.value.code == code
    result, retryable = fetch_once(url)
    assert result["ok"] is False and result["error"]["code"] == code and not retryable


def test_good_urls(webfarm, webfarm_allowed):
    assert validate_url("https://example.org/a?b=c") == "https://example.org/a?b=c"
    r = fetch(f"{webfarm.url}/delay/0.2", allow_networks=webfarm_allowed)
    assert r["ok"] and r["status"] == 200 and r["elapsed"] >= 0.2 and r["bytes"] > 0
    assert r["worker"] == "local" and r["error"] is None
    r = fetch(f"{webfarm.url}/redirect/2", allow_networks=webfarm_allowed)
    assert r["ok"] and r["final_url"].endswith("/delay/0")
    r = fetch(f"{webfarm.url}/bytes/5000", allow_networks=webfarm_allowed)
    assert r["ok"] and r["bytes"] == 5000


def test_http_errors_are_results_not_retried(webfarm, webfarm_allowed):
    started = time.monotonic()
    r = fetch(f"{webfarm.url}/status/503", allow_networks=webfarm_allowed)
    assert time.monotonic() - started < 1  # no backoff on HTTP errors
    assert r["status"] == 503 and not r["ok"] and r["error"]["code"] == "http_status"


def test_failures(webfarm, webfarm_allowed, monkeypatch):
    monkeypatch.setattr(fetching, "BACKOFF_BASE", 0.05)
    r = fetch(f"{webfarm.url}/bytes/2000", max_bytes=1000, allow_networks=webfarm_allowed)
    assert r["error"]["code"] == "too_large"
    # No Content-Length to trust: the cap applies while streaming too.
    r = fetch(f"{webfarm.url}/redirect/10", allow_networks=webfarm_allowed)
    assert r["error"]["code"] == "too_many_redirects"
    started = time.monotonic()
    r = fetch(f"{webfarm.url}/hang", timeout=1, allow_networks=webfarm_allowed)
    assert r["error"]["code"] == "timeout" and time.monotonic() - started < 3
    r = fetch("http://no-such-host.invalid/")
    assert r["error"]["code"] == "dns"
    started = time.monotonic()
    r = fetch(f"http://127.0.0.1:{free_port()}/", retries=2, allow_networks=webfarm_allowed)
    assert r["error"]["code"] == "refused"
    assert time.monotonic() - started >= 0.05 + 0.1  # two backoffs happened


def test_backoff_is_exponential_and_capped():
    assert [fetching.backoff(i) for i in range(6)] == [0.5, 1, 2, 4, 8, 8]
