"""`nseh demo`: a VM behind a strict stateful firewall, live connections, a migration.

It builds the lab, boots a VM on h1, opens long-lived flows from client c1 through the
firewall, live-migrates the VM to h2, and shows what happened to each flow and to the
destination firewall's invalid-drop counter. Then it removes the lab, also on failure.
"""

from __future__ import annotations

import asyncio
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nseh import lab
from nseh.cluster import Cluster
from nseh.definition import VMDefinition
from nseh.inventory import Inventory
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
SETTLE_SECONDS = 4.0


def demo_flows(vm: VMDefinition = DEMO_VM) -> list[str]:
    assert vm.network.ipv4 is not None and vm.network.ipv6 is not None
    v4, v6 = vm.network.ipv4.ip, vm.network.ipv6.ip
    return ["--tcp", f"{v4}:7", "--tcp", f"{v4}:7", "--tcp", f"[{v6}]:7",
            "--tcp", f"{vm.network.floating_ipv4}:7", "--udp", f"{v4}:7", "--ping", str(v4)]


async def _migrate_with_flows(cluster: Cluster, console: Console, sc_mode: str,
                              client_namespace: str, source: str,
                              destination: str) -> dict[str, Any]:
    probe = Probe(client_namespace, demo_flows())
    try:
        if not probe.wait_ready():
            raise RuntimeError("the client's flows could not reach the VM before migration")
        console.print(f"\n[bold]client c1[/] has {len(demo_flows()) // 2} live flows to "
                      f"{DEMO_VM.name}; migrating {source} → {destination} with --sc {sc_mode}")
        before = await cluster.call(destination, "firewall.counters")
        report = await cluster.migrate(
            DEMO_VM.name, destination, sc_mode,
            on_event=lambda e: console.print(f"  [dim]{e['phase']}[/] {escape(e['message'])}")
            if "message" in e and "phase" in e else None)
        await asyncio.sleep(SETTLE_SECONDS)
        after = await cluster.call(destination, "firewall.counters")
        flows = await asyncio.to_thread(probe.finish)
    finally:
        probe.kill()
    vms, _ = await cluster.list_vms()
    where = [v["host"] for v in vms if v["name"] == DEMO_VM.name]
    return {"sc_mode": sc_mode, "source": source, "destination": destination,
            "report": report, "flows": flows, "vm_hosts": where,
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
        console.print(f"security context: {sc['entries']} conntrack entries moved "
                      f"({sc['bytes']} bytes, {sc['rounds']} change rounds); final delta "
                      f"{sc['final_delta']} records, {sc['stop_window_ms']:.1f} ms inside "
                      "the stop window")
    console.print(f"destination {result['destination']} firewall: "
                  f"{result['destination_invalid_drops']} packets dropped as "
                  "`ct state invalid` during the migration")


def run_demo(console: Console) -> dict[str, Any]:
    console.rule("nseh demo: live migration behind a strict stateful firewall")
    lab.down()  # leftovers of an earlier, killed run
    try:
        with console.status("creating the lab (2 hosts, 1 client)"):
            status = lab.up(hosts=2, clients=1)
        console.print(f"lab up: hosts {', '.join(h.name for h in status.hosts)}; "
                      f"client {status.clients[0].name} at {status.clients[0].ipv4}")
        cluster = Cluster(Inventory.find())
        return asyncio.run(_demo(cluster, console, status.clients[0].namespace))
    finally:
        with console.status("removing the lab"):
            lab.down()
        console.print("lab removed")


async def _demo(cluster: Cluster, console: Console, client_namespace: str) -> dict[str, Any]:
    with console.status(f"booting {DEMO_VM.name} on h1 (first run also builds the guest image)"):
        await cluster.call("h1", "vm.start", {"definition": DEMO_VM.to_json()}, timeout=900)
    console.print(f"{DEMO_VM.name} runs on h1 at {DEMO_VM.network.ipv4} / "
                  f"{DEMO_VM.network.ipv6}, behind policy: tcp 7,80 + udp 7 + ping in; "
                  "conntrack strict (nf_conntrack_tcp_loose=0)")
    runs = []
    for sc_mode, source, destination in (("none", "h1", "h2"), ("precopy", "h2", "h1")):
        result = await _migrate_with_flows(cluster, console, sc_mode, client_namespace, source,
                                           destination)
        show(console, result)
        runs.append(result)
    comparison = Table("--sc", "QEMU downtime", "SC in stop window", "flows survived",
                       "invalid drops on destination", title="side by side")
    for result in runs:
        sc = result["report"].get("sc") or {}
        alive = sum(f["alive"] for f in result["flows"])
        comparison.add_row(result["sc_mode"], f"{result['report']['qemu']['downtime_ms']} ms",
                           f"{sc.get('stop_window_ms', 0):.1f} ms",
                           f"{alive} of {len(result['flows'])}",
                           str(result["destination_invalid_drops"]))
    console.print()
    console.print(comparison)
    console.print(
        "Stock migration (--sc none) leaves the destination without conntrack state: strict "
        "conntrack marks the TCP flows' packets invalid and the firewall drops them (UDP and "
        "ping only come back because the policy admits them as new flows). With --sc "
        "precopy the VM's conntrack entries move with it and every flow survives.")
    return {"runs": runs}
