"""A TCP echo server run inside a lab node, for connections the VM opens to the outside.

`python -m nseh.lab.echo 7 8080` listens on those ports (IPv4 and IPv6), prints `ready`,
and echoes until its stdin closes.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from types import TracebackType

from nseh.lab.layout import netns_exec_argv


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)


def _serve(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_echo, args=(conn,), daemon=True).start()


class EchoServer:
    """This module running inside a namespace, as a context manager."""

    def __init__(self, namespace: str, ports: list[int]) -> None:
        argv = netns_exec_argv(namespace, [sys.executable, "-m", "nseh.lab.echo",
                                           *map(str, ports)])
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError(f"the echo server in {namespace} did not start")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


def main() -> None:
    # Listening before "ready": a client may connect the moment it reads it.
    listeners = [socket.create_server(("", int(port)), family=socket.AF_INET6,
                                      dualstack_ipv6=True) for port in sys.argv[1:]]
    for listener in listeners:
        threading.Thread(target=_serve, args=(listener,), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
