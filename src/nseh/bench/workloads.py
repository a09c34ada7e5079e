"""The load a benchmark migration runs under, and the SC top-up before it.

- probe flows (every workload): a few long-lived TCP, UDP and ping flows from client c1,
  as in the demo; they give the longest client gap and how many flows survived;
- `http`: wrk from client c2 against the VM's web server during the migration;
- `memory`: a guest process that keeps rewriting a 16 MiB buffer with random bytes, so
  QEMU must send dirtied pages again.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from nseh.lab.layout import namespace_of, netns_exec_argv

# --ips-blocks: the blocked sources come from the second half of the benchmarking range
# (scfill's synthetic peers use the first), which no lab node uses.
BLOCK_BASE = IPv4Address("198.19.0.1")

PROBE_CLIENT = "c1"
HTTP_CLIENT = "c2"
HTTP_CONNECTIONS = 4
# wrk stops by itself after this even if nobody signals it (a bound, not the usual length).
HTTP_MAX_SECONDS = 120
# A request without an answer for this long counts as a wrk timeout.
HTTP_TIMEOUT = "2s"

# wrk's `done` hook: its summary as one JSON line (wrk prints it on SIGINT too).
_WRK_REPORT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "status_errors": %d, ' ..
    '"timeouts": %d, "latency_mean_us": %.1f, "latency_max_us": %d, "latency_p99_us": %d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency.mean, latency.max, latency:percentile(99)))
end
"""

# Each pass of dd reads 16 MiB from /dev/urandom into a fresh 16 MiB buffer: that many
# non-zero guest pages dirtied per pass, as fast as the vCPU makes random bytes. No file: the
# guest has ~80 MiB usable and no swap, and a 16 MiB file besides the buffer left so little
# that the guest's services started failing (a broken probe flow, then a probe that could
# not connect).
MEMORY_PIDFILE = "/tmp/nseh-bench-dirtier.pid"
MEMORY_STOP = f"kill $(cat {MEMORY_PIDFILE}) 2>/dev/null; rm -f {MEMORY_PIDFILE}"
# `$!` must be the loop's own subshell, so that killing it ends the loop. Starting ends an
# earlier loop first, so that a start retried after a lost answer leaves one loop running.
MEMORY_START = (f"{MEMORY_STOP}; "
                "(while :; do dd if=/dev/urandom of=/dev/null bs=16M count=1 2>/dev/null; "
                f"done) >/dev/null 2>&1 & echo $! >{MEMORY_PIDFILE}")


def block_sources(count: int) -> list[str]:
    """The first `count` sources an --ips-blocks run has the VM's IPS block."""
    return [str(BLOCK_BASE + index) for index in range(count)]


def probe_flow_args(ipv4: str, ipv6: str) -> list[str]:
    """The demo's flows: TCP v4 twice, TCP v6, UDP echo, ping."""
    return ["--tcp", f"{ipv4}:7", "--tcp", f"{ipv4}:7", "--tcp", f"[{ipv6}]:7",
            "--udp", f"{ipv4}:7", "--ping", ipv4]


class HttpLoad:
    """wrk against `url` from a client node, until `finish()` (SIGINT) or its bound."""

    def __init__(self, url: str, client: str = HTTP_CLIENT) -> None:
        with tempfile.NamedTemporaryFile("w", prefix="nseh-bench-wrk-", suffix=".lua",
                                         delete=False) as script:
            script.write(_WRK_REPORT)
        self.script = Path(script.name)
        # `ip netns exec` execs wrk in place, so the child's pid is wrk's.
        argv = netns_exec_argv(namespace_of(client), [
            "wrk", "-t1", f"-c{HTTP_CONNECTIONS}", f"-d{HTTP_MAX_SECONDS}s",
            "--timeout", HTTP_TIMEOUT, "-s", str(self.script), url])
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)

    def finish(self) -> dict[str, Any]:
        """Stop wrk and return its figures (requests, errors, latency)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            output, errors = self.proc.communicate(timeout=30)
        finally:
            self.kill()
        lines = [line for line in output.splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"wrk printed no report: {(errors or output).strip()[-200:]}")
        figures: dict[str, Any] = json.loads(lines[-1])
        seconds = figures["duration_us"] / 1e6
        figures["requests_per_s"] = round(figures["requests"] / seconds, 1) if seconds else 0.0
        return figures

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.script.unlink(missing_ok=True)


def top_up_sc(host: str, mark: int, size: int, clear: int, ipv4: str | None,
              ipv6: str | None) -> dict[str, int]:
    """Run `nseh.bench.scfill` in `host`'s namespace: {"live", "added", "removed", "total"}."""
    argv = [sys.executable, "-m", "nseh.bench.scfill", "--mark", str(mark), "--size", str(size),
            "--clear", str(clear)]
    argv += ["--ipv4", ipv4] if ipv4 else []
    argv += ["--ipv6", ipv6] if ipv6 else []
    result = subprocess.run(netns_exec_argv(namespace_of(host), argv), capture_output=True,
                            text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"SC top-up on {host} failed: {result.stderr.strip()[-300:]}")
    counts: dict[str, int] = json.loads(result.stdout)
    return counts
