"""Health checks shared by ``fleetapp doctor`` and the pre-flight of ``fetch``/``add``.

Every network call here is bounded by a timeout, so a dead Redis never hangs the CLI.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.retry import Retry

from fleetapp.config import Settings, redact_url

# Exit codes (documented in the CLI's --help and the README); keep them stable.
EXIT_OK = 0
EXIT_FAILED = 1  # some fetches failed, a task raised, or doctor found another problem
EXIT_USAGE = 2  # bad arguments (argparse's own code too), including a bad URL
EXIT_CONFIG = 3  # invalid FLEETAPP_* setting
EXIT_BROKER_DOWN = 4  # Redis unreachable (refused, timeout, DNS)
EXIT_AUTH = 5  # Redis rejected the credentials (wrong/missing password, ACL)
EXIT_NO_WORKERS = 6  # no worker answered, or none consumes a queue a task is routed to
EXIT_UNKNOWN_TASK = 7  # the workers do not know a task the client sends
EXIT_TIMEOUT = 8  # results did not arrive within --timeout

REDIS_TIMEOUT = 3.0
# kombu's Redis transport keeps priorities in extra lists: "<queue>", "<queue>\x06\x163", ...
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
TRAP = '"Received unregistered task" trap'


class FleetError(Exception):
    """An expected failure: printed as one line, mapped to an exit code, no traceback."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


def redis_client(url: str, settings: Settings, timeout: float = REDIS_TIMEOUT) -> redis.Redis:
    """A plain redis-py client for the broker/backend URL with hard timeouts and no retries."""
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if settings.tls:
        kwargs["ssl_cert_reqs"] = "required"
        if settings.ca_file:
            kwargs["ssl_ca_certs"] = settings.ca_file
    return redis.Redis.from_url(url, **kwargs)


def check_redis(url: str, settings: Settings, what: str = "broker") -> None:
    """PING with authentication; raises FleetError (broker down / auth failure)."""
    shown = redact_url(url)
    client = redis_client(url, settings)
    try:
        client.ping()
    except (redis.exceptions.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
        raise FleetError(EXIT_AUTH, f"{what} {shown} rejected the credentials: {exc}") from None
    except redis.exceptions.ResponseError as exc:
        if any(word in str(exc) for word in ("NOAUTH", "WRONGPASS", "NOPERM")):
            raise FleetError(EXIT_AUTH, f"{what} {shown} rejected the credentials: {exc}") from None
        raise FleetError(EXIT_BROKER_DOWN, f"{what} {shown} answered an error: {exc}") from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise FleetError(EXIT_BROKER_DOWN, f"cannot reach the {what} at {shown}: {exc}") from None
    finally:
        client.close()


def check_backends(settings: Settings) -> None:
    check_redis(settings.broker_url, settings, "broker")
    if settings.result_backend != settings.broker_url:
        check_redis(settings.result_backend, settings, "result backend")


def queue_length(client: redis.Redis, queue: str) -> int:
    keys = [queue] + [f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS[1:]]
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.llen(key)
    return sum(int(n) for n in pipe.execute())


@dataclass
class Worker:
    tasks: list[str] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)


def inspect_workers(app: Celery, timeout: float) -> dict[str, Worker]:
    """Workers that answered within ``timeout``: their registered tasks and queues."""
    registered = app.control.inspect(timeout=timeout).registered() or {}
    if not registered:
        return {}
    # We now know who is there: the second question returns as soon as they all answered.
    hosts = sorted(registered)
    active_queues = (
        app.control.inspect(timeout=timeout, destination=hosts, limit=len(hosts)).active_queues()
        or {}
    )
    workers: dict[str, Worker] = {}
    for host in sorted(set(registered) | set(active_queues)):
        workers[host] = Worker(
            tasks=sorted(registered.get(host) or []),
            queues=sorted(q.get("name", "?") for q in active_queues.get(host) or []),
        )
    return workers


def client_tasks(app: Celery) -> dict[str, str]:
    """{task name: queue} for the tasks this client can send."""
    app.loader.import_default_modules()
    default = app.conf.task_default_queue
    result: dict[str, str] = {}
    for name in sorted(app.tasks):
        if name.startswith("celery."):
            continue
        route = app.amqp.router.route({}, name)
        queue = route.get("queue")
        result[name] = getattr(queue, "name", None) or default
    return result


