"""Any application: the tutorial's, unchanged, deployed by inventory variables alone.

Switches the running lab from the sample (fleetapp) to examples/tutorial with the rolling upgrade
playbook, runs the tutorial's own code from client1, and switches back the same way. Runs last
(the other suites expect the sample).
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from tests.conftest import ssh
from tests.fleet.conftest import KEY_PREFIX, api, playbook, take_refusals

pytestmark = pytest.mark.timeout(1500)

WEBFARM = "http://198.18.0.1:8080"
TUTORIAL = "examples/tutorial/fleet.yml"
TUTORIAL_PREFIX = "celery_config:"  # its fleet_app's module: fleet_redis_key_prefix's default


# The celery command on a worker host, with that host's settings (its user may broadcast).
OPERATOR_CELERY = "FLEET_ENV_FILE=/etc/celery-fleet/app.env /opt/celery-fleet/venv/bin/fleet-celery"


def on_client(code: str, timeout: float = 120) -> str:
    result = ssh("client1", f"fleet-python -c {json.dumps(code)}", timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def tutorial_deployed(request: pytest.FixtureRequest):
    started = time.monotonic()
    switch = playbook("playbooks/upgrade.yml", "-e", f"@{TUTORIAL}")
    took = time.monotonic() - started
    assert switch.returncode == 0, switch.stdout[-6000:]
    print(f"\nswitch fleetapp -> tutorial (playbooks/upgrade.yml, rolling): {took:.0f} s")
    # Redis admits the new application's keys first: the old one's services, until replaced,
    # are refused (and only they).
    take_refusals(lambda entry: str(entry.get("object", "")).startswith(KEY_PREFIX))
    yield took
    items = request.session.items
    if items and items[-1].module is request.module:
        # Nothing runs after this module (make test: the lab is removed next); the next
        # session's deploy (tests/fleet/conftest.py: deployed) brings the sample back.
        print("\nlast module of the session: fleetapp comes back with the next session's deploy")
        return
    started = time.monotonic()
    # Back to the sample by a plain (parallel) site.yml: the rolling switch was measured above.
    back = playbook("site.yml")
    print(f"\nswitch tutorial -> fleetapp (site.yml): {time.monotonic() - started:.0f} s")
    assert back.returncode == 0, back.stdout[-6000:]
    take_refusals(lambda entry: str(entry.get("object", "")).startswith(TUTORIAL_PREFIX))


def test_the_tutorials_fan_out_runs_on_the_workers(tutorial_deployed):
    run = f"tutorial-{int(time.time())}"
    urls = [f"{WEBFARM}/delay/0.5?ledger={run}.{n}" for n in range(10)]
    on_client(f"from celery_blog import func; func({urls!r})")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        executions = requests.get(f"{WEBFARM}/ledger/{run}", timeout=10).json()["executions"]
        if len(executions) == len(urls):
            break
        time.sleep(1)
    assert sorted(int(n) for n in executions) == list(range(len(urls))), executions
    # Flower saw every one succeed, on a worker host.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        tasks = api(5555, "/api/tasks", taskname="celery_blog.fetch_url").json()
        ours = [t for t in tasks.values() if run in str(t.get("args"))]
        if len(ours) == len(urls) and all(t["state"] == "SUCCESS" for t in ours):
            break
        time.sleep(2)
    assert len(ours) == len(urls) and all(t["state"] == "SUCCESS" for t in ours), ours
    assert {t["worker"].split("@")[1] for t in ours} <= {"worker1", "worker2"}


def test_the_tutorials_add_returns_nine(tutorial_deployed):
    assert on_client("from celery_add import add; print(add.delay(4, 5).get(timeout=60))") == "9"


def test_fleet_celery_is_the_apps_celery_command(tutorial_deployed):
    result = ssh("client1", "fleet-celery call celery_add.add --args '[4, 5]'", timeout=60)
    assert result.returncode == 0, result.stderr
    # Inspecting is an operator's broadcast: a client's Redis user may not send it.
    registered = ssh("worker1", f"{OPERATOR_CELERY} inspect registered --json", timeout=60)
    assert registered.returncode == 0, registered.stderr
    names = {n for tasks in json.loads(registered.stdout).values() for n in tasks}
    assert {"celery_blog.fetch_url", "celery_add.add", "pack.celery_fetch.fetch_length"} <= names


def test_the_workers_run_with_the_fleets_settings(tutorial_deployed):
    """The tutorial sets none of these; `celery inspect conf` on its workers shows the fleet's."""
    result = ssh("worker1", f"{OPERATOR_CELERY} inspect conf --json", timeout=60)
    assert result.returncode == 0, result.stderr
    confs = json.loads(result.stdout)
    assert confs
    for node, conf in confs.items():
        assert conf["task_acks_late"] is True, node
        assert conf["task_reject_on_worker_lost"] is True, node
        assert conf["accept_content"] == ["json"], node
        assert conf["broker_transport_options"]["visibility_timeout"] == 30, node


TRAP = """
from celery import Celery

app = Celery("celery_blo")


@app.task
def fetch_url(url):
    return url
"""


def test_the_doctor_names_the_tutorials_trap(tutorial_deployed):
    healthy = ssh("client1", "fleet-doctor --timeout 10", timeout=60)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    # The tutorial's ending: a client whose module is celery_blo sends celery_blo.fetch_url,
    # the workers registered celery_blog.fetch_url.
    ssh("client1", "mkdir -p /tmp/trap && cat > /tmp/trap/celery_blo.py <<'PY'" + TRAP + "PY")
    trap = ssh(
        "client1", "cd /tmp/trap && fleet-doctor -A celery_blo --json --timeout 10", timeout=60
    )
    ssh("client1", "rm -rf /tmp/trap")
    assert trap.returncode == 7, trap.stdout + trap.stderr  # a task the workers did not register
    problems = " ".join(json.loads(trap.stdout)["problems"])
    assert (
        "The client sends 'celery_blo.fetch_url' but the workers registered"
        " 'celery_blog.fetch_url': the tutorial's \"Received unregistered task\" trap"
    ) in problems
