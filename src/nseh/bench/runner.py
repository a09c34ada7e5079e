"""Runs the benchmark: its own lab, one VM, the matrix of real migrations, the outputs."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from nseh import lab
from nseh.api.client import AgentError
from nseh.bench import plots
from nseh.bench.matrix import NOIPS, BenchConfig, PlannedMigration, plan
from nseh.bench.report import Sample, ratio_cell, span, summarize, to_markdown, write_samples
from nseh.bench.workloads import (
    MEMORY_START,
    MEMORY_STOP,
    PROBE_CLIENT,
    HttpLoad,
    block_sources,
    probe_flow_args,
    top_up_sc,
)
from nseh.cluster import Cluster
from nseh.definition import IpsPolicy, PortScan
from nseh.demo import DEMO_VM, with_ips
from nseh.inventory import Inventory
from nseh.lab import layout
from nseh.lab.layout import namespace_of
from nseh.lab.probe import Probe, ProbeError
from nseh.provenance import Provenance

VM = DEMO_VM
VM4 = str(VM.network.ipv4.ip) if VM.network.ipv4 else None
VM6 = str(VM.network.ipv6.ip) if VM.network.ipv6 else None
HOSTS = ("h1", "h2")
# wrk's connections exist (and have entries) before the SC is topped up and QEMU starts.
HTTP_WARMUP = 1.0
# After a migration, longer than the probe's stall limit (2 s), so a dead flow reads as dead.
SETTLE = 3.0
MICROBENCH_TIMEOUT = 900
GUEST_TIMEOUT, GUEST_ATTEMPTS = 20, 2  # the guest commands take well under a second
PROBE_ATTEMPTS, PROBE_RETRY_AFTER = 3, 5.0
# --ips-blocks: the VM's intrusion prevention (no workload scans it), and how long the
# blocks the benchmark adds last: longer than any run, so none expires during it.
BENCH_IPS = IpsPolicy(portscan=PortScan(ports=10, seconds=30))
BLOCK_SECONDS = 86_400


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message is one line."""


def default_out() -> Path:
    return Path("bench/results") / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def run_bench(config: BenchConfig, console: Console) -> tuple[Path, dict[str, Any]]:
    """Run the whole benchmark; write its outputs; return where, and the summary.

    Migration failures are samples. A failure of the benchmark itself (the VM lost, a
    workload that cannot run) stops it: the samples so far are still written, then
    BenchError is raised.
    """
    out = config.out or default_out()
    if out.exists() and any(out.iterdir()):
        raise BenchError(f"--out {out} is not empty")
    provenance = Provenance.start()  # before the output directory adds to the tree
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    samples: list[Sample] = []
    info: dict[str, Any] = {}
    stopped: str | None = None
    lab.down()  # leftovers of an earlier, killed run
    # Before the lab exists, so the VM's vCPU does not share the CPUs with it.
    microbench = run_microbench(config.microbench_sizes, console)
    try:
        with console.status("creating the lab (2 hosts, 2 clients)"):
            lab.up(hosts=2, clients=2)
        try:
            asyncio.run(_run_matrix(Cluster(Inventory.find()), config, samples, info, console))
        except (BenchError, AgentError) as exc:
            stopped = str(exc)
    finally:
        keep_agent_logs(out)
        with console.status("removing the lab"):
            lab.down()
    info.update(wall_s=round(time.monotonic() - started),
                sizes=list(config.sizes), workloads=list(config.workloads),
                modes=list(config.modes), reps=config.reps, ips_blocks=config.ips_blocks,
                stopped_early=stopped)
    provenance.finish(accel=info.pop("accel", None))
    if microbench:
        microbench["provenance"] = provenance.to_json()
    summary = summarize(samples, microbench=microbench, run_info=info, provenance=provenance)
    write_outputs(out, samples, summary)
    if stopped:
        raise BenchError(f"{stopped}; stopped after {len(samples)} migrations, "
                         f"results so far in {out}")
    return out, summary


def keep_agent_logs(out: Path) -> None:
    """The agents' logs go with the results (what each migration did, and why one failed):
    `lab down` removes them."""
    for host in HOSTS:
        log_file = layout.agent_log_path(host)
        if log_file.exists():
            (out / "agent-logs").mkdir(exist_ok=True)
            shutil.copyfile(log_file, out / "agent-logs" / f"{host}.log")


