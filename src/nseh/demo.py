"""`nseh demo`: a VM behind a strict stateful firewall and an IPS, live connections, an
attacker, migrations.

It builds the lab, boots a VM on h1, and migrates it twice (h1 → h2 with `--sc none`, back
with `--sc precopy`). Before each migration the attacker, client c2, port-scans the VM and
its host's IPS blocks it; during it client c1 keeps long-lived flows open through the
firewall. It shows what happened to each flow, to the destination firewall's invalid-drop
counter and to the attacker's block, and judges the run by its figures (`verdicts`): the
demo fails when the product failed (precopy lost a flow or the attacker's block) or when its
premise did not hold (stock migration did not break the TCP flows: conntrack not strict).
Then it removes the lab, also on failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nseh import lab
from nseh.agent.engines import FirewallEngine
from nseh.agent.ips import IpsEngine
from nseh.cluster import Cluster
from nseh.definition import IpsPolicy, PortScan, VMDefinition
from nseh.inventory import Inventory
from nseh.lab import traffic
from nseh.lab.netns import call_in_namespace
from nseh.lab.probe import Probe, ProbeError

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
# The demo's migrations, in order: (--sc mode, source, destination). The VM starts on h1.
MIGRATIONS = (("none", "h1", "h2"), ("precopy", "h2", "h1"))
# The security engines whose state `--skip-engine` may leave behind on the precopy migration.
ENGINES = (FirewallEngine.name, IpsEngine.name)


class DemoError(Exception):
    """The demo could not set up what it measures (e.g. the client's flows never reached the
    VM); nothing was judged."""


def with_ips(vm: VMDefinition, ips: IpsPolicy | None) -> VMDefinition:
    return vm.model_copy(update={"policy": vm.policy.model_copy(update={"ips": ips})})


def demo_flows(vm: VMDefinition = DEMO_VM) -> list[str]:
    assert vm.network.ipv4 is not None and vm.network.ipv6 is not None
    v4, v6 = vm.network.ipv4.ip, vm.network.ipv6.ip
    return ["--tcp", f"{v4}:7", "--tcp", f"{v4}:7", "--tcp", f"[{v6}]:7",
            "--tcp", f"{vm.network.floating_ipv4}:7", "--udp", f"{v4}:7", "--ping", str(v4)]


DEMO_FLOWS = len(demo_flows()) // 2  # each flow is an option and its target


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
            raise DemoError(f"{host}'s IPS did not block the attacker's port scan within "
                            f"{BLOCK_TIMEOUT:.0f} s")
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
                              client_namespace: str, source: str, destination: str,
                              skip_engines: Sequence[str]) -> dict[str, Any]:
    attack = await _attack(cluster, console, source)
    probe = Probe(client_namespace, demo_flows())
    try:
        if not probe.wait_ready():
            raise DemoError("the client's flows could not reach the VM before migration")
        skipping = f" leaving {', '.join(skip_engines)} state behind" if skip_engines else ""
        console.print(f"[bold]client c1[/] has {DEMO_FLOWS} live flows to {DEMO_VM.name}; "
                      f"migrating {source} → {destination} with --sc {sc_mode}{skipping}")
        before = await cluster.call(destination, "firewall.counters")
        report = await cluster.migrate(
            DEMO_VM.name, destination, sc_mode, skip_engines=skip_engines,
            on_event=lambda e: console.print(f"  [dim]{e['phase']}[/] {escape(e['message'])}")
            if "message" in e and "phase" in e else None)
        settled = time.monotonic() + SETTLE_SECONDS
        # At once, on the destination: is the attacker still blocked, and for how long?
        asked, block = await attacker_block(cluster, destination)
        attacker = {"connect": await attacker_connects(), "block": block,
                    "before": attack["block"], "seconds_between": asked - attack["asked"]}
        await asyncio.sleep(settled - time.monotonic())
        after = await cluster.call(destination, "firewall.counters")
        try:
            flows, flows_error = await asyncio.to_thread(probe.finish), None
        except ProbeError as exc:  # its flows were not measured
            flows, flows_error = [], str(exc)
    finally:
        probe.kill()
    vms, unreachable = await cluster.list_vms()
    return {"sc_mode": sc_mode, "source": source, "destination": destination,
            "report": report, "flows_started": DEMO_FLOWS, "flows": flows,
            "flows_error": flows_error,
            "vm_hosts": [v["host"] for v in vms if v["name"] == DEMO_VM.name],
            "hosts_unreachable": unreachable, "attacker": attacker,
            "destination_invalid_drops": after.get("invalid_drops", 0)
            - before.get("invalid_drops", 0)}


# -- verdicts: what the run's figures say (pure functions of the runs' results) -------------


@dataclass(frozen=True)
class Verdict:
    check: str
    passed: bool
    detail: str  # a sentence built from the figures the check judged

    def to_json(self) -> dict[str, Any]:
        return {"check": self.check, "passed": self.passed, "detail": self.detail}


def _flow_name(flow: dict[str, Any]) -> str:
    return f"{flow['kind']} {flow['target']}"


def _unmeasured(run: dict[str, Any]) -> str | None:
    """Why the run's flows were not measured, or None if the probe reported every flow."""
    if len(run["flows"]) == run["flows_started"]:
        return None
    why = f" ({run['flows_error']})" if run["flows_error"] else ""
    return (f"--sc {run['sc_mode']}: flows not measured: the probe reported "
            f"{len(run['flows'])} of the {run['flows_started']} flows started{why}")


