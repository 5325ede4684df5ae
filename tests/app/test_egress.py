"""The fetch guard (fleetapp.egress): only public addresses and FLEETAPP_FETCH_ALLOW_NETWORKS.

Real sockets on loopback throughout. Linux routes all of 127/8 to lo, so 127.0.0.2 stands for
"a private address that is not allowed" while the webfarm's 127.0.0.1/32 is allowed.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from fleetapp import egress
from fleetapp.fetching import fetch, fetch_once
from fleettest.sample import run_cli

EXIT_FAILED, EXIT_CONFIG = 1, 3
METADATA = "http://169.254.169.254/latest/meta-data/"


# -- the address predicate -------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.0.0.2",
        "0.0.0.0",  # Linux connects it to the local host
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",  # carrier-grade NAT
        "169.254.169.254",  # cloud metadata
        "198.18.0.1",  # the lab's webfarm and Redis (benchmarking range)
        "198.18.0.10",
        "198.19.255.254",
        "192.0.2.1",  # documentation
        "224.0.0.251",  # multicast (is_global calls it global before Python 3.11.10)
        "239.255.255.250",
        "240.0.0.1",  # reserved
        "255.255.255.255",
        "::",
        "::1",
        "fe80::1",
        "fe80::1%1",
        "fc00::1",
        "fd12:3456::1",
        "fec0::1",  # site-local (deprecated, still not public)
        "ff02::1",
        "2001:db8::1",
        "::ffff:127.0.0.1",  # IPv4-mapped: an IPv6 socket connects to the IPv4 address
        "::ffff:169.254.169.254",
        "::ffff:10.0.0.1",
        "::ffff:198.18.0.10",
        "::ffff:0.0.0.0",
        "::7f00:1",  # IPv4-compatible (deprecated): reserved
        "64:ff9b::a9fe:a9fe",  # NAT64 to 169.254.169.254
        "64:ff9b::7f00:1",  # NAT64 to 127.0.0.1
        "2002:a9fe:a9fe::1",  # 6to4 to 169.254.169.254
        "2002:7f00:1::1",  # 6to4 to 127.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address):
    ip = ipaddress.ip_address(address)
    assert not egress.is_public(ip)
    assert not egress.address_allowed(ip)


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_are_allowed(address):
    assert egress.address_allowed(ipaddress.ip_address(address))


def test_the_allowlist_admits_exactly_its_networks():
    allow = (ipaddress.ip_network("198.18.0.1/32"), ipaddress.ip_network("fd00:1::/64"))
    allowed = ["198.18.0.1", "::ffff:198.18.0.1", "fd00:1::5"]
    refused = ["198.18.0.10", "198.18.0.2", "127.0.0.1", "169.254.169.254", "fd00:2::5"]
    for address in allowed:
        assert egress.address_allowed(ipaddress.ip_address(address), allow), address
    for address in refused:
        assert not egress.address_allowed(ipaddress.ip_address(address), allow), address
    # Public addresses stay allowed whatever the allowlist says.
    assert egress.address_allowed(ipaddress.ip_address("8.8.8.8"), allow)


# -- real sockets ----------------------------------------------------------------------------


class Listener:
    """A bare listening socket: answers nothing, only counts the connections made to it."""

    def __init__(self, host: str, port: int = 0) -> None:
        self.sock = socket.create_server((host, port))
        self.sock.setblocking(False)
        self.host, self.port = self.sock.getsockname()[:2]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def connections(self) -> int:
        # The kernel completes a handshake into the accept queue whether or not we accept.
        count = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def forbidden_listener():
    listener = Listener("127.0.0.2")
    yield listener
    listener.close()


class _Redirect(BaseHTTPRequestHandler):
    """GET /?to=<url>: 302 to that URL."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        target = parse_qs(urlsplit(self.path).query)["to"][0]
        self.send_response(302)
        self.send_header("Location", target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format, *args) -> None:
        pass


