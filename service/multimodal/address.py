"""Which addresses an image URL may reach: the SSRF policy, with no network I/O.

Hosts are read the way a browser (WHATWG URL) and libc's inet_aton read them, so every numeric
spelling of an address (2130706433, 0x7f.1, 017700000001, 127.1) is checked as the address it
is. IPv6 forms that carry an IPv4 address (IPv4-mapped/-compatible, NAT64, 6to4) are judged by
the IPv4 address inside. Python's ipaddress flags overlap (and vary between versions), so the
categories are tested in a fixed order and anything not globally routable is refused.
"""

from __future__ import annotations

import ipaddress
import re

from service.multimodal.limits import ImageLimits

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BadHost(ValueError):
    pass


# Cloud instance-metadata services (credentials live there): AWS/GCP/Azure/OpenStack, AWS ECS task
# metadata, Oracle Cloud, Alibaba Cloud, AWS over IPv6.
METADATA_IPS = frozenset(map(ipaddress.ip_address, (
    "169.254.169.254", "169.254.170.2", "192.0.0.192", "100.100.100.200", "fd00:ec2::254",
)))
METADATA_HOSTS = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal",
})

_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix
_NUMERIC = re.compile(r"0x[0-9a-f]*|[0-9]+")
_HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")

_CATEGORIES = (  # first match names the refusal; order matters (the flags overlap)
    ("unspecified", lambda ip: ip.is_unspecified or (ip.version == 4 and ip in _THIS_NETWORK)),
    ("loopback", lambda ip: ip.is_loopback),
    ("link-local", lambda ip: ip.is_link_local),
    ("shared (carrier-grade NAT)", lambda ip: ip.version == 4 and ip in _SHARED),
    ("multicast", lambda ip: ip.is_multicast),
    ("reserved", lambda ip: ip.is_reserved),
    ("private", lambda ip: ip.is_private or (ip.version == 6 and ip.is_site_local)),
    ("non-public", lambda ip: not ip.is_global),
)


def normalize_host(host: str) -> str:
    """Lower-case, without the brackets of an IPv6 literal or one trailing dot."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host[:-1] if host.endswith(".") and not host.endswith("..") else host


def parse_ip_host(host: str) -> IPAddress | None:
    """The address a URL host spells, or None for a name to resolve; BadHost when it is neither."""
    host = normalize_host(host)
    if ":" in host:
        try:
            return ipaddress.ip_address(host.replace("%25", "%"))  # %25: an escaped zone id
        except ValueError:
            raise BadHost(f"{host!r} is not a valid IPv6 address") from None
    parts = host.split(".")
    if not _NUMERIC.fullmatch(parts[-1]):
        if not _HOSTNAME.fullmatch(host):
            raise BadHost(f"{host!r} is not a valid host name")
        return None  # a name: only a numeric last label makes it an address (WHATWG)
    if len(parts) > 4 or "" in parts:
        raise BadHost(f"{host!r} is not a valid IPv4 address")
    try:
        nums = [int(p[2:] or "0", 16) if p.startswith("0x") else int(p, 8 if len(p) > 1 and p[0] == "0" else 10)
                for p in parts]
    except ValueError:
        raise BadHost(f"{host!r} is not a valid IPv4 address") from None
    *head, last = nums
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        raise BadHost(f"{host!r} is not a valid IPv4 address")
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def embedded_ipv4(ip: IPAddress) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 address carries, and the name of the form that carries it."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped IPv6"
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # ::/127 are the unspecified and loopback addresses
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "IPv4-compatible IPv6"
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    return None


def refusal_reason(ip: IPAddress) -> str | None:
    """Why the address may not be fetched ("a loopback address", ...), or None when it is public."""
    if is_metadata(ip):
        return "a cloud metadata service address"
    inner = embedded_ipv4(ip)
    if inner is not None:
        why = refusal_reason(inner[0])
        return f"{why} ({inner[0]} in {inner[1]} form)" if why else None  # a public IPv4 inside: judged by it alone
    for name, test in _CATEGORIES:
        if test(ip):
            return f"{'an' if name[0] in 'aeiou' else 'a'} {name} address"
    return None


def is_metadata(ip: IPAddress) -> bool:
    return any(addr in METADATA_IPS for addr in _with_embedded(ip))


def is_allowed(ip: IPAddress, limits: ImageLimits) -> bool:
    """Whether FRONTIER_IMAGE_ALLOWED_HOSTS lets this address through despite its category."""
    for addr in _with_embedded(ip):
        for net in limits.allowed_networks:
            if addr.version != net.version or addr not in net:
                continue
            if addr not in METADATA_IPS or net.num_addresses == 1:  # metadata: only by exact address
                return True
    return False


def _with_embedded(ip: IPAddress) -> list[IPAddress]:
    inner = embedded_ipv4(ip)
    return [ip] if inner is None else [ip, inner[0]]


def connect_address(ip: IPAddress) -> str:
    """The address to open the socket to: IPv4-mapped/-compatible forms are dialled as IPv4."""
    inner = embedded_ipv4(ip)
    if inner is not None and inner[1].startswith("IPv4-"):
        return str(inner[0])
    return str(ip)
