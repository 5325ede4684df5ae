"""``fleet-doctor``: is this Celery application served by the fleet?

For any application: the broker and result backend answer and accept the credentials, workers
are online, every task the application defines is registered by a worker that consumes the
queue it is routed to, no queue with messages lacks a consumer, and no task is parked as a dead
letter. When a client sends a name the workers do not know, it names the tutorial's trap in one
sentence.

Every network call is bounded, so a dead Redis never hangs it. Exit codes:

  0  healthy                      4  broker unreachable
  1  another problem, or tasks    5  credentials rejected
     parked as dead letters       6  no worker, or a queue without a consumer
  3  invalid configuration        7  a task the workers did not register
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from celery_fleet import config

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 3
EXIT_BROKER_DOWN = 4
EXIT_AUTH = 5
EXIT_NO_WORKERS = 6
EXIT_UNKNOWN_TASK = 7

REDIS_TIMEOUT = 3.0
TRAP = '"Received unregistered task" trap'
NO_WORKERS = "no worker is online (none renewed its entry in _fleet.workers lately)"


class DoctorError(Exception):
    """An expected failure: one line and an exit code, no traceback."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


def redact_url(url: str) -> str:
    """The URL without credentials, safe to print (each of a Sentinel URL's ``;`` parts)."""
    shown = []
    for part in url.split(";"):
        parts = urlsplit(part)
        host = parts.netloc.rpartition("@")[2]
        shown.append(urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)))
    return ";".join(shown)


def redis_client(app: Any, url: str, timeout: float = REDIS_TIMEOUT) -> Any:
    """A plain redis-py client for one of the app's URLs: hard timeouts, no retries. For a
    sentinel:// URL, a client of the primary the Sentinels name."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    ssl_options = app.conf.broker_use_ssl
    tls = isinstance(ssl_options, dict) and (
        url.startswith("rediss://") or url.startswith(config.SENTINEL_SCHEME)
    )
    if tls:
        kwargs.update({k: v for k, v in ssl_options.items() if k.startswith("ssl_")})
    if not url.startswith(config.SENTINEL_SCHEME):
        return redis.Redis.from_url(url, **kwargs)
    return _sentinel_primary(app, url, kwargs, tls)


@dataclass
class _Sentinels:
    """A sentinel:// URL taken apart: the Sentinels, the credentials, how to reach them."""

    addresses: list[tuple[str, int]]
    credentials: dict[str, str]
    db: int
    master_name: str
    kwargs: dict[str, Any]  # for the Sentinels' own connections


def _sentinels(app: Any, url: str, timeout: float) -> _Sentinels:
    parts = [urlsplit(part) for part in url.split(";") if part]
    first = parts[0]
    credentials = {
        name: unquote(value)
        for name, value in (("username", first.username), ("password", first.password))
        if value
    }
    # An app that sets broker_transport_options itself replaces the fleet's dict (the channel
    # fills the fleet's options back in; so does this).
    fleet_options = config.fleet_settings()["broker_transport_options"]
    options = {**fleet_options, **(app.conf.broker_transport_options or {})}
    master_name = options.get("master_name")
    if not master_name:
        raise DoctorError(EXIT_CONFIG, "a sentinel:// broker needs FLEET_REDIS_MASTER_NAME")
    kwargs = config.sentinel_kwargs_with_credentials(options.get("sentinel_kwargs"), credentials)
    kwargs.update(socket_timeout=timeout, socket_connect_timeout=timeout)
    return _Sentinels(
        addresses=config.sentinel_addresses(url),
        credentials=credentials,
        db=int(first.path.strip("/") or 0),
        master_name=str(master_name),
        kwargs=kwargs,
    )


def _sentinel_primary(app: Any, url: str, kwargs: dict[str, Any], tls: bool) -> Any:
    from redis import sentinel

    # Untyped in redis-py.
    Sentinel: Any = sentinel.Sentinel
    found = _sentinels(app, url, kwargs["socket_timeout"])
    sentinels = Sentinel(found.addresses, sentinel_kwargs=found.kwargs, **kwargs)
    return sentinels.master_for(found.master_name, db=found.db, ssl=tls, **found.credentials)


