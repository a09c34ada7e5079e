"""Client traffic for the demo and the tests: one echo exchange, and a port scan's probes.

Both open their sockets where they run: call them inside a client node's namespace with
`nseh.lab.netns.call_in_namespace`.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable

# How long a scan's half-open connections are kept: their SYNs are out, and none is sent
# again yet (the first retransmission comes after 1 s).
SCAN_WAIT = 0.3


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def echo(host: str, port: int, proto: str = "tcp", timeout: float = 2.0) -> str:
    """"echo" if the echo service at host:port answered, else why not: "timeout" (dropped
    on the way), "refused", "wrong" (another answer) or the error's name."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(_family(host), kind) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
            sock.sendall(b"hello\n")
            return "echo" if sock.recv(100) == b"hello\n" else "wrong"
        except TimeoutError:
            return "timeout"
        except ConnectionRefusedError:
            return "refused"
        except OSError as exc:
            return type(exc).__name__


def scan(host: str, ports: Iterable[int]) -> None:
    """One TCP SYN to each port, as a port scan sends them."""
    probes: list[socket.socket] = []
    try:
        for port in ports:
            probe = socket.socket(_family(host), socket.SOCK_STREAM)
            probes.append(probe)
            probe.setblocking(False)
            probe.connect_ex((host, port))
        time.sleep(SCAN_WAIT)
    finally:
        for probe in probes:
            probe.close()
