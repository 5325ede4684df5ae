"""A real redis-server and real Celery workers on loopback, on free ports: nothing in eager mode.

The tests of the sample app and the local benchmark share this harness.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .commands import BIN

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
# A password with every character that must be URL-quoted.
PASSWORD = "s3cr@t:p/w%#?x"
USERNAME = "fleet"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    username: str
    password: str

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


def start_redis(
    workdir: Path,
    username: str = USERNAME,
    password: str = PASSWORD,
    users: dict[str, str] | None = None,
    extra: str = "",
) -> RedisServer:
    """``users``: more ACL users, {name: rules}, each with ``password`` (fleettest.acl);
    ``extra``: more configuration lines (a replica's ``replicaof``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "redis.conf"
    more = "".join(f"user {name} on >{password} {rule}\n" for name, rule in (users or {}).items())
    # No unauthenticated access: the default user is off, only "fleet" with a password exists.
    conf.write_text(
        f'port {port}\nbind 127.0.0.1\nsave ""\nappendonly no\ndir {workdir}\n'
        f"databases 16\nuser default off\nuser {username} on >{password} ~* &* +@all\n{more}"
        f"{extra}"
    )
    proc = subprocess.Popen(
        [REDIS_SERVER, str(conf)],
        stdout=(workdir / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    server = RedisServer(port, proc, workdir, username, password)
    wait_listening(proc, port, workdir / "redis.log", "redis-server")
    return server


def wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path, what: str) -> None:
    """Until ``proc`` accepts connections on ``port``; its log if it exits first."""

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_for(up, 10, what)


def start_replica(workdir: Path, primary: RedisServer) -> RedisServer:
    """A replica of ``primary``, with its users, replicating as its user."""
    return start_redis(
        workdir,
        primary.username,
        primary.password,
        extra=(
            f"replicaof 127.0.0.1 {primary.port}\nmasteruser {primary.username}\n"
            f'masterauth "{primary.password}"\nreplica-announce-ip 127.0.0.1\n'
        ),
    )


@dataclass
class SentinelServer:
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def start_sentinel(
    workdir: Path, primary: RedisServer, master_name: str = "fleet", down_after_ms: int = 1000
) -> SentinelServer:
    """One Sentinel watching ``primary`` (quorum 1), knowing the same user as the servers."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "sentinel.conf"  # Sentinel rewrites it: it must be its own, writable
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
        f"sentinel monitor {master_name} 127.0.0.1 {primary.port} 1\n"
        f"sentinel auth-user {master_name} {primary.username}\n"
        f'sentinel auth-pass {master_name} "{primary.password}"\n'
        f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
        f"sentinel failover-timeout {master_name} 10000\n"
        f"user default off\nuser {primary.username} on >{primary.password} &* +@all\n"
    )
    proc = subprocess.Popen(
        [REDIS_SERVER, str(conf), "--sentinel"],
        stdout=(workdir / "sentinel.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    wait_listening(proc, port, workdir / "sentinel.log", "redis-sentinel")
    return SentinelServer(port, proc, workdir)


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
    loglevel: str = "INFO",  # wait_ready needs INFO: it looks for " ready." in the log
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
        f"--loglevel={loglevel}",
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
