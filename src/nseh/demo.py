"""`nseh demo`: a VM behind a strict stateful firewall and an IPS, live connections, an
attacker, migrations.

It builds the lab, boots a VM on h1, and migrates it twice (h1 → h2 with `--sc none`, back
with `--sc precopy`). Before each migration the attacker, client c2, port-scans the VM and
its host's IPS blocks it; during it client c1 keeps long-lived flows open through the
firewall. It shows what happened to each flow, to the destination firewall's invalid-drop
counter and to the attacker's block. Then it removes the lab, also on failure.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nseh import lab
from nseh.cluster import Cluster
from nseh.definition import IpsPolicy, PortScan, VMDefinition
from nseh.inventory import Inventory
from nseh.lab import traffic
from nseh.lab.netns import call_in_namespace
from nseh.lab.probe import Probe

DEMO_VM = VMDefinition.from_json({
    "name": "web1",
    "memory_mib": 128,
    "network": {"ipv4": "10.0.0.10/24", "ipv6": "fd00::10/64",
                "gateway4": str(lab.ROUTER4), "gateway6": str(lab.ROUTER6),
                # Its host 1:1-NATs this public address to 10.0.0.10.
                "floating_ipv4": str(lab.layout.PUBLIC_SUBNET4.network_address + 10)},
    "policy": {
        "inbound": [
            {"proto": "tcp", "ports": [7, 80], "peers": [str(lab.VM_SUBNET4),
                                                        str(lab.VM_SUBNET6)]},
            {"proto": "udp", "ports": [7]},
            {"proto": "icmp"},
        ],
        "outbound": [{"proto": "tcp", "ports": [7]}],
    },
})
DEMO_VM4 = str(DEMO_VM.addresses[0])  # its IPv4 address
SETTLE_SECONDS = 4.0
# The demo's VM also has intrusion prevention: more than 5 closed ports within 60 s is a port
# scan, and blocks its source for 300 s.
DEMO_IPS = IpsPolicy(portscan=PortScan(ports=5, seconds=60), block_seconds=300)
ATTACKER = 2  # client c2; c1 is the legitimate client
ATTACKER4 = str(lab.client_ipv4(ATTACKER))
SCAN_PORTS = range(1001, 1007)  # closed: six of them make a scan
BLOCK_TIMEOUT = 5.0  # for the IPS to block the scanner (it takes well under a second)
DROPPED_AFTER = 1.0  # an attacker's connection unanswered this long counts as dropped


def with_ips(vm: VMDefinition, ips: IpsPolicy | None) -> VMDefinition:
    return vm.model_copy(update={"policy": vm.policy.model_copy(update={"ips": ips})})


def demo_flows(vm: VMDefinition = DEMO_VM) -> list[str]:
    assert vm.network.ipv4 is not None and vm.network.ipv6 is not None
    v4, v6 = vm.network.ipv4.ip, vm.network.ipv6.ip
    return ["--tcp", f"{v4}:7", "--tcp", f"{v4}:7", "--tcp", f"[{v6}]:7",
            "--tcp", f"{vm.network.floating_ipv4}:7", "--udp", f"{v4}:7", "--ping", str(v4)]


async def attacker_connects() -> str:
    """The attacker's connection to the VM's echo port: "echo", or "timeout" if dropped."""
    return await asyncio.to_thread(call_in_namespace, lab.client_namespace(ATTACKER),
                                   traffic.echo, DEMO_VM4, 7, "tcp", DROPPED_AFTER)


async def attacker_block(cluster: Cluster, host: str) -> tuple[float, dict[str, Any] | None]:
    """When `host`'s IPS was asked, and the attacker's block it listed (None: not blocked)."""
    asked = time.monotonic()
    listing = await cluster.call(host, "ips.list", {"name": DEMO_VM.name}, timeout=30)
    found = [b for b in listing["blocks"] if b["source"] == ATTACKER4]
    return (asked + time.monotonic()) / 2, found[0] if found else None


async def _attack(cluster: Cluster, console: Console, host: str) -> dict[str, Any]:
    """The attacker scans the VM on `host` until the host's IPS blocks it."""
    await asyncio.to_thread(call_in_namespace, lab.client_namespace(ATTACKER), traffic.scan,
                            DEMO_VM4, SCAN_PORTS)
    deadline = time.monotonic() + BLOCK_TIMEOUT
    while (found := await attacker_block(cluster, host))[1] is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{host}'s IPS did not block the attacker's port scan")
        await asyncio.sleep(0.1)
    asked, block = found
    connect = await attacker_connects()
    console.print(f"\n[bold]attacker c2[/] ({ATTACKER4}) probes {len(SCAN_PORTS)} "
                  f"closed ports of {DEMO_VM.name}: {host}'s IPS blocks it for "
                  f"{block['timeout_s']:.0f} s; its connection to port 7 now: "
                  f"{_fate(connect)}")
    return {"host": host, "asked": asked, "block": block, "connect": connect}


