"""Publishes ledger-tagged fetch tasks from a client host and records every publish.

Runs on a client host with the app's interpreter (copied there by the fault tests). Each task
fetches ``/delay/<s>?ledger=<run>.<n>`` from the lab's webfarm, which records the execution.
Publishing goes on at a steady rate for the whole scenario, faults included; a publish that
raises is recorded as such (the caller was told), never retried behind the caller's back.

Prints one JSON object: {"publishes": [[n, task_id or null, sent_at, error or null], ...]}.
With ``--results``: reads task ids from stdin, prints {"results": {task_id: result or null}}
(the stored result of each task that succeeded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", action="store_true", help="read stored results instead")
    parser.add_argument("--run")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--first", type=int, default=0, help="ledger number of the first task")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="publishes per second (0 = flat out)"
    )
    parser.add_argument("--delay", type=float, default=2.0, help="seconds each fetch takes")
    parser.add_argument("--webfarm", default="http://198.18.0.1:8080")
    parser.add_argument("--task", default="fleetapp.fetch_url")
    parser.add_argument("--countdown", type=float, default=None)
    parser.add_argument("--queue", default=None, help="route to this queue instead of the app's")
    parser.add_argument("--stop-file", default=None, help="stop publishing once this file exists")
    args = parser.parse_args()

    from fleetapp.celery import app  # the app's own configuration, as a client uses it

    if args.results:
        results = {}
        for task_id in sys.stdin.read().split():
            stored = app.AsyncResult(task_id)
            results[task_id] = stored.result if stored.state == "SUCCESS" else None
        json.dump({"results": results}, sys.stdout)
        return 0
    if not args.run or args.count <= 0:
        parser.error("--run and --count are required")
    publishes: list[tuple[int, str | None, float, str | None]] = []
    started = time.monotonic()
    for i in range(args.count):
        if args.stop_file and os.path.exists(args.stop_file):
            break
        n = args.first + i
        if args.rate > 0:
            time.sleep(max(0.0, started + i / args.rate - time.monotonic()))
        url = f"{args.webfarm}/delay/{args.delay:g}?ledger={args.run}.{n}"
        sent_at = time.time()
        try:
            options: dict[str, object] = {}
            if args.countdown is not None:
                options["countdown"] = args.countdown
            if args.queue is not None:
                options["queue"] = args.queue
            task_id = app.send_task(args.task, args=[url], **options).id
        except Exception as error:  # the publish raised: the caller knows, it is not "lost"
            publishes.append((n, None, sent_at, f"{type(error).__name__}: {error}"))
        else:
            publishes.append((n, task_id, sent_at, None))
    json.dump({"publishes": publishes}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
