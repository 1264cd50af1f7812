"""Which remote upstreams an asset may name, and where their keys may come from.

An `openai`-runtime asset names a URL and an environment variable holding its key; whoever may
apply assets could otherwise make a worker send any of its variables (the database DSN, say)
to any address, cloud metadata services included. `UpstreamRules` are checked when an asset is
applied (registry and `roundhouse apply`) and again by the worker before it reads the key.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from services.common.secrets import DEFAULT_UPSTREAM_KEY_ENVS

RESERVED_ENV_PREFIX = "ROUNDHOUSE_"
"""Roundhouse's own settings (the DSN among them): never an upstream key."""

METADATA_HOSTS = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog", "instance-data",
    "instance-data.ec2.internal", "metadata.azure.internal", "metadata.tencentyun.com",
    "metadata.platformequinix.com",
})
"""Well-known host names of cloud instance metadata services."""

METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200",
))
"""Metadata service addresses (AWS, ECS, AWS IPv6, Alibaba); not all of them are link-local."""

ALLOW_LINK_LOCAL_SETTING = "ROUNDHOUSE_ALLOW_LINK_LOCAL_UPSTREAMS"
KEY_ENVS_SETTING = "ROUNDHOUSE_UPSTREAM_KEY_ENVS"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class UpstreamRules:
    """The upstream policy: variables that may hold a key, and whether link-local (and cloud
    metadata) addresses may be called. Build from settings with `CommonSettings.upstream_rules`."""

    key_envs: tuple[str, ...] = DEFAULT_UPSTREAM_KEY_ENVS
    allow_link_local: bool = False

    def key_env_problem(self, name: str) -> str | None:
        """Why `name` may not be an asset's `api_key_env`; None when it may (or is empty)."""
        if not name:
            return None
        # Settings are read case-insensitively, so `roundhouse_database_url` is the DSN too.
        if name.upper().startswith(RESERVED_ENV_PREFIX):
            return f"{name} is a Roundhouse setting, never an upstream key variable"
        if name not in self.key_envs:
            allowed = ", ".join(self.key_envs) or "none"
            return (f"{name} is not an allowed upstream key variable (allowed: {allowed}); "
                    f"add it to {KEY_ENVS_SETTING} to allow it")
        return None

    def url_problem(self, url: str, *, resolve: bool = False) -> str | None:
        """Why `url` may not be called; None when it may.

        Refuses link-local and metadata addresses and the well-known metadata host names unless
        link-local upstreams are allowed. With `resolve`, a host name is looked up too (blocking)
        and refused if any of its addresses is; a name that does not resolve passes here (the
        call will fail on its own). Loopback and private networks are allowed.
        """
        if self.allow_link_local or not url:
            return None
        try:
            host = (urlsplit(url).hostname or "").rstrip(".").lower()
        except ValueError:
            return None
        if host in METADATA_HOSTS:
            return f"{host} is a cloud metadata service; set {ALLOW_LINK_LOCAL_SETTING}=true to allow it"
        literal = _address(host)
        addresses = [literal] if literal is not None else (_resolve(host) if resolve else [])
        for address in addresses:
            if _forbidden(address):
                return (f"{host} is a link-local or cloud metadata address ({address}); "
                        f"set {ALLOW_LINK_LOCAL_SETTING}=true to allow it")
        return None


DEFAULT_UPSTREAM_RULES = UpstreamRules()


def _address(host: str) -> IPAddress | None:
    """`host` as an IP address when it is one, in any form a resolver accepts (`2852039166`)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _resolve(host: str) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []
    found = [_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    return [a for a in found if a is not None]


def _forbidden(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_link_local or address in METADATA_ADDRESSES
