"""`fleet screenshots`: Flower and Prometheus as a person sees them, in headless Chromium.

Debian's chromium and chromium-driver, driven by Selenium. The browser trusts the fleet's CA
the way a person's would (an NSS database holding it, in a throwaway home directory) instead of
ignoring certificate errors, and sends Flower's user and password as a header set over the
DevTools protocol, so the password is in no URL and on no command line. Each page is read once
its data has loaded (Flower fills its tables from its API), then saved as a full-page PNG.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service

from fleetctl.status import Source, StatusError

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CERTUTIL = "/usr/bin/certutil"
WIDTH = 1400
# A page longer than this is cut: the rest of a 100-target list says nothing more.
MAX_HEIGHT = 6000

# Each reader runs in the page and returns its rows, one object per row. Text is read as
# textContent: Flower splits a worker's name into two spans that innerText breaks apart.
TEXT = "const text = node => node ? node.textContent.replace(/\\s+/g, ' ').trim() : '';"
# Flower pages its workers by 15: all of them on one page (the table is filled client-side).
FLOWER_WORKERS = f"""{TEXT}
if (window.jQuery && jQuery.fn.dataTable.isDataTable('#workers-table')) {{
  const table = jQuery('#workers-table').DataTable();
  if (table.page.len() !== -1) table.page.len(-1).draw(false);
}}
return [...document.querySelectorAll('#workers-table tbody tr')]
  .filter(tr => tr.querySelector('a.worker-name-link'))
  .map(tr => ({{worker: text(tr.querySelector('a.worker-name-link')),
               status: text(tr.querySelector('.badge'))}}));
"""
FLOWER_TASKS = f"""{TEXT}
const columns = [...document.querySelectorAll('#tasks-table thead th')]
  .map(th => th.dataset.column);
return [...document.querySelectorAll('#tasks-table tbody tr')]
  .filter(tr => !tr.querySelector('.dataTables_empty'))
  .map(tr => ({{...Object.fromEntries([...tr.cells].map((td, i) => [columns[i] || i, text(td)])),
               uuid: tr.id}}));  // the UUID cell holds the id twice (whole, shortened)
"""
# Debian's Prometheus ships the classic UI (its React UI needs npm to build), under /classic.
PROMETHEUS_TARGETS = """
return [...document.querySelectorAll('td.state')].map(td => {
  const tr = td.closest('tr');
  const labels = Object.fromEntries([...tr.querySelectorAll('td.labels .badge')]
    .map(badge => badge.textContent.trim().match(/^([^=]+)="(.*)"$/)).filter(m => m)
    .map(m => [m[1], m[2]]));
  return {job: labels.job || '', instance: labels.instance || '',
          state: td.textContent.trim().toLowerCase(),
          error: (tr.querySelector('td.errors') || td).textContent.trim()};
});
"""
PROMETHEUS_ALERTS = """
const states = {'alert-success': 'inactive', 'alert-warning': 'pending', 'alert-danger': 'firing'};
return [...document.querySelectorAll('tr.alert_header')].map(tr => ({
  alert: tr.querySelector('b').textContent.trim(),
  state: Object.entries(states).filter(([cls]) => tr.classList.contains(cls))
    .map(([, state]) => state)[0] || '?'}));