def sentinel_view(app: Any, url: str, timeout: float = REDIS_TIMEOUT) -> dict[str, Any]:
    """What each Sentinel says: the primary it names, and the replicas with their link and how
    far each is behind the furthest one (bytes of replication stream). Only what the tier's
    own user may ask a Sentinel: no command reaches a Redis server."""
    import redis

    found = _sentinels(app, url, timeout)
    sentinels: list[dict[str, Any]] = []
    replicas: list[dict[str, Any]] = []
    for host, port in found.addresses:
        entry: dict[str, Any] = {"address": f"{host}:{port}"}
        client: Any = redis.Redis(host, port, **found.kwargs)
        try:
            state = client.sentinel_master(found.master_name)
            entry.update(
                primary=f"{state['ip']}:{state['port']}",
                down=bool(state.get("is_sdown") or state.get("is_odown")),
                other_sentinels=int(state.get("num-other-sentinels", 0)),
                quorum=int(state.get("quorum", 0)),
            )
            if not replicas:
                replicas = [
                    {
                        "address": f"{r['ip']}:{r['port']}",
                        "link": str(r.get("master-link-status", "?")),
                        "offset": int(r.get("slave-repl-offset", 0)),
                        "down": bool(r.get("is_sdown") or r.get("is_odown")),
                    }
                    for r in client.sentinel_slaves(found.master_name)
                ]
        except (OSError, redis.exceptions.RedisError) as exc:
            entry["error"] = str(exc)
        finally:
            client.close()
        sentinels.append(entry)
    furthest = max((r["offset"] for r in replicas), default=0)
    for replica in replicas:
        replica["behind_bytes"] = furthest - replica["offset"]
    named = [s["primary"] for s in sentinels if "primary" in s]
    primary = max(set(named), key=named.count) if named else None
    return {
        "master_name": found.master_name,
        "primary": primary,
        "named_by": named.count(primary) if primary else 0,
        "replicas": replicas,
        "sentinels": sentinels,
    }


def check_redis(app: Any, url: str, what: str) -> None:
    import redis

    shown = redact_url(url)
    if urlsplit(url).scheme not in ("redis", "rediss", "sentinel"):
        raise DoctorError(
            EXIT_CONFIG, f"the {what} {shown} is not a redis://, rediss:// or sentinel:// URL"
        )
    client = redis_client(app, url)
    try:
        client.ping()
    except (redis.exceptions.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
        raise DoctorError(
            EXIT_AUTH, f"the {what} {shown} rejected the credentials: {exc}"
        ) from None
    except redis.exceptions.ResponseError as exc:
        if any(word in str(exc) for word in ("NOAUTH", "WRONGPASS", "NOPERM")):
            raise DoctorError(
                EXIT_AUTH, f"the {what} {shown} rejected the credentials: {exc}"
            ) from None
        raise DoctorError(EXIT_BROKER_DOWN, f"the {what} {shown} answered: {exc}") from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        # MasterNotFoundError is a ConnectionError: no Sentinel answered, or none knows a primary.
        raise DoctorError(EXIT_BROKER_DOWN, f"cannot reach the {what} at {shown}: {exc}") from None
    finally:
        client.close()


def check_backends(app: Any) -> None:
    broker, backend = str(app.conf.broker_url or ""), str(app.conf.result_backend or "")
    check_redis(app, broker, "broker")
    if backend and backend != broker:
        check_redis(app, backend, "result backend")


@dataclass
class Worker:
    tasks: list[str] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)


