"""The sd_notify protocol: tell systemd when the supervisor is ready and what it is doing.

Security: runs as root; only writes to the socket systemd named in $NOTIFY_SOCKET.
"""

from __future__ import annotations

import os
import socket


def notify(**fields: str) -> bool:
    """Send `KEY=value` lines to systemd; False (and nothing sent) when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract socket
        address = "\0" + address[1:]
    message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message, address)
        except OSError:
            return False
    return True