def write_outputs(out: Path, samples: list[Sample], summary: dict[str, Any]) -> None:
    write_samples(samples, out, summary["provenance"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(to_markdown(summary))
    if any(c["downtime_ms"] for c in summary["cells"]):
        plots.downtime_vs_size(summary["cells"], out / "downtime_vs_size.png")
    if microbench := summary["microbench"]:
        (out / "microbench.json").write_text(json.dumps(microbench, indent=1) + "\n")
        if any("error" not in run for run in microbench["runs"]):
            plots.sc_rates(microbench, out / "sc_rate.png")


def run_microbench(sizes: tuple[int, ...], console: Console) -> dict[str, Any] | None:
    """`python -m nseh.agent.ctbench` per size. It makes its own namespaces (nsehtest-ctbench*),
    which the lab's (nseh-*) never clash with. A failed run is recorded, not raised."""
    if not sizes:
        return None
    runs: list[dict[str, Any]] = []
    for size in sizes:
        command = [sys.executable, "-m", "nseh.agent.ctbench", "--entries", str(size)]
        with console.status(f"SC move micro-benchmark, {size:,} entries"):
            result = subprocess.run(command, capture_output=True, text=True,
                                    timeout=MICROBENCH_TIMEOUT, check=False)
        # A run's own provenance (its command, start and end) is in its JSON.
        runs.append(json.loads(result.stdout) if result.returncode == 0 else
                    {"entries": size, "command": command,
                     "error": result.stderr.strip()[-300:]})
    return {"runs": runs}


async def _run_matrix(cluster: Cluster, config: BenchConfig, samples: list[Sample],
                      info: dict[str, Any], console: Console) -> None:
    definition = VM if config.ips_blocks is None else with_ips(VM, BENCH_IPS)
    with console.status(f"booting {VM.name} on h1"):
        vm = await cluster.call("h1", "vm.start", {"definition": definition.to_json()},
                                timeout=900)
    info["accel"] = vm.get("accel")
    # One unrecorded migration first: a host's first incoming VM pays one-off costs (the
    # guest image prepared there) that would otherwise land in the first sample.
    with console.status("warm-up migration h1 -> h2 (not recorded)"):
        warm_up = await cluster.migrate(VM.name, "h2", "none")
    if warm_up["result"] != "migrated":
        raise BenchError(f"the warm-up migration failed: {warm_up['failure']}")
    planned = plan(config)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("migrations", total=len(planned))
        workload = None
        synthetic_high = 0  # most synthetic entries any top-up added: the ones to clear
        for item in planned:
            if item.workload != workload:
                if workload == "memory":
                    await _guest(cluster, MEMORY_STOP)
                if item.workload == "memory":
                    await _guest(cluster, MEMORY_START)
                workload = item.workload
            progress.update(task, description=f"{item.workload} | {item.size:,} entries | "
                                              f"rep {item.rep}/{config.reps} | {item.mode}")
            sample = await measure(cluster, item, synthetic_high, config.ips_blocks)
            synthetic_high = max(synthetic_high, sample.synthetic_entries or 0)
            samples.append(sample)
            progress.console.print(escape(describe(sample)), highlight=False)
            progress.advance(task)
    # VmHWM: each agent's peak over the whole run, so it covers the largest SC moved.
    info["agent_peak_rss_mib"] = {
        host: (await cluster.call(host, "host.info"))["agent_peak_rss_mib"]
        for host in ("h1", "h2")}


async def _guest(cluster: Cluster, command: str) -> None:
    """Run an idempotent guest command; retried once, as the serial command channel can
    lose a request after many migrations (seen once in 120: the exec timed out)."""
    for attempt in range(GUEST_ATTEMPTS):
        host = await cluster.locate(VM.name)
        try:
            result = await cluster.call(
                host, "vm.exec", {"name": VM.name, "command": command,
                                  "timeout": GUEST_TIMEOUT}, timeout=GUEST_TIMEOUT + 10)
            break
        except AgentError:
            if attempt == GUEST_ATTEMPTS - 1:
                raise
    if result["exit_code"] != 0:
        raise BenchError(f"guest command failed ({result['exit_code']}): "
                         f"{result['output'].strip()[-200:]}")


async def _mark(cluster: Cluster, host: str) -> int:
    vms = await cluster.call(host, "vm.list", timeout=10)
    return int(next(v["mark"] for v in vms if v["name"] == VM.name))


async def top_up_blocks(cluster: Cluster, host: str, count: int) -> int:
    """Have the VM's IPS on `host` block `count` sources (those a migration carried are
    there already) through the agent's API; how many it then blocks."""
    listed = await cluster.call(host, "ips.list", {"name": VM.name}, timeout=30)
    present = {block["source"] for block in listed["blocks"]}
    for source in block_sources(count):
        if source not in present:
            await cluster.call(host, "ips.block", {"name": VM.name, "source": source,
                                                   "seconds": BLOCK_SECONDS}, timeout=30)
    listed = await cluster.call(host, "ips.list", {"name": VM.name}, timeout=30)
    return len(listed["blocks"])


async def _ready_probe(host: str) -> Probe:
    """The probe, its flows all open. A busy guest (the memory workload under TCG, on a
    QEMU whose code cache is cold after a migration) may miss the first attempt."""
    assert VM4 is not None and VM6 is not None
    for attempt in range(1, PROBE_ATTEMPTS + 1):
        probe = Probe(namespace_of(PROBE_CLIENT), probe_flow_args(VM4, VM6))
        if await asyncio.to_thread(probe.wait_ready):
            return probe
        probe.kill()
        if attempt < PROBE_ATTEMPTS:
            await asyncio.sleep(PROBE_RETRY_AFTER)
    raise BenchError(f"the probe's flows could not reach {VM.name} on {host} "
                     f"({PROBE_ATTEMPTS} attempts)")


async def measure(cluster: Cluster, item: PlannedMigration, clear: int,
                  ips_blocks: int | None = None) -> Sample:
    """One migration of the VM to the other host under the item's workload and SC size
    (and, with `ips_blocks`, that many blocked sources in its IPS)."""
    source = await cluster.locate(VM.name)
    destination = next(h for h in HOSTS if h != source)
    sample = Sample(workload=item.workload, size=item.size, mode=item.mode, rep=item.rep,
                    order=item.order, direction=f"{source}->{destination}",
                    started_utc=datetime.now(UTC).isoformat(timespec="milliseconds"),
                    result="failed")
    assert VM4 is not None and VM6 is not None
    probe = await _ready_probe(source)
    http: HttpLoad | None = None
    try:
        if item.workload == "http":
            http = HttpLoad(f"http://{VM4}/")
            await asyncio.sleep(HTTP_WARMUP)
        try:
            counts = await asyncio.to_thread(top_up_sc, source, await _mark(cluster, source),
                                             item.size, clear, VM4, VM6)
        except RuntimeError as exc:
            raise BenchError(str(exc)) from None
        sample.live_entries, sample.synthetic_entries = counts["live"], counts["added"]
        if ips_blocks is not None:
            sample.ips_blocks = await top_up_blocks(cluster, source, ips_blocks)
        sc_mode, skip = ("precopy", ["ips"]) if item.mode == NOIPS else (item.mode, [])
        try:
            record_report(sample, await cluster.migrate(VM.name, destination, sc_mode,
                                                        skip_engines=skip))
        except AgentError as exc:
            sample.failure = str(exc)
        await asyncio.sleep(SETTLE)
        if http is not None:
            try:
                _record_http(sample, await asyncio.to_thread(http.finish))
            except RuntimeError as exc:
                raise BenchError(str(exc)) from None
        try:
            _record_flows(sample, await asyncio.to_thread(probe.finish))
        except ProbeError as exc:
            raise BenchError(str(exc)) from None
    finally:
        probe.kill()
        if http is not None:
            http.kill()
    try:
        sample.vm_host_after = await cluster.locate(VM.name)
    except AgentError as exc:
        raise BenchError(f"after migrating {source} -> {destination} ({item.mode}, "
                         f"{sample.result}): {exc}") from None
    return sample


def record_report(sample: Sample, report: dict[str, Any]) -> None:
    qemu = report["qemu"]
    sample.result, sample.failure = report["result"], report.get("failure")
    # A completed migration never takes 0 ms: QEMU answered query-migrate before it had
    # computed its times (seen right after the "completed" event). Missing, not zero.
    if qemu["total_time_ms"]:
        sample.downtime_ms, sample.total_time_ms = qemu["downtime_ms"], qemu["total_time_ms"]
        sample.setup_time_ms = qemu["setup_time_ms"]
    sample.ram_transferred_bytes = qemu["ram_transferred_bytes"]
    sample.dirty_sync_count = qemu["dirty_sync_count"]
    sample.wall_ms = report.get("elapsed_ms")
    if sc := report.get("sc"):
        sample.sc_entries, sample.sc_bytes, sample.sc_rounds = (
            sc["entries"], sc["bytes"], sc["rounds"])
        sample.sc_final_delta, sample.sc_stop_window_ms = sc["final_delta"], sc["stop_window_ms"]
        sample.sc_pause_ms = sc.get("pause_ms")
        sample.sc_rejected = sc["rejected"]
        sample.sc_reasons = "; ".join(sc["reasons"]) or None
        sample.sc_destination_entries = sc["destination_entries"]
        sample.sc_ips_records = sc["engines"].get("ips")


def _record_http(sample: Sample, figures: dict[str, Any]) -> None:
    sample.http_requests = figures["requests"]
    sample.http_requests_per_s = figures["requests_per_s"]
    sample.http_errors = sum(figures[k] for k in ("connect_errors", "read_errors",
                                                  "write_errors", "status_errors"))
    sample.http_timeouts = figures["timeouts"]
    sample.http_latency_max_ms = round(figures["latency_max_us"] / 1000, 1)


def _record_flows(sample: Sample, flows: list[dict[str, Any]]) -> None:
    gaps = [float(f["longest_gap_ms"]) for f in flows if f["kind"] == "tcp"]
    sample.longest_tcp_gap_ms = max(gaps) if gaps else None
    sample.flows = len(flows)
    sample.flows_survived = sum(bool(f["alive"]) for f in flows)
    sample.flows_broken = sample.flows - sample.flows_survived


def describe(sample: Sample) -> str:
    """One line per migration for the progress log."""
    head = (f"{sample.workload} {sample.size:,} rep {sample.rep} {sample.mode:13} "
            f"{sample.direction}: {sample.result}")
    if not sample.ok:
        return f"{head} ({sample.failure})"
    stop = (f", SC {sample.sc_stop_window_ms:.1f} ms in stop window"
            if sample.sc_stop_window_ms is not None else "")
    if sample.sc_pause_ms is not None:
        stop += f" (QEMU paused {sample.sc_pause_ms:.1f} ms)"
    return (f"{head}, downtime {sample.downtime_ms} ms, total {sample.total_time_ms} ms, "
            f"wall {sample.wall_ms} ms{stop}, entries {sample.live_entries} live + "
            f"{sample.synthetic_entries}"
            + (f", IPS blocks {sample.ips_blocks}" if sample.ips_blocks is not None else "")
            + f", flows {sample.flows_survived}/{sample.flows}, "
            f"longest TCP gap {sample.longest_tcp_gap_ms} ms")


def show_summary(console: Console, summary: dict[str, Any], out: Path) -> None:
    table = Table("workload", "SC size", "mode", "downtime ms", "total ms", "wall ms",
                  "SC stop ms", "TCP gap ms", "flows", "failed",
                  title="nseh bench: medians (min-max)")
    for c in summary["cells"]:
        table.add_row(c["workload"], f"{c['size']:,}", c["mode"], span(c["downtime_ms"]),
                      span(c["total_time_ms"]), span(c["wall_ms"]),
                      span(c["sc_stop_window_ms"]), span(c["longest_tcp_gap_ms"]),
                      f"{c['flows_survived']}/{c['flows']}", f"{c['failed']}/{c['samples']}")
    console.print(table)
    if summary["ips_overheads"]:
        ips = Table("workload", "SC size", "IPS blocks", "downtime ms", "SC stop ms",
                    "wall ms", title="carrying IPS state: precopy vs precopy-noips, medians")
        for o in summary["ips_overheads"]:
            ips.add_row(o["workload"], f"{o['size']:,}", span(o["ips_blocks"]),
                        *(ratio_cell(o[key]) for key in ("downtime_ms", "sc_stop_window_ms",
                                                          "wall_ms")))
        console.print(ips)
    verdicts = Table("target", "where", "verdict", "figure", title="targets")
    for t in summary["targets"]:
        verdict = {True: "[green]met[/]", False: "[red]MISSED[/]", None: "not measured"}
        verdicts.add_row(escape(t["target"]), t["where"], verdict[t["met"]], escape(t["figure"]))
    console.print(verdicts)
    console.print(f"results in {out} (summary.md, samples.csv/json, plots); "
                  f"wall time {summary['run']['wall_s']} s")
