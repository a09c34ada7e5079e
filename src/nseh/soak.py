"""`nseh soak`: one VM with live connections migrated back and forth many times in a row.

On a lab of its own (built and removed like the demo's): the demo's VM on h1, from client
c1 TCP streams to the VM over IPv4, IPv6 and its floating IP, a UDP echo flow and ping,
and a TCP stream the VM itself opens to c1. The VM then migrates h1 -> h2 -> h1 ... with
`--sc precopy`. Every flow must survive every migration, and nothing may pile up: the
hosts' conntrack entries, nftables objects and processes, and each agent's open files and
memory are measured with the VM back on h1 after the warm-up round trip and at the end.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nseh import lab
from nseh.bench.report import stat
from nseh.cluster import Cluster
from nseh.demo import DEMO_VM, demo_flows
from nseh.inventory import Inventory
from nseh.lab.echo import EchoServer
from nseh.lab.probe import Probe, ProbeError
from nseh.provenance import Provenance

HOSTS = ("h1", "h2")
CLIENT = 1
ECHO_PORT = 7
ECHOES_FILE = "/tmp/nseh-soak-echoes"
# What may differ between the first and the last measurement without counting as growth:
# the VM's conntrack entries of short-lived exchanges (the guest-command checks) and
# allocator noise in a Python process.
TOLERANCE = {"conntrack_entries": 5, "nft_objects": 0, "processes": 0, "agent_fds": 2,
             "agent_rss_mib": 8.0}


class SoakError(RuntimeError):
    """The soak could not run (not: a flow broke, which is a result); one line."""


def run_soak(migrations: int, console: Console) -> dict[str, Any]:
    """Build the lab, soak, remove the lab (also on failure); return the result."""
    if migrations < 2 or migrations % 2:
        raise SoakError("--migrations must be an even number >= 2 (the VM ends on h1)")
    provenance = Provenance.start()
    lab.down()  # leftovers of an earlier, killed run
    try:
        with console.status("creating the lab (2 hosts, 1 client)"):
            lab.up(hosts=2, clients=1)
        result = asyncio.run(_soak(Cluster(Inventory.find()), migrations, console))
        provenance.finish(accel=result.pop("accel"))
        return {"provenance": provenance.to_json(), **result}
    finally:
        with console.status("removing the lab"):
            lab.down()


async def _soak(cluster: Cluster, migrations: int, console: Console) -> dict[str, Any]:
    with console.status(f"booting {DEMO_VM.name} on h1"):
        vm = await cluster.call("h1", "vm.start", {"definition": DEMO_VM.to_json()},
                                timeout=900)
    client_ip = lab.client_ipv4(CLIENT)
    started = time.monotonic()
    with EchoServer(lab.client_namespace(CLIENT), [ECHO_PORT]), \
            Probe(lab.client_namespace(CLIENT), demo_flows()) as probe:
        if not probe.wait_ready():
            raise SoakError("the client's flows could not reach the VM")
        await _guest(cluster, f"(while :; do echo tick; sleep 0.2; done) | nc {client_ip} "
                              f"{ECHO_PORT} >{ECHOES_FILE} 2>&1 &")
        reports: list[dict[str, Any]] = []
        baseline: dict[str, Any] = {}
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("migrations", total=migrations)
            for i in range(migrations):
                source, destination = HOSTS[i % 2], HOSTS[(i + 1) % 2]
                report = await cluster.migrate(DEMO_VM.name, destination, "precopy")
                reports.append(_figures(report))
                progress.update(task, advance=1, description=(
                    f"{source} -> {destination}: {report['result']}, downtime "
                    f"{report['qemu']['downtime_ms']} ms"))
                if report["result"] != "migrated":
                    break
                if i == 1:  # the warm-up round trip: one-off costs paid on both hosts
                    baseline = await _resources(cluster)
        echoes_before = await _guest_echoes(cluster)
        await asyncio.sleep(2)
        guest_flow_alive = await _guest_echoes(cluster) > echoes_before
        final = await _resources(cluster)
        try:
            flows = await asyncio.to_thread(probe.finish)
        except ProbeError as exc:
            raise SoakError(str(exc)) from None
    growth = {host: {key: final[host][key] - baseline[host][key] for key in TOLERANCE}
              for host in HOSTS} if baseline else {}
    grown = [f"{host} {key} +{value:g}" for host, figures in growth.items()
             for key, value in figures.items() if value > TOLERANCE[key]]
    broken = [f"{f['kind']} {f['target']}" for f in flows if not f["alive"]]
    if not guest_flow_alive:
        broken.append(f"tcp from the VM to {client_ip}:{ECHO_PORT}")
    failed = [r for r in reports if r["result"] != "migrated"]
    return {
        "accel": vm.get("accel"),  # the caller moves it into the provenance
        "migrations": len(reports), "planned": migrations, "failed": len(failed),
        "failures": [r["failure"] for r in failed],
        "wall_s": round(time.monotonic() - started),
        "downtime_ms": stat(r["downtime_ms"] for r in reports),
        "flows": flows, "guest_flow_alive": guest_flow_alive, "broken": broken,
        "resources": {"after_warm_up": baseline, "end": final}, "growth": growth,
        "tolerance": TOLERANCE, "grown": grown,
        "passed": not failed and not broken and not grown and len(reports) == migrations,
    }


def _figures(report: dict[str, Any]) -> dict[str, Any]:
    return {"result": report["result"], "failure": report.get("failure"),
            "destination": report["destination"],
            "downtime_ms": report["qemu"]["downtime_ms"],
            "sc_entries": report.get("sc", {}).get("entries")}


async def _guest(cluster: Cluster, command: str) -> str:
    host = await cluster.locate(DEMO_VM.name)
    result = await cluster.call(host, "vm.exec", {"name": DEMO_VM.name, "command": command,
                                                  "timeout": 20}, timeout=40)
    return str(result["output"])


async def _guest_echoes(cluster: Cluster) -> int:
    return int((await _guest(cluster, f"wc -l < {ECHOES_FILE}")).strip() or 0)


async def _resources(cluster: Cluster) -> dict[str, dict[str, float]]:
    """What each host holds that a leak would grow."""
    found: dict[str, dict[str, float]] = {}
    for host in HOSTS:
        namespace = lab.host_namespace(HOSTS.index(host) + 1)
        info = await cluster.call(host, "host.info")
        pid = lab.layout.agent_pid_path(host).read_text().strip()
        in_host = lab.netns_exec_argv
        found[host] = {
            "conntrack_entries": _vm_entries(_output(in_host(namespace, ["conntrack", "-L"]))),
            "nft_objects": _nft_objects(_output(in_host(namespace, ["nft", "-j", "list",
                                                                    "ruleset"]))),
            "processes": len(_output(["ip", "netns", "pids", namespace]).split()),
            "agent_fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
            "agent_rss_mib": info["agent_rss_mib"],
        }
    return found


def _vm_entries(listing: str) -> int:
    """Conntrack entries of the VM (any of its addresses in a tuple). Not the hosts' own
    management connections (SC channel, QEMU streams), whose TIME_WAIT entries come and go
    with the migrations."""
    network = DEMO_VM.network
    addresses = [*map(str, DEMO_VM.addresses), str(network.floating_ipv4)]
    return sum(any(f"={address} " in line for address in addresses)
               for line in listing.splitlines())


def _output(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()


def _nft_objects(listing: str) -> int:
    """Tables, chains, rules, sets, maps, counters, and the elements of sets and maps."""
    objects = 0
    for item in json.loads(listing)["nftables"]:
        if "metainfo" in item:
            continue
        body = next(iter(item.values()))
        objects += 1 + len(body.get("elem", []))
    return objects
