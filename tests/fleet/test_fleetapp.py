"""Every host the fleetapp role installs the app on: config and state owned as intended."""

from __future__ import annotations

import pytest

testinfra_hosts = ["ansible://workers", "ansible://clients", "ansible://monitor"]


@pytest.mark.parametrize(
    ("path", "user", "group", "mode"),
    [
        ("/etc/fleetapp", "root", "celery", 0o750),
        # Holds the Redis password: readable by the celery group only.
        ("/etc/fleetapp/fleetapp.env", "root", "celery", 0o640),
        ("/var/lib/celery", "celery", "celery", 0o750),
    ],
)
def test_config_permissions(host, path, user, group, mode):
    f = host.file(path)
    assert f.exists
    assert (f.user, f.group, f.mode) == (user, group, mode)
