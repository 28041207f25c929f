"""Serving: the OpenAI-compatible API, the scheduler thread that steps the engine's batch, serving
figures, the labelling app, and what their servers share (binding, loopback checks)."""

from __future__ import annotations

import errno
import ipaddress
import socket

from kiln.errors import KilnError


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int, section: str) -> socket.socket:
    """A socket bound to host:port, so that a bad host or a busy port is one line naming the
    `section.host` / `section.port` keys to change, and port 0 has a number to print."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror:
        raise KilnError(f"{section}.host={host} is not an address of this machine; write e.g. "
                        f"{section}.host=127.0.0.1") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise KilnError(f"port {port} on {host} is in use (another kiln server?); choose another with "
                            f"{section}.port=, or {section}.port=0 for any free one") from None
        raise KilnError(f"cannot listen on {host}:{port} ({e.strerror}); choose another {section}.host or "
                        f"{section}.port") from None
    return sock
