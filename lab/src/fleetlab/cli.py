"""`lab`: bring a small data centre of real Linux machines up and down on this box."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from rich.console import Console
from rich.table import Table

from .config import DEFAULT_RELEASE, RELEASES, LabError, load_config
from .lab import Lab

err = Console(stderr=True)


def _format_uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _status(lab: Lab, as_json: bool) -> int:
    rows = lab.status()
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "name": row.machine.name,
                        "address": row.machine.address,
                        "groups": row.machine.groups,
                        "release": row.machine.release,
                        "state": row.state,
                        "uptime": row.uptime,
                    }
                    for row in rows
                ],
                indent=2,
            )
        )
        return 0
    table = Table(title=f"celery-fleet lab ({lab.config.subnet}, bridge {lab.config.bridge})")
    for column in ("name", "address", "groups", "release", "state", "uptime"):
        table.add_column(column)
    colours = {"running": "green", "cut": "yellow", "stopped": "red"}
    for row in rows:
        table.add_row(
            row.machine.name,
            row.machine.address,
            ",".join(row.machine.groups) or "-",
            row.machine.release,
            f"[{colours[row.state]}]{row.state}[/]",
            _format_uptime(row.uptime),
        )
    Console().print(table)
    if not rows:
        print("no machines (run `lab up`)")
    for path in lab.inventories():
        print(f"inventory: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create and boot the default topology (idempotent)")
    up.add_argument("--workers", type=int, help="number of worker machines (default 2)")
    up.add_argument(
        "--redis", type=int, help="number of Redis machines (default 1; 3 or more: Sentinel)"
    )
    release_help = (
        f"Debian release of the machines it makes: {' or '.join(RELEASES)} (default: the"
        f" lab's, when its machines share one, else {DEFAULT_RELEASE})"
    )
    up.add_argument("--release", choices=RELEASES, help=release_help)
    sub.add_parser("down", help="remove every machine, namespace, veth, bridge, mirror and mount")
    add = sub.add_parser("add", help="add one machine while the others keep running")
    add.add_argument("name")
    add.add_argument("--address", help="a free address in the lab subnet (default: next free)")
    add.add_argument("--group", help="inventory group (default: from the name, e.g. worker3)")
    add.add_argument("--release", choices=RELEASES, help=release_help)
    for verb, text in (
        ("remove", "power off and delete one machine"),
        ("start", "boot a stopped or killed machine"),
        ("stop", "clean power-off"),
        ("kill", "power cut: every process of the machine dies at once"),
        ("cut", "network partition: unplug the machine from the bridge"),
        ("heal", "plug it back in"),
    ):
        sub.add_parser(verb, help=text).add_argument("name")
    run = sub.add_parser("exec", help="run a command inside a machine: lab exec HOST -- CMD...")
    run.add_argument("name")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    ssh = sub.add_parser("ssh", help="ssh into a machine as root with the lab key")
    ssh.add_argument("name")
    ssh.add_argument("cmd", nargs=argparse.REMAINDER)
    status = sub.add_parser("status", help="a table of machines: name, address, groups, state")
    status.add_argument("--json", action="store_true")
    sub.add_parser("inventory", help="print the path of the generated inventory")
    return parser


def dispatch(lab: Lab, args: argparse.Namespace) -> int:
    command = args.command
    if command == "up":
        if args.workers is not None and args.workers < 1:
            raise LabError("--workers must be at least 1")
        if args.redis is not None and args.redis < 1:
            raise LabError("--redis must be at least 1")
        lab.up(args.workers, args.redis, args.release)
        return _status(lab, as_json=False)
    if command == "down":
        lab.down()
        return 0
    if command == "add":
        machine = lab.add(args.name, args.address, args.group, args.release)
        groups = ",".join(machine.groups) or "-"
        print(f"{machine.name} {machine.address} {groups} {machine.release}")
        return 0
    if command in ("remove", "start", "stop", "kill", "cut", "heal"):
        getattr(lab, command)(args.name)
        return 0
    if command in ("exec", "ssh"):
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if command == "exec":
            if not cmd:
                raise LabError("usage: lab exec HOST -- CMD...")
            return lab.exec(args.name, cmd).returncode
        ssh_args = lab.ssh_args(args.name)
        if sys.stdin.isatty() and sys.stdout.isatty():
            # A terminal for the remote command too, so progress bars and colours show.
            ssh_args.insert(1, "-t")
        os.execvp(ssh_args[0], [*ssh_args, *cmd])
    if command == "status":
        return _status(lab, args.json)
    if command == "inventory":
        print(lab.config.inventory_file)
        return 0
    raise LabError(f"unknown command {command}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        lab = Lab(load_config(), log=lambda message: err.print(f"[dim]lab:[/] {message}"))
        return dispatch(lab, args)
    except LabError as error:
        err.print(f"[bold red]lab:[/] {error}", highlight=False, soft_wrap=True)
        return 1
    except (OSError, subprocess.SubprocessError) as error:
        err.print(f"[bold red]lab:[/] {error}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("[bold red]lab:[/] interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
