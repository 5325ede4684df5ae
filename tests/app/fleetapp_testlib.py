"""Helpers for tests/app: real redis-server, real Celery workers, the webfarm, the CLI.

(A uniquely named module rather than conftest imports: other test trees may have helpers too.)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
# A password with every character that must be URL-quoted.
PASSWORD = "s3cr@t:p/w%#?x"
USERNAME = "fleet"

try:
    from fleetlab import webfarm as _webfarm  # noqa: F401 - re-exported for the tests
except ImportError:  # the lab package may not be installed yet
    sys.path.insert(0, str(REPO / "ansible" / "lab" / "src"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_redis(workdir: Path) -> RedisServer:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "redis.conf"
    # No unauthenticated access: the default user is off, only "fleet" with a password exists.
    conf.write_text(
        f'port {port}\nbind 127.0.0.1\nsave ""\nappendonly no\ndir {workdir}\n'
        f"databases 16\nuser default off\nuser {USERNAME} on >{PASSWORD} ~* &* +@all\n"
    )
    proc = subprocess.Popen(
        [REDIS_SERVER, str(conf)],
        stdout=(workdir / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    server = RedisServer(port=port, proc=proc, workdir=workdir)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited: {(workdir / 'redis.log').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_for(up, 10, "redis-server")
    return server


def fleet_env(redis: RedisServer, env_file: Path, db: int = 0, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETAPP_")}
    env.update(
        FLEETAPP_ENV_FILE=str(env_file),
        FLEETAPP_BROKER_URL=redis.url(db),
        FLEETAPP_REDIS_USERNAME=USERNAME,
        FLEETAPP_REDIS_PASSWORD=PASSWORD,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15) -> float:
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return time.monotonic() - started


def start_worker(
    env: dict[str, str],
    logdir: Path,
    name: str,
    *,
    app: str = "fleetapp.celery",
    pool: str = "solo",
    concurrency: int = 1,
    queues: str | None = None,
    cwd: Path | None = None,
) -> Worker:
    log = logdir / f"{name}.log"
    cmd = [
        # As the fleet runs workers: the celery command with celery-fleet's runtime active.
        str(BIN / "fleet-celery"),
        "-A",
        app,
        "worker",
        "-n",
        f"{name}@%h",
        "-P",
        pool,
        "-c",
        str(concurrency),
        "--loglevel=INFO",
        "--without-mingle",  # no 1 s neighbour search at start-up
        "--without-gossip",
    ]
    if queues:
        cmd += ["-Q", queues]
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd or logdir, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    return Worker(name=name, proc=proc, log=log)


def wait_ready(*workers: Worker, timeout: float = 30) -> None:
    def ready() -> bool:
        for w in workers:
            if not w.alive():
                raise RuntimeError(f"worker {w.name} exited:\n{w.text()[-3000:]}")
        return all(" ready." in w.text() for w in workers)

    wait_for(ready, timeout, "workers")


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
    # As a client host runs it: the fleetapp script under fleet-python (the runtime active).
    return subprocess.run(
        [str(BIN / "fleet-python"), str(BIN / "fleetapp"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
