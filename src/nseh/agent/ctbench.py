"""Micro-benchmark: moving a VM's N conntrack entries from one table to another, three ways.

    python -m nseh.agent.ctbench --entries 10000      (as root; prints JSON)

It creates two network namespaces, `nsehtest-ctbench` (the source host's table) and
`nsehtest-ctbench2` (the destination's), fills the source with N IPv4 TCP entries of one VM
(one ct mark, the VM's address in every tuple), and moves them to the destination with:

- `nseh`: the agents' own code. Source: `FirewallEngine.snapshot` (one kernel-filtered
  dump by mark) and the SC frames exactly as `ScSender` sends them (`round_messages`,
  `FrameEncoder`). Destination: `receive_sc`, the receiver of `nseh.migration.sc_transfer`
  (frame decoding, the scope check of every entry, batched insert with the VM's mark here).
  End to end, a live `ScSender` talks to `receive_sc` over a socket pair (no TLS);
- `conntrack_cli`: what Proxmox VE's tooling runs, `conntrack -L -m MARK -o save` on the
  source and `conntrack -R -` (conntrack-tools' --load-file, from stdin) on the destination.
  The save format carries no ct mark: the restored entries have mark 0;
- `pyroute2`: `Conntrack.dump_entries(mark=...)` on the source, one JSON line per entry,
  and one `entry('add')` request per entry on the destination.

Timing rule, the same for all three: every step is a fresh process, started directly inside
its namespace (setns before exec, not `ip netns exec`) and timed from spawn to exit, so
process start-up (for Python: the interpreter and its imports) is included for all.
Per run and path:

- `dump`: the source step alone, its transfer bytes written to a file;
- `insert`: the destination step alone, reading that file (the table emptied first);
- `end_to_end`: both steps at once, the source's output streamed into the destination;
- `empty_dump`: the source step on an empty table: its start-up and fixed costs.

The Python steps also report what they measured inside the process (no start-up), which
is where the install rate is judged: `install_s` is nseh's decode + scope check + insert.
Every run's figures are kept; the medians are over `--runs` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from nseh.agent.conntrack import Conntrack
from nseh.agent.ctnetlink import IPS_ASSURED, IPS_CONFIRMED, IPS_SEEN_REPLY, make_entry
from nseh.provenance import Provenance

SOURCE, DESTINATION = "nsehtest-ctbench", "nsehtest-ctbench2"
MARK = 0x5EED  # the VM's mark on the source host
DESTINATION_MARK = 0x5EEE  # and on the destination host
EMPTY_MARK = 0x5A3  # no entry has it: the `empty_dump` runs
VM_ADDRESS = "10.200.0.1"
SOURCE_HOST = "bench-source"
PATHS = ("nseh", "conntrack_cli", "pyroute2")
STEP_TIMEOUT = 600
_CLONE_NEWNET = 0x40000000
MATCH_ALL = 0  # as both mark and mask: every entry


def _namespaces(create: bool) -> None:
    for name in (SOURCE, DESTINATION):
        if Path(f"/run/netns/{name}").exists():
            subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)
        if create:
            subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)


def _address(index: int) -> tuple[str, int]:
    """A distinct (client address, client port) per index."""
    return f"10.{64 + (index >> 22) % 64}.{(index >> 14) & 0xFF}.1", 1024 + (index & 0x3FFF)


def synthetic(count: int, mark: int) -> list[bytes]:
    """`count` established connections of clients to the VM's port 443."""
    entries = []
    for index in range(count):
        client, port = _address(index)
        entries.append(make_entry(client, VM_ADDRESS, "tcp", port, 443, mark=mark,
                                  timeout=3600))
    return entries


# -- the steps, each run as its own process ---------------------------------------------------

def _scope(mark: int) -> Any:
    from nseh.agent.engines import VMScope
    from nseh.definition import VMDefinition

    return VMScope(VMDefinition.from_json({"name": "bench", "network": {
        "ipv4": f"{VM_ADDRESS}/24"}}), mark)


def _engine() -> Any:
    from nseh.agent.engines import FirewallEngine
    from nseh.agent.firewall import Firewall

    return FirewallEngine(Firewall())  # snapshot/apply use conntrack only, not nftables


def _report(figures: dict[str, float]) -> None:
    """The step's own timings, as the last line on stderr."""
    print(json.dumps(figures), file=sys.stderr)


