"""Who is on the other end of a loopback connection to the web view: the user that owns
the client's socket, as Linux's /proc/net/tcp and tcp6 say.

The view reads the inventory and the audit log with its user's client certificate,
which only that user can read on disk (0600). Served on 127.0.0.1 without this check,
any local user or process could read through it what the certificate can (a security
review: `nobody` fetched the whole inventory). The kernel knows each socket's owner, so
a connection whose client socket belongs to another user (root aside, who can read the
key anyway) is refused, without a password or token for the browser to carry.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))


def _address(text: str) -> tuple[str, int]:
    """An address as /proc/net/tcp writes it: host bytes in 32-bit little-endian words,
    then the port in hex."""
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(port, 16)


def _normal(address: tuple[str, int]) -> tuple[str, int]:
    ip = ipaddress.ip_address(address[0].split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(address[1])


def owner(client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The uid owning the client end of the TCP connection `client` -> `server` on this
    machine; None if no table lists it (not Linux, or the connection is gone)."""
    want = (_normal(client), _normal(server))
    for table in TABLES:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 8:
                continue
            try:
                if (_address(fields[1]), _address(fields[2])) == want:
                    return int(fields[7])
            except ValueError:
                continue
    return None
