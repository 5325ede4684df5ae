"""A tiny stand-in for "the internet": slow, failing, huge and hanging URLs on demand.

Stdlib only, so the lab can run it on the bridge address without installing anything.

Endpoints (GET and HEAD):
    /delay/<seconds>   sleep, then 200 with a small body (seconds may be fractional, max 60)
    /status/<code>     answer with that HTTP status (100..599 excluding 1xx -> 400)
    /hang              accept the request and never answer (until the server shuts down)
    /bytes/<n>         n bytes of body (max 1 GiB), streamed in chunks
    /redirect/<n>      n redirects (302) ending at /delay/0
    /tutorial/<i>      i in 1..5: the tutorial's five URLs, delays summing to 7.6 s
    /ledger/<run>      the execution ledger of a run (GET: JSON, DELETE: forget it)
    /webhook/<name>    a webhook receiver (POST: record the JSON body, GET: what it recorded,
                       DELETE: forget it): the lab's Alertmanager posts its alerts here
    /                  a short index

The execution ledger: any request whose query has ``ledger=<run>.<n>`` is recorded under that
token with the caller's address, its arrival, when the answer was sent and whether it was sent
whole. The fault tests count executions here, outside Redis and outside Celery's bookkeeping.

In process:  server = serve("127.0.0.1", 0); port = server.server_address[1]; server.close()
As a CLI:    python -m fleettest.webfarm --host 198.18.0.1 --port 8080
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from urllib.parse import parse_qs

# The tutorial's five sequential fetches took ~7.6 s in total; these reproduce that shape.
TUTORIAL_DELAYS: tuple[float, ...] = (1.2, 1.9, 1.3, 2.2, 1.0)
MAX_DELAY = 60.0
MAX_BYTES = 1 << 30
MAX_REDIRECTS = 50
MAX_WEBHOOK_BODY = 1 << 20
_CHUNK = 64 * 1024
# Connections waiting to be accepted: hundreds of workers' greenlets connect at once.
LISTEN_BACKLOG = 4096
_LEDGER_TOKEN = re.compile(r"([A-Za-z0-9_-]{1,64})\.(\d{1,9})")


class Ledger:
    """Executions by token, kept in this process (outside everything a fault test breaks)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, dict[str, list[dict[str, object]]]] = {}

    def start(self, run: str, n: str, host: str) -> dict[str, object]:
        entry: dict[str, object] = {"host": host, "start": time.time(), "end": None, "sent": False}
        with self._lock:
            self._runs.setdefault(run, {}).setdefault(n, []).append(entry)
        return entry

    @staticmethod
    def finish(entry: dict[str, object], *, sent: bool) -> None:
        entry["end"] = time.time()
        entry["sent"] = sent

    def get(self, run: str) -> dict[str, list[dict[str, object]]]:
        with self._lock:
            executions = self._runs.get(run, {})
            return {n: [dict(entry) for entry in entries] for n, entries in executions.items()}

    def forget(self, run: str) -> None:
        with self._lock:
            self._runs.pop(run, None)