def online_workers(app: Any, timeout: float = REDIS_TIMEOUT) -> dict[str, Worker]:
    """Workers online (celery_fleet.registry): their registered tasks and queues.

    Read from Redis, not asked over the pidbox: clients may not broadcast to the workers.
    """
    from celery_fleet import registry

    options = app.conf.broker_transport_options or {}
    key = options.get("global_keyprefix", "") + registry.WORKERS_KEY
    client = redis_client(app, str(app.conf.broker_url), timeout)
    try:
        seconds, microseconds = client.time()
        entries = registry.read(client, key)
    finally:
        client.close()
    now = seconds + microseconds / 1_000_000
    lease = float(options.get("visibility_timeout", 3600))
    return {
        name: Worker(tasks=entry.tasks, queues=entry.queues)
        for name, entry in registry.fresh(entries, now, lease).items()
    }


def describe(app: Any) -> dict[str, Any]:
    """What the application sends: its default queue and {task name: queue}."""
    app.loader.import_default_modules()
    default = app.conf.task_default_queue
    tasks: dict[str, str] = {}
    for name in sorted(app.tasks):
        if name.startswith("celery."):
            continue
        queue = app.amqp.router.route({}, name).get("queue")
        tasks[name] = getattr(queue, "name", None) or default
    return {"default_queue": default, "tasks": tasks}


def explain_missing(name: str, worker_tasks: set[str]) -> str:
    """One sentence naming the tutorial's trap for a task the workers do not know."""
    short = name.rsplit(".", 1)[-1]
    # Same function name in another module first (the tutorial's case); else the closest names.
    similar = sorted(t for t in worker_tasks if t.rsplit(".", 1)[-1] == short)
    similar = similar or difflib.get_close_matches(name, worker_tasks, n=2)
    if similar:
        others = " and ".join(f"'{t}'" for t in similar)
        return (
            f"The client sends '{name}' but the workers registered {others}: the tutorial's"
            f" {TRAP} (a worker drops such a message), so give clients and workers the same"
            " task names: the same code, and explicit names (@app.task(name=...))."
        )
    return (
        f"The client sends '{name}' but no online worker registered it: the tutorial's {TRAP}"
        " (a worker drops such a message), so deploy the code that defines it to the workers."
    )


def queue_length(client: Any, prefix: str, queue: str) -> int:
    return int(client.llen(prefix + queue))


def dead_letters(app: Any, client: Any, queues: list[str]) -> dict[str, int]:
    """Parked tasks of these queues (celery_fleet.deadletter): {queue: count}, empty ones left out.

    One LLEN per queue: the clients' Redis user may read lists, not scan the keyspace.
    """
    from celery_fleet.deadletter import dead_key

    prefix = (app.conf.broker_transport_options or {}).get("global_keyprefix", "")
    found = {queue: int(client.llen(prefix + dead_key(queue))) for queue in queues}
    return {queue: n for queue, n in found.items() if n}


@dataclass
class Report:
    broker: str
    result_backend: str
    broker_ok: bool = False
    workers: dict[str, Worker] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    queues: dict[str, int] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)
    # With Sentinel: the primary, its replicas and each Sentinel's view (sentinel_view).
    sentinel: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    exit_code: int = EXIT_OK

    @property
    def healthy(self) -> bool:
        return self.exit_code == EXIT_OK

    def fail(self, exit_code: int, problem: str) -> None:
        self.problems.append(problem)
        if self.exit_code == EXIT_OK:  # the first (most fundamental) failure decides
            self.exit_code = exit_code

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["healthy"] = self.healthy
        return data


def diagnose(app: Any, timeout: float = 2.0) -> Report:
    """Broker, workers, task names, queues and dead letters; never raises for expected failures."""
    report = _diagnose(app, timeout)
    # Last, so a more basic failure (no worker, an unregistered task) keeps its exit code.
    prefix = (app.conf.broker_transport_options or {}).get("global_keyprefix", "")
    for queue, parked in report.dead_letters.items():
        dead, live = f"{prefix}_fleet.dead.{queue}", f"{prefix}{queue}"
        report.fail(
            EXIT_FAILED,
            f"{parked} task(s) of queue '{queue}' parked in {dead}: each killed its worker on"
            f" every start; fix the cause, then move them back with LMOVE {dead} {live} RIGHT LEFT"
            " (as the Redis admin user)",
        )
    return report


