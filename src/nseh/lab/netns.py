"""Running Python code inside another network namespace, without a subprocess.

A netlink or inet socket belongs to the namespace of the thread that opened it, so a
function run here may return sockets (e.g. a `Conntrack`) that keep acting in `namespace`
after the thread is gone. The caller's own thread never changes namespace.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)  # os.setns only exists from Python 3.12 on


def call_in_namespace(namespace: str, function: Callable[..., T], *args: Any,
                      **kwargs: Any) -> T:
    """`function(*args, **kwargs)` in a fresh thread that has entered the named namespace
    (`ip netns` name); its exception, if any, is raised here."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            with open(f"/run/netns/{namespace}") as target:
                if _libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {namespace}")
            outcome["value"] = function(*args, **kwargs)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
