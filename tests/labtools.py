"""Helpers for end-to-end tests on the lab: run the real CLI, probe from client nodes."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nseh import lab
from nseh.lab import traffic
from nseh.lab.echo import EchoServer
from nseh.lab.layout import namespace_of
from nseh.lab.netns import call_in_namespace

NSEH = str(Path(sys.executable).with_name("nseh"))
REPO = Path(__file__).resolve().parent.parent
EXAMPLE_VM = REPO / "examples" / "web1.toml"
EXAMPLE_IPS_VM = REPO / "examples" / "web1-ips.toml"  # the same VM with [policy.ips]


def nseh(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real `nseh` command line."""
    result = subprocess.run([NSEH, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"nseh {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def nseh_json(*args: str) -> Any:
    """Run `nseh ... --json` (the flag goes before a `--` that starts a guest command)."""
    split = args.index("--") if "--" in args else len(args)
    return json.loads(nseh(*args[:split], "--json", *args[split:]).stdout)


def vm_host(name: str) -> str:
    """The one host VM `name` runs on."""
    hosts = [v["host"] for v in nseh_json("vm", "list")["vms"] if v["name"] == name]
    assert len(hosts) == 1, hosts
    return str(hosts[0])


def migrate(destination: str, sc: str, *options: str, vm: str = "web1") -> dict[str, Any]:
    """`nseh migrate` (with extra `options`); the report, once the VM runs on `destination`."""
    report: dict[str, Any] = nseh_json("migrate", vm, "--to", destination, "--sc", sc,
                                       *options)
    assert report["result"] == "migrated", report
    assert vm_host(vm) == destination
    return report


def client_connect(client: int, host: str, port: int, proto: str = "tcp",
                   timeout: float = 2.0) -> str:
    """From client node `client`: "echo" if the VM's echo service answered, else why not."""
    return call_in_namespace(lab.client_namespace(client), traffic.echo, host, port, proto,
                             timeout)


def client_scan(client: int, host: str, ports: list[int]) -> None:
    """From client node `client`: one TCP SYN to each port, as a port scan sends them."""
    call_in_namespace(lab.client_namespace(client), traffic.scan, host, ports)


def client_ping(client: int, host: str) -> bool:
    argv = lab.netns_exec_argv(lab.client_namespace(client),
                               ["ping", "-c", "1", "-W", "2", host])
    return subprocess.run(argv, capture_output=True, timeout=10).returncode == 0


def client_http_get(client: int, url: str) -> int:
    """Bytes received from a plain HTTP GET, -1 if it failed."""
    code = ("import sys, urllib.request\n"
            "try: print(len(urllib.request.urlopen(sys.argv[1], timeout=3).read()))\n"
            "except Exception: print(-1)")
    argv = lab.netns_exec_argv(lab.client_namespace(client), [sys.executable, "-c", code, url])
    return int(subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout)


@contextlib.contextmanager
def start_client_echo_server(client: int, ports: list[int]) -> Iterator[None]:
    """A TCP echo server on client node `client` (for connections the VM opens)."""
    with EchoServer(lab.client_namespace(client), ports):
        yield


@contextlib.contextmanager
def management_link_down(host: str) -> Iterator[None]:
    """Cut a host off the management network (its mgmt0 link down) for the duration."""
    namespace = namespace_of(host)
    subprocess.run(["ip", "-n", namespace, "link", "set", lab.HOST_MGMT_LINK, "down"],
                   check=True)
    try:
        yield
    finally:
        subprocess.run(["ip", "-n", namespace, "link", "set", lab.HOST_MGMT_LINK, "up"],
                       check=True)
        time.sleep(0.5)
