"""What `fleet status` shows, read from the fleet's Prometheus (the same numbers its alerts use).

Ansible says where Prometheus is and with which credentials (playbooks/status.yml, so a vault
works as for a deploy); Prometheus says the rest: which targets answer, the state of each host's
fleet units (the node exporters' systemd collector), the workers with heartbeats (Flower), each
queue's length and live consumers, kombu's unacknowledged deliveries, Redis' memory and
persistence, and the firing alerts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[3]
STATUS_PLAYBOOK = REPO / "playbooks" / "status.yml"


class StatusError(Exception):
    """Why the fleet (its state, its dashboards) could not be read, in one sentence."""


@dataclass(frozen=True)
class Source:
    """Where the monitor host's services are, and Flower's user and password (theirs too)."""

    url: str  # Prometheus; empty without metrics
    flower: str
    user: str
    password: str
    ca: str


@dataclass
class Fleet:
    # (job, instance) -> health ("up", "down", "unknown") and the scrape's last error.
    targets: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    # host -> unit -> state
    units: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    # host name (after @ in a worker's name) -> workers with heartbeats
    workers: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    queues: dict[str, float] = field(default_factory=dict)
    consumers: dict[str, float] = field(default_factory=dict)
    unacked: float | None = None
    redis: dict[str, dict[str, Any]] = field(default_factory=lambda: defaultdict(dict))
    alerts: list[dict[str, Any]] = field(default_factory=list)

    def problems(self) -> list[str]:
        found = [
            f"{job} on {host} is {health}"
            for (job, host), (health, _) in self.targets.items()
            if health != "up"
        ]
        found += [
            f"{unit} on {host} failed"
            for host, units in self.units.items()
            for unit, state in units.items()
            if state == "failed"
        ]
        found += [
            f"{queue} has messages and no live worker"
            for queue, length in self.queues.items()
            if length > 0 and not self.consumers.get(queue)
        ]
        found += [f"alert {a['labels']['alertname']} firing" for a in self.alerts]
        return found


def prometheus_source(inventory: str | None = None) -> Source:
    """Prometheus's URL, user, password and CA, from the inventory through Ansible."""
    source = monitor_source(inventory)
    if not source.url:
        raise StatusError("the inventory has no monitor host (no Prometheus)")
    return source


def monitor_source(inventory: str | None = None) -> Source:
    """The monitor host's URLs, user, password and CA, from the inventory through Ansible."""
    command = [str(Path(sys.executable).parent / "ansible-playbook"), str(STATUS_PLAYBOOK)]
    if inventory:
        command += ["-i", inventory]
    env = {**os.environ, "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json", "ANSIBLE_NOCOLOR": "1"}
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StatusError(f"could not run {STATUS_PLAYBOOK.name}: {exc}") from exc
    try:
        report = json.loads(done.stdout)
    except ValueError as exc:
        raise StatusError(f"{STATUS_PLAYBOOK.name} failed: {done.stderr.strip()[-500:]}") from exc
    for play in report.get("plays", []):
        for task in play.get("tasks", []):
            for result in task.get("hosts", {}).values():
                msg = result.get("msg")
                if isinstance(msg, dict) and "prometheus" in msg:
                    return Source(
                        msg["prometheus"], msg["flower"], msg["user"], msg["password"], msg["ca"]
                    )
    failures = [
        r.get("msg", "")
        for play in report.get("plays", [])
        for t in play["tasks"]
        for r in t.get("hosts", {}).values()
        if r.get("failed")
    ]
    raise StatusError(
        "the inventory names no monitor host"
        + (f" ({'; '.join(map(str, failures))})" if failures else "")
    )


class _Prometheus:
    def __init__(self, source: Source) -> None:
        self.source = source
        self.session = requests.Session()
        self.session.auth = (source.user, source.password)

    def get(self, path: str, **params: str) -> Any:
        try:
            # verify on each request: requests lets REQUESTS_CA_BUNDLE override a session's.
            response = self.session.get(
                f"{self.source.url}{path}", params=params, timeout=10, verify=self.source.ca
            )
        except requests.RequestException as exc:
            raise StatusError(f"Prometheus at {self.source.url} did not answer: {exc}") from exc
        if response.status_code != 200:
            raise StatusError(f"Prometheus answered {response.status_code} to {path}")
        return response.json()["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/query", query=expression)["result"])