def _fate(connect: str) -> str:
    return {"timeout": "[green]dropped[/]", "echo": "[red]answered[/]"}.get(connect, connect)


async def _migrate_with_flows(cluster: Cluster, console: Console, sc_mode: str,
                              client_namespace: str, source: str,
                              destination: str) -> dict[str, Any]:
    attack = await _attack(cluster, console, source)
    probe = Probe(client_namespace, demo_flows())
    try:
        if not probe.wait_ready():
            raise RuntimeError("the client's flows could not reach the VM before migration")
        console.print(f"[bold]client c1[/] has {len(demo_flows()) // 2} live flows to "
                      f"{DEMO_VM.name}; migrating {source} → {destination} with --sc {sc_mode}")
        before = await cluster.call(destination, "firewall.counters")
        report = await cluster.migrate(
            DEMO_VM.name, destination, sc_mode,
            on_event=lambda e: console.print(f"  [dim]{e['phase']}[/] {escape(e['message'])}")
            if "message" in e and "phase" in e else None)
        settled = time.monotonic() + SETTLE_SECONDS
        # At once, on the destination: is the attacker still blocked, and for how long?
        asked, block = await attacker_block(cluster, destination)
        attacker = {"connect": await attacker_connects(), "block": block,
                    "before": attack["block"], "seconds_between": asked - attack["asked"]}
        await asyncio.sleep(settled - time.monotonic())
        after = await cluster.call(destination, "firewall.counters")
        flows = await asyncio.to_thread(probe.finish)
    finally:
        probe.kill()
    vms, _ = await cluster.list_vms()
    where = [v["host"] for v in vms if v["name"] == DEMO_VM.name]
    return {"sc_mode": sc_mode, "source": source, "destination": destination,
            "report": report, "flows": flows, "vm_hosts": where, "attacker": attacker,
            "destination_invalid_drops": after.get("invalid_drops", 0)
            - before.get("invalid_drops", 0)}


def show(console: Console, result: dict[str, Any]) -> None:
    report = result["report"]
    qemu = report["qemu"]
    console.print(f"\nmigration {report['result']}: QEMU downtime {qemu['downtime_ms']} ms, "
                  f"total {qemu['total_time_ms']} ms; {DEMO_VM.name} now on "
                  f"{', '.join(result['vm_hosts'])}")
    table = Table("flow", "echoes", "longest gap", "after migration",
                  title=f"client c1's flows (--sc {result['sc_mode']})")
    for flow in result["flows"]:
        fate = "[green]survived[/]" if flow["alive"] else "[red]broken[/]"
        table.add_row(escape(f"{flow['kind']} {flow['target']}"), str(flow["echoed"]),
                      f"{flow['longest_gap_ms']:.0f} ms", fate)
    console.print(table)
    if sc := report.get("sc"):
        ips = sc["engines"].get("ips", 0)
        console.print(f"security context: {sc['engines'].get('firewall', 0)} conntrack "
                      f"entries and {ips} IPS record{'s' * (ips != 1)} moved ({sc['bytes']} "
                      f"bytes, {sc['rounds']} change rounds); final delta "
                      f"{sc['final_delta']} records, {sc['stop_window_ms']:.1f} ms inside "
                      "the stop window")
    console.print(f"destination {result['destination']} firewall: "
                  f"{result['destination_invalid_drops']} packets dropped as "
                  "`ct state invalid` during the migration")
    attacker = result["attacker"]
    if block := attacker["block"]:
        state = (f"still blocked: {block['expires_s']:.1f} s of {block['timeout_s']:.0f} s "
                 f"left ({attacker['before']['expires_s']:.1f} s on {result['source']}, "
                 f"{attacker['seconds_between']:.1f} s before)")
    else:
        state = "not blocked there"
    console.print(f"attacker c2 right after the migration: {state}; its connection to port 7: "
                  f"{_fate(attacker['connect'])}")