def _nseh_dump(mark: int, out: IO[bytes]) -> None:
    """The source agent's bulk copy as one byte stream: HELLO, round 1, COMMIT."""
    from nseh.agent.engines import Delta
    from nseh.migration.sc_transfer import round_messages
    from nseh.sc.wire import PROTOCOL_VERSION, Commit, FrameEncoder, Hello, new_session

    engine, scope = _engine(), _scope(mark)
    started = time.perf_counter()
    entries = engine.snapshot(scope)
    dumped = time.perf_counter()
    encoder = FrameEncoder(new_session())
    messages = [Hello(PROTOCOL_VERSION, SOURCE_HOST, scope.name, "stopcopy"),
                *round_messages({engine.name: Delta(upserts=entries)}, 1,
                                encoder.max_frame_bytes, encoder.max_entries_per_frame,
                                final=False), Commit()]
    out.writelines(encoder.encode_many(messages))
    out.flush()
    _report({"dump_s": dumped - started, "encode_s": time.perf_counter() - dumped})


async def _receive(sock: socket.socket) -> None:
    """The destination agent's receiver on `sock`, until COMMIT."""
    from nseh.migration.sc_transfer import receive_sc
    from nseh.sc.channel import Channel

    engine, scope = _engine(), _scope(DESTINATION_MARK)
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    channel = Channel(reader, writer, SOURCE_HOST, session=None)
    started = time.perf_counter()
    await receive_sc(channel, [engine], lambda vm, peer: scope)
    _report({"install_s": time.perf_counter() - started})
    await channel.aclose()


def _nseh_insert(source: IO[bytes]) -> None:
    """`receive_sc` on a recorded stream (the `dump` step's file), fed through a socket."""
    stream = source.read()
    ours, feeder = socket.socketpair()

    def feed() -> None:
        feeder.sendall(stream)
        while feeder.recv(1 << 16):  # the receiver's acknowledgements, until it closes
            pass
        feeder.close()

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    asyncio.run(_receive(ours))
    thread.join()


async def _nseh_send(sock: socket.socket) -> None:
    """The source agent's sender, live: HELLO, bulk copy, COMMIT."""
    from nseh.migration.sc_transfer import ScSender
    from nseh.sc.channel import Channel
    from nseh.sc.wire import new_session

    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    sender = ScSender(Channel(reader, writer, "bench-destination", session=new_session()),
                      [_engine()], _scope(MARK), "stopcopy")
    await sender.hello(SOURCE_HOST)
    await sender.send_bulk()
    await sender.commit()
    await sender.channel.aclose()


def _pyroute2_dump(mark: int, out: IO[bytes]) -> None:
    from pyroute2 import Conntrack as PyConntrack

    started = time.perf_counter()
    with PyConntrack() as table:
        for entry in table.dump_entries(mark=mark):
            orig, reply = entry.tuple_orig, entry.tuple_reply
            out.write(json.dumps({
                "orig": [orig.saddr, orig.daddr, orig.proto, orig.sport, orig.dport],
                "reply": [reply.saddr, reply.daddr, reply.proto, reply.sport, reply.dport],
                "status": entry.status, "timeout": entry.timeout,
                "state": entry.protoinfo.state}).encode() + b"\n")
    out.flush()
    _report({"dump_s": time.perf_counter() - started})


def _pyroute2_insert(source: IO[bytes]) -> None:
    from pyroute2 import Conntrack as PyConntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    def fields(values: list[Any]) -> dict[str, Any]:
        return dict(zip(("saddr", "daddr", "proto", "sport", "dport"), values, strict=True))

    started = time.perf_counter()
    with PyConntrack() as table:
        for line in source:
            item = json.loads(line)
            table.entry("add", tuple_orig=NFCTAttrTuple(**fields(item["orig"])),
                        tuple_reply=NFCTAttrTuple(**fields(item["reply"])),
                        timeout=item["timeout"], mark=DESTINATION_MARK,
                        status=item["status"] & (IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED),
                        protoinfo={"attrs": [["CTA_PROTOINFO_TCP", {"attrs": [
                            ["CTA_PROTOINFO_TCP_STATE", item["state"]]]}]]})
    _report({"install_s": time.perf_counter() - started})


