"""Server addresses as a Client takes them: grpc targets, whether they ask for
TLS, and whether they are this machine (where a bearer token may travel in
plaintext)."""
from __future__ import annotations

import ipaddress
from typing import Sequence, Union

_SCHEMES = (("http://", False), ("grpc://", False), ("https://", True), ("grpcs://", True))


def targets(address: Union[str, Sequence[str]]) -> list[tuple[str, bool]]:
    """(grpc target, whether its scheme asked for TLS) for each address: one
    address, a list, or a comma-separated string."""
    if isinstance(address, str):
        addresses = [a.strip() for a in address.split(",") if a.strip()]
    else:
        addresses = [str(a).strip() for a in address]
    if not addresses:
        raise ValueError("no server address given")
    return [_normalize(a) for a in addresses]


def _normalize(address: str) -> tuple[str, bool]:
    for scheme, tls in _SCHEMES:
        if address.startswith(scheme):
            return address[len(scheme):].rstrip("/"), tls
    return address, False


def is_local(target: str) -> bool:
    """Whether a grpc target is this machine: a Unix socket, `localhost`, or a
    loopback address (127.0.0.0/8, ::1). Anything else, including names that
    a resolver might map to loopback, counts as another machine."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    if target.startswith(("ipv4:", "ipv6:")):  # grpc's address-list schemes
        return all(_is_local_host(_host(a)) for a in target[5:].split(","))
    if target.startswith("dns:"):  # dns:host:port, dns:///host:port, dns://resolver/host:port
        target = target[4:]
        if target.startswith("//"):
            target = target[2:].split("/", 1)[-1]
    return _is_local_host(_host(target))


def _host(hostport: str) -> str:
    """The host of host:port, [v6]:port, a bare host or a bare IPv6 address."""
    if hostport.startswith("["):
        return hostport[1:hostport.find("]")]
    if hostport.count(":") > 1:  # a bare IPv6 address
        return hostport
    return hostport.rsplit(":", 1)[0]


def _is_local_host(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # without an IPv6 zone
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
