"""What a person sees: Flower and Prometheus in headless Chromium (`fleet screenshots`).

Each page is read as the browser renders it, once its data has loaded, and compared with a
source outside it: the worker units systemd has on the worker hosts, the lab's targets, the
rules file Prometheus was given. The screenshots are kept in .build/screenshots/.
"""

from __future__ import annotations

import base64
import random
import struct

import pytest
import yaml
from fleetctl import browser, status
from fleetctl.cli import SCREENSHOTS

from tests.conftest import LAB_NAMES, on
from tests.fleet.conftest import LAB_TARGETS, api, every_target_up, fleet, secret

pytestmark = pytest.mark.timeout(300)

RULES = "/etc/prometheus/rules/celery-fleet.rules.yml"
ADDITIONS = 3
# The client's tasks carry it as their first argument: a search finds them whatever the order.
NONCE = random.randrange(10**8, 10**9)
# The tasks page filtered on the task's name, as ?name= does in a person's browser. The default
# page lists the newest received first, by the workers' clocks: after the fault suite's clock
# test, tasks from worker1's future sit on top of it for ten minutes.
ADD_TASKS = browser.Page(
    "flower-add-tasks", "flower", "/tasks?name=fleetapp.add", browser.FLOWER_TASKS
)


@pytest.fixture(scope="module")
def shots() -> dict[str, browser.Shot]:
    """The four pages and the add tasks, after the client ran a few and Prometheus scraped
    every target."""
    for k in range(ADDITIONS):
        on("client1", f"fleetapp add --json {NONCE} {k}")
    every_target_up()
    source = status.monitor_source()
    pages = (*browser.PAGES, ADD_TASKS)
    return {shot.page.name: shot for shot in browser.capture(source, SCREENSHOTS, pages)}


@pytest.fixture(scope="module")
def worker_instances() -> set[str]:
    """queue@host of every worker unit systemd has on the lab's hosts, running or not."""
    found = set()
    for name in LAB_NAMES:
        listed = on(name, "systemctl list-units --all --plain --no-legend 'celery-worker@*'")
        for line in listed.stdout.splitlines():
            queue = line.split()[0].removeprefix("celery-worker@").removesuffix(".service")
            found.add(f"{queue}@{name}")
    return found


def test_flower_shows_every_worker_of_the_fleet_online(shots, worker_instances):
    expected = worker_instances
    assert expected
    seen = {row["worker"]: row["status"] for row in shots["flower-workers"].rows}
    online = {worker for worker, state in seen.items() if state == "Online"}
    assert online == expected, seen


def test_flower_shows_the_tasks_the_client_just_ran(shots, worker_instances):
    # Which tasks are the client's: Flower's API, by their arguments.
    response = api(5555, "/api/tasks", taskname="fleetapp.add", sort_by="-received", limit="500")
    assert response.status_code == 200, response.text
    ours = {uuid for uuid, task in response.json().items() if str(NONCE) in str(task["args"])}
    assert len(ours) == ADDITIONS, response.json()
    shown = {row["uuid"]: row for row in shots["flower-add-tasks"].rows}
    assert ours <= set(shown), (ours, shots["flower-add-tasks"].rows)
    for uuid in ours:
        assert (shown[uuid]["name"], shown[uuid]["state"]) == ("fleetapp.add", "SUCCESS")
        assert shown[uuid]["worker"] in worker_instances, shown[uuid]


def test_prometheus_shows_every_target_of_the_inventory_up(shots):
    rows = shots["prometheus-targets"].rows
    assert {(row["job"], row["instance"]) for row in rows} == LAB_TARGETS, rows
    assert all(row["state"] == "up" for row in rows), rows


def test_prometheus_shows_the_fleets_alert_rules_and_none_firing(shots):
    deployed = yaml.safe_load(on("monitor1", f"cat {RULES}").stdout)
    rules = {r["alert"] for group in deployed["groups"] for r in group["rules"] if "alert" in r}
    rows = shots["prometheus-alerts"].rows
    assert {row["alert"] for row in rows} == rules, rows
    assert not [row for row in rows if row["state"] == "firing"], rows


@pytest.mark.parametrize("page", [page.name for page in browser.PAGES])
def test_each_page_is_saved_whole(shots, page):
    """The whole page, not the browser's window (900 px high): as high as the page."""
    screenshot = SCREENSHOTS / f"{page}.png"
    assert shots[page].screenshot == screenshot
    header = screenshot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", screenshot
    width, height = struct.unpack(">II", header[16:24])
    assert width >= 1000, (screenshot, width)
    assert abs(height - min(shots[page].height, browser.MAX_HEIGHT)) <= 1, (screenshot, height)


def test_fleet_screenshots_tells_where_they_are_and_says_nothing_secret(tmp_path):
    """The command make demo runs: its table names each file; the password is nowhere in it."""
    done = fleet("screenshots", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    for page in browser.PAGES:
        assert (tmp_path / f"{page.name}.png").is_file()
        assert page.name in done.stdout
    token = base64.b64encode(f"admin:{secret('flower')}".encode()).decode()
    for said in (secret("flower"), token):
        assert said not in done.stdout + done.stderr
