"""`fleet status`: the whole fleet in one screen, from its Prometheus."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from fleetctl import status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser(
        "status",
        help="hosts, units, workers per queue, queues, unacked, Redis, firing alerts",
    )
    show.add_argument(
        "-i", "--inventory", help="the inventory (default: ansible.cfg's, inventory/lab)"
    )
    args = parser.parse_args(argv)
    console = Console()
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


if __name__ == "__main__":
    sys.exit(main())
