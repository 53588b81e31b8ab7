"""Loopback ports for servers: is one free, a free one, and which of a set are given twice."""
from __future__ import annotations

import socket
import threading

from serve.environment import SetupError


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on the port now. SO_REUSEADDR as servers bind (Triton's gRPC
    and HTTP, uvicorn): a port held by a listener is taken, one left only with connections in
    TIME_WAIT by a server that stopped or died is free (a plain bind refuses it for about a minute,
    which would refuse a restart of tritonserver on its own ports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _unused_port(host: str) -> int:
    """The port the kernel picks for a bind to port 0, released again at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now and never returned before by this process. The socket is closed
    before anything binds the port, so the kernel may pick the same one on the next call: CI once got
    Triton's HTTP and gRPC ports equal from two calls in a row."""
    with _handed_out_lock:
        for _ in range(100):
            port = _unused_port(host)
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise SetupError(f"no free port on {host} that this process has not handed out already")


def refuse_equal_ports(named: dict[str, int]) -> None:
    """SetupError naming the flags when two of `named`'s ports (flag -> port) are equal."""
    clashes = duplicate_ports(named)
    if clashes:
        raise SetupError(f"each port must differ: {'; '.join(clashes)}")


def duplicate_ports(named: dict[str, int]) -> list[str]:
    """'--a and --b are both N' for every port given twice in `named` (flag -> port)."""
    first: dict[int, str] = {}
    clashes = []
    for flag, port in named.items():
        if port in first:
            clashes.append(f"{first[port]} and {flag} are both {port}")
        else:
            first[port] = flag
    return clashes