"""
PAGE_HEIGHT = "return Math.max(document.documentElement.scrollHeight, document.body.scrollHeight);"

Rows = list[dict[str, str]]


def _targets_scraped(rows: Rows) -> bool:
    # A target Prometheus has not scraped yet (just after a deploy) is "unknown", not down.
    return bool(rows) and all(row["state"] != "unknown" for row in rows)


@dataclass(frozen=True)
class Page:
    name: str  # the screenshot's file name, without .png
    service: str  # "flower" or "prometheus"
    path: str
    reader: str
    ready: Callable[[Rows], bool] = bool  # whether the rows read are what the page will show


PAGES = (
    Page("flower-workers", "flower", "/workers", FLOWER_WORKERS),
    Page("flower-tasks", "flower", "/tasks", FLOWER_TASKS),
    Page(
        "prometheus-targets", "prometheus", "/classic/targets", PROMETHEUS_TARGETS, _targets_scraped
    ),
    Page("prometheus-alerts", "prometheus", "/classic/alerts", PROMETHEUS_ALERTS),
)


@dataclass(frozen=True)
class Shot:
    page: Page
    screenshot: Path
    height: int  # the page's (scrollHeight, CSS pixels): the screenshot's unless cut at MAX_HEIGHT
    rows: Rows

    def summary(self) -> str:
        if self.page.reader == FLOWER_WORKERS:
            online = sum(row["status"] == "Online" for row in self.rows)
            return f"{online} of {len(self.rows)} workers online"
        if self.page.reader == FLOWER_TASKS:
            states = Counter(row.get("state", "?") for row in self.rows)
            return f"{len(self.rows)} tasks: " + ", ".join(f"{n} {s}" for s, n in states.items())
        if self.page.reader == PROMETHEUS_TARGETS:
            up = sum(row["state"] == "up" for row in self.rows)
            return f"{up} of {len(self.rows)} targets up"
        states = Counter(row["state"] for row in self.rows)
        firing, pending = states["firing"], states["pending"]
        return f"{len(self.rows)} alert rules, {firing} firing, {pending} pending"

    def problems(self) -> list[str]:
        if not self.rows and self.page.reader != FLOWER_TASKS:  # no task yet is no problem
            return [f"{self.page.name}: the page showed nothing"]
        if self.page.reader == FLOWER_WORKERS:
            return [f"{r['worker']} is {r['status']}" for r in self.rows if r["status"] != "Online"]
        if self.page.reader == PROMETHEUS_TARGETS:
            return [
                f"target {r['job']} on {r['instance']} is {r['state']} ({r['error']})"
                for r in self.rows
                if r["state"] != "up"
            ]
        if self.page.reader == PROMETHEUS_ALERTS:
            return [f"alert {r['alert']} firing" for r in self.rows if r["state"] == "firing"]
        return []


@contextmanager
def chromium(source: Source) -> Iterator[webdriver.Chrome]:
    """Headless Chromium trusting the fleet's CA and sending Flower's credentials."""
    for program in (CHROMIUM, CHROMEDRIVER, CERTUTIL):
        if not os.access(program, os.X_OK):
            raise StatusError(
                f"{program} is missing: apt install chromium chromium-driver libnss3-tools"
            )
    home = Path(tempfile.mkdtemp(prefix="fleet-chromium-"))
    try:
        nssdb = f"sql:{home / '.pki' / 'nssdb'}"
        (home / ".pki" / "nssdb").mkdir(parents=True)
        for args in (
            ["-N", "--empty-password"],
            ["-A", "-t", "C,,", "-n", "celery-fleet CA", "-i", source.ca],
        ):
            done = subprocess.run(
                [CERTUTIL, "-d", nssdb, *args], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise StatusError(f"certutil could not trust {source.ca}: {done.stderr.strip()}")
        hosts = {urlsplit(url).hostname or "" for url in (source.flower, source.url) if url}
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in (
            "--headless=new",
            f"--window-size={WIDTH},900",
            f"--user-data-dir={home / 'profile'}",
            # Only the fleet's hosts: no name resolves, so nothing of Chromium's own (updates,
            # safe browsing) leaves the box.
            f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {', EXCLUDE '.join(sorted(hosts))}",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
        ):
            options.add_argument(argument)
        if os.geteuid() == 0:
            # Chromium refuses to run as root inside its own sandbox.
            options.add_argument("--no-sandbox")
        # HOME: where Chromium's NSS looks for trusted CAs.
        service = Service(CHROMEDRIVER, env={**os.environ, "HOME": str(home)})
        try:
            driver = webdriver.Chrome(options=options, service=service)
        except WebDriverException as exc:
            raise StatusError(f"Chromium did not start: {exc.msg or exc}") from exc
        try:
            token = base64.b64encode(f"{source.user}:{source.password}".encode()).decode()
            driver.execute_cdp_cmd("Network.enable", {})
            # Selenium logs each command at DEBUG, this one with the password (base64).
            connection_log = logging.getLogger("selenium.webdriver.remote.remote_connection")
            level = connection_log.level
            connection_log.setLevel(logging.INFO)
            try:
                driver.execute_cdp_cmd(
                    "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}}
                )
            finally:
                connection_log.setLevel(level)
            yield driver
        finally:
            driver.quit()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _read(driver: webdriver.Chrome, page: Page, timeout: float) -> Rows:
    """The page's rows once they are ready, or what it shows after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found: list[dict[str, Any]] = driver.execute_script(page.reader) or []
        rows = [{str(k): str(v) for k, v in row.items()} for row in found]
        if page.ready(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def _full_page_png(driver: webdriver.Chrome) -> bytes:
    """The whole page, not only the window (Selenium's screenshot stops at the window)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], MAX_HEIGHT)}
    image = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {"format": "png", "captureBeyondViewport": True, "clip": {**clip, "scale": 1}},
    )
    return base64.b64decode(image["data"])


def capture(
    source: Source, out: Path, pages: tuple[Page, ...] = PAGES, timeout: float = 20
) -> list[Shot]:
    """Open each page, read what it shows, and save a full-page screenshot under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    bases = {"flower": source.flower, "prometheus": source.url}
    shots = []
    with chromium(source) as driver:
        for page in pages:
            if not bases[page.service]:
                continue  # no Prometheus without metrics
            url = bases[page.service] + page.path
            screenshot = out / f"{page.name}.png"
            try:
                driver.get(url)
                rows = _read(driver, page, timeout)
                height = driver.execute_script(PAGE_HEIGHT)
                image = _full_page_png(driver)
            except WebDriverException as exc:
                raise StatusError(f"Chromium could not show {url}: {exc.msg or exc}") from exc
            screenshot.write_bytes(image)
            shots.append(Shot(page, screenshot, int(height), rows))
    return shots
