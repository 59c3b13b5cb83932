"""Which addresses ingestion may connect to.

A URL table from the web can point at `http://169.254.169.254/` (cloud metadata), `localhost`,
or an internal service. Every host is resolved here and every resolved address is checked
before a connection is made, and again on every redirect hop; the fetcher then connects to
the checked address itself (never re-resolving), so DNS rebinding cannot swap it afterwards.

By default private, loopback, link-local, multicast, reserved and unspecified addresses are
refused; `allow_networks` (CIDRs, `--allow-network`) opens exactly the ranges named.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Sequence

from data_pipeline.config import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BlockedAddress(Exception):
    """The host resolved to an address the policy refuses (reason `blocked_address`)."""


class ResolveError(Exception):
    """The host name does not resolve (reason `dns_error`)."""


def parse_networks(cidrs: Sequence[str], where: str = "fetch.allow_networks") -> tuple:
    """CIDR strings -> ip_network objects; ConfigError naming the bad entry."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{where}: {cidr!r} is not a CIDR network (e.g. 127.0.0.0/8)") from None
    return tuple(networks)


def is_public(ip: IPAddress) -> bool:
    """True for globally routable unicast addresses (what the default policy admits)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback, judge it as IPv4
    if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast:
        return False
    if ip.is_reserved or ip.is_unspecified:
        return False
    return not (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)


@dataclass(frozen=True)
class NetworkPolicy:
    """Default-deny for non-public addresses, with explicit allowed networks."""
    allowed: tuple = ()

    @classmethod
    def from_cidrs(cls, cidrs: Sequence[str]) -> "NetworkPolicy":
        return cls(parse_networks(cidrs))

    def permits(self, ip: IPAddress) -> bool:
        if any(ip.version == net.version and ip in net for net in self.allowed):
            return True
        return is_public(ip)

    def resolve(self, host: str, port: int) -> list[IPAddress]:
        """All addresses of `host`; BlockedAddress if any of them is refused.

        Refusing when *any* address is refused (not only the first) keeps a host that mixes a
        public and an internal record from being reachable through the internal one.
        """
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise ResolveError(f"{host}: {exc}") from None
        addresses = []
        for info in infos:
            ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
            if ip not in addresses:
                addresses.append(ip)
        if not addresses:
            raise ResolveError(f"{host}: no addresses")
        blocked = [str(ip) for ip in addresses if not self.permits(ip)]
        if blocked:
            raise BlockedAddress(f"{host} resolves to refused address {blocked[0]}")
        return addresses
