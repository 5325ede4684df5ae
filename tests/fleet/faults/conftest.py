"""The fault suite's harness: load from client1 through a fault, then the ledger.

Each scenario publishes ledger-tagged fetch tasks at a steady rate from client1 (publishing goes
on through the fault), waits until the fleet has drained (every returned publish executed, and
Redis holds nothing queued or unacknowledged), and reports the ledger as one table row.

Sizes: ``make test`` runs every scenario small; ``make faults`` sets FLEET_FAULTS_SIZE=full.
The table is printed at the end of the session and written to .build/faults/.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import REPO, on
from tests.fleet.conftest import KEY_PREFIX, REDIS_CLI, redis_primary, secret
from tests.fleet.faults.ledger import Report, executions_sent, report

WEBFARM = "http://198.18.0.1:8080"
# The client's own interpreter for the app, with the fleet's settings (as a user's code runs).
APP_PYTHON = "/usr/local/bin/fleet-python"
LOADGEN = "/usr/local/lib/fleet-faults/loadgen.py"
FULL = os.environ.get("FLEET_FAULTS_SIZE", "small") == "full"
REPORTS: list[Report] = []


def size(small: int, full: int) -> int:
    return full if FULL else small


@pytest.fixture(scope="session", autouse=True)
def loadgen_on_client() -> Iterator[None]:
    loadgen = (Path(__file__).parent / "loadgen.py").read_text()
    on("client1", f"install -d /usr/local/lib/fleet-faults && cat > {LOADGEN}", input=loadgen)
    yield
    on("client1", "rm -rf /usr/local/lib/fleet-faults")


def redis_cli(*commands: str) -> list[str]:
    """Run redis-cli commands as the admin user on the primary; the password goes through stdin."""
    script = "read -r REDISCLI_AUTH; export REDISCLI_AUTH; " + "; ".join(
        f"{REDIS_CLI} --no-auth-warning --user admin {command}" for command in commands
    )
    return on(redis_primary(), script, input=secret("redis-admin") + "\n").stdout.split()


def redis_holds() -> int:
    """Messages Redis holds: queued in either queue, delivered and not acknowledged, or in a
    worker's processing list (celery_fleet.transport) on their way to either."""
    p = KEY_PREFIX
    lists = redis_cli(f"HKEYS {p}_fleet.processing")
    counts = [f"LLEN {p}network", f"LLEN {p}default", f"HLEN {p}unacked"]
    counts += [f"LLEN {p}{key}" for key in lists]
    return sum(int(n) for n in redis_cli(*counts))


@dataclass
class Scenario:
    name: str
    count: int
    rate: float
    delay: float = 2.0
    countdown: float | None = None
    queue: str | None = None
    # Publishing stops early once this file exists on client1 (count is then a ceiling).
    stop_file: str | None = None
    # The fault cuts a worker off from the webfarm: a fetch may time out (stored, not lost).
    fetches_may_fail: bool = False

    def run(
        self,
        fault: Callable[[], None],
        at: float,
        drain_timeout: float = 240,
        after: Callable[[], None] | None = None,
    ) -> Report:
        """Publish, inject the fault `at` seconds in, drain, record the ledger's row."""
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.name).strip("-")
        run_id = f"{slug}-{int(time.time())}"
        requests.delete(f"{WEBFARM}/ledger/{run_id}", timeout=10)
        published: dict[str, Any] = {}
        args = [
            f"--run={run_id}",
            f"--count={self.count}",
            f"--rate={self.rate}",
            f"--delay={self.delay}",
            f"--webfarm={WEBFARM}",
        ]
        if self.countdown is not None:
            args.append(f"--countdown={self.countdown}")
        if self.queue is not None:
            args.append(f"--queue={self.queue}")
        if self.stop_file is not None:
            on("client1", f"rm -f {self.stop_file}")
            args.append(f"--stop-file={self.stop_file}")

        def publish() -> None:
            published["result"] = on(
                "client1", f"{APP_PYTHON} {LOADGEN} {' '.join(args)}", check=False, timeout=900
            )

        publisher = threading.Thread(target=publish)
        publisher.start()
        time.sleep(at)
        try:
            fault()
        finally:
            publisher.join()
            if after is not None:
                after()
        result = published["result"]
        assert result.returncode == 0, result.stderr[-3000:]
        publishes = json.loads(result.stdout)["publishes"]
        row = drain(self.name, run_id, publishes, drain_timeout)
        REPORTS.append(row)
        assert self.fetches_may_fail or not row.failed, f"fetches failed: {row}"
        return row


def ledger(run_id: str) -> dict[str, list[dict[str, Any]]]:
    return requests.get(f"{WEBFARM}/ledger/{run_id}", timeout=10).json()["executions"]


def stored_results(task_ids: list[str]) -> dict[str, Any]:
    """The stored results of these tasks, read on client1 as the app's client reads them."""
    if not task_ids:
        return {}
    out = on("client1", f"{APP_PYTHON} {LOADGEN} --results", input="\n".join(task_ids) + "\n")
    return dict(json.loads(out.stdout)["results"])


def with_results(name: str, publishes: list[list[Any]], run_id: str) -> Report:
    """The ledger's row; the stored results are read for the tasks without an answer."""
    executions = ledger(run_id)
    answered = executions_sent(executions)
    unanswered = [
        task_id for n, task_id, sent_at, error in publishes if error is None and n not in answered
    ]
    return report(name, publishes, executions, stored_results(unanswered))


def drain(name: str, run_id: str, publishes: list[list[Any]], timeout: float) -> Report:
    """Wait until everything returned has run and Redis holds nothing, then settle."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if redis_holds() == 0:
            if not report(name, publishes, ledger(run_id)).lost:
                break
            # Redis holds nothing, yet some have no answer: done if each has run and failed.
            if not with_results(name, publishes, run_id).lost:
                break
        time.sleep(2)
    # Late duplicates (a redelivery of something that already ran) would show up now: one lease
    # keeper tick (3 s in the lab) and one task.
    time.sleep(5)
    row = with_results(name, publishes, run_id)
    if row.failed:
        print(f"{name}: {len(row.failed)} task(s) ran and reported a failed fetch: {row.failed}")
    raised = [(n, sent_at, error) for n, _task_id, sent_at, error in publishes if error]
    if raised:
        print(f"{name}: {len(raised)} publish(es) raised, first: {raised[:3]}")
    if row.lost:
        # The evidence a lost task leaves, printed with the failure: its task id (for the
        # workers' journals), what the webfarm saw of it, and what Redis still holds.
        executions = ledger(run_id)
        for n, task_id, sent_at, _error in publishes:
            if n in row.lost:
                print(f"lost {n}: task {task_id} sent at {sent_at:.3f}", executions.get(str(n)))
        print("redis holds", redis_holds())
    return row


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not REPORTS:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Fault suite ({'full' if FULL else 'small'} size): the ledger per scenario"
    )
    rows = [r.row() for r in REPORTS]
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for row in rows:
        table.add_row(*(str(value) for value in row.values()))
    Console(file=terminalreporter._tw._file, width=160).print(table)
    out = REPO / ".build" / "faults"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
    payload = json.dumps(
        {"size": "full" if FULL else "small", "date": stamp, "rows": rows}, indent=2
    )
    (out / f"{stamp}.json").write_text(payload)
    (out / "latest.json").write_text(payload)
