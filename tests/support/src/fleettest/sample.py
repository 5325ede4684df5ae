"""The sample app (fleetapp) on the local harness: its environment, two workers, its CLI."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .commands import BIN, run
from .local import RedisServer, Worker


def fleet_env(redis: RedisServer, env_file: Path, db: int = 0, **extra: str) -> dict[str, str]:
    """fleetapp's own variables, pointed at the local Redis (and away from /etc)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETAPP_")}
    env.update(
        FLEETAPP_ENV_FILE=str(env_file),
        FLEETAPP_BROKER_URL=redis.url(db),
        FLEETAPP_REDIS_USERNAME=redis.username,
        FLEETAPP_REDIS_PASSWORD=redis.password,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class Fleet:
    env: dict[str, str]
    net: Worker
    default: Worker
    logdir: Path
    extra: list[Worker] = field(default_factory=list)


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """As a client host runs it: the fleetapp script under fleet-python (the runtime active)."""
    return run([str(BIN / "fleet-python"), str(BIN / "fleetapp"), *args], env=env, timeout=timeout)