def _migrated(run: dict[str, Any]) -> tuple[bool, str]:
    report = run["report"]
    route = f"{DEMO_VM.name} {run['source']} → {run['destination']} with --sc {run['sc_mode']}"
    if report["result"] == "migrated":
        return True, f"migrated {route} (QEMU downtime {report['qemu']['downtime_ms']} ms)"
    return False, f"migrating {route} ended {report['result']}: {report['failure']}"


def _placed(run: dict[str, Any]) -> tuple[bool, str]:
    after = f"after --sc {run['sc_mode']}"
    if unreachable := run["hosts_unreachable"]:
        return False, (f"{after}, where {DEMO_VM.name} runs is unknown: "
                       + "; ".join(f"{host} not asked ({why})"
                                   for host, why in sorted(unreachable.items())))
    hosts = run["vm_hosts"]
    if hosts == [run["destination"]]:
        return True, f"{after}, {DEMO_VM.name} runs on {run['destination']} and on no other host"
    found = f"on {', '.join(hosts)}" if hosts else "on no host"
    return False, f"{after}, {DEMO_VM.name} runs {found}, not on {run['destination']} alone"


def _stock_breaks_tcp(run: dict[str, Any]) -> tuple[bool, str]:
    if why := _unmeasured(run):
        return False, why
    tcp = [f for f in run["flows"] if f["kind"] == "tcp"]
    survivors = [_flow_name(f) for f in tcp if f["alive"]]
    others = [f for f in run["flows"] if f["kind"] != "tcp"]
    others_alive = f"{sum(f['alive'] for f in others)} of {len(others)} UDP and ping flows alive"
    drops = (f"{run['destination']}'s firewall dropped {run['destination_invalid_drops']} "
             "packets as `ct state invalid`")
    if not tcp:
        return False, "--sc none: no TCP flow was measured"
    if survivors:
        return False, (f"--sc none: {len(survivors)} of {len(tcp)} TCP flows survived stock "
                       f"migration ({', '.join(survivors)}): conntrack is not strict, so the "
                       "demo's comparison proves nothing")
    if run["destination_invalid_drops"] <= 0:
        return False, (f"--sc none broke all {len(tcp)} TCP flows, but {drops}: not strict "
                       "conntrack broke them")
    return True, (f"--sc none broke all {len(tcp)} TCP flows and {drops}: strict conntrack is "
                  f"in force ({others_alive})")


def _stock_carries_no_block(run: dict[str, Any]) -> tuple[bool, str]:
    attacker, destination = run["attacker"], run["destination"]
    if block := attacker["block"]:
        return False, (f"after --sc none, {destination} blocks the attacker {ATTACKER4} "
                       f"({block['expires_s']:.1f} s left), though stock migration carries no "
                       "IPS state")
    if attacker["connect"] != "echo":
        return False, (f"after --sc none, {destination} lists no block of the attacker "
                       f"{ATTACKER4}, yet its connection to port 7 got no answer")
    return True, (f"after --sc none, {destination} does not block the attacker {ATTACKER4} "
                  f"that {run['source']} had blocked: its connection to port 7 was answered")