def _redis_failure(what: str, exc: Exception) -> tuple[int, str]:
    """The exit code and message for a Redis error while reading ``what``."""
    import redis

    if isinstance(exc, redis.exceptions.NoPermissionError) or str(exc).startswith("NOPERM"):
        # Redis is up and took the password: this user's ACL does not allow the read.
        return EXIT_AUTH, (
            f"Redis refused this host's user the {what}: {exc} (its ACL does not cover them: is"
            " FLEET_REDIS_KEY_PREFIX the deployment's, and is this the host's own env file?)"
        )
    return EXIT_BROKER_DOWN, f"could not read the {what}: {exc}"


def _diagnose(app: Any, timeout: float) -> Report:
    import redis

    report = Report(
        broker=redact_url(str(app.conf.broker_url or "")),
        result_backend=redact_url(str(app.conf.result_backend or "")),
    )
    try:
        check_backends(app)
    except DoctorError as exc:
        report.fail(exc.exit_code, exc.message)
        return report
    report.broker_ok = True
    broker = str(app.conf.broker_url or "")
    if broker.startswith(config.SENTINEL_SCHEME):
        report.sentinel = sentinel_view(app, broker, timeout)

    known = describe(app)["tasks"]
    try:
        report.workers = online_workers(app, timeout)
    except (OSError, redis.exceptions.RedisError) as exc:
        report.fail(*_redis_failure("list of online workers", exc))
        return report
    consumed = {q for w in report.workers.values() for q in w.queues}
    queues = sorted({app.conf.task_default_queue, *known.values(), *consumed})
    client = redis_client(app, str(app.conf.broker_url))
    try:
        prefix = (app.conf.broker_transport_options or {}).get("global_keyprefix", "")
        report.queues = {queue: queue_length(client, prefix, queue) for queue in queues}
        report.dead_letters = dead_letters(app, client, queues)
    except redis.exceptions.RedisError as exc:
        report.fail(*_redis_failure("queue lengths", exc))
    finally:
        client.close()

    if not report.workers:
        report.fail(EXIT_NO_WORKERS, NO_WORKERS)
        return report

    all_worker_tasks = {t for w in report.workers.values() for t in w.tasks}
    for name, queue in known.items():
        on = sorted(h for h, w in report.workers.items() if name in w.tasks)
        consumers = sorted(h for h, w in report.workers.items() if queue in w.queues)
        serving = sorted(set(on) & set(consumers))
        report.tasks[name] = {"queue": queue, "registered_on": on, "serving": serving}
        if not on:
            report.fail(EXIT_UNKNOWN_TASK, explain_missing(name, all_worker_tasks))
        elif not consumers:
            report.fail(
                EXIT_NO_WORKERS, f"no worker consumes queue '{queue}', where '{name}' is routed"
            )
        elif not serving:
            report.fail(
                EXIT_UNKNOWN_TASK,
                f"the workers consuming queue '{queue}' ({', '.join(consumers)}) do not have"
                f" '{name}' registered: the tutorial's {TRAP}",
            )
    for queue, length in report.queues.items():
        if length and queue not in consumed:
            report.fail(
                EXIT_NO_WORKERS,
                f"queue '{queue}' holds {length} message(s) and no worker consumes it",
            )
    return report


def preflight(app: Any, names: list[str], timeout: float = 1.5) -> None:
    """Fail fast (DoctorError) before sending: broker, credentials, workers, task names."""
    check_backends(app)
    workers = online_workers(app, timeout)
    if not workers:
        raise DoctorError(EXIT_NO_WORKERS, NO_WORKERS)
    known = describe(app)["tasks"]
    all_worker_tasks = {t for w in workers.values() for t in w.tasks}
    for name in names:
        queue = known.get(name, app.conf.task_default_queue)
        if name not in all_worker_tasks:
            raise DoctorError(EXIT_UNKNOWN_TASK, explain_missing(name, all_worker_tasks))
        if not any(queue in w.queues and name in w.tasks for w in workers.values()):
            raise DoctorError(EXIT_NO_WORKERS, f"no worker with '{name}' consumes queue '{queue}'")


