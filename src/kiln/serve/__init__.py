"""Serving: the OpenAI-compatible API, the scheduler thread that steps the engine's batch, serving
figures, the labelling app, and what their servers share (binding, loopback checks)."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from typing import TYPE_CHECKING

from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.config import Config, ServeConfig

API_KEY_ENV = "KILN_API_KEY"


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


def resolve_api_key(sv: ServeConfig) -> str:
    """The configured key (config, else KILN_API_KEY); refuses to listen off loopback without one."""
    key = sv.api_key or os.environ.get(API_KEY_ENV, "")
    if not is_loopback(sv.host) and not key:
        raise KilnError(f"serve.host={sv.host} listens beyond this machine and needs an API key; set serve.api_key "
                        f"or the {API_KEY_ENV} environment variable, or keep serve.host=127.0.0.1")
    return key


def check_exposure(cfg: Config, mode: str | None = None) -> None:
    """`kiln serve`'s first check, before it reads the run (`kiln.cli` calls it before the run is checked
    and the server imported): a refused exposure costs nothing."""
    resolve_api_key(cfg.serve)
