#!/usr/bin/python
"""Ansible module: install the application on the control node and ask it where it routes."""

from __future__ import annotations

DOCUMENTATION = r"""
module: app_describe
short_description: Install the application in a scratch venv on the control node and describe it
description:
  - Installs the application's artifact and the celery-fleet runtime into a virtualenv under
    O(work_dir) (one per set of inputs, kept), from O(index_url) with the constraints file if any,
    then runs C(fleet-doctor --describe) for O(app). So an application that does not install, or
    does not import, fails on the control node before any host changes, and the preflight knows
    which queues the application routes tasks to.
options:
  artifact:
    description: The application's wheel or sdist.
    type: path
    required: true
  runtime:
    description: The celery-fleet runtime wheel.
    type: path
    required: true
  constraints:
    description: A pip constraints file (empty = none).
    type: str
    default: ""
  index_url:
    description: Package index (empty = pip's default).
    type: str
    default: ""
  app:
    description: The Celery app, as C(celery -A) takes it.
    type: str
    required: true
  work_dir:
    description: Where the scratch virtualenvs are kept.
    type: path
    required: true
  python:
    description: Interpreter that creates the virtualenv.
    type: path
    required: true
author: celery-fleet
"""

RETURN = r"""
default_queue:
  description: The application's default queue.
  type: str
  returned: success
tasks:
  description: Task name to the queue it is routed to.
  type: dict
  returned: success
routed_queues:
  description: Every queue a task of the application is routed to.
  type: list
  returned: success
"""

import hashlib
import json
import os
import shutil
import subprocess
from urllib.parse import urlsplit

from ansible.module_utils.basic import AnsibleModule


def digest(paths: list[str], extra: str) -> str:
    sha = hashlib.sha256(extra.encode())
    for path in paths:
        with open(path, "rb") as handle:
            sha.update(hashlib.sha256(handle.read()).digest())
    return sha.hexdigest()[:16]


def tail(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stderr.strip() or result.stdout.strip()).splitlines()[-6:]
    return " | ".join(line.strip() for line in lines)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "artifact": {"type": "path", "required": True},
            "runtime": {"type": "path", "required": True},
            "constraints": {"type": "str", "default": ""},
            "index_url": {"type": "str", "default": ""},
            "app": {"type": "str", "required": True},
            "work_dir": {"type": "path", "required": True},
            "python": {"type": "path", "required": True},
        },
        supports_check_mode=True,
    )
    p = module.params
    inputs = [p["artifact"], p["runtime"]] + ([p["constraints"]] if p["constraints"] else [])
    venv = os.path.join(p["work_dir"], digest(inputs, p["index_url"]))
    done = os.path.join(venv, ".installed")
    if not os.path.exists(done):
        shutil.rmtree(venv, ignore_errors=True)
        created = subprocess.run(
            [p["python"], "-m", "venv", venv], capture_output=True, text=True, check=False
        )
        if created.returncode != 0:
            module.fail_json(msg=f"Cannot create a virtualenv on the control node: {tail(created)}")
        command = [os.path.join(venv, "bin", "pip"), "install", "--quiet"]
        if p["constraints"]:
            command += ["-c", p["constraints"]]
        if p["index_url"]:
            command += ["--index-url", p["index_url"]]
            if p["index_url"].startswith("http://"):
                command += ["--trusted-host", urlsplit(p["index_url"]).hostname or ""]
        installed = subprocess.run(
            [*command, p["artifact"], p["runtime"]], capture_output=True, text=True, check=False
        )
        if installed.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            module.fail_json(
                msg=f"The application {os.path.basename(p['artifact'])} does not install"
                f" (pip install, with its dependencies): {tail(installed)}"
            )
        open(done, "w").close()  # an empty marker file

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    described = subprocess.run(
        [os.path.join(venv, "bin", "fleet-doctor"), "--describe", "-A", p["app"]],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=venv,
    )
    if described.returncode != 0:
        module.fail_json(
            msg=f"The application does not load as fleet_app {p['app']!r}: {tail(described)}"
        )
    routes = json.loads(described.stdout)
    module.exit_json(
        changed=False,
        default_queue=routes["default_queue"],
        tasks=routes["tasks"],
        routed_queues=sorted(set(routes["tasks"].values())),
    )


if __name__ == "__main__":
    main()
