"""The ledger of a fault scenario: what the client published against what the webfarm executed.

Neither Redis nor Celery's own bookkeeping is trusted here: a publish counts as "returned" when
``send_task`` returned on the client, an execution counts when the webfarm (on the lab host)
sent a whole answer for that task's token.
"""

from __future__ import annotations

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
    duplicates: int = 0
    # Publishes that raised on the client and ran all the same (the caller was told "failed").
    raised_but_ran: int = 0
    longest_delay: float = 0.0

    def row(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "published": self.published,
            "returned": self.returned,
            "raised": self.raised,
            "executed": self.executed,
            "lost": len(self.lost),
            "duplicates": self.duplicates,
            "raised_but_ran": self.raised_but_ran,
            "longest_delay_s": round(self.longest_delay, 1),
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
) -> Report:
    done = executions_sent(executions)
    returned = {n: sent_at for n, task_id, sent_at, error in publishes if error is None}
    raised = {n for n, task_id, sent_at, error in publishes if error is not None}
    lost = sorted(n for n in returned if n not in done)
    delays = [done[n][0]["end"] - sent_at for n, sent_at in returned.items() if n in done]
    return Report(
        scenario=scenario,
        published=len(publishes),
        returned=len(returned),
        raised=len(raised),
        executed=sum(1 for n in returned if n in done),
        lost=lost,
        duplicates=sum(len(entries) - 1 for entries in done.values()),
        raised_but_ran=sum(1 for n in raised if n in done),
        longest_delay=max(delays, default=0.0),
    )
