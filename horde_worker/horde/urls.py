"""Which URLs the worker may fetch for a job: http(s) only, never a link-local (cloud metadata),
multicast or unspecified address, and unless the owner allows it, only public addresses.

A job's source image comes as a URL chosen by whoever made the request. Fetching it from the
volunteer's machine must not reach that machine's own services, its LAN or a cloud metadata
endpoint, so every host is resolved and each of its addresses checked before any connection,
and again for every redirect hop. (A name that resolves differently between the check and the
connection is not covered; the hop-by-hop check covers the common redirect trick.)
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

ALLOWED_SCHEMES = ("http", "https")
MAX_URL_LENGTH = 16384
# The NAT64 prefix carries an IPv4 address in its last 32 bits.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def form_problem(url: object) -> str | None:
    """Why `url` is not a well-formed http(s) URL with a host, or None when it is one."""
    if not isinstance(url, str):
        return f"a {type(url).__name__}, not a URL"
    if len(url) > MAX_URL_LENGTH:
        return "URL too long"
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        return "control characters or spaces in the URL"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError as exc:
        return f"malformed URL: {exc}"
    if parts.scheme not in ALLOWED_SCHEMES:
        return f"scheme {parts.scheme or '(none)'!r} is not fetched, only http(s)"
    if not parts.hostname:
        return "URL without a host"
    return None


# Never a source image's home, whatever the owner allows: link-local holds cloud metadata services.
_NEVER = (("is_link_local", "link-local"), ("is_multicast", "multicast"), ("is_unspecified", "unspecified"))
_NOT_PUBLIC = (("is_loopback", "loopback"), ("is_private", "private"), ("is_reserved", "reserved"))


def address_refusal(ip: IPAddress, allow_private: bool = False) -> str | None:
    """Why the worker must not connect to `ip` for a requester, or None. Link-local, multicast and
    unspecified addresses are always refused; loopback, private and reserved ones unless `allow_private`."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_refusal(embedded, allow_private)
    for flag, reason in _NEVER if allow_private else _NEVER + _NOT_PUBLIC:
        if getattr(ip, flag):
            return f"{ip} is a {reason} address"
    if not allow_private and not ip.is_global:  # 100.64.0.0/10 (carrier-grade NAT) and the like
        return f"{ip} is not a public address"
    return None


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (an IP literal is its own address)."""
    try:
        return [ipaddress.ip_address(host.split("%")[0])]
    except ValueError:
        pass
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in found]


def refuse_reason(url: str, allow_private: bool) -> str | None:
    """Why the worker must not fetch `url`, or None when it may.

    Only http(s) URLs with a host are fetched. The host is resolved and none of its addresses may be
    link-local, multicast or unspecified; unless `allow_private`, each must be public: no loopback,
    private (RFC 1918, ULA) or reserved address either, nor an IPv6 form that embeds one.
    """
    problem = form_problem(url)
    if problem is not None:
        return problem
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        addresses = resolve(host, parts.port or (443 if parts.scheme == "https" else 80))
    except Exception as exc:  # any failure to resolve means: do not connect
        return f"cannot resolve {host}: {type(exc).__name__}"
    if not addresses:
        return f"{host} resolves to nothing"
    for address in addresses:
        reason = address_refusal(address, allow_private)
        if reason is not None:
            return reason if str(address) == host else f"{host}: {reason}"
    return None