class Webhooks:
    """JSON bodies posted to each webhook, with their arrival, kept in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._received: dict[str, list[dict[str, object]]] = {}

    def record(self, name: str, body: object) -> None:
        with self._lock:
            self._received.setdefault(name, []).append({"at": time.time(), "body": body})

    def get(self, name: str) -> list[dict[str, object]]:
        with self._lock:
            return list(self._received.get(name, []))

    def forget(self, name: str) -> None:
        with self._lock:
            self._received.pop(name, None)


class WebFarm(ThreadingHTTPServer):
    """ThreadingHTTPServer that can release its sleeping/hanging handlers on shutdown."""

    # Handlers run in daemon threads and close() must not wait for /hang requests.
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], *, verbose: bool = False) -> None:
        super().__init__(address, _Handler)
        self.stopping = threading.Event()
        self.verbose = verbose
        self.ledger = Ledger()
        self.webhooks = Webhooks()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> WebFarm:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and wake every sleeping handler; returns promptly."""
        self.stopping.set()
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=5)
        self.server_close()

    def __enter__(self) -> WebFarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    server: WebFarm
    protocol_version = "HTTP/1.1"
    server_version = "fleettest-webfarm/1"

    def log_message(self, format: str, *args: object) -> None:
        # Quiet by default: tests and the benchmark issue thousands of requests.
        if self.server.verbose:
            super().log_message(format, *args)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_DELETE(self) -> None:
        match = re.fullmatch(r"/(ledger|webhook)/([A-Za-z0-9_-]{1,64})", self.path)
        if not match:
            payload = {"error": "only /ledger/<run> and /webhook/<name> can be deleted"}
            self._send(HTTPStatus.NOT_FOUND, payload, head=False)
            return
        store = self.server.ledger if match.group(1) == "ledger" else self.server.webhooks
        store.forget(match.group(2))
        self._send(HTTPStatus.OK, {"forgotten": match.group(2)}, head=False)

    def do_POST(self) -> None:
        match = re.fullmatch(r"/webhook/([A-Za-z0-9_-]{1,64})", self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if not match or not 0 < length <= MAX_WEBHOOK_BODY:
            payload = {
                "error": f"POST a JSON body of 1..{MAX_WEBHOOK_BODY} bytes to /webhook/<name>"
            }
            self._send(HTTPStatus.BAD_REQUEST, payload, head=False)
            return
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:
            self._send(HTTPStatus.BAD_REQUEST, {"error": "the body is not JSON"}, head=False)
            return
        self.server.webhooks.record(match.group(1), body)
        self._send(HTTPStatus.OK, {"recorded": match.group(1)}, head=False)

    # -- routing ---------------------------------------------------------------------------

    def _dispatch(self, *, head: bool) -> None:
        path, _, query = self.path.partition("?")
        token = _LEDGER_TOKEN.fullmatch(parse_qs(query).get("ledger", [""])[0])
        host = self.client_address[0]
        entry = self.server.ledger.start(token[1], token[2], host) if token else None
        try:
            self._route(path, head=head)
        except (BrokenPipeError, ConnectionResetError):
            if entry is not None:
                self.server.ledger.finish(entry, sent=False)
            return
        if entry is not None:
            # "Sent" only if the full answer went out: a cancelled fetch is not an execution.
            self.server.ledger.finish(entry, sent=not self.server.stopping.is_set())

    def _route(self, path: str, *, head: bool) -> None:
        routes: list[tuple[str, Callable[..., None]]] = [
            (r"/delay/(\d+(?:\.\d+)?)", self._delay),
            (r"/status/(\d{3})", self._status),
            (r"/hang", self._hang),
            (r"/bytes/(\d+)", self._bytes),
            (r"/redirect/(\d+)", self._redirect),
            (r"/tutorial/(\d+)", self._tutorial),
            (r"/ledger/([A-Za-z0-9_-]{1,64})", self._ledger),
            (r"/webhook/([A-Za-z0-9_-]{1,64})", self._webhook),
            (r"/?", self._index),
        ]
        for pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match:
                handler(*match.groups(), head=head)
                return
        self._send(HTTPStatus.NOT_FOUND, {"error": "no such endpoint", "path": path}, head=head)

    def _send(self, status: int, payload: Mapping[str, object], *, head: bool) -> None:
        body = (json.dumps(payload) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless the server is stopping; True if the full time elapsed."""
        return not self.server.stopping.wait(seconds)

    # -- endpoints -------------------------------------------------------------------------

    def _index(self, *, head: bool) -> None:
        self._send(
            HTTPStatus.OK,
            {
                "endpoints": [
                    "/delay/<s>",
                    "/status/<code>",
                    "/hang",
                    "/bytes/<n>",
                    "/redirect/<n>",
                    "/tutorial/<1..5>",
                    "/ledger/<run>",
                    "/webhook/<name>",
                ]
            },
            head=head,
        )

    def _delay(self, seconds: str, *, head: bool) -> None:
        delay = float(seconds)
        if delay > MAX_DELAY:
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"delay > {MAX_DELAY}"}, head=head)
            return
        started = time.monotonic()
        if not self._sleep(delay):
            return
        self._send(
            HTTPStatus.OK,
            {"delay": delay, "slept": round(time.monotonic() - started, 3)},
            head=head,
        )

    def _status(self, code: str, *, head: bool) -> None:
        status = int(code)
        if not 200 <= status <= 599:
            self._send(HTTPStatus.BAD_REQUEST, {"error": "status must be 200..599"}, head=head)
            return
        self._send(status, {"status": status}, head=head)

    def _hang(self, *, head: bool) -> None:
        # Answer nothing; only the server stopping ends the wait (no sane client waits an hour).
        self.server.stopping.wait(3600)
        self.close_connection = True

    def _bytes(self, count: str, *, head: bool) -> None:
        n = int(count)
        if n > MAX_BYTES:
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"n > {MAX_BYTES}"}, head=head)
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        if head:
            return
        chunk = b"x" * _CHUNK
        remaining = n
        while remaining > 0 and not self.server.stopping.is_set():
            piece = chunk[: min(_CHUNK, remaining)]
            self.wfile.write(piece)
            remaining -= len(piece)

    def _redirect(self, count: str, *, head: bool) -> None:
        n = int(count)
        if n > MAX_REDIRECTS:
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"n > {MAX_REDIRECTS}"}, head=head)
            return
        target = f"/redirect/{n - 1}" if n > 1 else "/delay/0"
        self.send_response(HTTPStatus.FOUND)
        self.send_header("Location", target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _tutorial(self, index: str, *, head: bool) -> None:
        i = int(index)
        if not 1 <= i <= len(TUTORIAL_DELAYS):
            self._send(HTTPStatus.NOT_FOUND, {"error": "tutorial URLs are 1..5"}, head=head)
            return
        delay = TUTORIAL_DELAYS[i - 1]
        if not self._sleep(delay):
            return
        self._send(HTTPStatus.OK, {"tutorial": i, "delay": delay}, head=head)

    def _ledger(self, run: str, *, head: bool) -> None:
        payload = {"run": run, "executions": self.server.ledger.get(run)}
        self._send(HTTPStatus.OK, payload, head=head)

    def _webhook(self, name: str, *, head: bool) -> None:
        self._send(
            HTTPStatus.OK, {"name": name, "received": self.server.webhooks.get(name)}, head=head
        )


def serve(host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False) -> WebFarm:
    """Start the web farm in a background thread and return it (port 0 = pick a free port)."""
    return WebFarm((host, port), verbose=verbose).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleettest.webfarm", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to bind (default 8080)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    try:
        server = serve(args.host, args.port, verbose=args.verbose)
    except OSError as exc:
        print(f"webfarm: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    done = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"webfarm listening on {server.url}", flush=True)
    done.wait()
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
