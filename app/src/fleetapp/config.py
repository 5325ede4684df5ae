"""Settings from the environment (optionally seeded from an env file).

The application's own settings; a deployment (celery-fleet) hands it the broker through
Celery's own variables, which win over the FLEETAPP_* ones:

    CELERY_BROKER_URL               Celery's variable: the broker URL, credentials included
    CELERY_RESULT_BACKEND           Celery's variable: the result backend URL
    FLEETAPP_ENV_FILE               env file to load first (default /etc/fleetapp/fleetapp.env
                                    if it exists); the real environment wins over the file
    FLEETAPP_BROKER_URL             redis://host:port/db, no credentials (default
                                    redis://127.0.0.1:6379/0)
    FLEETAPP_RESULT_BACKEND         defaults to the broker URL
    FLEETAPP_REDIS_USERNAME         ACL user, injected (URL-quoted) into both URLs
    FLEETAPP_REDIS_PASSWORD         its password; never printed or logged
    FLEETAPP_REDIS_TLS              true/false: rediss:// with certificate verification
    FLEETAPP_REDIS_CA_FILE          CA bundle to verify the Redis server with (needs TLS)
    FLEETAPP_DEFAULT_QUEUE          queue for everything else (default "default")
    FLEETAPP_NETWORK_QUEUE          queue for network-bound tasks (default "network")
    FLEETAPP_FETCH_ALLOW_NETWORKS   comma-separated CIDRs (e.g. 198.18.0.1/32,fd00:1::/64) that
                                    fetch_url may connect to although they are not public
                                    (default none: only globally routable addresses; see
                                    fleetapp.egress)

Time limits, leases and retries are the deployment's (celery-fleet's FLEET_* variables).
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

# The URL without credentials, safe to print (every part of a Sentinel URL): the runtime's.
from celery_fleet.doctor import redact_url

DEFAULT_ENV_FILE = "/etc/fleetapp/fleetapp.env"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_QUEUE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_ENV_LINE_RE = re.compile(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A setting is missing or invalid; the message is one line naming the variable."""


@dataclass(frozen=True)
class Settings:
    # The URLs carry the credentials: keep them out of repr() (tracebacks, logs).
    broker_url: str = field(repr=False)
    result_backend: str = field(repr=False)
    redis_username: str | None = None
    redis_password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None
    default_queue: str = "default"
    network_queue: str = "network"
    # Networks a fetch may connect to besides the public internet (fleetapp.egress).
    fetch_allow_networks: tuple[IPNetwork, ...] = ()

    @property
    def ssl_options(self) -> dict[str, Any] | None:
        """Options for broker_use_ssl / redis_backend_use_ssl (None without TLS)."""
        if not self.tls:
            return None
        options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        if self.ca_file:
            options["ssl_ca_certs"] = self.ca_file
        return options

    @property
    def redacted_broker_url(self) -> str:
        return redact_url(self.broker_url)

    @property
    def redacted_result_backend(self) -> str:
        return redact_url(self.result_backend)