@pytest.fixture(scope="module")
def redirector():
    """A redirecting server on 127.0.0.1, the allowed address; yields a URL maker."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    port = server.server_address[1]
    yield lambda target: f"http://127.0.0.1:{port}/?to={quote(target, safe='')}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_loopback_is_refused_unless_allowed(webfarm, webfarm_allowed):
    """The loopback webfarm: refused by default (no request reaches it), fetched when allowed."""
    run = f"guard-{uuid.uuid4().hex[:12]}"
    url = f"{webfarm.url}/delay/0?ledger={run}.1"

    result, retryable = fetch_once(url)
    assert result["ok"] is False and result["status"] is None
    assert result["error"]["code"] == "forbidden_address", result
    assert "127.0.0.1" in result["error"]["message"]
    assert "\n" not in result["error"]["message"]
    assert not retryable  # not transient: nothing to retry
    started = time.monotonic()
    assert fetch(url)["error"]["code"] == "forbidden_address"
    assert time.monotonic() - started < 0.4  # no backoff happened (the first one is 0.5 s)
    assert webfarm.ledger.get(run) == {}

    result = fetch(url, allow_networks=webfarm_allowed)
    assert result["ok"] and result["status"] == 200, result
    assert len(webfarm.ledger.get(run)["1"]) == 1


def test_no_connection_is_made_to_a_refused_address(forbidden_listener, webfarm_allowed):
    """Refused before connecting: not even a TCP handshake, and 127.0.0.1/32 allows no other."""
    mapped = f"http://[::ffff:127.0.0.2]:{forbidden_listener.port}/"
    for url in (forbidden_listener.url, mapped):
        for allow in ((), webfarm_allowed):
            result = fetch(url, allow_networks=allow)
            assert result["error"]["code"] == "forbidden_address", (url, allow, result)
    assert forbidden_listener.connections() == 0


def test_redirects_into_refused_addresses_are_refused(
    redirector, forbidden_listener, webfarm_allowed
):
    for target in (forbidden_listener.url, METADATA, "http://[::ffff:169.254.169.254]/"):
        result = fetch(redirector(target), allow_networks=webfarm_allowed)
        assert result["error"]["code"] == "forbidden_address", (target, result)
        assert result["elapsed"] < 1  # refused, not a connect attempt that timed out
    assert forbidden_listener.connections() == 0
    # A redirect to an allowed address is followed (and a closed port is the usual error).
    result, _ = fetch_once(
        redirector(redirector("http://127.0.0.1:1/")), allow_networks=webfarm_allowed
    )
    assert result["error"]["code"] == "refused"


def test_only_the_allowed_addresses_of_a_name_are_connected_to(
    webfarm, webfarm_allowed, monkeypatch
):
    """A name with a refused and an allowed address (as DNS rebinding would answer): the fetch
    connects only to the allowed one. Only name resolution is stubbed; the sockets are real."""
    port = webfarm.server_address[1]
    trap = Listener("127.0.0.2", port)
    real_getaddrinfo = socket.getaddrinfo
    lookups: list[str] = []

    def getaddrinfo(host, *args, **kwargs):
        if host != "rebind.test":
            return real_getaddrinfo(host, *args, **kwargs)
        lookups.append(host)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        result = fetch(f"http://rebind.test:{port}/delay/0", allow_networks=webfarm_allowed)
        assert result["ok"], result
        assert lookups == ["rebind.test"]  # one lookup: the checked address is the connected one
        result = fetch(f"http://rebind.test:{port}/delay/0")
        assert result["error"]["code"] == "forbidden_address"
        assert "rebind.test (127.0.0.2, 127.0.0.1)" in result["error"]["message"]
        assert trap.connections() == 0
    finally:
        trap.close()


# -- TLS is unchanged: certificate verification and SNI ------------------------------------


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """(CA cert, server cert, server key) for the name localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetapp test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class _Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, format, *args) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # the handshakes the client rejects on purpose


@pytest.fixture
def tls_server(tmp_path):
    ca, cert, key = _certificates(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server_names: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: server_names.append(name)
    server = _QuietServer(("127.0.0.1", 0), _Hello)
    # The handshake happens in the handler's thread, so a rejected one does not stall serving.
    server.socket = context.wrap_socket(
        server.socket, server_side=True, do_handshake_on_connect=False
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    yield f"https://localhost:{server.server_address[1]}/", ca, server_names
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_tls_verification_and_sni_still_work(tls_server, webfarm_allowed, monkeypatch):
    url, ca, server_names = tls_server
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    result = fetch(url, allow_networks=webfarm_allowed)
    assert result["ok"] and result["bytes"] == 5, result
    assert server_names == ["localhost"]  # SNI: the URL's name, not the address connected to
    # Verification is still on: without the test CA the certificate is rejected.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    assert fetch(url, allow_networks=webfarm_allowed)["error"]["code"] == "tls"
    # And the guard comes first: no handshake with a refused address.
    server_names.clear()
    assert fetch(url)["error"]["code"] == "forbidden_address"
    assert server_names == []


# -- on the workers and in the CLI --------------------------------------------------------


@pytest.mark.timeout(60)
def test_workers_refuse_non_public_addresses_and_do_not_retry(
    client_app, fleet, redirector, forbidden_listener, webfarm
):
    """The fleet fixture allows 127.0.0.1/32 (the webfarm): nothing else on loopback."""
    urls = [
        forbidden_listener.url,
        METADATA,
        redirector(forbidden_listener.url),
        redirector(METADATA),
    ]
    sent = {url: client_app.tasks["fleetapp.fetch_url"].delay(url, timeout=5) for url in urls}
    for url, async_result in sent.items():
        value = async_result.get(timeout=20)
        assert value["error"]["code"] == "forbidden_address", (url, value)
        assert value["worker"].startswith("net@")
        assert f"[{async_result.id}] retry" not in fleet.net.text()
    assert forbidden_listener.connections() == 0
    ok = client_app.tasks["fleetapp.fetch_url"].delay(f"{webfarm.url}/delay/0").get(timeout=10)
    assert ok["ok"], ok


def test_cli_sequential_fetch_is_guarded(fleet, webfarm):
    env = {k: v for k, v in fleet.env.items() if k != "FLEETAPP_FETCH_ALLOW_NETWORKS"}
    url = f"{webfarm.url}/delay/0"
    proc = run_cli(env, "fetch", "--sequential", "--json", url)
    assert proc.returncode == EXIT_FAILED, proc.stderr
    assert json.loads(proc.stdout)["results"][0]["error"]["code"] == "forbidden_address"
    proc = run_cli({**env, "FLEETAPP_FETCH_ALLOW_NETWORKS": "127.0.0.1/8"}, "doctor")
    assert proc.returncode == EXIT_CONFIG
    assert "FLEETAPP_FETCH_ALLOW_NETWORKS: '127.0.0.1/8'" in proc.stderr
    assert "Traceback" not in proc.stderr
