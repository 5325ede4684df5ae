"""Every role's meta/argument_specs.yml and defaults/main.yml name the same options with the same
defaults (as prometheus-community's CI checks): run by `make lint`. An option of another entry
point than main (tasks_from) is documented there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROLES = Path(__file__).resolve().parents[2] / "roles"


def problems(role: Path) -> list[str]:
    defaults_file = role / "defaults" / "main.yml"
    specs_file = role / "meta" / "argument_specs.yml"
    if not specs_file.exists():
        return [f"{role.name}: no meta/argument_specs.yml"]
    defaults = yaml.safe_load(defaults_file.read_text()) or {} if defaults_file.exists() else {}
    entry_points = yaml.safe_load(specs_file.read_text())["argument_specs"]
    documented = {name for entry in entry_points.values() for name in entry.get("options", {})}
    found = []
    for name in sorted(set(defaults) - documented):
        found.append(f"{role.name}: {name} is in defaults/main.yml but not in the argument specs")
    for entry_point, entry in entry_points.items():
        for name, spec in sorted(entry.get("options", {}).items()):
            found += _option_problems(
                f"{role.name} ({entry_point})", name, spec, defaults, entry_point == "main"
            )
    return found


def _option_problems(
    where: str, name: str, spec: dict[str, object], defaults: dict[str, object], main: bool
) -> list[str]:
    # Another entry point's option without a default is the caller's to give.
    if name not in defaults:
        if main and not spec.get("required"):
            return [f"{where}: {name} is in the argument specs but not in defaults"]
        return []
    if "default" not in spec:
        if not spec.get("required"):
            return [f"{where}: {name} has no default in the argument specs"]
    elif _normal(spec["default"]) != _normal(defaults[name]):
        return [
            f"{where}: {name} defaults to {defaults[name]!r} but the specs say {spec['default']!r}"
        ]
    return []


def _normal(value: object) -> object:
    # Folded scalars carry trailing whitespace differences; compare their words.
    return " ".join(value.split()) if isinstance(value, str) else value


def main() -> int:
    found = [p for role in sorted(ROLES.iterdir()) if role.is_dir() for p in problems(role)]
    for problem in found:
        print(problem, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
