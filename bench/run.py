"""`make bench`: the deployed fleet against the tutorial's deployment, on the lab, in one run.

Both deployments serve the same app (fleetapp) on the same worker hosts at the same time:

* the fleet's: what site.yml deployed (the ``network`` queue on gevent, ``default`` on prefork);
* the tutorial's: its worker command line, ``celery worker -P prefork -c 5``, one per worker
  host consuming the app's queues, started for its turn with ``systemd-run`` as the app's user
  while the fleet's workers are stopped (``celery.target``); they start again afterwards. It
  runs through ``fleet-celery``: the fleet admits no connection without TLS and a Redis user,
  so the two differ in pool, concurrency and prefetch, not in security.

Each benchmark runs the fleet's side, then the tutorial's, on the same hosts in the same run.

Benchmarks (a table each, then a summary; raw numbers in .build/bench/, a chart beside them):

1. fan-out: N webfarm URLs whose delays are uniform in 1-2 s (N = 5 is the tutorial's five
   URLs), from client1 with ``fleetapp.fanout.fetch_many``. Makespan, R = makespan / slowest
   single fetch, speed-up of the fleet over the tutorial's deployment. The webfarm's own
   ceiling (N concurrent GETs from client1, no Celery) is measured first.
2. tiny tasks: ``fleetapp.add`` sent one by one and as a group; publish and end-to-end rates,
   and E = fleet tasks/s / redis-benchmark LPUSH+RPOP ops/s from client1 (a throwaway Redis
   user for the few seconds it runs: redis-benchmark takes a password only on its command line).
3. deploy: site.yml as the run finds the lab (on a fresh lab: the whole deploy), then its
   idempotent re-run (changed=0), then adding a worker as the README says (worker3, retired and
   removed afterwards); each timed as a whole and per play.

Not a test: it reports. BENCH_SIZE=full adds N = 5,000 and 10,000 tiny tasks; BENCH_ONLY=fanout
(or tiny, deploy; comma-separated) runs only those.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / ".build" / "bench"
BIN = REPO / ".venv" / "bin"
SECRETS = Path(os.environ.get("HOME", "/root")) / ".celery-fleet" / "secrets" / "lab"
FULL = os.environ.get("BENCH_SIZE", "small") == "full"
ONLY = set(filter(None, os.environ.get("BENCH_ONLY", "fanout,tiny,deploy").split(",")))
CLIENT = "client1"
REDIS = "redis1"
WORKERS = ("worker1", "worker2")
WEBFARM = "http://198.18.0.1:8080"
REMOTE_DIR = "/usr/local/lib/fleet-bench"
APP_PYTHON = "/usr/local/bin/fleet-python"
# The app as deployed (roles/fleet defaults): its venv, user and environment files.
VENV = "/opt/celery-fleet/venv"
APP_USER = "celery"
APP_ENV = "/etc/celery-fleet/app.env"
TLS_CA = "/etc/celery-fleet/tls/ca.crt"
TUTORIAL_UNIT = "fleet-bench-tutorial"
APP_QUEUES = "network,default"
FANOUT_SIZES = [5, 100, 1000] + ([5000] if FULL else [])
# The tutorial's deployment takes ~N x 1.5 s / 10 processes: beyond 1,000 it would run minutes.
TUTORIAL_FANOUT_MAX = 1000
TINY_COUNT = 10_000 if FULL else 2_000
NEW_WORKER = "worker3"
WORKER_PLAY = "Deploy Celery workers"  # playbooks/workers.yml

console = Console(width=120)


def lab_exec(
    host: str, command: str, *, input: str | None = None, timeout: float = 1800
) -> subprocess.CompletedProcess[str]:
    """A shell command inside a lab machine; secrets go through stdin, never the command."""
    result = subprocess.run(
        [str(BIN / "lab"), "exec", host, "--", "sh", "-c", command],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{host}$ {command} -> {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def on_client(*args: str, input: str | None = None) -> dict[str, Any]:
    out = lab_exec(CLIENT, f"{APP_PYTHON} {REMOTE_DIR}/onclient.py {' '.join(args)}", input=input)
    return dict(json.loads(out.stdout))


def redis_admin(*commands: str) -> list[str]:
    """redis-cli commands as the admin user on the Redis host (password on stdin)."""
    script = "read -r REDISCLI_AUTH; export REDISCLI_AUTH; " + "; ".join(
        f"redis-cli --tls --cacert {TLS_CA} --no-auth-warning --user admin {c}" for c in commands
    )
    secret = (SECRETS / "redis-admin").read_text().strip()
    return lab_exec(REDIS, script, input=secret + "\n").stdout.split("\n")


# -- the tutorial's deployment ---------------------------------------------------------------


def start_tutorial() -> None:
    """The fleet's workers stop; the tutorial's take the app's queues."""
    for host in WORKERS:
        lab_exec(
            host,
            f"systemctl stop celery.target; systemctl stop {TUTORIAL_UNIT} 2>/dev/null;"
            f" systemctl reset-failed {TUTORIAL_UNIT} 2>/dev/null;"
            f" systemd-run --unit={TUTORIAL_UNIT} --uid={APP_USER} --gid={APP_USER}"
            f" --property=EnvironmentFile={APP_ENV} --working-directory=/tmp"
            f" {VENV}/bin/fleet-celery --app=fleetapp.celery:app worker --pool=prefork"
            f" --concurrency=5 --queues={APP_QUEUES} --hostname=tutorial@{host}"
            " --loglevel=INFO --without-mingle --without-gossip",
        )
    deadline = time.monotonic() + 120
    for host in WORKERS:
        while "ready." not in lab_exec(host, f"journalctl -u {TUTORIAL_UNIT} -o cat").stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the tutorial's worker on {host} did not start")
            time.sleep(1)