def render(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    console.print(f"broker: {report.broker}  result backend: {report.result_backend}")
    if report.sentinel:
        _render_sentinel(console, report.sentinel)
    if report.workers:
        table = Table(title="workers")
        for column in ("worker", "queues", "tasks"):
            table.add_column(column)
        for host, worker in report.workers.items():
            table.add_row(host, ", ".join(worker.queues), str(len(worker.tasks)))
        console.print(table)
    if report.tasks:
        table = Table(title="tasks this application sends")
        for column in ("task", "queue", "served by"):
            table.add_column(column)
        for name, info in report.tasks.items():
            table.add_row(name, info["queue"], ", ".join(info["serving"]) or "[red]nobody[/]")
        console.print(table)
    if report.queues:
        console.print("queues: " + ", ".join(f"{q}={n}" for q, n in report.queues.items()))
    if report.dead_letters:
        parked = ", ".join(f"{q}={n}" for q, n in report.dead_letters.items())
        console.print(f"parked (dead letters): {parked}")
    for problem in report.problems:
        console.print(f"[bold red]problem:[/] {problem}", highlight=False)
    console.print("[green]healthy[/]" if report.healthy else "[red]not healthy[/]")


def _render_sentinel(console: Any, view: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"Redis, Sentinel '{view['master_name']}'")
    for column in ("role", "address", "state"):
        table.add_column(column)
    told = len(view["sentinels"])
    table.add_row(
        "primary",
        view["primary"] or "[red]none named[/]",
        f"named by {view['named_by']} of {told} Sentinels",
    )
    for replica in view["replicas"]:
        state = (
            "down"
            if replica["down"]
            else f"link {replica['link']}, {replica['behind_bytes']} bytes behind"
        )
        table.add_row("replica", replica["address"], state)
    for sentinel in view["sentinels"]:
        if "error" in sentinel:
            state = f"[red]{sentinel['error']}[/]"
        else:
            state = (
                f"names {sentinel['primary']}{' (down)' if sentinel['down'] else ''},"
                f" sees {sentinel['other_sentinels']} other Sentinels, quorum {sentinel['quorum']}"
            )
        table.add_row("sentinel", sentinel["address"], state)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    from celery_fleet.config import ConfigError, load_env_file

    try:
        load_env_file()  # FLEET_ENV_FILE: the app's environment, FLEET_APP included
    except ConfigError as exc:
        print(f"fleet-doctor: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    parser = argparse.ArgumentParser(prog="fleet-doctor", description=__doc__.splitlines()[0])
    parser.add_argument(
        "-A",
        "--app",
        default=os.environ.get("FLEET_APP"),
        help="the Celery app (default $FLEET_APP)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for Redis")
    parser.add_argument(
        "--describe", action="store_true", help="print the app's tasks and their queues, as JSON"
    )
    args = parser.parse_args(argv)
    if not args.app:
        parser.error("no app: pass -A/--app or set FLEET_APP")

    import celery_fleet

    try:
        celery_fleet.activate()
    except ConfigError as exc:
        print(f"fleet-doctor: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from celery.app.utils import find_app  # how `celery -A` loads an app

    sys.path.insert(0, os.getcwd())
    try:
        app = find_app(args.app)
    except Exception as exc:  # the user's import failed: say which, in one line
        print(f"fleet-doctor: cannot load the app {args.app!r}: {exc!r}", file=sys.stderr)
        return EXIT_CONFIG
    if args.describe:
        print(json.dumps(describe(app), indent=2))
        return EXIT_OK
    report = diagnose(app, timeout=args.timeout)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        render(report)
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
