"""fleetapp.config: exact variable names, quoting, validation messages."""

from __future__ import annotations

import ipaddress
import ssl
import subprocess
from pathlib import Path

import pytest
from celery_fleet.config import fleet_settings
from fleetapp.celeryconfig import celery_config
from fleetapp.config import ConfigError, load_settings, redact_url


@pytest.fixture
def base(tmp_path: Path) -> dict[str, str]:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    return {"FLEETAPP_ENV_FILE": str(empty), "FLEETAPP_BROKER_URL": "redis://198.18.0.10:6379/0"}


def test_defaults(base):
    s = load_settings(base)
    assert s.broker_url == "redis://198.18.0.10:6379/0"
    assert s.result_backend == s.broker_url
    assert (s.default_queue, s.network_queue) == ("default", "network")
    assert s.ssl_options is None
    assert s.fetch_allow_networks == ()


def test_fetch_allow_networks(base):
    s = load_settings({**base, "FLEETAPP_FETCH_ALLOW_NETWORKS": " 198.18.0.1/32, fd00:1::/64,"})
    assert s.fetch_allow_networks == (
        ipaddress.ip_network("198.18.0.1/32"),
        ipaddress.ip_network("fd00:1::/64"),
    )
    # A bare address is that one address.
    s = load_settings({**base, "FLEETAPP_FETCH_ALLOW_NETWORKS": "198.18.0.1"})
    assert s.fetch_allow_networks == (ipaddress.ip_network("198.18.0.1/32"),)


def test_credentials_are_quoted_into_both_urls(base):
    password = "p@ss:w/rd%#?"
    s = load_settings(
        {
            **base,
            "FLEETAPP_RESULT_BACKEND": "redis://198.18.0.11:6379/1",
            "FLEETAPP_REDIS_USERNAME": "fleet",
            "FLEETAPP_REDIS_PASSWORD": password,
        }
    )
    quoted = "p%40ss%3Aw%2Frd%25%23%3F"
    assert s.broker_url == f"redis://fleet:{quoted}@198.18.0.10:6379/0"
    assert s.result_backend == f"redis://fleet:{quoted}@198.18.0.11:6379/1"
    # What Celery/kombu parse back is the original password.
    from kombu.utils.url import url_to_parts

    parts = url_to_parts(s.broker_url)
    assert (parts.username, parts.password, parts.hostname, parts.port) == (
        "fleet",
        password,
        "198.18.0.10",
        6379,
    )
    assert password not in repr(s) and quoted not in repr(s)
    assert redact_url(s.broker_url) == "redis://198.18.0.10:6379/0"


def test_variables_win_over_credentials_in_the_url(base):
    s = load_settings(
        {
            **base,
            "FLEETAPP_BROKER_URL": "redis://old:oldpw@h:6379/0",
            "FLEETAPP_REDIS_PASSWORD": "new",
        }
    )
    assert s.broker_url == "redis://old:new@h:6379/0"
    s = load_settings({**base, "FLEETAPP_BROKER_URL": "redis://old:oldpw@h:6379/0"})
    assert s.broker_url == "redis://old:oldpw@h:6379/0"


def test_tls_and_ca_file(base, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("dummy")
    s = load_settings({**base, "FLEETAPP_REDIS_TLS": "true", "FLEETAPP_REDIS_CA_FILE": str(ca)})
    assert s.broker_url.startswith("rediss://") and s.result_backend.startswith("rediss://")
    assert s.ssl_options == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca)}
    conf = celery_config(s)
    assert conf["broker_use_ssl"] == conf["redis_backend_use_ssl"] == s.ssl_options


@pytest.mark.parametrize(
    ("extra", "variable"),
    [
        ({"FLEETAPP_REDIS_TLS": "maybe"}, "FLEETAPP_REDIS_TLS"),
        ({"FLEETAPP_REDIS_CA_FILE": "/nonexistent.pem"}, "FLEETAPP_REDIS_CA_FILE"),
        (
            {"FLEETAPP_REDIS_TLS": "true", "FLEETAPP_REDIS_CA_FILE": "/nonexistent.pem"},
            "FLEETAPP_REDIS_CA_FILE",
        ),
        ({"FLEETAPP_BROKER_URL": "amqp://h/"}, "FLEETAPP_BROKER_URL"),
        ({"FLEETAPP_BROKER_URL": "redis://h:notaport/0"}, "FLEETAPP_BROKER_URL"),
        ({"FLEETAPP_RESULT_BACKEND": "redis:///0"}, "FLEETAPP_RESULT_BACKEND"),
        ({"FLEETAPP_NETWORK_QUEUE": "bad queue"}, "FLEETAPP_NETWORK_QUEUE"),
        ({"FLEETAPP_ENV_FILE": "/nonexistent/fleetapp.env"}, "FLEETAPP_ENV_FILE"),
        ({"FLEETAPP_FETCH_ALLOW_NETWORKS": "198.18.0.1/33"}, "FLEETAPP_FETCH_ALLOW_NETWORKS"),
        ({"FLEETAPP_FETCH_ALLOW_NETWORKS": "198.18.0.1/24"}, "FLEETAPP_FETCH_ALLOW_NETWORKS"),
        (
            {"FLEETAPP_FETCH_ALLOW_NETWORKS": "127.0.0.1/32,webfarm"},
            "FLEETAPP_FETCH_ALLOW_NETWORKS",
        ),
    ],
)
def test_invalid_values_name_the_variable(base, extra, variable):
    with pytest.raises(ConfigError) as info:
        load_settings({**base, **extra})
    message = str(info.value)
    assert message.startswith(variable), message
    assert "\n" not in message


