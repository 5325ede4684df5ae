"""The ledger of a fault scenario: what the client published against what the webfarm executed.

Neither Redis nor Celery's own bookkeeping is trusted to say a task ran: a publish counts as
"returned" when ``send_task`` returned on the client, an execution counts when the webfarm (on
the lab host) sent a whole answer for that task's token.

One case needs the task's stored result: a fetch the fault itself made fail (the worker was cut
off from the webfarm for longer than the fetch's timeout). The task ran and reported "timeout"
(its answer, if the request arrives at all, finds the connection closed). Such a token counts
as "failed" instead of lost only when the worker stored exactly that: a result with ``ok``
false and a network failure. A result cannot be stored for a task that never ran, so a lost
task stays lost; scenarios that do not cut a worker off also require none failed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Report:
    scenario: str
    published: int
    returned: int
    raised: int
    executed: int
    lost: list[int] = field(default_factory=list)
    # Ran and reported that its fetch failed (stored result ok=false): not an execution, not lost.
    failed: list[int] = field(default_factory=list)
    duplicates: int = 0
    # Publishes that raised on the client and ran all the same (the caller was told "failed").
    raised_but_ran: int = 0
    longest_delay: float = 0.0
    # The longest wait between two publishes: the load generator publishes one task at a time,
    # so a publish that blocked or retried through the fault shows as the gap before the next.
    publish_stall: float = 0.0

    def row(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "published": self.published,
            "returned": self.returned,
            "raised": self.raised,
            "executed": self.executed,
            "fetch_failed": len(self.failed),
            "lost": len(self.lost),
            "duplicates": self.duplicates,
            "raised_but_ran": self.raised_but_ran,
            "longest_delay_s": round(self.longest_delay, 1),
            "publish_stall_s": round(self.publish_stall, 1),
        }


def executions_sent(executions: dict[str, list[dict[str, Any]]]) -> dict[int, list[dict[str, Any]]]:
    """Only executions whose answer went out whole (a cancelled fetch did not execute)."""
    done: dict[int, list[dict[str, Any]]] = {}
    for token, entries in executions.items():
        sent = [entry for entry in entries if entry["sent"]]
        if sent:
            done[int(token)] = sorted(sent, key=lambda entry: entry["end"])
    return done


def report(
    scenario: str,
    publishes: list[list[Any]],
    executions: dict[str, list[dict[str, Any]]],
    results: dict[str, Any] | None = None,
) -> Report:
    """``results``: the stored result of a task by id (only read for tasks without an answer)."""
    done = executions_sent(executions)
    returned = {n: sent_at for n, task_id, sent_at, error in publishes if error is None}
    raised = {n for n, task_id, sent_at, error in publishes if error is not None}
    ids = {n: task_id for n, task_id, sent_at, error in publishes if error is None}
    failed = sorted(
        n for n in returned if n not in done and fetch_failed((results or {}).get(ids[n]))
    )
    lost = sorted(n for n in returned if n not in done and n not in failed)
    delays = [done[n][0]["end"] - sent_at for n, sent_at in returned.items() if n in done]
    sent = sorted(sent_at for _n, _task_id, sent_at, _error in publishes)
    return Report(
        scenario=scenario,
        published=len(publishes),
        returned=len(returned),
        raised=len(raised),
        executed=sum(1 for n in returned if n in done),
        lost=lost,
        failed=failed,
        duplicates=sum(len(entries) - 1 for entries in done.values()),
        raised_but_ran=sum(1 for n in raised if n in done),
        longest_delay=max(delays, default=0.0),
        publish_stall=max((b - a for a, b in itertools.pairwise(sent)), default=0.0),
    )


# What a fault between a worker and the webfarm makes of a fetch (fleetapp.fetching.classify);
# any other failure (a refused address, a bad URL) is a fault of the fleet: the task counts lost.
NETWORK_FAILURES = frozenset({"timeout", "connect_timeout", "connection"})


def fetch_failed(result: Any) -> bool:
    """A stored fetch_url result that reports a fetch the network failed (the task ran)."""
    if not isinstance(result, dict) or result.get("ok") is not False:
        return False
    error = result.get("error")
    return isinstance(error, dict) and error.get("code") in NETWORK_FAILURES
