"""The commands that run the application with the fleet's runtime active.

``fleet-celery``  the ``celery`` command (same arguments; ``-A`` defaults to $FLEET_APP); the
                  systemd units run it.
``fleet-python``  the Python interpreter of the application's venv: ``-c CODE``, ``-m MODULE``,
                  ``SCRIPT``, or an interactive prompt, like ``python``.
"""

from __future__ import annotations

import code
import os
import runpy
import sys

# The exit status of a bad FLEET_* setting (as fleet-doctor's and fleetapp's "configuration").
CONFIG_ERROR = 3


def _activate(program: str) -> None:
    import celery_fleet
    from celery_fleet.config import ConfigError, load_env_file

    try:
        load_env_file()
        celery_fleet.activate()
    except ConfigError as exc:
        print(f"{program}: configuration error: {exc}", file=sys.stderr)
        sys.exit(CONFIG_ERROR)


# The celery command's global options that take a value (celery/bin/celery.py).
_GLOBAL_OPTIONS_WITH_VALUE = {
    "-A",
    "--app",
    "-b",
    "--broker",
    "--result-backend",
    "--loader",
    "--config",
    "--workdir",
}


def _subcommand(argv: list[str]) -> str | None:
    """The celery subcommand of a command line (worker, flower, ...): its first word that is
    neither a global option nor an option's value, so ``worker -Q flower`` is a worker."""
    words = iter(argv)
    for word in words:
        if word in _GLOBAL_OPTIONS_WITH_VALUE:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def _pool(argv: list[str]) -> str | None:
    """The -P/--pool value of a celery command line."""
    for i, arg in enumerate(argv):
        if arg in ("-P", "--pool") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--pool="):
            return arg.split("=", 1)[1]
        if arg.startswith("-P") and len(arg) > 2:
            return arg[2:]
    return None


def main() -> None:
    if "multi" not in sys.argv and _pool(sys.argv[1:]) == "gevent":
        # Before celery is imported at all. Celery's own maybe_patch_concurrency() patches after
        # `import celery`, and gevent's patch_all() then touches the lazy `celery` module, which
        # imports kombu mid-patch: kombu keeps the blocking time.sleep, and every reconnection
        # retry (kombu.utils.functional.retry_over_time) blocks the whole worker for seconds.
        from gevent import monkey

        monkey.patch_all()

    from celery import maybe_patch_concurrency

    if "multi" not in sys.argv:
        maybe_patch_concurrency()
    _activate("fleet-celery")
    # The deployed app by default: `fleet-celery inspect registered` needs no -A.
    app = os.environ.get("FLEET_APP")
    if app and not any(a in ("-A", "--app") or a.startswith("--app=") for a in sys.argv[1:]):
        sys.argv.insert(1, f"--app={app}")

    if _subcommand(sys.argv[1:]) == "flower":
        from celery_fleet.flower import follow_sentinels, record_heartbeats, restrict_metrics

        restrict_metrics()
        record_heartbeats()
        follow_sentinels()

    from celery.bin.celery import main as celery_main

    sys.exit(celery_main())


def python_main() -> None:
    _activate("fleet-python")
    args = sys.argv[1:]
    if not args:
        sys.argv = [""]
        sys.path.insert(0, "")
        code.interact(banner=f"fleet-python {sys.version.split()[0]} (celery-fleet runtime active)")
        return
    if args[0] == "-c" and len(args) > 1:
        sys.argv = ["-c", *args[2:]]
        sys.path.insert(0, "")
        namespace = {"__name__": "__main__", "__builtins__": __builtins__}
        exec(compile(args[1], "<string>", "exec"), namespace)  # it is `python -c`
        return
    if args[0] == "-m" and len(args) > 1:
        sys.argv = [args[1], *args[2:]]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        return
    if args[0].startswith("-"):
        sys.exit(f"fleet-python: unsupported option {args[0]} (use -c CODE, -m MODULE or SCRIPT)")
    sys.argv = list(args)
    sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
    runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