def stop_tutorial() -> None:
    """Back to the fleet's own workers."""
    for host in WORKERS:
        lab_exec(host, f"systemctl stop {TUTORIAL_UNIT} 2>/dev/null; systemctl start celery.target")


# -- benchmarks ------------------------------------------------------------------------------


def urls_for(n: int, seed: int) -> list[str]:
    if n == 5:
        return [f"{WEBFARM}/tutorial/{i}" for i in range(1, 6)]
    rng = random.Random(seed)
    return [f"{WEBFARM}/delay/{rng.uniform(1.0, 2.0):.3f}?n={i}" for i in range(n)]


def webfarm_ceiling() -> list[dict[str, Any]]:
    return [
        on_client("farm", f"--count={n}", "--delay=1", f"--webfarm={WEBFARM}")
        for n in FANOUT_SIZES
        if n > 5
    ]


def bench_fanout(side: str) -> dict[int, dict[str, Any]]:
    rows = {}
    for n in FANOUT_SIZES:
        if side == "tutorial" and n > TUTORIAL_FANOUT_MAX:
            continue
        path = f"{REMOTE_DIR}/urls-{n}.txt"
        lab_exec(CLIENT, f"cat > {path}", input="\n".join(urls_for(n, seed=n)) + "\n")
        rows[n] = result = on_client("fanout", f"--urls={path}")
        console.print(
            f"fan-out N={n}, {side}'s deployment: {result['makespan']:.1f} s"
            f" ({result['ok']}/{n} ok)"
        )
    return rows


def redis_calls() -> dict[str, int]:
    """Commands Redis has run since it started, per command (INFO commandstats)."""
    calls = {}
    for line in redis_admin("INFO commandstats"):
        match = re.match(r"cmdstat_([a-z|_-]+):calls=(\d+)", line.strip())
        if match:
            calls[match.group(1)] = int(match.group(2))
    return calls


