"""Which client an attempt comes from, for the per-address login limits. Pure.

The key is the peer's IP address, or - when the peer is a trusted proxy - the client address
the proxy put in ``X-Forwarded-For`` (the right-most one that is not itself a trusted proxy:
what a client writes into the header itself stays to the left of what the proxies append).
IPv6 addresses count per /64, the block one subscriber usually gets, so that walking through
one's own addresses does not reset the limit.

The empty key means "not known": a trusted proxy that named no client (an XMPP stream through
a TCP load balancer, which carries no such header). Per-address limits do not apply to it,
since it may be everybody.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
UNKNOWN = ""


def networks(specs: str) -> list[Network]:
    """Parse ``10.0.0.0/8,::1`` and the like (ValueError on anything else)."""
    return [ipaddress.ip_network(s.strip(), strict=False) for s in specs.split(",") if s.strip()]


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _trusted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, trusted: Sequence[Network]) -> bool:
    return any(ip.version == net.version and ip in net for net in trusted)


def _key(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def client_key(peer: str | None, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    """The per-address key of an attempt from ``peer`` carrying ``forwarded_for``."""
    ip = _ip(peer or "")
    if ip is None:
        return UNKNOWN
    if not _trusted(ip, trusted):
        return _key(ip)
    hops = [hop for hop in (forwarded_for or "").split(",") if hop.strip()]
    for hop in reversed(hops):
        hop_ip = _ip(hop)
        if hop_ip is None:
            return UNKNOWN  # a header we cannot read names nobody we could limit
        if not _trusted(hop_ip, trusted):
            return _key(hop_ip)
    return UNKNOWN
