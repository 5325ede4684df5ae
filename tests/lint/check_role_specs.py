"""Every role's meta/argument_specs.yml and defaults/main.yml name the same options with the same
defaults (as prometheus-community's CI checks): run by `make lint`.
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
    options = yaml.safe_load(specs_file.read_text())["argument_specs"]["main"].get("options", {})
    found = []
    for name in sorted(set(defaults) - set(options)):
        found.append(f"{role.name}: {name} is in defaults/main.yml but not in the argument specs")
    for name, spec in sorted(options.items()):
        if name not in defaults:
            if not spec.get("required"):
                found.append(f"{role.name}: {name} is in the argument specs but not in defaults")
            continue
        if "default" not in spec:
            if not spec.get("required"):
                found.append(f"{role.name}: {name} has no default in the argument specs")
        elif _normal(spec["default"]) != _normal(defaults[name]):
            found.append(
                f"{role.name}: {name} defaults to {defaults[name]!r} but the specs say"
                f" {spec['default']!r}"
            )
    return found


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
