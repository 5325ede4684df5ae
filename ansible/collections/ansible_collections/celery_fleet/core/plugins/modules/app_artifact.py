#!/usr/bin/python
"""Ansible module: the application's artifact on the control node, built if need be."""

from __future__ import annotations

DOCUMENTATION = r"""
module: app_artifact
short_description: Build a Python project with its own build backend, or check a given artifact
description:
  - With O(project_dir), builds a wheel with C(python -m build) in an isolated environment, so
    the backend the project declares (setuptools, hatchling, poetry-core, flit, pdm, ...) is
    installed from O(index_url) for the build. The wheel is kept under O(build_dir) by a hash of
    the project's files, so an unchanged project is not rebuilt and its wheel keeps its bytes.
  - With O(artifact), checks the wheel or sdist exists and returns it.
  - A project that does not build fails with one sentence and the builder's last lines.
options:
  project_dir:
    description: Directory with pyproject.toml or setup.py.
    type: path
  artifact:
    description: A wheel or sdist to use as is.
    type: path
  build_dir:
    description: Where built wheels are kept (one folder per source hash).
    type: path
    required: true
  index_url:
    description: Package index for the isolated build environment (empty = pip's default).
    type: str
    default: ""
  python:
    description: Interpreter with the C(build) package.
    type: path
    required: true
author: celery-fleet
"""

RETURN = r"""
path:
  description: The artifact's path.
  type: str
  returned: success
distribution:
  description: The distribution name, from the file name.
  type: str
  returned: success
version:
  description: Its version, from the file name.
  type: str
  returned: success
built:
  description: Whether this run built it.
  type: bool
  returned: success
"""

import hashlib
import os
import re
import shutil
import subprocess
from urllib.parse import urlsplit

from ansible.module_utils.basic import AnsibleModule

# Not part of the project: build outputs, caches, VCS and virtualenvs.
SKIP_DIRS = {".git", ".hg", ".build", "build", "dist", "__pycache__", ".venv", "venv", ".tox"}
SKIP_SUFFIXES = (".pyc", ".egg-info")
ARTIFACT = re.compile(
    r"^(?P<name>[A-Za-z0-9_.]+?)-(?P<version>[0-9][^-]*)(-.+\.whl|\.tar\.gz|\.zip)$"
)


def source_hash(project: str) -> str:
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(project):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(SKIP_SUFFIXES))
        for name in sorted(files):
            if name.endswith(SKIP_SUFFIXES):
                continue
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, project).encode() + b"\0")
            with open(path, "rb") as handle:
                digest.update(hashlib.sha256(handle.read()).digest())
    return digest.hexdigest()[:16]


def describe(module: AnsibleModule, path: str, built: bool) -> None:
    match = ARTIFACT.match(os.path.basename(path))
    if not match:
        module.fail_json(msg=f"{path} is not a wheel or sdist named <name>-<version>...")
    module.exit_json(
        changed=False,
        path=path,
        distribution=match.group("name"),
        version=match.group("version"),
        built=built,
    )


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "project_dir": {"type": "path"},
            "artifact": {"type": "path"},
            "build_dir": {"type": "path", "required": True},
            "index_url": {"type": "str", "default": ""},
            "python": {"type": "path", "required": True},
        },
        mutually_exclusive=[("project_dir", "artifact")],
        required_one_of=[("project_dir", "artifact")],
        supports_check_mode=True,
    )
    params = module.params
    if params["artifact"]:
        if not os.path.isfile(params["artifact"]):
            module.fail_json(msg=f"The application artifact {params['artifact']} does not exist.")
        describe(module, params["artifact"], built=False)

    project = params["project_dir"]
    if not any(os.path.isfile(os.path.join(project, f)) for f in ("pyproject.toml", "setup.py")):
        module.fail_json(
            msg=f"The application project {project} has no pyproject.toml or setup.py to build."
        )
    out = os.path.join(params["build_dir"], source_hash(project))
    wheels = sorted(f for f in os.listdir(out) if f.endswith(".whl")) if os.path.isdir(out) else []
    if wheels:
        describe(module, os.path.join(out, wheels[0]), built=False)

    env = dict(os.environ, SOURCE_DATE_EPOCH="1580601600")
    if params["index_url"]:
        env["PIP_INDEX_URL"] = params["index_url"]
        if params["index_url"].startswith("http://"):
            # A plain-http index (a mirror on a private network) must be trusted explicitly.
            env["PIP_TRUSTED_HOST"] = urlsplit(params["index_url"]).hostname or ""
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    result = subprocess.run(
        [params["python"], "-m", "build", "--wheel", "--outdir", tmp, project],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    wheels = sorted(f for f in os.listdir(tmp) if f.endswith(".whl")) if os.path.isdir(tmp) else []
    if result.returncode != 0 or len(wheels) != 1:
        tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-8:]
        module.fail_json(
            msg=f"The application project {project} does not build (python -m build):"
            f" {' | '.join(line.strip() for line in tail)}",
        )
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    describe(module, os.path.join(out, wheels[0]), built=True)


if __name__ == "__main__":
    main()
