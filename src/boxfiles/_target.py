"""Parsing of connection targets and listen addresses (pure, no I/O)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import final


@final
@dataclass(frozen=True)
class UnixTarget:
    """A unix socket path (absolute or relative to the working directory)."""

    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


@final
@dataclass(frozen=True)
class TcpTarget:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


Target = UnixTarget | TcpTarget


def parse_target(target: str | os.PathLike[str], *, listen: bool = False) -> Target:
    """Parse ``unix:///abs.sock``, ``unix:rel/or/abs.sock``, ``tcp://host:port``
    or ``host:port``. An address to ``listen`` on may use port 0 (any free one).

    Raises:
        ValueError: naming the target and what is wrong with it.
    """
    text = os.fspath(target)
    if not isinstance(text, str):
        raise TypeError(f"target must be a str, not {type(text).__name__}")
    if text.startswith("unix://"):
        path = text[len("unix://") :]
        if not path.startswith("/"):
            raise ValueError(f"unix:// target needs an absolute path (unix:///abs.sock): {text!r}")
        return UnixTarget(path)
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError(f"unix target has no socket path: {text!r}")
        return UnixTarget(path)
    rest = text[len("tcp://") :] if text.startswith("tcp://") else text
    if "://" in rest:
        raise ValueError(f"unsupported target scheme (use unix: or tcp://): {text!r}")
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host:
        raise ValueError(f"target needs host:port: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"IPv6 hosts go in brackets, [::1]:port: {text!r}")
    lowest = 0 if listen else 1
    if not port_text.isdigit() or not lowest <= int(port_text) < 65536:
        raise ValueError(f"target port must be {lowest}-65535: {text!r}")
    return TcpTarget(host, int(port_text))
