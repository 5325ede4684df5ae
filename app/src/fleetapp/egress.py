"""Which addresses a fetch may connect to: fetch_url's guard against server-side request forgery.

A client chooses the URL, so without a guard a worker fetches whatever it is pointed at: cloud
metadata (169.254.169.254), services on its own loopback, the fleet's private hosts (Redis),
directly or through a redirect. By default a fetch may connect only to globally routable
addresses; the operator can allow more networks (FLEETAPP_FETCH_ALLOW_NETWORKS).

The check is made where the socket connects: each new connection resolves the host once, drops
the addresses that are not allowed and connects only to the others, by the address it checked.
So DNS cannot answer one address to a check and another to the connect (rebinding), and a
refused address never sees a packet. GuardedAdapter carries every request of a session,
redirects included.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import sys
from collections.abc import Iterable
from typing import NoReturn

from requests.adapters import DEFAULT_POOLBLOCK, HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    LocationParseError,
    NameResolutionError,
    NewConnectionError,
)
from urllib3.util.connection import allowed_gai_family
from urllib3.util.timeout import Timeout

from fleetapp.config import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# NAT64's well-known prefix (RFC 6052): a NAT64 gateway forwards 64:ff9b::a.b.c.d to a.b.c.d,
# and the stdlib has no property for it.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class ForbiddenAddressError(Exception):
    """Every address of a host is outside what a fetch may connect to.

    Deliberately not an OSError: urllib3 would wrap it as a connection error and retry it.
    """

    def __init__(self, host: str, addresses: Iterable[str]) -> None:
        unique = list(dict.fromkeys(addresses))
        self.host = host
        self.addresses = unique
        target = host if unique == [host] else f"{host} ({', '.join(unique)})"
        self.message = (
            f"refused to connect to {target}: not a public address"
            " (FLEETAPP_FETCH_ALLOW_NETWORKS can allow it)"
        )
        super().__init__(self.message)


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to through NAT64 or a 6to4 relay, if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: IPAddress) -> bool:
    """True if ``address`` is globally routable, judged as the address the packets reach."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # An IPv6 socket connects to ::ffff:a.b.c.d as to a.b.c.d.
        return is_public(address.ipv4_mapped)
    inner = _embedded_ipv4(address)
    if inner is not None and not is_public(inner):
        return False
    # is_global alone is not enough on every Python 3.11: before 3.11.10 it calls IPv4
    # multicast global, and it never looks at site-local IPv6 (fec0::/10, deprecated).
    return (
        address.is_global
        and not address.is_private
        and not address.is_loopback
        and not address.is_link_local
        and not address.is_multicast
        and not address.is_reserved
        and not address.is_unspecified
        and not (isinstance(address, ipaddress.IPv6Address) and address.is_site_local)
    )


def address_allowed(address: IPAddress, allow: Iterable[IPNetwork] = ()) -> bool:
    """May a fetch connect to ``address``: public, or inside one of the ``allow`` networks."""
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    for network in allow:
        # `in` is False across IP versions, so each network is tried on both forms.
        if address in network or (mapped is not None and mapped in network):
            return True
    return is_public(address)


def _parse(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def connect_checked(conn: HTTPConnection, allow: tuple[IPNetwork, ...]) -> socket.socket:
    """urllib3's HTTPConnection._new_conn, connecting only to allowed addresses.

    Raises ForbiddenAddressError before any connection when no address of the host is allowed;
    otherwise fails like urllib3 (NameResolutionError, ConnectTimeoutError, NewConnectionError).
    """
    host = conn._dns_host.strip("[]")  # urllib3 keeps IPv6 literals bracketed here
    try:
        host.encode("idna")
    except UnicodeError:
        raise LocationParseError(f"'{host}', label empty or too long") from None
    try:
        candidates = socket.getaddrinfo(host, conn.port, allowed_gai_family(), socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise NameResolutionError(conn.host, conn, exc) from exc
    refused: list[str] = []
    error: OSError | None = None
    for family, socktype, proto, _, sockaddr in candidates:
        shown = str(sockaddr[0])
        address = _parse(shown)
        if address is None or not address_allowed(address, allow):
            refused.append(shown)
            continue
        sock = socket.socket(family, socktype, proto)
        try:
            for level, option, value in conn.socket_options or ():
                sock.setsockopt(level, option, value)
            sock.settimeout(Timeout.resolve_default_timeout(conn.timeout))
            if conn.source_address:
                sock.bind(conn.source_address)
            # The very sockaddr that was checked: no second lookup between check and connect.
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sys.audit("http.client.connect", conn, conn.host, conn.port)
        return sock
    if error is None:
        if refused:
            raise ForbiddenAddressError(conn.host, refused)
        error = OSError(f"no address for {conn.host}")  # getaddrinfo returned an empty list
    if isinstance(error, TimeoutError):
        raise ConnectTimeoutError(
            conn, f"Connection to {conn.host} timed out. (connect timeout={conn.timeout})"
        ) from error
    raise NewConnectionError(conn, f"Failed to establish a new connection: {error}") from error


@functools.lru_cache(maxsize=16)
def _pool_classes(allow: tuple[IPNetwork, ...]) -> dict[str, type[HTTPConnectionPool]]:
    """Pool classes whose connections apply ``allow`` (urllib3 builds pools from classes)."""

    class GuardedHTTPConnection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return connect_checked(self, allow)

    class GuardedHTTPSConnection(HTTPSConnection):
        # HTTPSConnection.connect wraps what _new_conn returns: TLS and SNI are unchanged.
        def _new_conn(self) -> socket.socket:
            return connect_checked(self, allow)

    class GuardedHTTPConnectionPool(HTTPConnectionPool):
        ConnectionCls = GuardedHTTPConnection

    class GuardedHTTPSConnectionPool(HTTPSConnectionPool):
        ConnectionCls = GuardedHTTPSConnection

    return {"http": GuardedHTTPConnectionPool, "https": GuardedHTTPSConnectionPool}


class GuardedAdapter(HTTPAdapter):
    """A requests adapter that connects only to public addresses and those in ``allow``.

    Mount it for both http:// and https://. Proxies are refused: through one, the guard would
    check the proxy's address, not the target's.
    """

    def __init__(self, allow: Iterable[IPNetwork] = ()) -> None:
        self.allow = tuple(allow)  # before super().__init__, which builds the pool manager
        super().__init__()

    def init_poolmanager(
        self,
        connections: int,
        maxsize: int,
        block: bool = DEFAULT_POOLBLOCK,
        **pool_kwargs: object,
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_pool_classes(self.allow))

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: object) -> NoReturn:
        raise ValueError("fetches do not go through proxies: the address guard cannot see past one")
