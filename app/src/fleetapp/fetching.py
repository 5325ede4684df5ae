"""Fetching one URL, shared by the Celery task and the in-process (--sequential) mode.

Nothing here raises for a bad URL or a failing server: every outcome is a small JSON-able dict
(see FetchResult) so a worker never crashes or gets stuck on user input.

Fetches connect only to public addresses and the networks the caller allows (fleetapp.egress):
anything else, redirects included, ends as a ``forbidden_address`` result.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypedDict
from urllib.parse import urlsplit

import requests
import urllib3.exceptions

from fleetapp.config import IPNetwork
from fleetapp.egress import ForbiddenAddressError, GuardedAdapter

DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 120.0
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
MAX_BODY_CAP = 1024 * 1024 * 1024
MAX_URL_LENGTH = 2048
MAX_REDIRECTS = 5
CONNECT_TIMEOUT = 5.0
RETRIES = 3
BACKOFF_BASE = 0.5
BACKOFF_MAX = 8.0
_CHUNK = 64 * 1024
USER_AGENT = "fleetapp/0.1 (+celery-fleet)"


class FetchError(TypedDict):
    code: str
    message: str


class FetchResult(TypedDict):
    url: str
    final_url: str | None
    status: int | None
    elapsed: float
    bytes: int
    ok: bool
    error: FetchError | None
    worker: str


class InvalidURLError(ValueError):
    """A URL that must not be fetched (nor enqueued)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def validate_url(url: object) -> str:
    """Return the URL if it is a fetchable http(s) URL, else raise InvalidURLError."""
    if not isinstance(url, str):
        raise InvalidURLError("invalid_url", f"URL must be a string, got {type(url).__name__}")
    if not url or len(url) > MAX_URL_LENGTH:
        raise InvalidURLError("invalid_url", f"URL must be 1..{MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise InvalidURLError("invalid_url", "URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise InvalidURLError("invalid_url", f"malformed URL: {exc}") from None
    if not parts.scheme:
        raise InvalidURLError("invalid_url", f"not an absolute URL: {url!r}")
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidURLError(
            "unsupported_scheme", f"only http and https are supported, not {parts.scheme!r}"
        )
    if not parts.hostname:
        raise InvalidURLError("invalid_url", f"no host in URL {url!r}")
    return url


def clamp_timeout(timeout: object) -> float:
    """A sane per-fetch timeout from user input (bool and non-numbers rejected)."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise InvalidURLError("invalid_timeout", "timeout must be a number of seconds")
    if not 0 < timeout <= MAX_TIMEOUT:
        raise InvalidURLError("invalid_timeout", f"timeout must be in (0, {MAX_TIMEOUT:g}] s")
    return float(timeout)


def clamp_max_bytes(max_bytes: object) -> int:
    """A sane body size cap from user input."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
        raise InvalidURLError("invalid_max_bytes", "max_bytes must be a whole number")
    if not 0 < max_bytes <= MAX_BODY_CAP:
        raise InvalidURLError("invalid_max_bytes", f"max_bytes must be in 1..{MAX_BODY_CAP}")
    return max_bytes


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception, what it wraps (requests -> urllib3 -> socket), breadth first."""
    seen: set[int] = set()
    queue: list[BaseException] = [exc]
    while queue and len(seen) < 20:
        item = queue.pop(0)
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        nested: list[Any] = [item.__cause__, item.__context__, getattr(item, "reason", None)]
        nested.extend(item.args)
        queue.extend(n for n in nested if isinstance(n, BaseException))


def classify(exc: BaseException) -> tuple[str, str, bool]:
    """(code, message, retryable) for an exception raised while fetching."""
    chain = list(_causes(exc))
    for item in chain:
        if isinstance(item, ForbiddenAddressError):
            return "forbidden_address", item.message, False
    for item in chain:
        if isinstance(item, urllib3.exceptions.NameResolutionError | socket.gaierror):
            return "dns", "host name could not be resolved", False
    for item in chain:
        if isinstance(item, ConnectionRefusedError) or (
            isinstance(item, OSError) and item.errno == errno.ECONNREFUSED
        ):
            return "refused", "connection refused", True
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connect_timeout", "timed out connecting", True
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return "timeout", "timed out waiting for the server", False
    if isinstance(exc, requests.exceptions.TooManyRedirects):
        return "too_many_redirects", f"more than {MAX_REDIRECTS} redirects", False
    if isinstance(exc, requests.exceptions.SSLError):
        return "tls", "TLS handshake or certificate verification failed", False
    if isinstance(exc, requests.exceptions.InvalidURL | requests.exceptions.InvalidSchema):
        return "invalid_url", "malformed URL", False
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "connection", "connection failed or was reset", True
    if isinstance(exc, requests.exceptions.RequestException):
        return "request_failed", type(exc).__name__, False
    return "internal", type(exc).__name__, False


def backoff(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): 0.5, 1, 2, 4, ... <= 8."""
    # 2.0, not 2: int ** int is typed Any (a negative exponent gives a float); same values.
    return min(BACKOFF_MAX, BACKOFF_BASE * (2.0**attempt))


def _result(
    url: str,
    started: float,
    *,
    worker: str,
    final_url: str | None = None,
    status: int | None = None,
    size: int = 0,
    error: FetchError | None = None,
) -> FetchResult:
    return {
        "url": url,
        "final_url": final_url,
        "status": status,
        "elapsed": round(time.monotonic() - started, 3),
        "bytes": size,
        "ok": error is None,
        "error": error,
        "worker": worker,
    }


def fetch_once(
    url: object,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    worker: str = "local",
    allow_networks: Iterable[IPNetwork] = (),
) -> tuple[FetchResult, bool]:
    """One attempt: (result, retryable). Never raises for bad input or network trouble.

    Connects only to public addresses and those in ``allow_networks`` (fleetapp.egress).
    """
    started = time.monotonic()
    shown = url if isinstance(url, str) else repr(url)
    try:
        validate_url(url)
        timeout = clamp_timeout(timeout)
        max_bytes = clamp_max_bytes(max_bytes)
    except InvalidURLError as exc:
        return _result(
            shown, started, worker=worker, error={"code": exc.code, "message": exc.message}
        ), False
    assert isinstance(url, str)
    deadline = started + timeout
    with requests.Session() as session:
        session.max_redirects = MAX_REDIRECTS
        session.headers["User-Agent"] = USER_AGENT
        # No proxy from the environment (the guard would check the proxy, not the target) and
        # no ~/.netrc credentials for a host a client chose...
        session.trust_env = False
        # ...but still the CA bundle an operator named, as trust_env would have.
        session.verify = (
            os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        )
        adapter = GuardedAdapter(allow_networks)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        try:
            response = session.get(
                url, timeout=(min(CONNECT_TIMEOUT, timeout), timeout), stream=True
            )
        except Exception as exc:  # every requests/urllib3/socket failure becomes a result
            code, message, retryable = classify(exc)
            return _result(
                url, started, worker=worker, error={"code": code, "message": message}
            ), retryable
        with response:
            status = response.status_code
            final_url = response.url
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                return _too_large(url, started, worker, final_url, status, max_bytes), False
            size = 0

            def body_failed(code: str, message: str) -> tuple[FetchResult, bool]:
                error: FetchError = {"code": code, "message": message}
                return _result(
                    url,
                    started,
                    worker=worker,
                    final_url=final_url,
                    status=status,
                    size=size,
                    error=error,
                ), False

            try:
                for chunk in response.iter_content(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        return _too_large(url, started, worker, final_url, status, max_bytes), False
                    if time.monotonic() > deadline:
                        # A server dripping bytes would otherwise dodge the per-read timeout.
                        return body_failed("timeout", f"body took over {timeout:g} s")
            except Exception as exc:
                code, message, _ = classify(exc)
                return body_failed(code, message)
    http_error: FetchError | None = None
    if status >= 400:
        http_error = {
            "code": "http_status",
            "message": f"HTTP {status} {response.reason or ''}".strip(),
        }
    return _result(
        url, started, worker=worker, final_url=final_url, status=status, size=size, error=http_error
    ), False


def _too_large(
    url: str, started: float, worker: str, final_url: str, status: int, max_bytes: int
) -> FetchResult:
    error: FetchError = {"code": "too_large", "message": f"body larger than {max_bytes} bytes"}
    return _result(url, started, worker=worker, final_url=final_url, status=status, error=error)


def fetch(
    url: object,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    retries: int = RETRIES,
    worker: str = "local",
    allow_networks: Iterable[IPNetwork] = (),
) -> FetchResult:
    """fetch_once with in-process retries and backoff on connection errors (--sequential)."""
    allow = tuple(allow_networks)
    attempt = 0
    while True:
        result, retryable = fetch_once(
            url, timeout=timeout, max_bytes=max_bytes, worker=worker, allow_networks=allow
        )
        if not retryable or attempt >= retries:
            return result
        time.sleep(backoff(attempt))
        attempt += 1