def _precopy_keeps_flows(run: dict[str, Any]) -> tuple[bool, str]:
    if why := _unmeasured(run):
        return False, why
    flows = run["flows"]
    broken = [_flow_name(f) for f in flows if not f["alive"]]
    if broken:
        return False, (f"--sc precopy: {len(flows) - len(broken)} of {len(flows)} flows "
                       f"survived; broken: {', '.join(broken)}")
    longest = max(f["longest_gap_ms"] for f in flows)
    return True, (f"--sc precopy: all {len(flows)} flows survived (longest gap between two "
                  f"echoes {longest:.0f} ms)")


def _precopy_keeps_block(run: dict[str, Any]) -> tuple[bool, str]:
    attacker, destination = run["attacker"], run["destination"]
    before, block = attacker["before"], attacker["block"]
    answered = attacker["connect"] == "echo"
    fate = "answered" if answered else "dropped"
    if block is None:
        return False, (f"after --sc precopy, {destination} does not block the attacker "
                       f"{ATTACKER4} that {run['source']} had blocked; its connection to "
                       f"port 7 was {fate}")
    left = (f"{block['expires_s']:.1f} s of {block['timeout_s']:.0f} s left "
            f"({before['expires_s']:.1f} s on {run['source']} "
            f"{attacker['seconds_between']:.1f} s before)")
    if block["expires_s"] > before["expires_s"]:
        return False, (f"after --sc precopy, {destination}'s block of the attacker has {left}: "
                       "it started over instead of keeping its remaining time")
    if answered:
        return False, (f"after --sc precopy, {destination} lists the attacker as blocked "
                       f"({left}) but answered its connection to port 7")
    return True, (f"after --sc precopy, {destination} still blocks the attacker {ATTACKER4}: "
                  f"{left}; its connection to port 7 was dropped")


Judge = Callable[[dict[str, Any]], tuple[bool, str]]
CHECKS: dict[str, list[tuple[str, Judge]]] = {
    "none": [("none-migrated", _migrated), ("none-vm-placement", _placed),
             ("none-breaks-tcp", _stock_breaks_tcp),
             ("none-carries-no-block", _stock_carries_no_block)],
    "precopy": [("precopy-migrated", _migrated), ("precopy-vm-placement", _placed),
                ("precopy-keeps-flows", _precopy_keeps_flows),
                ("precopy-keeps-block", _precopy_keeps_block)],
}


def verdicts(runs: Sequence[dict[str, Any]]) -> list[Verdict]:
    """Every check of the demo, judged from the runs' figures. A migration the demo did not
    get to (an earlier one failed) fails all its checks."""
    by_mode = {run["sc_mode"]: run for run in runs}
    judged = []
    for sc_mode, source, destination in MIGRATIONS:
        run = by_mode.get(sc_mode)
        for check, judge in CHECKS[sc_mode]:
            if run is None:
                judged.append(Verdict(check, False, f"--sc {sc_mode}: not run (the demo "
                                                    f"stopped before {source} → {destination})"))
            else:
                judged.append(Verdict(check, *judge(run)))
    return judged


def failed_checks(judged: Sequence[Verdict]) -> list[str]:
    return [v.check for v in judged if not v.passed]


# -- the run ------------------------------------------------------------------------------


