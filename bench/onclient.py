"""The client side of `make bench`: runs on a client host with the app's interpreter.

Copied to the client by bench/run.py and run as ``fleet-python onclient.py <mode> ...``: it
uses the app exactly as a user's code does (the deployed settings, the client's Redis user).
Prints one JSON object.

Modes:
    fanout   fetch every URL of --urls (a file) through fleetapp.fanout.fetch_many; makespan,
             the slowest single fetch, how many were ok
    tiny     --count ``fleetapp.add`` tasks, sent one by one (``delay``) or as one group; the
             publish rate and the end-to-end rate (every result collected)
    farm     --count concurrent GETs of the webfarm from this host, no Celery (its ceiling)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def fanout(args: argparse.Namespace) -> dict[str, Any]:
    from fleetapp.celery import app
    from fleetapp.fanout import fetch_many

    urls = Path(args.urls).read_text().split()
    started = time.monotonic()
    results = list(fetch_many(urls, timeout=args.timeout, app=app))
    makespan = time.monotonic() - started
    ok = [r for r in results if r["ok"]]
    return {
        "n": len(urls),
        "makespan": makespan,
        "slowest_fetch": max((r["elapsed"] for r in ok), default=0.0),
        "ok": len(ok),
        "errors": sorted({r["error"]["code"] for r in results if r["error"]}),
    }


def tiny(args: argparse.Namespace) -> dict[str, Any]:
    from celery import group
    from fleetapp.celery import app

    add = app.tasks["fleetapp.add"]
    started = time.monotonic()
    if args.mode == "group":
        signatures = [add.s(i, i) for i in range(args.count)]
        pending = group(signatures).apply_async()
        published = time.monotonic() - started
        values = pending.get(timeout=args.timeout, interval=0.05)
    else:
        handles = [add.delay(i, i) for i in range(args.count)]
        published = time.monotonic() - started
        values = [handle.get(timeout=args.timeout, interval=0.05) for handle in handles]
    total = time.monotonic() - started
    wrong = sum(1 for i, value in enumerate(values) if value != 2 * i)
    return {
        "count": args.count,
        "mode": args.mode,
        "publish_per_s": args.count / published,
        "end_to_end_per_s": args.count / total,
        "seconds": total,
        "wrong": wrong,
    }


def farm(args: argparse.Namespace) -> dict[str, Any]:
    import requests

    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=args.count)
    session.mount("http://", adapter)

    def get(_: int) -> float:
        begun = time.monotonic()
        session.get(f"{args.webfarm}/delay/{args.delay:g}", timeout=60).raise_for_status()
        return time.monotonic() - begun

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=args.count) as pool:
        elapsed = list(pool.map(get, range(args.count)))
    return {
        "count": args.count,
        "delay": args.delay,
        "makespan": time.monotonic() - started,
        "slowest": max(elapsed),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fanout")
    p.add_argument("--urls", required=True)
    p.add_argument("--timeout", type=float, default=900)
    p = sub.add_parser("tiny")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--mode", choices=["one", "group"], required=True)
    p.add_argument("--timeout", type=float, default=900)
    p = sub.add_parser("farm")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--delay", type=float, default=1.0)
    p.add_argument("--webfarm", required=True)
    args = parser.parse_args()
    out = {"fanout": fanout, "tiny": tiny, "farm": farm}[args.command](args)
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