def bench_tiny(side: str) -> dict[str, dict[str, Any]]:
    """Each mode timed from client1, with what Redis ran for it (the whole fleet's commands
    over the run, per task: the round trips a task costs)."""
    rows = {}
    for mode in ("one", "group"):
        before = redis_calls()
        rows[mode] = result = on_client("tiny", f"--count={TINY_COUNT}", f"--mode={mode}")
        after = redis_calls()
        per_task = {
            name: (after[name] - before.get(name, 0)) / TINY_COUNT
            for name in after
            if after[name] > before.get(name, 0)
        }
        result["redis_commands_per_task"] = dict(sorted(per_task.items(), key=lambda kv: -kv[1]))
        console.print(
            f"tiny tasks ({mode}), {side}'s deployment: {result['end_to_end_per_s']:.0f}"
            f" tasks/s end to end, publish {result['publish_per_s']:.0f}/s,"
            f" {sum(per_task.values()):.1f} Redis commands per task"
        )
    return rows


def measure(side: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "fanout" in ONLY:
        out["fanout"] = bench_fanout(side)
    if "tiny" in ONLY:
        out["tiny"] = bench_tiny(side)
    return out


def redis_benchmark() -> dict[str, float]:
    """LPUSH and RPOP ops/s from the client host, as a throwaway user confined to its keys."""
    lab_exec(
        CLIENT,
        "command -v redis-benchmark >/dev/null || "
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends"
        " redis-tools >/dev/null",
    )
    password = secrets.token_hex(16)
    redis_admin(f"ACL SETUSER bench on '>{password}' '~mylist*' +lpush +rpop +ping")
    try:
        out = lab_exec(
            CLIENT,
            # read: the password stays out of this script's text (it is on the command line of
            # redis-benchmark for its few seconds, the reason for the throwaway user).
            "read -r PW; redis-benchmark -h 198.18.0.10 -p 6379 --tls"
            f' --cacert {TLS_CA} --user bench -a "$PW" -t lpush,rpop -n 100000 -c 50 -d 800'
            " --csv 2>/dev/null",
            input=password + "\n",
        ).stdout
    finally:
        redis_admin("ACL DELUSER bench")
    rates = {}
    for line in out.splitlines():
        match = re.match(r'"(LPUSH|RPOP)[^"]*","([\d.]+)"', line)
        if match:
            rates[match.group(1).lower()] = float(match.group(2))
    return rates


def deploy(*args: str) -> dict[str, Any]:
    """One ansible-playbook run (site.yml unless args say otherwise), timed as a whole and per
    play (ansible.posix.json's play durations); the lab's inventory is ansible.cfg's default."""
    started = time.monotonic()
    run = subprocess.run(
        [str(BIN / "ansible-playbook"), *(args or ("site.yml",))],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        env={
            **os.environ,
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
        },
    )
    seconds = time.monotonic() - started
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{run.stdout[-3000:]}{run.stderr[-2000:]}")
    report = json.loads(run.stdout)
    plays: dict[str, float] = {}
    for play in report["plays"]:
        name, duration = play["play"]["name"], play["play"]["duration"]
        if "end" not in duration:  # a play whose hosts --limit left out
            continue
        start, end = (datetime.fromisoformat(duration[key]) for key in ("start", "end"))
        plays[name] = plays.get(name, 0.0) + (end - start).total_seconds()
    changed = sum(stats["changed"] for stats in report["stats"].values())
    return {"seconds": seconds, "changed": changed, "plays": plays}


def add_worker() -> dict[str, Any]:
    """Scale out as the README says (`lab add worker3`, then site.yml --limit worker3,redis),
    timed; the worker play of that run is the deploy of that one host from nothing. worker3 is
    retired and removed afterwards, so the lab is as the benchmark found it."""
    lab = str(BIN / "lab")
    subprocess.run([lab, "add", NEW_WORKER], check=True, capture_output=True)
    try:
        run = deploy("site.yml", "--limit", f"{NEW_WORKER},redis")
        deploy("playbooks/retire-worker.yml", "-e", f"host={NEW_WORKER}")
    finally:
        # Also after a failed deploy: the next run of site.yml closes Redis' firewall to it.
        subprocess.run([lab, "remove", NEW_WORKER], check=True, capture_output=True)
    run["one_host"] = run["plays"][WORKER_PLAY]
    return run


# -- report ----------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> None:
    if "fanout" in ONLY:
        report_fanout(results)
    if "tiny" in ONLY:
        report_tiny(results)
    if "deploy" in results:
        report_deploy(results["deploy"])
    report_summary(results)


def report_summary(results: dict[str, Any]) -> None:
    """The goals of issue 10 against this run: what is met, what is not."""
    rows: list[tuple[str, str, float | None, bool | None]] = []

    def fanout(side: str) -> dict[str, Any]:
        return {str(n): row for n, row in results.get(side, {}).get("fanout", {}).items()}

    fleet, tutorial = fanout("fleet").get("1000"), fanout("tutorial").get("1000")
    if fleet:
        rows.append(("fan-out N=1,000: R", "<= 1.3", ratio(fleet), ratio(fleet) <= 1.3))
    if fleet and tutorial:
        speedup = tutorial["makespan"] / fleet["makespan"]
        rows.append(("fan-out N=1,000: fleet speed-up", ">= 40x", speedup, speedup >= 40))
    if "tiny" in results.get("fleet", {}) and "tiny" in results.get("tutorial", {}):
        mine = results["fleet"]["tiny"]["one"]["end_to_end_per_s"]
        theirs = results["tutorial"]["tiny"]["one"]["end_to_end_per_s"]
        rows.append(("tiny tasks: fleet / tutorial", ">= 1.0", mine / theirs, mine >= theirs))
        bench = results.get("redis_benchmark", {})
        ops = (bench.get("lpush", 0) + bench.get("rpop", 0)) / 2
        if ops:
            rows.append(("tiny tasks: E", ">= 0.02", mine / ops, mine / ops >= 0.02))
    if "deploy" in results:
        again, add = results["deploy"]["idempotent"], results["deploy"]["add"]
        rows.append(("idempotent site.yml, s", "<= 15", again["seconds"], again["seconds"] <= 15))
        share = add["seconds"] / add["one_host"]
        rows.append(("adding a worker / one-host deploy", "<= 1.2x", share, share <= 1.2))
    table = Table(title="Summary: the goals against this run")
    for column in ("measure", "goal", "measured", "met"):
        table.add_column(column, justify="right")
    for name, goal, value, met in rows:
        shown = "-" if value is None else f"{value:.3g}"
        table.add_row(name, goal, shown, "yes" if met else "no")
    console.print(table)


def report_deploy(results: dict[str, Any]) -> None:
    table = Table(title="Deploy: ansible-playbook on the lab's hosts")
    for column in ("run", "hosts", "seconds", "changed"):
        table.add_column(column, justify="right")
    first, again, add = results["converge"], results["idempotent"], results["add"]
    table.add_row(
        "site.yml as found (fresh lab: converge)",
        "5",
        f"{first['seconds']:.1f}",
        str(first["changed"]),
    )
    table.add_row(
        "site.yml again (idempotent)", "5", f"{again['seconds']:.1f}", str(again["changed"])
    )
    table.add_row(
        f"add {NEW_WORKER}: site.yml --limit {NEW_WORKER},redis",
        "2",
        f"{add['seconds']:.1f}",
        str(add["changed"]),
    )
    table.add_row(
        f"  of which {NEW_WORKER}'s own deploy (the workers play)",
        "1",
        f"{add['one_host']:.1f}",
        "-",
    )
    console.print(table)
    console.print(
        f"adding a worker / a one-host deploy: {add['seconds'] / add['one_host']:.2f}x;"
        f" idempotent re-run per play: "
        + ", ".join(f"{name} {secs:.1f} s" for name, secs in again["plays"].items())
    )


def ratio(result: dict[str, Any]) -> float:
    """R: makespan over the slowest single fetch (1.0 = as fast as fanning out can be)."""
    return float(result["makespan"]) / max(float(result["slowest_fetch"]), 1e-9)


def report_fanout(results: dict[str, Any]) -> None:
    fan = Table(title="Fan-out: N webfarm URLs (delays 1-2 s) from client1")
    for column in ("N", "fleet makespan", "R fleet", "tutorial makespan", "R tutorial", "speed-up"):
        fan.add_column(column, justify="right")
    tutorial_rows = results["tutorial"]["fanout"]
    for n, fleet in results["fleet"]["fanout"].items():
        cells = [str(n), f"{fleet['makespan']:.2f} s", f"{ratio(fleet):.2f}"]
        tutorial = tutorial_rows.get(n)
        if tutorial:
            speedup = tutorial["makespan"] / fleet["makespan"]
            cells += [f"{tutorial['makespan']:.2f} s", f"{ratio(tutorial):.2f}", f"{speedup:.1f}x"]
        else:
            cells += ["-", "-", "-"]
        fan.add_row(*cells)
    console.print(fan)
    farm = Table(title="The webfarm's ceiling: N concurrent GETs of /delay/1 from client1")
    for column in ("N", "makespan", "slowest"):
        farm.add_column(column, justify="right")
    for row in results["webfarm"]:
        farm.add_row(str(row["count"]), f"{row['makespan']:.2f} s", f"{row['slowest']:.2f} s")
    console.print(farm)


def report_tiny(results: dict[str, Any]) -> None:
    tiny = Table(title=f"Tiny tasks: {TINY_COUNT} fleetapp.add from client1")
    for column in ("sent", "deployment", "publish/s", "end to end tasks/s", "E"):
        tiny.add_column(column, justify="right")
    bench = results["redis_benchmark"]
    ops = (bench.get("lpush", 0) + bench.get("rpop", 0)) / 2 or None
    for mode in ("one", "group"):
        for side in ("fleet", "tutorial"):
            row = results[side]["tiny"][mode]
            e = f"{row['end_to_end_per_s'] / ops:.4f}" if ops else "-"
            tiny.add_row(
                "one by one" if mode == "one" else "as a group",
                side,
                f"{row['publish_per_s']:.0f}",
                f"{row['end_to_end_per_s']:.0f}",
                e,
            )
    console.print(tiny)
    one = results["fleet"]["tiny"]["one"].get("redis_commands_per_task", {})
    console.print(
        f"Redis commands per task, fleet, one by one: {sum(one.values()):.1f} ("
        + ", ".join(f"{name} {n:.1f}" for name, n in one.items() if n >= 0.5)
        + ")"
    )
    console.print(
        f"redis-benchmark from client1 (TLS, 50 clients, 800-byte values): LPUSH"
        f" {bench.get('lpush', 0):.0f} ops/s, RPOP {bench.get('rpop', 0):.0f} ops/s"
    )


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for side, marker in (("fleet", "o"), ("tutorial", "s")):
        points = sorted((int(n), r["makespan"]) for n, r in results[side]["fanout"].items())
        ax.plot(*zip(*points, strict=True), marker=marker, label=f"{side}'s deployment")
    ax.axhline(2.0, color="grey", linestyle=":", label="slowest single fetch (2 s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("URLs fetched (N)")
    ax.set_ylabel("makespan (s)")
    ax.set_title(f"Fan-out on the lab ({time.strftime('%Y-%m-%d')})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "full": FULL}
    if "deploy" in ONLY:
        # As the run finds the lab (fresh: the whole deploy), then the idempotent re-run.
        results["deploy"] = {"converge": deploy(), "idempotent": deploy(), "add": add_worker()}
    lab_exec(
        CLIENT,
        f"install -d {REMOTE_DIR} && cat > {REMOTE_DIR}/onclient.py",
        input=(Path(__file__).parent / "onclient.py").read_text(),
    )
    if ONLY & {"fanout", "tiny"}:
        if "fanout" in ONLY:
            results["webfarm"] = webfarm_ceiling()
        if "tiny" in ONLY:
            results["redis_benchmark"] = redis_benchmark()
        results["fleet"] = measure("fleet")
        start_tutorial()
        try:
            results["tutorial"] = measure("tutorial")
        finally:
            stop_tutorial()
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
    payload = json.dumps(results, indent=2)
    (OUT / f"{stamp}.json").write_text(payload)
    (OUT / "latest.json").write_text(payload)
    report(results)
    if "fanout" in ONLY:
        chart(results, OUT / "fanout.png")
    console.print(f"raw numbers: {OUT / 'latest.json'}; chart: {OUT / 'fanout.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
