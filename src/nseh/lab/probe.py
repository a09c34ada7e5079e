"""Long-lived connections that watch whether they survive: run inside a client node.

`python -m nseh.lab.probe --tcp 10.0.0.10:7 --udp 10.0.0.10:7 --ping 10.0.0.10`
opens the flows, prints `{"ready": true}` once every flow has echoed once, keeps exchanging
small numbered messages with the echo services, and on SIGTERM / SIGINT / stdin closing
prints one JSON line with each flow's fate: messages echoed, the longest gap between two
echoes, and whether it was still alive at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from nseh.lab.layout import netns_exec_argv

# A flow counts as broken if it got no echo for this long when the probe stops.
STALL_LIMIT = 2.0


@dataclass
class FlowStats:
    kind: str
    target: str
    echoed: int = 0
    longest_gap_ms: float = 0.0
    error: str | None = None
    last_echo: float = field(default=0.0, repr=False)

    def echo(self) -> None:
        now = time.monotonic()
        if self.last_echo:
            self.longest_gap_ms = max(self.longest_gap_ms, (now - self.last_echo) * 1000)
        self.last_echo = now
        self.echoed += 1

    def summary(self, now: float) -> dict[str, object]:
        stalled = now - self.last_echo if self.last_echo else float("inf")
        alive = self.error is None and stalled < STALL_LIMIT
        if alive:
            gap = self.longest_gap_ms
        else:
            gap = max(self.longest_gap_ms, min(stalled, 1e9) * 1000)
        data = asdict(self)
        del data["last_echo"]
        data.update(alive=alive, longest_gap_ms=round(gap, 1))
        return data


def split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


async def tcp_flow(stats: FlowStats, interval: float, first: asyncio.Event) -> None:
    host, port = split_target(stats.target)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        seq = 0
        while True:
            seq += 1
            message = f"{seq}\n".encode()
            writer.write(message)
            await writer.drain()
            line = await reader.readline()
            if line != message:
                raise ConnectionError(f"echo mismatch or EOF: {line[:40]!r}")
            stats.echo()
            first.set()
            await asyncio.sleep(interval)
    except (OSError, TimeoutError) as exc:
        stats.error = f"{type(exc).__name__}: {exc}"
        first.set()


async def udp_flow(stats: FlowStats, interval: float, first: asyncio.Event) -> None:
    host, port = split_target(stats.target)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, (host, port))
        seq = 0
        while True:
            seq += 1
            message = f"{seq}\n".encode()
            await loop.sock_sendall(sock, message)
            # Replies to older datagrams may still arrive: wait for this one's.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval * 4):
                    while await loop.sock_recv(sock, 2048) != message:
                        pass
                    stats.echo()
                    first.set()
            await asyncio.sleep(interval)
    except OSError as exc:
        stats.error = f"{type(exc).__name__}: {exc}"
        first.set()
    finally:
        sock.close()


async def ping_flow(stats: FlowStats, interval: float, first: asyncio.Event) -> None:
    # busybox/iputils ping prints one line per reply; each reply is an echo.
    proc = await asyncio.create_subprocess_exec(
        "ping", "-n", "-i", str(max(interval, 0.2)), stats.target,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        while line := await proc.stdout.readline():
            if b"bytes from" in line:
                stats.echo()
                first.set()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await proc.wait()


async def run(flows: list[FlowStats], interval: float) -> None:
    runners = {"tcp": tcp_flow, "udp": udp_flow, "ping": ping_flow}
    firsts = [asyncio.Event() for _ in flows]
    tasks = [asyncio.create_task(runners[f.kind](f, interval, e)) for f, e in zip(flows, firsts,
                                                                                  strict=True)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: sys.stdin.buffer.read1() or stop.set())
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(15):
            await asyncio.gather(*(e.wait() for e in firsts))
    print(json.dumps({"ready": all(f.echoed for f in flows)}), flush=True)
    await stop.wait()
    now = time.monotonic()
    print(json.dumps({"flows": [f.summary(now) for f in flows]}), flush=True)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class ProbeError(RuntimeError):
    """The probe did not report the fate of every flow it was started with; one line."""


FLOW_OPTIONS = ("--tcp", "--udp", "--ping")


def started_flows(flow_args: list[str]) -> list[tuple[str, str]]:
    """(kind, target) of each flow that `flow_args` (this module's options) asks for."""
    return [(option.removeprefix("--"), target)
            for option, target in itertools.pairwise(flow_args)
            if option in FLOW_OPTIONS]


def check_report(started: list[tuple[str, str]], stdout: str, exit_status: int,
                 stderr: str) -> list[dict[str, Any]]:
    """The flows of the probe's closing report; ProbeError unless it names exactly the
    flows that were started."""
    tail = " | ".join(stderr.strip().splitlines()[-2:])[-300:] or "nothing"
    said = f"exit status {exit_status}, stderr: {tail}"
    lines = stdout.strip().splitlines()
    try:
        flows: list[dict[str, Any]] = list(json.loads(lines[-1])["flows"])
    except (IndexError, ValueError, KeyError, TypeError):
        raise ProbeError(f"the probe reported no flows ({said})") from None
    reported = sorted((str(f.get("kind")), str(f.get("target"))) for f in flows)
    if reported != sorted(started):
        raise ProbeError(f"the probe reported {len(flows)} flows {reported}, not the "
                         f"{len(started)} it started {sorted(started)} ({said})")
    return flows


class Probe:
    """Controls this module running inside a client node's namespace."""

    def __init__(self, namespace: str, flow_args: list[str]) -> None:
        self.started = started_flows(flow_args)
        argv = netns_exec_argv(namespace, [sys.executable, "-m", "nseh.lab.probe",
                                               *flow_args])
        # stderr is only read at the end: the probe writes nothing there unless it fails.
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def wait_ready(self) -> bool:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        return bool(line) and bool(json.loads(line).get("ready"))

    def finish(self) -> list[dict[str, Any]]:
        """Stop the flows and return each one's fate; ProbeError if the probe does not
        report every flow it started."""
        try:
            output, errors = self.proc.communicate(input="", timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ProbeError("the probe did not report within 30 s of being stopped") from None
        return check_report(self.started, output, self.proc.returncode, errors)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tcp", action="append", default=[], metavar="HOST:PORT")
    parser.add_argument("--udp", action="append", default=[], metavar="HOST:PORT")
    parser.add_argument("--ping", action="append", default=[], metavar="HOST")
    parser.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args()
    flows = ([FlowStats("tcp", t) for t in args.tcp] + [FlowStats("udp", t) for t in args.udp]
             + [FlowStats("ping", t) for t in args.ping])
    asyncio.run(run(flows, args.interval))


if __name__ == "__main__":
    main()
