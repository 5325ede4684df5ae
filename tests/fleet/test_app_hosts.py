"""Every host the celery_app role installs the application on: config, state and commands."""

from __future__ import annotations

import pytest

testinfra_hosts = ["ansible://workers", "ansible://clients", "ansible://monitor"]


@pytest.mark.parametrize(
    ("path", "user", "group", "mode"),
    [
        ("/etc/celery-fleet", "root", "celery", 0o750),
        # Holds the Redis password: readable by the celery group only.
        ("/etc/celery-fleet/app.env", "root", "celery", 0o640),
        ("/var/lib/celery-fleet", "celery", "celery", 0o750),
    ],
)
def test_config_permissions(host, path, user, group, mode):
    f = host.file(path)
    assert f.exists
    assert (f.user, f.group, f.mode) == (user, group, mode)


def test_the_app_gets_celerys_own_variables(host):
    env = host.file("/etc/celery-fleet/app.env").content_string
    assert "CELERY_BROKER_URL=rediss://" in env
    assert "CELERY_RESULT_BACKEND=rediss://" in env
    assert "FLEET_REDIS_CA_FILE=/etc/celery-fleet/tls/ca.crt" in env
    assert "FLEET_APP=fleetapp.celery:app" in env
    assert "FLEET_VISIBILITY_TIMEOUT=30" in env