def show(console: Console, result: dict[str, Any]) -> None:
    report = result["report"]
    qemu = report["qemu"]
    console.print(f"\nmigration {report['result']}: QEMU downtime {qemu['downtime_ms']} ms, "
                  f"total {qemu['total_time_ms']} ms; {DEMO_VM.name} now on "
                  f"{', '.join(result['vm_hosts']) or 'no host'}")
    if why := _unmeasured(result):
        console.print(f"[red]{escape(why)}[/]")
    else:
        table = Table("flow", "echoes", "longest gap", "after migration",
                      title=f"client c1's flows (--sc {result['sc_mode']})")
        for flow in result["flows"]:
            fate = "[green]survived[/]" if flow["alive"] else "[red]broken[/]"
            table.add_row(escape(_flow_name(flow)), str(flow["echoed"]),
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


def show_verdicts(console: Console, judged: Sequence[Verdict]) -> None:
    console.print("\n[bold]checks[/]")
    for verdict in judged:
        mark = "[green]pass[/]" if verdict.passed else "[bold red]FAIL[/]"
        console.print(f"{mark} {verdict.check}: {escape(verdict.detail)}")
    if failed := failed_checks(judged):
        console.print(f"[bold red]{len(failed)} of {len(judged)} checks failed:[/] "
                      f"{', '.join(failed)}")
    else:
        console.print(f"[bold green]all {len(judged)} checks passed[/]")


def run_demo(console: Console, skip_engines: Sequence[str] = ()) -> dict[str, Any]:
    """The demo's runs and verdicts; `skip_engines` are left behind by the precopy
    migration (to see the demo fail without that engine's state)."""
    console.rule("nseh demo: live migration behind a strict stateful firewall and an IPS")
    lab.down()  # leftovers of an earlier, killed run
    try:
        with console.status("creating the lab (2 hosts, 2 clients)"):
            status = lab.up(hosts=2, clients=2)
        console.print(f"lab up: hosts {', '.join(h.name for h in status.hosts)}; "
                      f"client {status.clients[0].name} at {status.clients[0].ipv4}, "
                      f"attacker {status.clients[1].name} at {status.clients[1].ipv4}")
        cluster = Cluster(Inventory.find())
        runs = asyncio.run(_demo(cluster, console, status.clients[0].namespace,
                                 skip_engines))
    finally:
        with console.status("removing the lab"):
            lab.down()
        console.print("lab removed")
    judged = verdicts(runs)
    show_verdicts(console, judged)
    return {"runs": runs, "skipped_engines": list(skip_engines),
            "verdicts": [v.to_json() for v in judged], "passed": not failed_checks(judged)}


async def _demo(cluster: Cluster, console: Console, client_namespace: str,
                skip_engines: Sequence[str]) -> list[dict[str, Any]]:
    vm = with_ips(DEMO_VM, DEMO_IPS)
    with console.status(f"booting {vm.name} on h1"):
        await cluster.call("h1", "vm.start", {"definition": vm.to_json()}, timeout=900)
    scan = DEMO_IPS.portscan
    console.print(f"{vm.name} runs on h1 at {vm.network.ipv4} / {vm.network.ipv6}, behind "
                  "policy: tcp 7,80 + udp 7 + ping in; the lab's hosts set "
                  "nf_conntrack_tcp_loose=0 (strict conntrack); IPS: more than "
                  f"{scan.ports} closed ports within {scan.seconds} s is a port scan, blocked "
                  f"for {DEMO_IPS.block_seconds} s")
    runs = []
    for sc_mode, source, destination in MIGRATIONS:
        result = await _migrate_with_flows(
            cluster, console, sc_mode, client_namespace, source, destination,
            skip_engines if sc_mode == "precopy" else ())
        show(console, result)
        runs.append(result)
        misplaced = result["report"]["result"] != "migrated" or result["vm_hosts"] != [destination]
        if misplaced and sc_mode != MIGRATIONS[-1][0]:
            console.print(f"[red]{DEMO_VM.name} is not where the next migration starts: "
                          "the demo stops here[/]")
            break
    comparison = Table("--sc", "QEMU downtime", "SC in stop window", "flows survived",
                       "invalid drops on destination", "attacker blocked there",
                       title="side by side")
    for result in runs:
        sc = result["report"].get("sc") or {}
        alive = sum(f["alive"] for f in result["flows"])
        survived = ("not measured" if _unmeasured(result)
                    else f"{alive} of {result['flows_started']}")
        block = result["attacker"]["block"]
        comparison.add_row(result["sc_mode"], f"{result['report']['qemu']['downtime_ms']} ms",
                           f"{sc.get('stop_window_ms', 0):.1f} ms", survived,
                           str(result["destination_invalid_drops"]),
                           f"yes ({block['expires_s']:.0f} s)" if block else "no")
    console.print()
    console.print(comparison)
    return runs
