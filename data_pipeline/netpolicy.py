"""Which addresses ingestion may connect to.

A URL table from the web can point at `http://169.254.169.254/` (cloud metadata), `localhost`,
or an internal service. Every host is resolved here and every resolved address is checked
before a connection is made, and again on every redirect hop; the fetcher then connects to
the checked address itself (never re-resolving), so DNS rebinding cannot swap it afterwards.

By default every address that is not globally routable is refused (private, loopback,
link-local, shared address space 100.64.0.0/10 with cloud metadata at 100.100.100.200,
benchmarking, multicast, reserved, unspecified), and an IPv6 address that embeds an IPv4 one
(mapped, NAT64, 6to4, Teredo) is judged by the IPv4 address it reaches; `allow_networks`
(CIDRs, `--allow-network`) opens exactly the ranges named.
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


class TemporaryResolveError(ResolveError):
    """The resolver could not answer now (EAI_AGAIN; reason `dns_temporary`, retried)."""


def parse_networks(cidrs: Sequence[str], where: str = "fetch.allow_networks") -> tuple:
    """CIDR strings -> ip_network objects; ConfigError naming the bad entry."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{where}: {cidr!r} is not a CIDR network (e.g. 127.0.0.0/8)") from None
    return tuple(networks)


NAT64 = ipaddress.ip_network("64:ff9b::/96")


def translated_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv4-mapped or NAT64 IPv6 address stands for (None otherwise)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def tunnelled_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses a 6to4 or Teredo address reaches (empty if none)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found = [ip.sixtofour] if ip.sixtofour is not None else []
    return found + list(ip.teredo or ())


def is_public(ip: IPAddress) -> bool:
    """True for globally routable unicast addresses (what the default policy admits)."""
    translated = translated_ipv4(ip)
    if translated is not None:
        return is_public(translated)
    if not ip.is_global or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return False
    return all(is_public(inner) for inner in tunnelled_ipv4(ip))


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
        except socket.gaierror as exc:
            if exc.errno == socket.EAI_AGAIN:
                raise TemporaryResolveError(f"{host}: {exc}") from None
            raise ResolveError(f"{host}: {exc}") from None
        except UnicodeError as exc:
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