def run_step(step: str, mark: int, fd: int | None) -> None:
    """One step of a path, in this process (already inside its namespace)."""
    live = None if fd is None else socket.socket(fileno=fd)
    match step:
        case "nseh-dump" if live is not None:
            asyncio.run(_nseh_send(live))
        case "nseh-dump":
            _nseh_dump(mark, sys.stdout.buffer)
        case "nseh-insert" if live is not None:
            asyncio.run(_receive(live))
        case "nseh-insert":
            _nseh_insert(sys.stdin.buffer)
        case "pyroute2-dump":
            _pyroute2_dump(mark, sys.stdout.buffer)
        case "pyroute2-insert":
            _pyroute2_insert(sys.stdin.buffer)


# -- the driver ------------------------------------------------------------------------------

def _worker(step: str, mark: int = MARK, fd: int | None = None) -> list[str]:
    argv = [sys.executable, "-m", "nseh.agent.ctbench", "--step", step, "--mark", str(mark)]
    return argv + (["--fd", str(fd)] if fd is not None else [])


def _argv(path: str, role: str, mark: int, fd: int | None = None) -> list[str]:
    if path == "conntrack_cli":
        return (["conntrack", "-L", "-m", str(mark), "-o", "save"] if role == "dump"
                else ["conntrack", "-R", "-"])
    return _worker(f"{path.replace('_', '-')}-{role}", mark, fd)


def _spawn(namespace: str, argv: list[str], stdin: Any, stdout: Any,
           pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    """`argv` started inside `namespace` (entered between fork and exec)."""
    target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    libc = ctypes.CDLL(None, use_errno=True)

    def enter() -> None:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {namespace}")

    try:
        return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                                preexec_fn=enter, pass_fds=pass_fds)
    finally:
        os.close(target)


def _finish(process: subprocess.Popen[bytes], what: str) -> dict[str, float]:
    """Wait for a step; the figures a Python step reported (none for the CLI)."""
    _, errors = process.communicate(timeout=STEP_TIMEOUT)
    text = errors.decode(errors="replace").strip()
    if process.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {process.returncode}): {text[-300:]}")
    last = text.splitlines()[-1] if text else ""
    return json.loads(last) if last.startswith("{") else {}


def _timed(function: Callable[[], dict[str, float]]) -> tuple[float, dict[str, float]]:
    started = time.perf_counter()
    figures = function()
    return time.perf_counter() - started, figures


class Bench:
    """The two tables and one transfer file; runs the steps and checks what they did."""

    def __init__(self, count: int, workdir: Path) -> None:
        # Here, not at the top: the steps import this module, and nseh.lab (whose package
        # imports much more) would lengthen their start-up with code they never run.
        from nseh.lab.netns import call_in_namespace

        self.count = count
        self.transfer = workdir / "transfer"
        self.source = call_in_namespace(SOURCE, Conntrack)
        self.destination = call_in_namespace(DESTINATION, Conntrack)

    def close(self) -> None:
        self.source.close()
        self.destination.close()

    def fill(self) -> float:
        started = time.perf_counter()
        result = self.source.insert(synthetic(self.count, MARK))
        if result.created != self.count or result.failures:
            raise RuntimeError(f"filling the source table: {result}")
        return time.perf_counter() - started

    def _expect_moved(self, what: str) -> None:
        moved = self.destination.count(MATCH_ALL, MATCH_ALL)
        self.destination.flush(MATCH_ALL, MATCH_ALL)
        if moved != self.count:
            raise RuntimeError(f"{what}: {moved} entries on the destination, not {self.count}")

    def dump(self, path: str, mark: int = MARK) -> tuple[float, dict[str, float]]:
        with self.transfer.open("wb") as out:
            return _timed(lambda: _finish(_spawn(SOURCE, _argv(path, "dump", mark),
                                                 subprocess.DEVNULL, out), f"{path} dump"))

    def insert(self, path: str) -> tuple[float, dict[str, float]]:
        with self.transfer.open("rb") as source:
            result = _timed(lambda: _finish(_spawn(DESTINATION, _argv(path, "insert", MARK),
                                                   source, subprocess.DEVNULL),
                                            f"{path} insert"))
        self._expect_moved(f"{path} insert")
        return result

    def end_to_end(self, path: str) -> tuple[float, dict[str, float]]:
        def run() -> dict[str, float]:
            if path == "nseh":  # the live protocol: both ways over one socket pair
                ours, theirs = socket.socketpair()
                with ours, theirs:
                    sender = _spawn(SOURCE, _argv(path, "dump", MARK, ours.fileno()),
                                    subprocess.DEVNULL, subprocess.DEVNULL, (ours.fileno(),))
                    receiver = _spawn(DESTINATION,
                                      _argv(path, "insert", MARK, theirs.fileno()),
                                      subprocess.DEVNULL, subprocess.DEVNULL,
                                      (theirs.fileno(),))
            else:
                sender = _spawn(SOURCE, _argv(path, "dump", MARK), subprocess.DEVNULL,
                                subprocess.PIPE)
                receiver = _spawn(DESTINATION, _argv(path, "insert", MARK), sender.stdout,
                                  subprocess.DEVNULL)
                assert sender.stdout is not None
                sender.stdout.close()  # the receiver holds the pipe now
            figures = _finish(receiver, f"{path} end to end (destination)")
            _finish(sender, f"{path} end to end (source)")
            return figures

        result = _timed(run)
        self._expect_moved(f"{path} end to end")
        return result


