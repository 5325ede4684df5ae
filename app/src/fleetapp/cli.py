"""``fleetapp``: fetch URLs on the fleet, add numbers, and diagnose the deployment.

Exit codes:
  0  success (doctor: healthy)
  1  some fetches failed, a task raised, or doctor found another problem
  2  bad arguments (including a malformed or non-http(s) URL: nothing is sent)
  3  invalid FLEETAPP_* configuration
  4  broker (Redis) unreachable
  5  broker rejected the credentials (wrong password / ACL)
  6  no workers online (or none consuming the queue a task is routed to)
  7  unknown task: the workers did not register a task the client sends
  8  timed out waiting for results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fleetapp import __version__
from fleetapp.config import ConfigError, Settings, load_settings
from fleetapp.doctor import (
    EXIT_AUTH,
    EXIT_BROKER_DOWN,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNKNOWN_TASK,
    EXIT_USAGE,
    FleetError,
    Report,
    diagnose,
    explain_missing,
    preflight,
)
from fleetapp.fetching import (
    DEFAULT_TIMEOUT,
    FetchResult,
    InvalidURLError,
    clamp_timeout,
    validate_url,
)

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise FleetError(EXIT_USAGE, message)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fleetapp",
        description="Run the tutorial's tasks on a Celery fleet (config: FLEETAPP_* variables).",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fleetapp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    fetch = sub.add_parser("fetch", help="fetch URLs on the workers (or in-process)")
    fetch.add_argument("urls", nargs="*", metavar="URL")
    fetch.add_argument(
        "-f", "--file", type=Path, help="read URLs from FILE, one per line (# comments)"
    )
    mode = fetch.add_mutually_exclusive_group()
    mode.add_argument(
        "--sequential", action="store_true", help="fetch one by one in-process, no Celery"
    )
    mode.add_argument(
        "--compare",
        action="store_true",
        help="run sequentially and distributed; print the speed-up",
    )
    fetch.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    fetch.add_argument(
        "--timeout",
        type=_positive_float,
        default=120.0,
        help="overall seconds to wait for results (default 120)",
    )
    fetch.add_argument(
        "--fetch-timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        help=f"per-URL timeout in seconds (default {DEFAULT_TIMEOUT:g})",
    )
    fetch.add_argument(
        "--no-check", action="store_true", help="skip the broker/worker pre-flight check"
    )

    add = sub.add_parser("add", help="add two numbers on a worker")
    add.add_argument("a", type=_number)
    add.add_argument("b", type=_number)
    add.add_argument(
        "--timeout", type=_positive_float, default=30.0, help="seconds to wait (default 30)"
    )
    add.add_argument("--json", action="store_true", help="print machine-readable JSON only")

    doctor = sub.add_parser("doctor", help="check broker, workers, task names and queues")
    doctor.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    doctor.add_argument(
        "--timeout",
        type=_positive_float,
        default=2.0,
        help="seconds to wait for Redis (default 2)",
    )
    return parser


def _read_urls(args: argparse.Namespace) -> list[str]:
    urls = list(args.urls)
    if args.file is not None:
        try:
            text = args.file.read_text(encoding="utf-8")
        except OSError as exc:
            raise FleetError(
                EXIT_USAGE, f"cannot read {args.file}: {exc.strerror or exc}"
            ) from None
        urls += [
            ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")
        ]
    if not urls:
        raise FleetError(EXIT_USAGE, "no URLs given (pass URLs or -f FILE)")
    for url in urls:
        try:
            validate_url(url)
        except InvalidURLError as exc:
            raise FleetError(EXIT_USAGE, f"{url!r}: {exc.message} (nothing was sent)") from None
    return urls


def _progress_results(
    iterator: Iterator[FetchResult], total: int, label: str, show: bool
) -> tuple[list[FetchResult], float]:
    started = time.monotonic()
    results: list[FetchResult] = []
    if not show:
        results = list(iterator)
        return results, time.monotonic() - started
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True) as progress:
        bar = progress.add_task(label, total=total)
        for result in iterator:
            results.append(result)
            progress.advance(bar)
    return results, time.monotonic() - started


def _in_order(urls: list[str], results: list[FetchResult]) -> list[FetchResult]:
    """Results in input order (they arrive in completion order; URLs may repeat)."""
    by_url: dict[str, list[FetchResult]] = {}
    for result in results:
        by_url.setdefault(result["url"], []).append(result)
    return [by_url[url].pop(0) for url in urls if by_url.get(url)]


def _table(title: str, results: list[FetchResult], wall: float) -> Table:
    table = Table(title=title, caption=f"total wall time {wall:.2f} s")
    table.add_column("URL", overflow="fold")
    table.add_column("status", justify="right")
    table.add_column("time", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("worker")
    for r in results:
        if r["error"] is not None:
            status = f"[red]{r['status'] or ''} {r['error']['code']}[/]".replace("[red] ", "[red]")
        else:
            status = f"[green]{r['status']}[/]"
        table.add_row(r["url"], status, f"{r['elapsed']:.2f} s", str(r["bytes"]), r["worker"])
    return table


def cmd_fetch(args: argparse.Namespace, settings: Settings) -> int:
    from fleetapp.fanout import FETCH_TASK, fetch_many, fetch_sequential

    urls = _read_urls(args)
    try:
        per_url = min(clamp_timeout(args.fetch_timeout), args.timeout)
    except InvalidURLError as exc:
        raise FleetError(EXIT_USAGE, f"--fetch-timeout: {exc.message}") from None
    show = not args.json and stderr.is_terminal
    out: dict[str, Any] = {
        "mode": "sequential" if args.sequential else "compare" if args.compare else "distributed"
    }
    exit_code = EXIT_OK

    sequential: list[FetchResult] | None = None
    if args.sequential or args.compare:
        results, seq_wall = _progress_results(
            fetch_sequential(
                urls, fetch_timeout=per_url, allow_networks=settings.fetch_allow_networks
            ),
            len(urls),
            "sequential",
            show,
        )
        sequential = results
        out["sequential_time"] = round(seq_wall, 3)
        if args.sequential:
            out["results"], out["wall_time"] = results, round(seq_wall, 3)

    if not args.sequential:
        from fleetapp.celery import app

        if not args.no_check:
            preflight(app, settings, ["fleetapp.fetch_url"])
        stream = fetch_many(urls, timeout=args.timeout, fetch_timeout=per_url, app=app)
        results, dist_wall = _progress_results(stream, len(urls), "distributed", show)
        results = _in_order(urls, results)
        out["results"], out["wall_time"] = results, round(dist_wall, 3)
        out["distributed_time"] = round(dist_wall, 3)
        if sequential is not None:
            out["sequential_results"] = sequential
            out["speedup"] = round(out["sequential_time"] / dist_wall, 2) if dist_wall > 0 else None
        codes = {r["error"]["code"] for r in results if r["error"]}
        if "unregistered" in codes:
            exit_code = EXIT_UNKNOWN_TASK
            stderr.print(explain_missing(FETCH_TASK, set()), markup=False, highlight=False)
        elif "not_sent" in codes:
            exit_code = EXIT_BROKER_DOWN
        elif any(
            r["error"] and r["error"]["code"] == "timeout" and r["worker"] == "?" for r in results
        ):
            exit_code = EXIT_TIMEOUT

    failed = sum(1 for r in out["results"] if not r["ok"])
    out["ok"] = len(out["results"]) - failed
    out["failed"] = failed
    if exit_code == EXIT_OK and failed:
        exit_code = EXIT_FAILED
    out["exit_code"] = exit_code

    if args.json:
        print(json.dumps(out, indent=2))
        return exit_code
    if sequential is not None and args.compare:
        stdout.print(_table("sequential (in-process)", sequential, out["sequential_time"]))
    title = "sequential (in-process)" if args.sequential else "distributed (Celery workers)"
    stdout.print(_table(title, out["results"], out["wall_time"]))
    if args.compare:
        stdout.print(
            f"sequential {out['sequential_time']:.2f} s,"
            f" distributed {out['distributed_time']:.2f} s: [bold]{out['speedup']}x[/] faster"
        )
    if failed:
        stderr.print(f"[red]{failed} of {len(out['results'])} URL(s) failed[/]")
    return exit_code


def cmd_add(args: argparse.Namespace, settings: Settings) -> int:
    from celery.exceptions import TimeoutError as CeleryTimeoutError

    from fleetapp.celery import app

    preflight(app, settings, ["fleetapp.add"])
    result = app.tasks["fleetapp.add"].delay(args.a, args.b)
    try:
        value = result.get(timeout=args.timeout, propagate=False)
    except CeleryTimeoutError:
        raise FleetError(EXIT_TIMEOUT, f"no result within {args.timeout:g} s") from None
    worker = getattr(result, "worker", None)
    if result.failed():
        raise FleetError(EXIT_FAILED, f"add failed on the worker: {value}")
    result.forget()
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, "result": value, "worker": worker}))
    else:
        stdout.print(f"{args.a} + {args.b} = [bold]{value}[/] (worker {worker})")
    return EXIT_OK


def _print_report(report: Report) -> None:
    stdout.print(
        f"broker          {report.broker}  {'[green]ok[/]' if report.broker_ok else '[red]FAIL[/]'}"
    )
    if report.result_backend != report.broker:
        stdout.print(f"result backend  {report.result_backend}")
    if report.workers:
        table = Table(title="workers")
        table.add_column("worker")
        table.add_column("queues")
        table.add_column("tasks")
        for host, worker in report.workers.items():
            table.add_row(host, ", ".join(worker.queues), ", ".join(worker.tasks))
        stdout.print(table)
    if report.tasks:
        table = Table(title="tasks this client sends")
        table.add_column("task")
        table.add_column("queue")
        table.add_column("served by")
        for name, info in report.tasks.items():
            served = ", ".join(info["serving"]) or "[red]nobody[/]"
            table.add_row(name, info["queue"], served)
        stdout.print(table)
    if report.queues:
        stdout.print("queue lengths   " + ", ".join(f"{q}={n}" for q, n in report.queues.items()))
    for problem in report.problems:
        stdout.print(f"[red]problem:[/] {problem}")
    stdout.print(
        "[green]healthy[/]" if report.healthy else f"[red]unhealthy[/] (exit {report.exit_code})"
    )


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    from fleetapp.celery import app

    report = diagnose(app, settings, timeout=args.timeout)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        _print_report(report)
    return report.exit_code


COMMANDS = {"fetch": cmd_fetch, "add": cmd_add, "doctor": cmd_doctor}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        try:
            settings = load_settings()
        except ConfigError as exc:
            raise FleetError(EXIT_CONFIG, f"configuration error: {exc}") from None
        return COMMANDS[args.command](args, settings)
    except FleetError as exc:
        stderr.print(f"fleetapp: error: {exc.message}", markup=False, highlight=False)
        return exc.exit_code
    except KeyboardInterrupt:
        stderr.print("fleetapp: interrupted")
        return 130
    except Exception as exc:
        # Publish/receive failures that slipped past the pre-flight (Redis died meanwhile).
        code = _classify_unexpected(exc)
        if code is None:
            raise
        stderr.print(f"fleetapp: error: lost the broker: {exc}", markup=False, highlight=False)
        return code


def _classify_unexpected(exc: BaseException) -> int | None:
    import kombu.exceptions
    import redis.exceptions

    # kombu wraps a refused password in its OperationalError: look down the causes.
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, redis.exceptions.AuthenticationError):
            return EXIT_AUTH
        cause = cause.__cause__
    if isinstance(exc, RuntimeError) and "result store" in str(exc):
        return EXIT_BROKER_DOWN  # Celery's result consumer gave up reconnecting
    if isinstance(
        exc,
        kombu.exceptions.OperationalError
        | redis.exceptions.ConnectionError
        | redis.exceptions.TimeoutError
        | ConnectionError,
    ):
        return EXIT_BROKER_DOWN
    return None


if __name__ == "__main__":
    sys.exit(main())
