"""TLS on the lab (roles/pki): Redis serves TLS only and Flower HTTPS, with certificates of the
fleet's own CA; a plaintext client and a client trusting another CA get nothing."""

from __future__ import annotations

import pytest
import requests

from tests.conftest import address, on
from tests.fleet.conftest import CA_CERT, SECRETS, TLS_DIR, playbook, recap

pytestmark = pytest.mark.timeout(900)

PORT = 6379
FLOWER_PORT = 5555
# A CA the fleet never heard of, made on the client for the test.
OTHER_CA = (
    "test -s /tmp/other-ca.crt || openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256"
    " -nodes -keyout /tmp/other-ca.key -out /tmp/other-ca.crt -subj /CN=other-ca -days 1"
)


# PING with redis-py, as the app connects (client hosts have no redis-cli), without a password.
PING = """
import sys, redis
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tls = {"ssl": True, "ssl_ca_certs": ca} if ca != "-" else {}
try:
    print(redis.Redis(host=host, port=port, socket_timeout=5, protocol=2, **tls).ping())
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def redis_ping_from_client1(ca: str = "-") -> str:
    """PING to redis1 from client1 (a host its firewall admits): plaintext, or TLS trusting ca."""
    command = f"/opt/celery-fleet/venv/bin/python - {address('redis1')} {PORT} {ca}"
    return on("client1", command, input=PING).stdout.strip()


def test_redis_refuses_a_plaintext_client():
    # Plaintext Redis would answer NOAUTH (no password given); TLS-only Redis drops the bytes.
    answer = redis_ping_from_client1()
    assert answer.startswith("ConnectionError"), answer


def test_redis_is_verified_with_the_fleets_ca_and_asks_for_a_password():
    answer = redis_ping_from_client1(f"{TLS_DIR}/ca.crt")
    # NOAUTH, which redis-py reports as AuthenticationError "Authentication required."
    assert answer.startswith("AuthenticationError") and "required" in answer, answer


def test_a_client_trusting_another_ca_refuses_redis():
    on("client1", OTHER_CA)
    answer = redis_ping_from_client1("/tmp/other-ca.crt")
    assert "certificate verify failed" in answer, answer


def test_the_apps_celery_refuses_redis_under_another_ca():
    """The fleet's Celery settings verify the server: with another CA, nothing is published."""
    on("client1", OTHER_CA)
    # The host's settings with one change (the environment wins over the env file).
    publish = (
        "FLEET_ENV_FILE=/etc/celery-fleet/app.env FLEET_REDIS_CA_FILE=/tmp/other-ca.crt "
        "/opt/celery-fleet/venv/bin/fleet-python -c 'from fleetapp.celery import app; "
        'app.send_task("fleetapp.add", (1, 2), retry=False, ignore_result=True)\''
    )
    result = on("client1", publish, check=False, timeout=120)
    assert result.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in result.stderr or "certificate verify" in result.stderr, (
        result.stderr[-2000:]
    )


def test_flower_serves_https_only():
    base = f"{address('monitor1')}:{FLOWER_PORT}"
    assert requests.get(f"https://{base}/healthcheck", timeout=10, verify=str(CA_CERT)).ok
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://{base}/healthcheck", timeout=10)
    # Verified against the system's CAs (not the fleet's), the certificate is refused.
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"https://{base}/healthcheck", timeout=10)


@pytest.mark.parametrize(
    ("host", "name", "group"), [("redis1", "redis", "redis"), ("monitor1", "flower", "celery")]
)
def test_a_key_is_readable_by_its_service_only(host, name, group):
    listing = on(host, f"stat -c '%U %G %a' {TLS_DIR}/{name}.key {TLS_DIR}/{name}.crt").stdout
    assert listing.split("\n")[:2] == [f"root {group} 640", "root root 644"]


@pytest.mark.parametrize("host", ["redis1", "worker1", "client1", "monitor1"])
def test_every_host_trusts_the_fleets_ca_and_holds_no_ca_key(host):
    assert on(host, f"cmp {TLS_DIR}/ca.crt -", input=CA_CERT.read_text()).returncode == 0
    assert on(host, "find / -xdev -name ca.key -path '*tls*' 2>/dev/null").stdout.strip() == ""


def test_the_ca_key_stays_private_on_the_control_node():
    assert oct((SECRETS / "ca").stat().st_mode & 0o777) == "0o700"
    assert oct((SECRETS / "ca" / "ca.key").stat().st_mode & 0o777) == "0o600"


def test_the_redis_certificate_names_redis1_and_chains_to_the_ca():
    crt = f"{TLS_DIR}/redis.crt"
    text = on("redis1", f"openssl x509 -in {crt} -noout -ext subjectAltName -issuer").stdout
    # OpenSSL 3.0 (Debian 12) prints "CN = ...", 3.5 (Debian 13) "CN=...".
    issuer = text.replace("CN = ", "CN=")
    assert f"IP Address:{address('redis1')}" in text and "CN=celery-fleet CA" in issuer, text
    assert on("redis1", f"openssl verify -CAfile {TLS_DIR}/ca.crt {crt}").returncode == 0


def serial(host: str, name: str) -> str:
    return on(host, f"openssl x509 -in {TLS_DIR}/{name}.crt -noout -serial").stdout.strip()


def test_a_run_renews_certificates_due_and_the_fleet_carries_on():
    """A certificate expiring within pki_renew_days is renewed by the next run (here every one is
    due); Redis serves it without a restart, Flower restarts, and every tier still connects."""
    before = {key: serial(*key) for key in (("redis1", "redis"), ("monitor1", "flower"))}
    redis_pid = on("redis1", "systemctl show -P MainPID redis-server").stdout.strip()
    # Only the hosts and tasks that serve TLS: the others hold the CA certificate alone.
    result = playbook(
        "site.yml",
        *("--limit", "redis1,monitor1", "--tags", "redis_tls,flower_configure"),
        *("-e", "pki_renew_days=400"),
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert recap(result)["redis1"]["changed"] > 0
    after = {key: serial(*key) for key in before}
    assert all(after[key] != before[key] for key in before), (before, after)
    # Redis reads the new certificate without a restart (its clients stay connected) and serves it.
    assert on("redis1", "systemctl show -P MainPID redis-server").stdout.strip() == redis_pid
    served = on(
        "redis1",
        f"openssl s_client -connect 127.0.0.1:{PORT} -CAfile {TLS_DIR}/ca.crt </dev/null"
        " 2>/dev/null | openssl x509 -noout -serial",
    ).stdout.strip()
    assert served == after[("redis1", "redis")], (served, after)
    # Verified with the same CA, as every tier connects.
    assert redis_ping_from_client1(f"{TLS_DIR}/ca.crt").startswith("AuthenticationError")
    base = f"https://{address('monitor1')}:{FLOWER_PORT}"
    assert requests.get(f"{base}/healthcheck", timeout=10, verify=str(CA_CERT)).ok
    doctor = on("client1", "fleet-doctor", check=False, timeout=120)
    assert doctor.returncode == 0, doctor.stdout[-2000:] + doctor.stderr[-2000:]