def parse_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read KEY=VALUE lines (systemd EnvironmentFile style: comments, optional quotes)."""
    values: dict[str, str] = {}
    text = Path(path).read_text(encoding="utf-8")
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        match = _ENV_LINE_RE.fullmatch(line)
        if not match:
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE")
        key, value = match.group(1), match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def load_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The effective environment: the env file's values overlaid by the real environment."""
    env = dict(os.environ if environ is None else environ)
    explicit = env.get("FLEETAPP_ENV_FILE")
    path = explicit or DEFAULT_ENV_FILE
    try:
        present = explicit or Path(path).exists()
    except OSError as exc:  # e.g. /etc/fleetapp not readable by this user
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if present:
        try:
            from_file = parse_env_file(path)
        except OSError as exc:
            raise ConfigError(
                f"FLEETAPP_ENV_FILE: cannot read {path}: {exc.strerror or exc}"
            ) from None
        return {**from_file, **env}
    return env


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def _queue(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip() or default
    if not _QUEUE_RE.fullmatch(value):
        raise ConfigError(
            f"{name}: invalid queue name {value!r} (letters, digits, '.', '_', ':', '-')"
        )
    return value


def _networks(env: Mapping[str, str], name: str) -> tuple[IPNetwork, ...]:
    networks: list[IPNetwork] = []
    for item in env.get(name, "").split(","):
        text = item.strip()
        if not text:
            continue
        try:
            # strict: "198.18.0.1/24" (host bits set) is more likely a typo than a /24.
            networks.append(ipaddress.ip_network(text))
        except ValueError as exc:
            raise ConfigError(
                f"{name}: {text!r} is not a network in CIDR notation ({exc})"
            ) from None
    return tuple(networks)


def _redis_url(name: str, url: str, username: str | None, password: str | None, tls: bool) -> str:
    if url.startswith("sentinel://"):
        # The Sentinels, ";"-separated: each part gets the credentials (the Sentinels want them
        # too); TLS is the transport's setting, not a scheme.
        return ";".join(
            _redis_url_part(name, part, username, password, None)
            for part in url.split(";")
            if part.strip()
        )
    return _redis_url_part(name, url, username, password, "rediss" if tls else "redis")


def _redis_url_part(
    name: str, url: str, username: str | None, password: str | None, scheme: str | None
) -> str:
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError on a non-numeric/out-of-range port
    except ValueError as exc:
        raise ConfigError(f"{name}: not a valid URL ({exc})") from None
    expected = ("redis", "rediss") if scheme is not None else ("sentinel",)
    if parts.scheme not in expected:
        raise ConfigError(
            f"{name}: expected a redis://, rediss:// or sentinel:// URL (Sentinels joined by ;),"
            f" got scheme {parts.scheme!r}"
        )
    if not parts.hostname:
        raise ConfigError(f"{name}: no host in {redact_url(url)!r}")
    user = username if username is not None else (unquote(parts.username or "") or None)
    secret = password if password is not None else (unquote(parts.password or "") or None)
    host = parts.netloc.rpartition("@")[2]
    if user or secret:
        # Quote everything: a password may hold '@', ':', '/', '%' or '#'.
        userinfo = quote(user or "", safe="")
        if secret:
            userinfo += ":" + quote(secret, safe="")
        host = f"{userinfo}@{host}"
    return urlunsplit((scheme or parts.scheme, host, parts.path, parts.query, parts.fragment))


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the environment; raises ConfigError with a one-line message."""
    env = load_environment(environ)
    broker_name = "CELERY_BROKER_URL" if env.get("CELERY_BROKER_URL") else "FLEETAPP_BROKER_URL"
    broker = env.get(broker_name, "").strip() or DEFAULT_BROKER_URL
    backend_name = (
        "CELERY_RESULT_BACKEND" if env.get("CELERY_RESULT_BACKEND") else "FLEETAPP_RESULT_BACKEND"
    )
    backend = env.get(backend_name, "").strip() or broker
    username = env.get("FLEETAPP_REDIS_USERNAME") or None
    password = env.get("FLEETAPP_REDIS_PASSWORD") or None

    tls_default = urlsplit(broker).scheme == "rediss"
    tls = _bool(env, "FLEETAPP_REDIS_TLS", tls_default)
    ca_file = env.get("FLEETAPP_REDIS_CA_FILE", "").strip() or None
    if ca_file:
        if not tls:
            raise ConfigError("FLEETAPP_REDIS_CA_FILE: set, but FLEETAPP_REDIS_TLS is not true")
        if not Path(ca_file).is_file():
            raise ConfigError(f"FLEETAPP_REDIS_CA_FILE: no such file {ca_file}")

    return Settings(
        broker_url=_redis_url(broker_name, broker, username, password, tls),
        result_backend=_redis_url(backend_name, backend, username, password, tls),
        redis_username=username,
        redis_password=password,
        tls=tls,
        ca_file=ca_file,
        default_queue=_queue(env, "FLEETAPP_DEFAULT_QUEUE", "default"),
        network_queue=_queue(env, "FLEETAPP_NETWORK_QUEUE", "network"),
        fetch_allow_networks=_networks(env, "FLEETAPP_FETCH_ALLOW_NETWORKS"),
    )
