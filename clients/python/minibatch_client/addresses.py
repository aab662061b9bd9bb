"""Server addresses as a Client takes them: grpc targets, and whether they ask
for TLS."""
from __future__ import annotations

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
