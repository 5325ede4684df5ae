"""A task that kills its worker process on every start is parked after FLEET_MAX_TASK_STARTS."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import redis
from fleettest.commands import BIN, run
from fleettest.local import start_worker, wait_for, wait_ready
from fleettest.sample import fleet_env

HERE = Path(__file__).resolve().parent
DB = 3


def call(env: dict[str, str], task: str, *args: object) -> str:
    """Send a task of the poison app to the default queue with `celery call`; its id."""
    command = [str(BIN / "fleet-celery"), "-A", "poison", "call", "--queue", "default", task]
    sent = run([*command, "--args", json.dumps(list(args))], cwd=HERE, env=env)
    assert sent.returncode == 0, sent.stderr
    return sent.stdout.strip()


def result_of(env: dict[str, str], task_id: str) -> str:
    """The stored result of a poison task (`celery result`), as printed."""
    command = [str(BIN / "fleet-celery"), "-A", "poison", "result", task_id]
    return run(command, cwd=HERE, env=env, timeout=30).stdout.strip()


@pytest.mark.timeout(120)
def test_a_poison_pill_is_parked_and_the_doctor_lists_it(redis_server, empty_env_file, tmp_path):
    env = fleet_env(redis_server, empty_env_file, db=DB, FLEET_MAX_TASK_STARTS="3")
    server = redis_server
    client = redis.Redis(
        port=server.port, db=DB, username=server.username, password=server.password
    )
    client.flushdb()
    # prefork: the pool child dies, the worker survives and requeues the task (worker lost).
    worker = start_worker(
        env, tmp_path, "poison", pool="prefork", queues="default", cwd=HERE, app="poison"
    )
    marker = tmp_path / "starts"
    try:
        wait_ready(worker)
        task_id = call(env, "poison.crash", str(marker))

        wait_for(lambda: client.llen("_fleet.dead.default") == 1, 60, "the task to be parked")
        time.sleep(3)  # had it gone back to the queue, it would have started again by now
        starts = marker.read_text().split()
        assert len(starts) == 3, f"started {len(starts)} times, not FLEET_MAX_TASK_STARTS"
        assert client.llen("default") == 0 and client.hlen("unacked") == 0
        parked = json.loads(client.lindex("_fleet.dead.default", 0))
        assert parked["headers"]["id"] == task_id
        assert not client.exists(f"_fleet.starts.{parked['headers']['id']}")
        assert "parked poison.crash" in worker.text()

        # The worker goes on serving.
        assert result_of(env, call(env, "poison.echo", 7)) == "7"

        doctor = run([str(BIN / "fleet-doctor"), "-A", "poison", "--json"], cwd=HERE, env=env)
        report = json.loads(doctor.stdout)
        assert report["dead_letters"] == {"default": 1}
        assert doctor.returncode == 1
        assert any("LMOVE _fleet.dead.default default" in p for p in report["problems"])
    finally:
        worker.stop()
        client.flushdb()
        client.close()


def test_a_bad_max_task_starts_is_a_configuration_error(redis_server, empty_env_file):
    env = fleet_env(redis_server, empty_env_file, FLEET_MAX_TASK_STARTS="zero")
    proc = subprocess.run(
        [str(BIN / "fleet-python"), "-c", "pass"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 3
    assert "FLEET_MAX_TASK_STARTS" in proc.stderr


@pytest.mark.timeout(150)
def test_a_retry_that_cannot_be_published_keeps_its_task(redis_server, empty_env_file, tmp_path):
    """Celery's Task.retry rejects the running message *without requeue* when publishing the
    retry fails (celery/app/task.py: ``raise Reject(exc, requeue=False)``), so the task is gone:
    neither the retry nor the original exists. Redis refuses writes (maxmemory) while the task
    retries; once it accepts them again, the task runs again (celery_fleet.patches, fix 9)."""
    env = fleet_env(redis_server, empty_env_file, db=DB, FLEET_VISIBILITY_TIMEOUT="10")
    client = redis.Redis(
        port=redis_server.port,
        db=DB,
        username=redis_server.username,
        password=redis_server.password,
    )
    client.flushdb()
    worker = start_worker(env, tmp_path, "retry", queues="default", cwd=HERE, app="poison")
    marker, go = tmp_path / "starts", tmp_path / "go"
    try:
        wait_ready(worker)
        task_id = call(env, "poison.retry_once", str(marker), str(go))
        wait_for(marker.exists, 30, "the task to start")
        client.config_set("maxmemory", 1)  # every write refused (noeviction): OOM
        try:
            go.touch()
            # The retry's publish is tried (and retried) and fails; the task ends.
            wait_for(lambda: "celery.exceptions.Reject" in worker.text(), 30, "the retry to fail")
            time.sleep(5)
        finally:
            client.config_set("maxmemory", 0)
        wait_for(lambda: len(marker.read_text().split()) >= 2, 60, "the task to run again")
        assert result_of(env, task_id) == "done"
    finally:
        worker.stop()
        client.flushdb()
        client.close()


@pytest.mark.timeout(120)
def test_a_retry_that_can_never_be_published_does_not_loop(redis_server, empty_env_file, tmp_path):
    """Fix 9 requeues only when the publish failed for a reason that passes: a retry whose
    arguments do not serialize keeps Celery's reject, or its task would run again forever."""
    env = fleet_env(redis_server, empty_env_file, db=DB, FLEET_VISIBILITY_TIMEOUT="10")
    worker = start_worker(env, tmp_path, "noloop", queues="default", cwd=HERE, app="poison")
    marker = tmp_path / "starts"
    try:
        wait_ready(worker)
        call(env, "poison.retry_unserializable", str(marker))
        wait_for(marker.exists, 30, "the task to start")
        time.sleep(15)  # more than a lease: a requeued task would have started again by now
        assert marker.read_text().split() == ["0"], worker.text()[-3000:]
        assert "could not be published" not in worker.text()
    finally:
        worker.stop()
