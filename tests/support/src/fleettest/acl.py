"""The redis role's ACL presets, rendered as Ansible renders them, for a local redis-server.

So the local harness runs the sample app under the very rules the fleet deploys
(roles/redis/defaults/main.yml), not under an all-powerful user.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2.nativetypes import NativeEnvironment

ROLE = Path(__file__).resolve().parents[4] / "roles" / "redis"
DEFAULTS = ROLE / "defaults" / "main.yml"
VARS = ROLE / "vars" / "main.yml"
OS_RELEASE = Path("/etc/os-release")
PRESETS = {
    "worker": "redis_acl_rules_celery_worker",
    "client": "redis_acl_rules_celery_client",
    "flower": "redis_acl_rules_flower",
}


def _release_vars() -> dict[str, Any]:
    """What differs between releases (vars/Debian-<major>.yml), for this machine's release: the
    local redis-server is its Debian's."""
    fields = dict(line.split("=", 1) for line in OS_RELEASE.read_text().splitlines() if "=" in line)
    major = fields.get("VERSION_ID", "").strip('"').split(".")[0]
    release = yaml.safe_load((ROLE / "vars" / f"Debian-{major}.yml").read_text(encoding="utf-8"))
    return dict(release["_redis_release"])


def _bool(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def rules(prefix: str, queues: list[str], *, chords: bool = True, db: int = 0) -> dict[str, str]:
    """{tier: ACL rules} for an application with this key prefix and these queues.

    The role's internal values (vars/main.yml) are rendered too, with native types as Ansible
    renders them.
    """
    defaults = yaml.safe_load(DEFAULTS.read_text(encoding="utf-8"))
    role_vars = yaml.safe_load(VARS.read_text(encoding="utf-8"))
    filters = {
        "bool": _bool,
        "regex_replace": lambda value, pattern, replacement: re.sub(pattern, replacement, value),
    }
    text = jinja2.Environment(undefined=jinja2.StrictUndefined)
    native = NativeEnvironment(undefined=jinja2.StrictUndefined)
    text.filters.update(filters)
    native.filters.update(filters)
    context: dict[str, Any] = {
        "redis_acl_key_prefix": prefix,
        "redis_acl_db": db,
        "redis_acl_client_queues": queues,
        "redis_acl_celery_chords": chords,
        "_redis_release": _release_vars(),
    }
    for name in (
        "_redis_acl_fanout",
        "_redis_acl_client_queues",
        "_redis_acl_client_queue_keys",
        "_redis_acl_client_binding_keys",
    ):
        context[name] = native.from_string(role_vars[name]).render(**context)

    def render(value: Any) -> Any:
        if isinstance(value, str):
            return text.from_string(value).render(**context)
        return [render(item) for item in value]

    context["redis_acl_rules_connection"] = render(defaults["redis_acl_rules_connection"])
    return {tier: " ".join(render(defaults[name])) for tier, name in PRESETS.items()}
