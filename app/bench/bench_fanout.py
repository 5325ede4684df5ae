"""Fan-out benchmark: 20 URLs that each take 1 s, sequential vs two gevent workers.

Run: .venv/bin/python app/bench/bench_fanout.py   (what `make bench-app` calls)

Starts its own redis-server on loopback (ACL user + password), the webfarm, and two
`celery worker -P gevent` processes; prints a rich table. Targets: distributed within 1.5x of
the slowest single fetch, and at least 10x faster than sequential. Not a test: it reports.
"""

from __future__ import annotations

import secrets
import shutil
import sys
import tempfile
from pathlib import Path

from fleetapp.celery import create_app
from fleetapp.config import load_settings
from fleetapp.fanout import fetch_many, fetch_sequential, timed
from fleettest.local import Worker, start_redis, start_worker, wait_for
from fleettest.sample import fleet_env
from fleettest.webfarm import serve
from rich.console import Console
from rich.table import Table

N_URLS = 20
DELAY = 1.0
WORKERS = 2
CONCURRENCY = 20

console = Console()


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="fleetapp-bench-"))
    redis = start_redis(workdir / "redis", "bench", secrets.token_urlsafe(16))
    farm = serve("127.0.0.1", 0)
    (workdir / "empty.env").write_text("")
    # The webfarm is on loopback, which the fetch guard refuses unless allowed.
    env = fleet_env(redis, workdir / "empty.env", FLEETAPP_FETCH_ALLOW_NETWORKS="127.0.0.1/32")
    workers: list[Worker] = []
    try:
        for i in range(WORKERS):
            worker = start_worker(
                env,
                workdir,
                f"bench{i}",
                pool="gevent",
                concurrency=CONCURRENCY,
                queues="network,default",
                loglevel="WARNING",
            )
            workers.append(worker)
        settings = load_settings(env)
        app = create_app(settings)
        wait_for(lambda: len(app.control.ping(timeout=0.3) or ()) >= WORKERS, 30, "workers")

        urls = [f"{farm.url}/delay/{DELAY:g}?n={i}" for i in range(N_URLS)]
        console.print(f"[bold]{N_URLS} URLs x {DELAY:g} s[/], {WORKERS} gevent workers")
        # Warm-up: connections and imports, so the measurement is the fan-out itself.
        list(fetch_many([f"{farm.url}/delay/0"] * WORKERS * 2, timeout=30, app=app))

        sequential, seq_time = timed(
            fetch_sequential(urls, allow_networks=settings.fetch_allow_networks)
        )
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
        for worker in workers:
            worker.stop()
        farm.close()
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
