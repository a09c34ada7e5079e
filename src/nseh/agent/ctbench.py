"""Micro-benchmark of the ways to read and write conntrack, side by side in one run.

    python -m nseh.agent.ctbench --entries 10000      (as root; prints JSON)

It creates two network namespaces, `nsehtest-ctbench` (source table) and `nsehtest-ctbench2`
(destination table), and removes them at the end; nothing touches the root namespace's table.
The source table is filled with N IPv4 TCP entries with one mark (through `Conntrack.insert`),
then it measures on that same table:

- `nseh_dump`: `Conntrack.dump(mark)`, one kernel-filtered dump kept as bytes;
- `conntrack_cli_dump`: `conntrack -L -m mark` (C, conntrack-tools), output to /dev/null;
- `nseh_insert`: `Conntrack.insert` of the dumped entries into the empty destination table;
- `pyroute2_*`: pyroute2's object-per-entry API (`dump_entries`, then one `entry('add')`
  request per entry) on a sample of entries with another mark, run in a subprocess inside the
  namespaces; the rates are extrapolated from the sample and labelled so;
- `peak_rss_mib_moving`: this process's peak RSS while dumping and inserting the N entries.

Each measure runs `--repeat` times; the best run counts (other helpers share the CPUs) and all
runs are listed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nseh.agent.conntrack import Conntrack
from nseh.agent.ctnetlink import IPS_ASSURED, IPS_CONFIRMED, IPS_SEEN_REPLY, make_entry
from nseh.lab.netns import call_in_namespace

SOURCE, DESTINATION = "nsehtest-ctbench", "nsehtest-ctbench2"
MARK, SAMPLE_MARK = 0x5EED, 0x5A3


def _namespaces(create: bool) -> None:
    for name in (SOURCE, DESTINATION):
        if Path(f"/run/netns/{name}").exists():
            subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)
        if create:
            subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)


def _address(index: int) -> tuple[str, int]:
    """A distinct (client address, client port) per index."""
    return f"10.{64 + (index >> 22) % 64}.{(index >> 14) & 0xFF}.1", 1024 + (index & 0x3FFF)


def synthetic(count: int, mark: int, first: int = 0) -> list[bytes]:
    entries = []
    for index in range(first, first + count):
        client, port = _address(index)
        entries.append(make_entry(client, "10.200.0.1", "tcp", port, 443, mark=mark,
                                  timeout=3600))
    return entries


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _best(runs: list[float]) -> dict[str, Any]:
    return {"per_s": round(max(runs)), "runs_per_s": [round(rate) for rate in runs]}


def _timed(function: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def _cli_dump(count: int) -> float:
    command = ["ip", "netns", "exec", SOURCE, "conntrack", "-L", "-m", str(MARK)]
    started = time.perf_counter()
    listing = subprocess.run(command, capture_output=True, check=True)
    elapsed = time.perf_counter() - started
    lines = listing.stdout.count(b"\n")
    if lines != count:
        raise RuntimeError(f"conntrack -L listed {lines} entries, not {count}")
    return count / elapsed


def _pyroute2(sample: int) -> dict[str, Any]:
    """pyroute2 dump in the source namespace, then per-entry adds in the destination."""
    measures: dict[str, Any] = {}
    for step, namespace in (("dump", SOURCE), ("insert", DESTINATION)):
        command = ["ip", "netns", "exec", namespace, sys.executable, "-m", "nseh.agent.ctbench",
                   "--pyroute2-worker", step, "--entries", str(sample)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"pyroute2 {step} worker failed: {result.stderr.strip()[-300:]}")
        measures[f"pyroute2_{step}_per_s_extrapolated_from_{sample}"] = round(
            float(result.stdout))
    return measures


def _pyroute2_worker(step: str, sample: int) -> float:
    """Inside a namespace: the pyroute2 rate (entries/s) of one step on `sample` entries."""
    from pyroute2 import Conntrack as PyConntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    table = PyConntrack()
    try:
        if step == "dump":
            elapsed, found = _timed(lambda: list(table.dump_entries(mark=SAMPLE_MARK)))
            if len(found) != sample:
                raise RuntimeError(f"pyroute2 dumped {len(found)} entries, not {sample}")
            return sample / elapsed

        def add_all() -> None:
            for index in range(sample):
                client, port = _address(index)
                orig = NFCTAttrTuple(saddr=client, daddr="10.200.0.1", proto=6, sport=port,
                                     dport=443)
                table.entry("add", tuple_orig=orig, tuple_reply=orig.reverse(), timeout=3600,
                            mark=SAMPLE_MARK,
                            status=IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED,
                            protoinfo={"attrs": [["CTA_PROTOINFO_TCP", {"attrs": [
                                ["CTA_PROTOINFO_TCP_STATE", 3]]}]]})

        elapsed, _ = _timed(add_all)
        return sample / elapsed
    finally:
        table.close()


def benchmark(count: int, sample: int, repeat: int) -> dict[str, Any]:
    report: dict[str, Any] = {"entries": count, "kernel": os.uname().release,
                              "cpus": os.cpu_count(),
                              "loadavg_before": Path("/proc/loadavg").read_text().split()[:3]}
    _namespaces(create=True)
    try:
        source = call_in_namespace(SOURCE, Conntrack)
        destination = call_in_namespace(DESTINATION, Conntrack)
        entries = synthetic(count, MARK)
        elapsed, result = _timed(lambda filling=entries: source.insert(filling))
        if result.created != count or result.failures:
            raise RuntimeError(f"filling the source table: {result}")
        report["fill_insert_per_s"] = round(count / elapsed)
        del entries
        filled = source.insert(synthetic(sample, SAMPLE_MARK, first=count))
        if filled.created != sample:
            raise RuntimeError(f"filling the pyroute2 sample: {filled}")

        dumps: list[float] = []
        for _ in range(repeat):
            elapsed, dumped = _timed(lambda: source.dump(MARK))
            if len(dumped) != count:
                raise RuntimeError(f"dumped {len(dumped)} entries, not {count}")
            dumps.append(count / elapsed)
            del dumped
        report["nseh_dump"] = _best(dumps)
        report["conntrack_cli_dump"] = _best([_cli_dump(count) for _ in range(repeat)])
        report["dump_speedup_vs_conntrack_cli"] = round(
            report["nseh_dump"]["per_s"] / report["conntrack_cli_dump"]["per_s"], 2)

        report.update(_pyroute2(sample))
        destination.flush(SAMPLE_MARK)

        inserts: list[float] = []
        report["rss_mib_before_moving"] = round(_rss_mib("VmRSS"), 1)
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak RSS (VmHWM) from here
        for _ in range(repeat):
            destination.flush(MARK)
            dumped = source.dump(MARK)
            elapsed, result = _timed(lambda moved=dumped: destination.insert(moved))
            if result.created != count or result.failures:
                raise RuntimeError(f"inserting into the destination: {result}")
            inserts.append(count / elapsed)
            del dumped
        report["peak_rss_mib_moving"] = round(_rss_mib("VmHWM"), 1)
        report["nseh_insert"] = _best(inserts)
        source.close()
        destination.close()
    finally:
        _namespaces(create=False)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--pyroute2-sample", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pyroute2-worker", choices=("dump", "insert"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pyroute2_worker:
        print(_pyroute2_worker(args.pyroute2_worker, args.entries))
        return
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, conntrack)")
    print(json.dumps(benchmark(args.entries, args.pyroute2_sample, args.repeat), indent=2))


if __name__ == "__main__":
    main()
