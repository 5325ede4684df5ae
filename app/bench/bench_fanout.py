"""Fan-out benchmark: 20 URLs that each take 1 s, sequential vs two gevent workers.

Run: .venv/bin/python app/bench/bench_fanout.py   (what `make bench-app` calls)

Starts its own redis-server on loopback (ACL user + password), the webfarm, and two
`celery worker -P gevent` processes; prints a rich table. Targets: distributed within 1.5x of
the slowest single fetch, and at least 10x faster than sequential. Not a test: it reports.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fleetapp.celery import create_app
from fleetapp.config import load_settings
from fleetapp.fanout import fetch_many, fetch_sequential, timed
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
N_URLS = 20
DELAY = 1.0
WORKERS = 2
CONCURRENCY = 20

try:
    from fleetlab import webfarm
except ImportError:  # the lab package may not be installed (yet)
    sys.path.insert(0, str(REPO / "ansible" / "lab" / "src"))
    from fleetlab import webfarm

console = Console()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise SystemExit(f"bench: timed out waiting for {what}")


def start_redis(workdir: Path, password: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = workdir / "redis.conf"
    conf.write_text(
        f'port {port}\nbind 127.0.0.1\nsave ""\nappendonly no\ndir {workdir}\n'
        f"user default off\nuser bench on >{password} ~* &* +@all\n"
    )
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen([server, str(conf)], stdout=subprocess.DEVNULL)

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait(up, 10, "redis-server")
    return proc, port


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="fleetapp-bench-"))
    password = secrets.token_urlsafe(16)
    redis_proc, port = start_redis(workdir, password)
    farm = webfarm.serve("127.0.0.1", 0)
    (workdir / "empty.env").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETAPP_")}
    env |= {
        "FLEETAPP_ENV_FILE": str(workdir / "empty.env"),
        "FLEETAPP_BROKER_URL": f"redis://127.0.0.1:{port}/0",
        "FLEETAPP_REDIS_USERNAME": "bench",
        "FLEETAPP_REDIS_PASSWORD": password,
    }
    workers: list[subprocess.Popen[bytes]] = []
    logs = [workdir / f"worker{i}.log" for i in range(WORKERS)]
    try:
        for i, log in enumerate(logs):
            cmd = [
                str(BIN / "fleet-celery"), "-A", "fleetapp.celery", "worker", "-P", "gevent",
                "-c", str(CONCURRENCY), "-n", f"bench{i}@%h", "-Q", "network,default",
                "--without-mingle", "--without-gossip", "--loglevel=WARNING",
            ]  # fmt: skip
            workers.append(
                subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
            )
        app = create_app(load_settings(env))
        # Typed Optional (a broadcast without replies); ping waits for replies, so a list.
        wait(lambda: len(app.control.ping(timeout=0.3) or ()) >= WORKERS, 30, "workers")

        urls = [f"{farm.url}/delay/{DELAY:g}?n={i}" for i in range(N_URLS)]
        console.print(f"[bold]{N_URLS} URLs x {DELAY:g} s[/], {WORKERS} gevent workers")
        # Warm-up: connections and imports, so the measurement is the fan-out itself.
        list(fetch_many([f"{farm.url}/delay/0"] * WORKERS * 2, timeout=30, app=app))

        sequential, seq_time = timed(fetch_sequential(urls))
        distributed, dist_time = timed(fetch_many(urls, timeout=60, app=app))
        failed = [r for r in sequential + distributed if not r["ok"]]
        slowest = max(r["elapsed"] for r in distributed)
        speedup = seq_time / dist_time
        vs_slowest = dist_time / slowest
        used = sorted({r["worker"] for r in distributed})

        def verdict(ok: bool) -> str:
            return "[green]met[/]" if ok else "[red]missed[/]"

        table = Table(title="fleetapp fan-out benchmark")
        table.add_column("measure")
        table.add_column("value", justify="right")
        table.add_column("target", justify="right")
        table.add_column("", justify="center")
        table.add_row("sequential (in-process)", f"{seq_time:.2f} s", "", "")
        table.add_row("distributed (Celery, gevent)", f"{dist_time:.2f} s", "", "")
        table.add_row("slowest single fetch", f"{slowest:.2f} s", "", "")
        table.add_row("speed-up (sequential / distributed)", f"{speedup:.1f}x", ">= 10x",
                      verdict(speedup >= 10))  # fmt: skip
        table.add_row("distributed / slowest fetch", f"{vs_slowest:.2f}x", "<= 1.5x",
                      verdict(vs_slowest <= 1.5))  # fmt: skip
        table.add_row("workers used", ", ".join(used), "", "")
        table.add_row("failed fetches", str(len(failed)), "0", verdict(not failed))
        console.print(table)
        app.close()
        return 0
    finally:
        for proc in workers:
            proc.terminate()
        for proc in workers:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        farm.close()
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