def gather(source: Source) -> Fleet:
    prometheus = _Prometheus(source)
    fleet = Fleet()
    for target in prometheus.get("/api/v1/targets", state="active")["activeTargets"]:
        key = (target["labels"]["job"], target["labels"]["instance"])
        fleet.targets[key] = (target["health"], target.get("lastError", ""))
    for sample in prometheus.query("node_systemd_unit_state == 1"):
        labels = sample["metric"]
        fleet.units[labels["instance"]][labels["name"]] = labels["state"]
    for sample in prometheus.query("celery_fleet:worker_alive"):
        worker = sample["metric"]["worker"]
        fleet.workers[worker.partition("@")[2]].append(worker)
    for name, into in (("queue_length", fleet.queues), ("queue_consumers", fleet.consumers)):
        for sample in prometheus.query(f"celery_fleet:{name}"):
            into[sample["metric"]["queue"]] = float(sample["value"][1])
    for sample in prometheus.query("celery_fleet:unacked"):
        fleet.unacked = float(sample["value"][1])
    for metric in (
        "redis_memory_used_bytes",
        "redis_memory_max_bytes",
        "redis_aof_last_write_status",
        "redis_rdb_last_bgsave_status",
    ):
        for sample in prometheus.query(metric):
            fleet.redis[sample["metric"]["instance"]][metric] = float(sample["value"][1])
    for sample in prometheus.query("redis_instance_info"):
        fleet.redis[sample["metric"]["instance"]]["role"] = sample["metric"].get("role", "?")
    fleet.alerts = [a for a in prometheus.get("/api/v1/alerts")["alerts"] if a["state"] == "firing"]
    return fleet


def _state(state: str) -> str:
    colour = {"active": "green", "failed": "red"}.get(state, "yellow")
    return f"[{colour}]{state}[/]"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


def render(fleet: Fleet, console: Console) -> None:
    hosts = sorted({host for _, host in fleet.targets} | set(fleet.units))
    table = Table(title="Hosts", title_justify="left")
    for column in ("host", "scraped", "fleet units", "workers with heartbeats"):
        table.add_column(column)
    for host in hosts:
        scraped = ", ".join(
            f"{job} " + ("[green]up[/]" if health == "up" else f"[red]{health}[/] ({error})")
            for (job, name), (health, error) in sorted(fleet.targets.items())
            if name == host
        )
        units = ", ".join(
            f"{unit} {_state(state)}" for unit, state in sorted(fleet.units[host].items())
        )
        table.add_row(
            host, scraped, units or "-", ", ".join(sorted(fleet.workers.get(host, []))) or "-"
        )
    console.print(table)

    table = Table(title="Queues", title_justify="left")
    for column in ("queue", "messages", "live workers"):
        table.add_column(column)
    for queue in sorted(set(fleet.queues) | set(fleet.consumers)):
        length, consumers = fleet.queues.get(queue, 0.0), fleet.consumers.get(queue, 0.0)
        mark = "[red]0[/]" if length > 0 and not consumers else f"{consumers:.0f}"
        table.add_row(queue, f"{length:.0f}", mark)
    unacked = "-" if fleet.unacked is None else f"{fleet.unacked:.0f}"
    table.caption = f"delivered, not yet acknowledged (unacked): {unacked}"
    console.print(table)

    table = Table(title="Redis", title_justify="left")
    for column in ("host", "role", "memory (of maxmemory)", "AOF write", "RDB save"):
        table.add_column(column)
    for host, values in sorted(fleet.redis.items()):
        used, limit = values.get("redis_memory_used_bytes"), values.get("redis_memory_max_bytes")
        share = f" ({used / limit:.0%} of {_mib(limit)})" if used is not None and limit else ""
        ok = {1.0: "[green]ok[/]", 0.0: "[red]failing[/]"}
        table.add_row(
            host,
            str(values.get("role", "?")),
            _mib(used) + share,
            ok.get(values.get("redis_aof_last_write_status", -1), "-"),
            ok.get(values.get("redis_rdb_last_bgsave_status", -1), "-"),
        )
    console.print(table)

    if fleet.alerts:
        table = Table(title="Firing alerts", title_justify="left")
        for column in ("alert", "severity", "what", "since"):
            table.add_column(column)
        for alert in fleet.alerts:
            labels = alert["labels"]
            table.add_row(
                f"[red]{labels['alertname']}[/]",
                labels.get("severity", ""),
                alert.get("annotations", {}).get("summary", ""),
                alert.get("activeAt", "")[:19],
            )
        console.print(table)
    else:
        console.print("[green]No alert firing.[/]")
