"""The ``fleetapp`` console script as a user (or the lab's tests) runs it: exit codes, JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from fleettest.local import PASSWORD, free_port, start_worker, wait_ready
from fleettest.sample import fleet_env, run_cli

HERE = Path(__file__).resolve().parent

EXIT_FAILED, EXIT_USAGE, EXIT_CONFIG, EXIT_BROKER_DOWN, EXIT_AUTH = 1, 2, 3, 4, 5
EXIT_NO_WORKERS, EXIT_UNKNOWN_TASK, EXIT_TIMEOUT = 6, 7, 8


def assert_clean_failure(proc, code):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert PASSWORD not in proc.stderr + proc.stdout
    assert quote(PASSWORD, safe="") not in proc.stderr + proc.stdout


def test_documented_exit_codes_match_the_code():
    from fleetapp import doctor

    assert (doctor.EXIT_FAILED, doctor.EXIT_USAGE, doctor.EXIT_CONFIG) == (1, 2, 3)
    assert (doctor.EXIT_BROKER_DOWN, doctor.EXIT_AUTH, doctor.EXIT_NO_WORKERS) == (4, 5, 6)
    assert (doctor.EXIT_UNKNOWN_TASK, doctor.EXIT_TIMEOUT) == (7, 8)


@pytest.mark.timeout(60)
def test_fetch_compare_json(fleet, webfarm):
    urls = [f"{webfarm.url}/tutorial/{i}" for i in range(1, 6)]
    proc = run_cli(fleet.env, "fetch", "--compare", "--json", *urls)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # JSON only on stdout
    assert out["mode"] == "compare"
    assert [r["url"] for r in out["results"]] == urls
    assert all(r["ok"] and r["status"] == 200 for r in out["results"])
    assert all(r["worker"].startswith("net@") for r in out["results"])
    assert all(r["worker"] == "local" for r in out["sequential_results"])
    assert 7.5 <= out["sequential_time"] < 10
    assert out["distributed_time"] < 3.5  # the slowest URL takes 2.2 s
    assert out["wall_time"] == out["distributed_time"]
    assert out["speedup"] > 2.5


def test_fetch_table_and_failures(fleet, webfarm, tmp_path):
    url_file = tmp_path / "urls.txt"
    url_file.write_text(f"# a comment\n{webfarm.url}/delay/0.2\n\n{webfarm.url}/status/500\n")
    proc = run_cli(fleet.env, "fetch", "-f", str(url_file))
    assert proc.returncode == EXIT_FAILED, proc.stderr
    assert "net@" in proc.stdout and "total wall time" in proc.stdout
    assert "1 of 2 URL(s) failed" in proc.stderr
    proc = run_cli(fleet.env, "fetch", "--sequential", "--json", f"{webfarm.url}/delay/0.1")
    out = json.loads(proc.stdout)
    assert proc.returncode == 0 and out["results"][0]["worker"] == "local"
    assert "wall_time" in out


def test_add_and_doctor_healthy(fleet):
    proc = run_cli(fleet.env, "add", "2", "40", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["result"] == 42 and out["worker"].startswith("default@")
    proc = run_cli(fleet.env, "doctor", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["healthy"] and report["broker_ok"] and not report["problems"]
    assert {h.split("@")[0] for h in report["workers"]} == {"net", "default"}
    assert report["tasks"]["fleetapp.fetch_url"]["queue"] == "network"
    assert report["tasks"]["fleetapp.fetch_url"]["serving"][0].startswith("net@")
    assert report["tasks"]["fleetapp.add"]["serving"][0].startswith("default@")
    assert set(report["queues"]) == {"default", "network"}
    assert PASSWORD not in proc.stdout and quote(PASSWORD, safe="") not in proc.stdout
    # The worker logs never show the password either.
    for worker in (fleet.net, fleet.default):
        assert PASSWORD not in worker.text() and quote(PASSWORD, safe="") not in worker.text()


@pytest.mark.parametrize(
    "args",
    [
        ["fetch"],
        ["fetch", "ftp://example.org/"],
        ["fetch", "not a url"],
        ["fetch", "--timeout", "-1", "http://example.org/"],
        ["fetch", "--fetch-timeout", "500", "http://example.org/"],
        ["fetch", "-f", "/nonexistent/urls.txt"],
        ["add", "one", "2"],
        ["add", "1"],
        ["add", "nan", "1"],
        ["bogus"],
        [],
    ],
)
def test_bad_arguments(fleet, args):
    proc = run_cli(fleet.env, *args, timeout=20)
    assert_clean_failure(proc, EXIT_USAGE)


def test_bad_url_enqueues_nothing(fleet, redis_server):
    env = {**fleet.env, "FLEETAPP_BROKER_URL": redis_server.url(3)}
    proc = run_cli(env, "fetch", "http://example.org/", "gopher://x/")
    assert_clean_failure(proc, EXIT_USAGE)
    assert "gopher" in proc.stderr and "nothing was sent" in proc.stderr


def test_config_error(fleet):
    env = {**fleet.env, "FLEETAPP_NETWORK_QUEUE": "bad queue"}
    proc = run_cli(env, "doctor")
    assert_clean_failure(proc, EXIT_CONFIG)
    assert "FLEETAPP_NETWORK_QUEUE" in proc.stderr


def test_fleet_config_error(fleet):
    """A bad deployment setting stops the runtime in one line, before the app is imported."""
    env = {**fleet.env, "FLEET_VISIBILITY_TIMEOUT": "5"}
    proc = run_cli(env, "doctor")
    assert_clean_failure(proc, EXIT_CONFIG)
    assert "fleet-python: configuration error: FLEET_VISIBILITY_TIMEOUT: 5 is below 10 s" in (
        proc.stderr
    )


@pytest.mark.parametrize("args", [["doctor"], ["add", "1", "2"], ["fetch", "http://x.org/"]])
def test_broker_down(fleet, args):
    env = {**fleet.env, "FLEETAPP_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    started = time.monotonic()
    proc = run_cli(env, *args, timeout=30)
    assert time.monotonic() - started < 10
    assert_clean_failure(proc, EXIT_BROKER_DOWN)
    assert "cannot reach the broker" in proc.stderr + proc.stdout


@pytest.mark.parametrize("password", ["wrong-password", ""])
@pytest.mark.parametrize("args", [["doctor", "--json"], ["add", "1", "2"]])
def test_auth_failure(fleet, password, args):
    env = {**fleet.env, "FLEETAPP_REDIS_PASSWORD": password}
    if not password:
        del env["FLEETAPP_REDIS_USERNAME"]
    proc = run_cli(env, *args, timeout=30)
    assert_clean_failure(proc, EXIT_AUTH)
    if args[0] == "doctor":
        report = json.loads(proc.stdout)
        assert report["healthy"] is False and report["exit_code"] == EXIT_AUTH


def test_no_workers(redis_server, empty_env_file):
    env = fleet_env(redis_server, empty_env_file, db=1)
    started = time.monotonic()
    proc = run_cli(env, "add", "1", "2", timeout=30)
    assert time.monotonic() - started < 10
    assert_clean_failure(proc, EXIT_NO_WORKERS)
    proc = run_cli(env, "doctor", "--json", "--timeout", "1")
    assert_clean_failure(proc, EXIT_NO_WORKERS)
    assert json.loads(proc.stdout)["broker_ok"] is True


@pytest.mark.timeout(90)
def test_task_name_mismatch_is_diagnosed(redis_server, empty_env_file, webfarm, tmp_path):
    """The tutorial's ending: the worker registered celery_blog.fetch_url, the client sends
    fleetapp.fetch_url."""
    env = fleet_env(redis_server, empty_env_file, db=2)
    worker = start_worker(
        env, tmp_path, "blog", queues="default,network", cwd=HERE, app="trap_blog"
    )
    try:
        wait_ready(worker)
        proc = run_cli(env, "doctor")
        assert_clean_failure(proc, EXIT_UNKNOWN_TASK)
        text = " ".join(proc.stdout.split())  # undo rich's line wrapping
        assert "'fleetapp.fetch_url'" in text and "'celery_blog.fetch_url'" in text
        assert "Received unregistered task" in text
        report = json.loads(run_cli(env, "doctor", "--json").stdout)
        assert report["exit_code"] == EXIT_UNKNOWN_TASK
        assert any("celery_blog.fetch_url" in p for p in report["problems"])

        proc = run_cli(env, "fetch", f"{webfarm.url}/delay/0")
        assert_clean_failure(proc, EXIT_UNKNOWN_TASK)
        assert "celery_blog.fetch_url" in proc.stderr

        # Skipping the pre-flight shows the trap itself: the worker rejects the message.
        proc = run_cli(
            env, "fetch", "--json", "--no-check", "--timeout", "10", f"{webfarm.url}/delay/0"
        )
        assert_clean_failure(proc, EXIT_UNKNOWN_TASK)
        assert json.loads(proc.stdout)["results"][0]["error"]["code"] == "unregistered"
        assert "Received unregistered task of type 'fleetapp.fetch_url'" in worker.text()
        assert worker.alive()
    finally:
        worker.stop()
