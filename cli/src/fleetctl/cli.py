"""`fleet`: the whole fleet from the control node (status; screenshots of its dashboards)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fleetctl import status

SCREENSHOTS = status.REPO / ".build" / "screenshots"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser(
        "status",
        help="hosts, units, workers per queue, queues, unacked, Redis, firing alerts",
    )
    shots = commands.add_parser(
        "screenshots",
        help="Flower (workers, tasks) and Prometheus (targets, alerts) in headless Chromium",
    )
    shots.add_argument(
        "-o", "--out", type=Path, default=SCREENSHOTS, help=f"where (default: {SCREENSHOTS})"
    )
    for command in (show, shots):
        command.add_argument(
            "-i", "--inventory", help="the inventory (default: ansible.cfg's, inventory/lab)"
        )
    args = parser.parse_args(argv)
    console = Console()
    if args.command == "screenshots":
        return screenshots(args.inventory, args.out, console)
    try:
        with console.status("Asking Ansible where the fleet's Prometheus is...") as progress:
            source = status.prometheus_source(args.inventory)
            progress.update(f"Asking Prometheus at {source.url}...")
            fleet = status.gather(source)
    except status.StatusError as exc:
        console.print(f"[red]fleet status:[/] {exc}")
        return 1
    status.render(fleet, console)
    return 0 if not fleet.problems() else 2


def screenshots(inventory: str | None, out: Path, console: Console) -> int:
    # Imported here: `fleet status` does not need Selenium.
    from fleetctl import browser

    try:
        with console.status("Asking Ansible where the monitor host is..."):
            source = status.monitor_source(inventory)
        with console.status(f"Opening Flower and Prometheus in headless Chromium ({out})..."):
            shots = browser.capture(source, out)
    except status.StatusError as exc:
        console.print(f"[red]fleet screenshots:[/] {exc}")
        return 1
    table = Table(title="What the dashboards show", title_justify="left")
    table.add_column("page")
    table.add_column("shows")
    table.add_column("screenshot", overflow="fold")
    problems = []
    for shot in shots:
        problems += shot.problems()
        shows = shot.summary() + "".join(f"\n[red]{problem}[/]" for problem in shot.problems())
        table.add_row(shot.page.name, shows, str(shot.screenshot))
    console.print(table)
    return 0 if not problems else 2


if __name__ == "__main__":
    sys.exit(main())