def run_demo(console: Console) -> dict[str, Any]:
    console.rule("nseh demo: live migration behind a strict stateful firewall and an IPS")
    lab.down()  # leftovers of an earlier, killed run
    try:
        with console.status("creating the lab (2 hosts, 2 clients)"):
            status = lab.up(hosts=2, clients=2)
        console.print(f"lab up: hosts {', '.join(h.name for h in status.hosts)}; "
                      f"client {status.clients[0].name} at {status.clients[0].ipv4}, "
                      f"attacker {status.clients[1].name} at {status.clients[1].ipv4}")
        cluster = Cluster(Inventory.find())
        return asyncio.run(_demo(cluster, console, status.clients[0].namespace))
    finally:
        with console.status("removing the lab"):
            lab.down()
        console.print("lab removed")


async def _demo(cluster: Cluster, console: Console, client_namespace: str) -> dict[str, Any]:
    vm = with_ips(DEMO_VM, DEMO_IPS)
    with console.status(f"booting {vm.name} on h1 (first run also builds the guest image)"):
        await cluster.call("h1", "vm.start", {"definition": vm.to_json()}, timeout=900)
    console.print(f"{vm.name} runs on h1 at {vm.network.ipv4} / {vm.network.ipv6}, behind "
                  "policy: tcp 7,80 + udp 7 + ping in; conntrack strict "
                  "(nf_conntrack_tcp_loose=0); IPS: more than 5 closed ports within 60 s is "
                  "a port scan, blocked for 300 s")
    runs = []
    for sc_mode, source, destination in (("none", "h1", "h2"), ("precopy", "h2", "h1")):
        result = await _migrate_with_flows(cluster, console, sc_mode, client_namespace, source,
                                           destination)
        show(console, result)
        runs.append(result)
    comparison = Table("--sc", "QEMU downtime", "SC in stop window", "flows survived",
                       "invalid drops on destination", "attacker blocked there",
                       title="side by side")
    for result in runs:
        sc = result["report"].get("sc") or {}
        alive = sum(f["alive"] for f in result["flows"])
        block = result["attacker"]["block"]
        comparison.add_row(result["sc_mode"], f"{result['report']['qemu']['downtime_ms']} ms",
                           f"{sc.get('stop_window_ms', 0):.1f} ms",
                           f"{alive} of {len(result['flows'])}",
                           str(result["destination_invalid_drops"]),
                           f"yes ({block['expires_s']:.0f} s)" if block else "no")
    console.print()
    console.print(comparison)
    console.print(
        "Stock migration (--sc none) leaves the destination without conntrack state: strict "
        "conntrack marks the TCP flows' packets invalid and the firewall drops them (UDP and "
        "ping only come back because the policy admits them as new flows); nor does the "
        "destination know the attacker the source had blocked. With --sc precopy the VM's "
        "conntrack entries and its IPS blocks move with it: every flow survives, and the "
        "attacker stays blocked for what was left of its block.")
    return {"runs": runs}