def test_env_file_loaded_and_real_environment_wins(tmp_path):
    env_file = tmp_path / "fleetapp.env"
    env_file.write_text(
        "# written by the fleetapp role\n"
        "FLEETAPP_BROKER_URL=redis://10.0.0.1:6379/0\n"
        "export FLEETAPP_NETWORK_QUEUE='net'\n"
        'FLEETAPP_REDIS_PASSWORD="from file"\n'
        "FLEETAPP_DEFAULT_QUEUE=q1\n"
    )
    s = load_settings({"FLEETAPP_ENV_FILE": str(env_file), "FLEETAPP_DEFAULT_QUEUE": "q2"})
    assert s.broker_url == "redis://:from%20file@10.0.0.1:6379/0"
    assert s.network_queue == "net"
    assert s.default_queue == "q2"


def test_celerys_own_variables_win(base):
    """How a deployment hands the app its broker: Celery's variables, credentials included."""
    s = load_settings(
        {
            **base,
            "CELERY_BROKER_URL": "redis://app:pw@10.0.0.9:6379/0",
            "CELERY_RESULT_BACKEND": "redis://app:pw@10.0.0.9:6379/1",
        }
    )
    assert s.broker_url == "redis://app:pw@10.0.0.9:6379/0"
    assert s.result_backend == "redis://app:pw@10.0.0.9:6379/1"


def test_celery_settings(base):
    conf = celery_config(load_settings(base))
    # Deployment settings are the deployment's (celery-fleet's runtime defaults), not the app's.
    deployment = ("task_acks_late", "broker_transport_options", "task_time_limit", "accept_content")
    assert not set(deployment) & set(conf)
    fleet = fleet_settings({})
    assert fleet["accept_content"] == fleet["result_accept_content"] == ["json"]
    assert fleet["task_serializer"] == fleet["result_serializer"] == "json"
    assert fleet["worker_send_task_events"] and fleet["task_send_sent_event"]
    assert conf["task_routes"] == {"fleetapp.fetch_url": {"queue": "network"}}
    assert conf["task_default_queue"] == "default"
    # Each queue has its own binding: nothing routed to one queue is copied into the other.
    assert {(q.name, q.exchange.name, q.routing_key) for q in conf["task_queues"]} == {
        ("default", "default", "default"),
        ("network", "network", "network"),
    }


def test_a_sentinel_url_keeps_every_sentinel_with_the_credentials(base):
    sentinels = "sentinel://198.18.0.10:26379/0;sentinel://198.18.0.11:26379/0"
    s = load_settings(
        {
            **base,
            "FLEETAPP_BROKER_URL": sentinels,
            "FLEETAPP_REDIS_USERNAME": "fleet",
            "FLEETAPP_REDIS_PASSWORD": "p@ss",
        }
    )
    assert s.broker_url == (
        "sentinel://fleet:p%40ss@198.18.0.10:26379/0;sentinel://fleet:p%40ss@198.18.0.11:26379/0"
    )
    assert s.result_backend == s.broker_url
    assert redact_url(s.broker_url) == sentinels
    with pytest.raises(ConfigError, match="expected a redis://, rediss:// or sentinel://"):
        load_settings({**base, "FLEETAPP_BROKER_URL": f"{sentinels};redis://198.18.0.12:6379/0"})


def test_the_fleet_asks_the_sentinels_by_name_and_never_puts_a_password_in_its_settings():
    env = {
        "CELERY_BROKER_URL": "sentinel://worker:s3cret@198.18.0.10:26379/0",
        "FLEET_REDIS_MASTER_NAME": "fleet",
        "FLEET_REDIS_CA_FILE": "/etc/celery-fleet/tls/ca.crt",
    }
    settings = fleet_settings(env)
    for name in ("broker_transport_options", "result_backend_transport_options"):
        options = settings[name]
        assert options["master_name"] == "fleet"
        assert options["sentinel_kwargs"]["ssl"] is True
        assert options["sentinel_kwargs"]["ssl_ca_certs"] == "/etc/celery-fleet/tls/ca.crt"
    assert "s3cret" not in repr(settings)
    with pytest.raises(Exception, match="FLEET_REDIS_MASTER_NAME: required"):
        fleet_settings({"CELERY_BROKER_URL": env["CELERY_BROKER_URL"]})


def test_a_quoted_sentinel_url_in_the_env_file_is_read_whole(tmp_path):
    from celery_fleet.config import load_env_file

    env_file = tmp_path / "app.env"
    urls = "sentinel://w:pw@198.18.0.10:26379/0;sentinel://w:pw@198.18.0.11:26379/0"
    env_file.write_text(f'CELERY_BROKER_URL="{urls}"\nFLEET_REDIS_MASTER_NAME=fleet\n')
    env = {"FLEET_ENV_FILE": str(env_file)}
    load_env_file(env)
    assert env["CELERY_BROKER_URL"] == urls
    # As the client commands read it: sh sources the file (a bare ";" would end the line).
    shown = subprocess.run(
        ["sh", "-c", f'set -a; . {env_file}; printf %s "$CELERY_BROKER_URL"'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown.stdout == urls