def explain_missing(name: str, worker_tasks: set[str]) -> str:
    """One sentence naming the tutorial's trap for a task the workers do not know."""
    short = name.rsplit(".", 1)[-1]
    similar = sorted(t for t in worker_tasks if t.rsplit(".", 1)[-1] == short)
    similar += [t for t in difflib.get_close_matches(name, worker_tasks, n=2) if t not in similar]
    if similar:
        others = " and ".join(f"'{t}'" for t in similar)
        return (
            f"The client sends '{name}' but the workers registered {others}: the tutorial's"
            f" {TRAP} (workers drop the message with a KeyError), so deploy the same fleetapp"
            " version, with the same task names, to clients and workers."
        )
    return (
        f"The client sends '{name}' but no online worker registered it: the tutorial's {TRAP}"
        " (workers drop the message with a KeyError), so check the workers run fleetapp"
        " with this task."
    )


@dataclass
class Report:
    broker: str
    result_backend: str
    broker_ok: bool = False
    workers: dict[str, Worker] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    queues: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    exit_code: int = EXIT_OK

    @property
    def healthy(self) -> bool:
        return self.exit_code == EXIT_OK

    def fail(self, exit_code: int, problem: str) -> None:
        self.problems.append(problem)
        # The first (most fundamental) failure decides the exit code.
        if self.exit_code == EXIT_OK:
            self.exit_code = exit_code

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["healthy"] = self.healthy
        return data


def diagnose(app: Celery, settings: Settings, timeout: float = 2.0) -> Report:
    """Broker, workers, task names and queues; never raises for expected failures."""
    report = Report(
        broker=redact_url(settings.broker_url), result_backend=redact_url(settings.result_backend)
    )
    try:
        check_backends(settings)
    except FleetError as exc:
        report.fail(exc.exit_code, exc.message)
        return report
    report.broker_ok = True

    known = client_tasks(app)
    queues = sorted({app.conf.task_default_queue, *known.values()})
    client = redis_client(settings.broker_url, settings)
    try:
        report.queues = {queue: queue_length(client, queue) for queue in queues}
    except redis.exceptions.RedisError as exc:
        report.fail(EXIT_BROKER_DOWN, f"could not read queue lengths: {exc}")
    finally:
        client.close()

    try:
        report.workers = inspect_workers(app, timeout)
    except (OSError, redis.exceptions.RedisError) as exc:
        report.fail(EXIT_BROKER_DOWN, f"could not reach the workers through the broker: {exc}")
        return report
    if not report.workers:
        report.fail(EXIT_NO_WORKERS, f"no worker answered within {timeout:g} s")
        return report

    all_worker_tasks = {t for w in report.workers.values() for t in w.tasks}
    for name, queue in known.items():
        on = sorted(h for h, w in report.workers.items() if name in w.tasks)
        consumers = sorted(h for h, w in report.workers.items() if queue in w.queues)
        serving = sorted(set(on) & set(consumers))
        report.tasks[name] = {
            "queue": queue,
            "registered_on": on,
            "serving": serving,
            "ok": bool(serving),
        }
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
    return report


def preflight(app: Celery, settings: Settings, names: list[str], timeout: float = 1.5) -> None:
    """Fail fast (FleetError) before sending: broker, auth, workers, task names."""
    check_backends(settings)
    workers = inspect_workers(app, timeout)
    if not workers:
        raise FleetError(
            EXIT_NO_WORKERS, f"no worker answered within {timeout:g} s; is any running?"
        )
    known = client_tasks(app)
    all_worker_tasks = {t for w in workers.values() for t in w.tasks}
    for name in names:
        queue = known.get(name, app.conf.task_default_queue)
        if name not in all_worker_tasks:
            raise FleetError(EXIT_UNKNOWN_TASK, explain_missing(name, all_worker_tasks))
        if not any(queue in w.queues and name in w.tasks for w in workers.values()):
            raise FleetError(EXIT_NO_WORKERS, f"no worker with '{name}' consumes queue '{queue}'")
