"""The fleet's Celery settings, applied as defaults to every app a fleet process creates.

The roles write the deployment's values as environment variables (``/etc/celery-fleet/app.env``,
read by the units and by ``fleet-python``/``fleet-celery``)::

    CELERY_BROKER_URL, CELERY_RESULT_BACKEND   Celery's own: preferred to anything in the app
    FLEET_TASK_TIME_LIMIT                      hard limit per task, s (default 300)
    FLEET_TASK_SOFT_TIME_LIMIT                 soft limit, s (default: 90 % of the hard limit)
    FLEET_VISIBILITY_TIMEOUT                   lease on a delivered message, s (default 120, >= 10)
    FLEET_REDIS_TLS                            true: Redis (and Sentinel) serve TLS only
    FLEET_REDIS_CA_FILE                        CA to verify a rediss:// server with (optional);
                                               with Sentinel, the primary and the Sentinels
    FLEET_REDIS_MASTER_NAME                    the name Sentinel knows the primary by; required
                                               with sentinel:// URLs (``sentinel://a:26379;
                                               sentinel://b:26379;...``), which name Sentinels
    FLEET_WORKER_CONTROL_COMMANDS              control commands workers obey (celery_fleet.control)
    FLEET_REDIS_KEY_PREFIX                     prefix of every key and channel of the app (kombu's
                                               global_keyprefix): the app's Redis users may touch
                                               only these (optional)

They are *defaults* (``Celery.add_defaults``): a setting the application makes itself, in its
config module or with ``app.conf.update``, wins over the fleet's. A broker or result backend URL
hard-coded in the app loses to ``CELERY_BROKER_URL``/``CELERY_RESULT_BACKEND``: Celery reads the
environment first.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

MIN_VISIBILITY_TIMEOUT = 10
_ENV_LINE = re.compile(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)")
# Bounded sockets: neither a client nor a worker blocks for minutes when Redis vanishes
# (Celery's defaults: no socket timeout on the broker, 120 s on the backend).
SOCKET_TIMEOUT = 15.0
SOCKET_CONNECT_TIMEOUT = 5.0
HEALTH_CHECK_INTERVAL = 10
SENTINEL_SCHEME = "sentinel://"
SENTINEL_TIMEOUT = 2.0
DEFAULT_MAX_TASK_STARTS = 5
# The prefix becomes part of Redis ACL key and channel patterns: no glob characters, no spaces.
# It ends in a separator: Celery adds "_" to its result keys' prefix otherwise, kombu does not.
_KEY_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{0,63}[:_.-]")


class ConfigError(ValueError):
    """A FLEET_* setting is invalid; the message is one line naming the variable."""


def load_env_file(environ: dict[str, str] | None = None) -> None:
    """Read FLEET_ENV_FILE (the app's env file) into the environment; the environment wins.

    So a command run by root can be given the app's environment by naming the file, without
    putting a password on a command line.
    """
    env = os.environ if environ is None else environ
    path = env.get("FLEET_ENV_FILE", "").strip()
    if not path:
        return
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"FLEET_ENV_FILE: cannot read {path}: {exc.strerror or exc}") from None
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _ENV_LINE.fullmatch(line)
        if not match:
            raise ConfigError(f"FLEET_ENV_FILE: {path}:{number}: expected KEY=VALUE")
        value = match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            # Quoted as sh and systemd read it (a Sentinel URL's ";" would end an sh command).
            value = value[1:-1]
        env.setdefault(match.group(1), value)


def _seconds(env: Mapping[str, str], name: str, default: int, unit: str = "seconds") -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number of {unit}, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name}: must be greater than 0, got {value}")
    return value


def max_task_starts(environ: Mapping[str, str] | None = None) -> int:
    """How many times a task may start without finishing before it is parked (deadletter)."""
    env = os.environ if environ is None else environ
    return _seconds(env, "FLEET_MAX_TASK_STARTS", DEFAULT_MAX_TASK_STARTS, unit="starts")


def key_prefix(environ: Mapping[str, str] | None = None) -> str:
    """The app's key prefix (FLEET_REDIS_KEY_PREFIX), "" when unset."""
    env = os.environ if environ is None else environ
    prefix = env.get("FLEET_REDIS_KEY_PREFIX", "").strip()
    if prefix and not _KEY_PREFIX.fullmatch(prefix):
        raise ConfigError(
            f"FLEET_REDIS_KEY_PREFIX: {prefix!r} may hold only letters, digits and _ . : - "
            "(at most 64) and must end in one of : _ . -"
        )
    return prefix


def soft_time_limit(hard: int) -> int:
    """The soft limit derived from the hard one: 90 %, so a task can clean up before the kill."""
    return max(1, hard * 9 // 10)


def fleet_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The fleet's Celery settings for this environment (raises ConfigError)."""
    env = os.environ if environ is None else environ
    hard = _seconds(env, "FLEET_TASK_TIME_LIMIT", 300)
    soft = _seconds(env, "FLEET_TASK_SOFT_TIME_LIMIT", soft_time_limit(hard))
    if soft >= hard:
        raise ConfigError(
            f"FLEET_TASK_SOFT_TIME_LIMIT: {soft} must be below FLEET_TASK_TIME_LIMIT {hard}"
        )
    lease = _seconds(env, "FLEET_VISIBILITY_TIMEOUT", 120)
    max_task_starts(env)  # validated here, read by the worker (celery_fleet.deadletter)
    if lease < MIN_VISIBILITY_TIMEOUT:
        # Renewed every tenth of it: shorter would not survive one slow round trip.
        raise ConfigError(f"FLEET_VISIBILITY_TIMEOUT: {lease} is below {MIN_VISIBILITY_TIMEOUT} s")
    prefix = key_prefix(env)
    master_name = env.get("FLEET_REDIS_MASTER_NAME", "").strip()
    if not master_name and env.get("CELERY_BROKER_URL", "").startswith(SENTINEL_SCHEME):
        raise ConfigError(
            "FLEET_REDIS_MASTER_NAME: required with a sentinel:// broker URL"
            " (the name the Sentinels know the primary by)"
        )
    ssl_options: dict[str, Any] | None = None
    ca_file = env.get("FLEET_REDIS_CA_FILE", "").strip()
    tls = env.get("FLEET_REDIS_TLS", "").strip().lower() in ("1", "true", "yes")
    # A sentinel:// URL does not say whether TLS is on: FLEET_REDIS_TLS does (or a CA file).
    if tls or ca_file or env.get("CELERY_BROKER_URL", "").startswith("rediss://"):
        # The server is always verified (name and chain); without a CA file, by the system's.
        ssl_options = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        if ca_file:
            ssl_options["ssl_ca_certs"] = ca_file

    settings: dict[str, Any] = {
        # JSON only: a pickled message must never be deserialized (remote code execution).
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Flower needs the events.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        # At-least-once: acknowledge after the task ran, requeue if the worker died mid-task,
        # take one message at a time so a long task does not hold others hostage.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # A task running when the broker connection drops keeps running and acknowledges once
        # Redis answers (the lease keeper holds its message meanwhile); cancelling it would only
        # run it again.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # A result that cannot be stored while Redis restarts is stored when it is back, instead
        # of turning a task that ran into a FAILURE (about five minutes of tries).
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        "broker_transport_options": {
            # The lease on a delivered message, renewed by the worker that holds it.
            "visibility_timeout": lease,
            "socket_timeout": SOCKET_TIMEOUT,
            "socket_connect_timeout": SOCKET_CONNECT_TIMEOUT,
            "socket_keepalive": True,
            "health_check_interval": HEALTH_CHECK_INTERVAL,
            # kombu's own sweep for expired leases every 10 s (not ~100 s); the lease keeper
            # sweeps too.
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            # A sweeper cut off while holding kombu's lock blocks every sweep until it expires.
            "unacked_mutex_expire": 30,
            # One list per queue, so a worker can take a message with one atomic BLMOVE.
            "priority_steps": [0],
        },
        "result_backend_transport_options": {
            "visibility_timeout": lease,
            "retry_policy": {"timeout": SOCKET_TIMEOUT},
        },
        "redis_socket_timeout": SOCKET_TIMEOUT,
        "redis_socket_connect_timeout": SOCKET_CONNECT_TIMEOUT,
        "redis_socket_keepalive": True,
        "redis_backend_health_check_interval": HEALTH_CHECK_INTERVAL,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": SOCKET_CONNECT_TIMEOUT,
        # A client publishing while Redis is down fails in seconds instead of retrying forever.
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        "result_expires": 24 * 3600,
        "task_time_limit": hard,
        "task_soft_time_limit": soft,
        # Workers started with -Q <name> get that queue declared.
        "task_create_missing_queues": True,
    }
    if prefix:
        # Queues, unacked, bindings, fanout channels (kombu) and results with their channels
        # (Celery) all carry it, so the app's Redis users can be confined to it.
        settings["broker_transport_options"]["global_keyprefix"] = prefix
        settings["result_backend_transport_options"]["global_keyprefix"] = prefix
    if ssl_options is not None:
        settings["broker_use_ssl"] = ssl_options
        settings["redis_backend_use_ssl"] = ssl_options
    if master_name:
        # The Sentinels are asked where the primary is; every connection then follows it. Their
        # own connections get the same timeouts and TLS; the credentials are the URL's, added
        # when a connection is made (celery_fleet.transport, _fleet_sentinel_backend), so no
        # password is ever part of the settings (``inspect conf``, Flower's config view).
        # Short: a Sentinel answers at once, and one that does not is skipped for the next.
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": SENTINEL_TIMEOUT,
            "socket_connect_timeout": SENTINEL_TIMEOUT,
        }
        if ssl_options is not None:
            sentinel_kwargs.update(ssl=True, **ssl_options)
        for name in ("broker_transport_options", "result_backend_transport_options"):
            settings[name].update(master_name=master_name, sentinel_kwargs=sentinel_kwargs)
    return settings


DEFAULT_EVENTS = "celery.app.events:Events"
FLEET_EVENTS = "celery_fleet.events:FleetEvents"


def install() -> None:
    """Every Celery app this process creates gets the fleet's settings as its defaults."""
    from celery import Celery

    if getattr(Celery, "_fleet_installed", False):
        return
    original_init = Celery.__init__

    def __init__(self: Celery[Any], *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.add_defaults(fleet_settings)
        if self.events_cls == DEFAULT_EVENTS:
            self.events_cls = FLEET_EVENTS

    Celery.__init__ = __init__  # type: ignore[method-assign]
    Celery._fleet_installed = True  # type: ignore[attr-defined]
    _keep_fleet_backend_options()
    _authenticate_to_sentinels()


def sentinel_addresses(url: str) -> list[tuple[str, int]]:
    """The Sentinels of a ``sentinel://a:26379/0;sentinel://b:26379/0`` URL, as (host, port)."""
    parts = (urlsplit(part) for part in url.split(";") if part.strip())
    return [(part.hostname or "localhost", part.port or 26379) for part in parts]


def sentinel_kwargs_with_credentials(
    sentinel_kwargs: Any, params: Mapping[str, Any]
) -> dict[str, Any]:
    """The Sentinels' connection settings with the URL's user and password (the fleet's
    Sentinels know the same users as its Redis servers, roles/redis_sentinel), trying each
    Sentinel once.

    redis-py retries a connection ten times by default: a Sentinel whose host is down, asked
    first, then held every lookup of the primary for about 40 s, and Celery's result backend,
    which looks it up again on each of its own retries, blocked a client's ``send_task`` for
    many minutes after a failover (seen on the lab). One try each: the next Sentinel answers.
    """
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    kwargs = dict(sentinel_kwargs or {})
    for name in ("username", "password"):
        if params.get(name):
            kwargs.setdefault(name, params[name])
    kwargs.setdefault("retry", Retry(NoBackoff(), 0))
    return kwargs


def _authenticate_to_sentinels() -> None:
    """Celery's Sentinel result backend gives the Sentinels only sentinel_kwargs, so the URL's
    credentials reach the primary but not the Sentinels, which the fleet protects too."""
    from celery.backends import redis as redis_backend

    # Not in the stubs.
    backend: Any = redis_backend.SentinelBackend

    def _get_sentinel_instance(self: Any, **params: Any) -> Any:
        connparams = dict(params)
        hosts = connparams.pop("hosts")
        options = self._transport_options
        return self.sentinel.Sentinel(
            [(host["host"], host["port"]) for host in hosts],
            min_other_sentinels=options.get("min_other_sentinels", 0),
            sentinel_kwargs=sentinel_kwargs_with_credentials(
                options.get("sentinel_kwargs"), connparams
            ),
            **connparams,
        )

    backend._get_sentinel_instance = _get_sentinel_instance


def _keep_fleet_backend_options() -> None:
    """Results keep the deployment's key prefix and CA when the app sets its own
    result_backend_transport_options or redis_backend_use_ssl without them (its dict replaces
    the fleet's)."""
    from celery.backends import base

    # The stubs describe neither this private method nor the backend's app.
    backend: Any = base.BaseKeyValueStoreBackend
    original = backend._add_global_keyprefix

    # Called by the backend's __init__ before the Redis backend reads its SSL settings.
    def _add_global_keyprefix(self: Any) -> None:
        options = dict(self.app.conf.get("result_backend_transport_options") or {})
        prefix = key_prefix()
        if prefix and not options.get("global_keyprefix"):
            options["global_keyprefix"] = prefix
            self.app.conf.result_backend_transport_options = options
        ssl_options = self.app.conf.get("redis_backend_use_ssl")
        if isinstance(ssl_options, dict):
            fleet_ssl = fleet_settings().get("redis_backend_use_ssl") or {}
            self.app.conf.redis_backend_use_ssl = {**fleet_ssl, **ssl_options}
        original(self)

    backend._add_global_keyprefix = _add_global_keyprefix