def _summary(count: int, runs: list[float]) -> dict[str, Any]:
    median = statistics.median(runs)
    return {"median_s": round(median, 4), "per_s": round(count / median),
            "runs_s": [round(run, 4) for run in runs]}


def measure_path(bench: Bench, path: str, runs: int) -> dict[str, Any]:
    figures: dict[str, list[float]] = {}
    inside: dict[str, list[float]] = {}
    transfer_bytes = 0

    def keep(measure: str, outcome: tuple[float, dict[str, float]]) -> None:
        figures.setdefault(measure, []).append(outcome[0])
        if measure in ("dump", "insert"):  # end to end, the receiver also waits for the dump
            for key, value in outcome[1].items():
                inside.setdefault(f"{measure}.{key}", []).append(value)

    for _ in range(runs):
        keep("empty_dump", bench.dump(path, EMPTY_MARK))
        keep("dump", bench.dump(path))
        transfer_bytes = bench.transfer.stat().st_size
        keep("insert", bench.insert(path))
        keep("end_to_end", bench.end_to_end(path))
    result = {measure: _summary(bench.count, values) for measure, values in figures.items()}
    result["empty_dump"].pop("per_s")
    result["transfer_bytes"] = transfer_bytes
    result["inside_process"] = {key: _summary(bench.count, values)
                                for key, values in inside.items()}
    return result


def benchmark(count: int, runs: int, pyroute2_max: int) -> dict[str, Any]:
    report: dict[str, Any] = {
        "entries": count, "runs": runs,
        "timing": "every step a fresh process started inside its namespace, timed from spawn "
                  "to exit: process start-up included for all paths; medians of the runs",
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3]}
    _namespaces(create=True)
    try:
        with tempfile.TemporaryDirectory(prefix="nseh-ctbench-", dir="/dev/shm") as workdir:
            bench = Bench(count, Path(workdir))
            try:
                report["fill_s"] = round(bench.fill(), 3)
                paths: dict[str, Any] = {}
                for path in PATHS:
                    if path == "pyroute2" and count > pyroute2_max:
                        paths[path] = {"skipped": f"not run above {pyroute2_max:,} entries "
                                                  "(one request per entry: minutes per run)"}
                        continue
                    paths[path] = measure_path(bench, path, runs)
                report["paths"] = paths
            finally:
                bench.close()
    finally:
        _namespaces(create=False)
    nseh, cli = report["paths"]["nseh"], report["paths"]["conntrack_cli"]
    report["speedup_vs_conntrack_cli"] = {
        measure: round(cli[measure]["median_s"] / nseh[measure]["median_s"], 2)
        for measure in ("dump", "insert", "end_to_end")}
    report["nseh_install_per_s"] = nseh["inside_process"]["insert.install_s"]["per_s"]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5, help="runs per measure (median)")
    parser.add_argument("--pyroute2-max", type=int, default=10_000,
                        help="largest table pyroute2 is run on (it is slow)")
    parser.add_argument("--step", choices=("nseh-dump", "nseh-insert", "pyroute2-dump",
                                           "pyroute2-insert"), help=argparse.SUPPRESS)
    parser.add_argument("--mark", type=int, default=MARK, help=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        run_step(args.step, args.mark, args.fd)
        return
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, conntrack)")
    if args.entries < 1 or args.runs < 1:
        parser.error("--entries and --runs must be at least 1")
    provenance = Provenance.start()
    try:
        report = benchmark(args.entries, args.runs, args.pyroute2_max)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:  # ConntrackError too
        sys.exit(f"ctbench: {exc}")
    report["provenance"] = provenance.finish().to_json()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
