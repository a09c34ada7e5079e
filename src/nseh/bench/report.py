"""Benchmark samples and what is made of them: raw files, the summary, its verdicts.

Everything here is pure (no lab): a sample is one migration's figures; the summary has, per
cell and mode, the median with min-max of each figure, the overhead of each SC mode over
`none`, and whether the project's targets are met.
"""

from __future__ import annotations

import csv
import json
import statistics
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from nseh.bench.matrix import NOIPS
from nseh.provenance import Provenance

MIB = 1 << 20


@dataclass
class Sample:
    """One migration of the benchmark, flat (one CSV row)."""

    workload: str
    size: int  # the cell's SC size (entries the VM has before the migration)
    mode: str
    rep: int
    order: int  # position of the mode within its repetition
    direction: str  # "h1->h2"
    started_utc: str
    result: str  # "migrated" | "failed"
    failure: str | None = None
    vm_host_after: str | None = None
    live_entries: int | None = None  # the VM's entries (its connections) before the top-up
    synthetic_entries: int | None = None  # added to reach `size`
    downtime_ms: float | None = None
    total_time_ms: float | None = None
    setup_time_ms: float | None = None
    ram_transferred_bytes: int | None = None
    dirty_sync_count: int | None = None
    wall_ms: float | None = None  # the whole migration, as its source agent timed it
    sc_entries: int | None = None
    sc_bytes: int | None = None
    sc_rounds: int | None = None
    sc_final_delta: int | None = None
    sc_stop_window_ms: float | None = None
    sc_pause_ms: float | None = None
    sc_rejected: int | None = None
    sc_reasons: str | None = None  # the destination's first reasons for rejecting, "; "-joined
    sc_destination_entries: int | None = None
    ips_blocks: int | None = None  # blocked sources the VM's IPS held before (--ips-blocks)
    sc_ips_records: int | None = None  # of the SC records moved, the IPS engine's
    longest_tcp_gap_ms: float | None = None  # max over the probe's TCP flows
    flows: int | None = None
    flows_survived: int | None = None
    flows_broken: int | None = None
    http_requests: int | None = None
    http_requests_per_s: float | None = None
    http_errors: int | None = None  # connect + read + write + status errors
    http_timeouts: int | None = None
    http_latency_max_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.result == "migrated"


SAMPLE_FIELDS = [f.name for f in fields(Sample)]


def _field_types() -> dict[str, tuple[type, bool]]:
    """Each sample field's base type and whether it may be None."""
    kinds = {}
    for name, hint in typing.get_type_hints(Sample).items():
        optional = isinstance(hint, types.UnionType)
        kinds[name] = (next(a for a in typing.get_args(hint) if a is not type(None))
                       if optional else hint, optional)
    return kinds


_FIELD_TYPES = _field_types()


def _from_text(name: str, text: str) -> Any:
    kind, optional = _FIELD_TYPES[name]
    if optional and text == "":
        return None
    return kind(text) if kind in (int, float) else text


def write_samples(samples: Sequence[Sample], directory: Path,
                  provenance: dict[str, Any]) -> None:
    """samples.json ({"provenance", "samples"}) and samples.csv, whose provenance leads as
    `# key: value` comment lines (pandas: `comment="#"`)."""
    (directory / "samples.json").write_text(json.dumps(
        {"provenance": provenance, "samples": [asdict(s) for s in samples]}, indent=1) + "\n")
    with (directory / "samples.csv").open("w", newline="") as stream:
        stream.writelines(f"# {key}: {json.dumps(value)}\n" for key, value in provenance.items())
        writer = csv.DictWriter(stream, fieldnames=SAMPLE_FIELDS)
        writer.writeheader()
        writer.writerows(asdict(s) for s in samples)


def read_samples_json(path: Path) -> list[Sample]:
    return [Sample(**record) for record in json.loads(path.read_text())["samples"]]


def read_samples_csv(path: Path) -> list[Sample]:
    with path.open(newline="") as stream:
        rows = csv.DictReader(line for line in stream if not line.startswith("#"))
        return [Sample(**{k: _from_text(k, v) for k, v in row.items()}) for row in rows]


# -- summary ----------------------------------------------------------------------------

# Figures summarised per cell and mode: (summary key, sample field, scale).
_FIGURES = (
    ("live_entries", "live_entries", 1),
    ("synthetic_entries", "synthetic_entries", 1),
    ("downtime_ms", "downtime_ms", 1),
    ("total_time_ms", "total_time_ms", 1),
    ("setup_time_ms", "setup_time_ms", 1),
    ("wall_ms", "wall_ms", 1),
    ("ram_transferred_mib", "ram_transferred_bytes", 1 / MIB),
    ("dirty_sync_count", "dirty_sync_count", 1),
    ("sc_entries", "sc_entries", 1),
    ("sc_rounds", "sc_rounds", 1),
    ("sc_final_delta", "sc_final_delta", 1),
    ("sc_stop_window_ms", "sc_stop_window_ms", 1),
    ("sc_pause_ms", "sc_pause_ms", 1),
    ("sc_rejected", "sc_rejected", 1),
    ("ips_blocks", "ips_blocks", 1),
    ("sc_ips_records", "sc_ips_records", 1),
    ("longest_tcp_gap_ms", "longest_tcp_gap_ms", 1),
    ("http_requests_per_s", "http_requests_per_s", 1),
    ("http_errors", "http_errors", 1),
    ("http_timeouts", "http_timeouts", 1),
    ("http_latency_max_ms", "http_latency_max_ms", 1),
)

# The targets (issue #4).
DOWNTIME_MAX_RATIO, DOWNTIME_MAX_DELTA_MS = 1.05, 1.0
DOWNTIME_TARGET_SIZES = (10_000, 100_000)
DOWNTIME_TARGET_WORKLOAD = "http"
TOTAL_MAX_RATIO, TOTAL_TARGET_SIZE = 1.10, 100_000
MOVE_MIN_SPEEDUP, INSTALL_MIN_RATE = 1.5, 250_000
AGENT_MAX_PEAK_MIB, AGENT_MEMORY_TARGET_SIZE = 150, 100_000
# Carrying the IPS state (issue #6): within the same budget, precopy vs precopy-noips.
IPS_KEYS = ("downtime_ms", "sc_stop_window_ms", "total_time_ms", "wall_ms")


def stat(values: Iterable[float | None]) -> dict[str, float] | None:
    """Median, min and max of the values that exist; None if there are none."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"median": round(statistics.median(present), 3), "min": round(min(present), 3),
            "max": round(max(present), 3), "n": len(present)}


def _cell_summary(workload: str, size: int, mode: str, group: list[Sample]) -> dict[str, Any]:
    done = [s for s in group if s.ok]
    cell: dict[str, Any] = {"workload": workload, "size": size, "mode": mode,
                            "samples": len(group), "failed": len(group) - len(done)}
    for key, name, scale in _FIGURES:
        cell[key] = stat(None if getattr(s, name) is None else getattr(s, name) * scale
                         for s in done)
    cell["flows"] = sum(s.flows or 0 for s in done)
    cell["flows_survived"] = sum(s.flows_survived or 0 for s in done)
    cell["failures"] = [s.failure for s in group if not s.ok]
    return cell


def _median(cell: dict[str, Any] | None, key: str) -> float | None:
    figure = cell.get(key) if cell else None
    return figure["median"] if figure else None


def _overhead(base: float | None, value: float | None) -> dict[str, float] | None:
    if base is None or value is None:
        return None
    return {"base": base, "value": value, "delta": round(value - base, 3),
            "ratio": round(value / base, 3) if base else None}


def overheads(cells: list[dict[str, Any]], base_mode: str = "none",
              keys: Sequence[str] = ("downtime_ms", "total_time_ms", "wall_ms")
              ) -> list[dict[str, Any]]:
    """Each SC mode's medians against `base_mode`'s in the same cell (workload, size)."""
    by_key = {(c["workload"], c["size"], c["mode"]): c for c in cells}
    rows = []
    for (workload, size, mode), cell in by_key.items():
        base = by_key.get((workload, size, base_mode))
        if mode == base_mode or base is None:
            continue
        rows.append({"workload": workload, "size": size, "mode": mode, **{
            key: _overhead(_median(base, key), _median(cell, key)) for key in keys}})
    return rows


def ips_overheads(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What carrying the IPS state costs: `precopy` against `precopy-noips`, per cell."""
    blocks = {(c["workload"], c["size"]): c["ips_blocks"] for c in cells
              if c["mode"] == "precopy"}
    return [row | {"ips_blocks": blocks[row["workload"], row["size"]]}
            for row in overheads(cells, NOIPS, IPS_KEYS) if row["mode"] == "precopy"]


def _within_budget(figure: dict[str, float] | None) -> bool | None:
    """The downtime budget: at most +1 ms or +5% (None: not measured)."""
    if figure is None:
        return None
    return figure["delta"] <= DOWNTIME_MAX_DELTA_MS or (
        figure["ratio"] is not None and figure["ratio"] <= DOWNTIME_MAX_RATIO)


def _ratio_text(over: dict[str, float]) -> str:
    ratio = f" ({(over['ratio'] - 1) * 100:+.0f}%)" if over["ratio"] is not None else ""
    return f"{over['value']:g} vs {over['base']:g} ms: {over['delta']:+.1f} ms{ratio}"


def targets(over: list[dict[str, Any]], microbench: dict[str, Any] | None,
            run_info: dict[str, Any] | None = None,
            ips_over: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """The verdict on each target: met True/False, or None when this run did not measure it."""
    verdicts: list[dict[str, Any]] = []
    info = run_info or {}
    peaks = info.get("agent_peak_rss_mib") or {}
    moved_target_size = AGENT_MEMORY_TARGET_SIZE in info.get("sizes", [])
    verdicts.append({
        "target": f"agent peak memory <= {AGENT_MAX_PEAK_MIB} MB",
        "where": "both agents, whole run"
                 + (f" (SCs of {AGENT_MEMORY_TARGET_SIZE:,} entries)" if moved_target_size else ""),
        "met": max(peaks.values()) <= AGENT_MAX_PEAK_MIB if peaks and moved_target_size else None,
        "figure": ", ".join(f"{host} {mib:,.1f} MiB" for host, mib in sorted(peaks.items()))
        or "not measured"})
    find = {(o["workload"], o["size"], o["mode"]): o for o in over}
    for size in DOWNTIME_TARGET_SIZES:
        row = find.get((DOWNTIME_TARGET_WORKLOAD, size, "precopy"))
        figure = row["downtime_ms"] if row else None
        met = _within_budget(figure)
        verdicts.append({
            "target": "precopy downtime overhead <= +5% or <= +1 ms",
            "where": f"{DOWNTIME_TARGET_WORKLOAD}, {size:,} entries", "met": met,
            "figure": "not measured" if figure is None else
            f"median downtime precopy vs none {_ratio_text(figure)}"})
    total_rows = [o for o in over if o["size"] == TOTAL_TARGET_SIZE and o["mode"] == "precopy"]
    # Judged twice: on QEMU's own total time, and on the whole migration as the operator
    # waits for it (the SC bulk copy, before QEMU's pre-copy, counts only there).
    for key, label, what in (("total_time_ms", "QEMU total time", "QEMU's total time"),
                             ("wall_ms", "wall time", "the whole migration")):
        for row in total_rows or [None]:
            figure = row[key] if row else None
            met = None if figure is None or figure["ratio"] is None else (
                figure["ratio"] <= TOTAL_MAX_RATIO)
            verdicts.append({
                "target": f"precopy {label} overhead <= +10%",
                "where": f"{row['workload'] if row else 'any workload'}, "
                         f"{TOTAL_TARGET_SIZE:,} entries ({what})",
                "met": met, "figure": "not measured" if figure is None else
                f"median {label} precopy vs none {_ratio_text(figure)}"})
    for ips in ips_over or [None]:
        figure = ips["downtime_ms"] if ips else None
        text = "not measured"
        if ips and figure:
            text = f"median downtime {_ratio_text(figure)}"
            if stop := ips["sc_stop_window_ms"]:
                text += f"; SC in the stop window {_ratio_text(stop)}"
        verdicts.append({
            "target": f"IPS state carried: precopy downtime <= +5% or <= +1 ms over {NOIPS}",
            "where": f"{ips['workload']}, {ips['size']:,} entries, "
                     f"{span(ips['ips_blocks'])} IPS blocks" if ips else "runs with --ips-blocks",
            "met": _within_budget(figure), "figure": text})
    runs = [r for r in (microbench or {}).get("runs", []) if "error" not in r]
    for run in runs or [None]:
        where = f"micro-benchmark, {run['entries']:,} entries" if run else "micro-benchmark"
        speedup = run["speedup_vs_conntrack_cli"]["end_to_end"] if run else None
        figure = "not measured"
        if run:
            nseh, cli = run["paths"]["nseh"], run["paths"]["conntrack_cli"]
            figure = (f"{speedup}x ({nseh['end_to_end']['median_s']:.3f} s vs "
                      f"{cli['end_to_end']['median_s']:.3f} s, start-up included for both)")
        verdicts.append({
            # No `|` in it: it is a cell of summary.md's Markdown table.
            "target": "SC move end to end >= 1.5x the conntrack CLI (`-L -o save` into `-R`)",
            "where": where, "met": None if speedup is None else speedup >= MOVE_MIN_SPEEDUP,
            "figure": figure})
        rate = run["nseh_install_per_s"] if run else None
        verdicts.append({
            "target": "SC install >= 250,000 entries/s (decode, scope check, insert)",
            "where": where, "met": None if rate is None else rate >= INSTALL_MIN_RATE,
            "figure": "not measured" if rate is None else
            f"{rate:,}/s (median, inside the receiving process)"})
    return verdicts


def memory_check(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Does the memory workload dirty guest RAM? Its RAM sent and dirty syncs vs idle's."""
    by_key = {(c["workload"], c["size"], c["mode"]): c for c in cells}
    checks = []
    for (workload, size, mode), cell in by_key.items():
        idle = by_key.get(("idle", size, mode))
        if workload != "memory" or idle is None:
            continue
        checks.append({"size": size, "mode": mode, **{
            key: {"idle": _median(idle, key), "memory": _median(cell, key)}
            for key in ("ram_transferred_mib", "dirty_sync_count", "downtime_ms")}})
    return checks


def _rejections(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """Migrations whose destination rejected SC records, with its reasons."""
    return [{"workload": s.workload, "size": s.size, "mode": s.mode, "rep": s.rep,
             "rejected": s.sc_rejected, "reasons": s.sc_reasons}
            for s in samples if s.sc_rejected]


def summarize(samples: Sequence[Sample], *, microbench: dict[str, Any] | None = None,
              run_info: dict[str, Any] | None = None,
              provenance: Provenance | None = None) -> dict[str, Any]:
    groups: dict[tuple[str, int, str], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.workload, sample.size, sample.mode), []).append(sample)
    cells = [_cell_summary(*key, group) for key, group in groups.items()]
    over, ips_over = overheads(cells), ips_overheads(cells)
    return {"provenance": provenance.to_json() if provenance else None,
            "run": run_info or {}, "migrations": len(samples),
            "failed": sum(not s.ok for s in samples),
            "qemu_times_missing": sum(s.ok and s.total_time_ms is None for s in samples),
            "rejections": _rejections(samples), "cells": cells, "overheads": over,
            "ips_overheads": ips_over, "targets": targets(over, microbench, run_info, ips_over),
            "memory_check": memory_check(cells), "microbench": microbench}


# -- markdown ---------------------------------------------------------------------------


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.1f}"


def span(figure: dict[str, float] | None) -> str:
    """"median (min-max)", or the median alone when all samples agree."""
    if figure is None:
        return "-"
    if figure["min"] == figure["max"]:
        return _num(figure["median"])
    return f"{_num(figure['median'])} ({_num(figure['min'])}-{_num(figure['max'])})"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**MISSED**", None: "not measured"}[met]


def ratio_cell(over: dict[str, float] | None) -> str:
    if over is None:
        return "-"
    ratio = f"x{over['ratio']:.2f}, " if over["ratio"] is not None else ""
    return f"{ratio}{over['delta']:+.1f} ms"


def to_markdown(summary: dict[str, Any]) -> str:
    run = summary["run"]
    lines = ["# nseh bench summary", ""]
    if summary["provenance"]:
        lines += Provenance(**summary["provenance"]).markdown()
    if run:
        lines += [f"- wall time {run.get('wall_s')} s",
                  f"- matrix: sizes {run.get('sizes')}, workloads {run.get('workloads')}, "
                  f"modes {run.get('modes')}, {run.get('reps')} repetitions (modes rotate "
                  "from one repetition to the next)"]
        if run.get("ips_blocks") is not None:
            lines.append(f"- the VM's IPS blocks {run['ips_blocks']:,} sources before each "
                         f"migration; {NOIPS} = precopy with `--skip-engine ips`")
        if run.get("stopped_early"):
            lines.append(f"- **stopped early**: {run['stopped_early']}")
    lines.append(f"- {summary['migrations']} migrations, {summary['failed']} failed")
    if summary["qemu_times_missing"]:
        lines.append(f"- {summary['qemu_times_missing']} completed migrations without QEMU "
                     "times (query-migrate answered 0 ms right after the `completed` event): "
                     "left out of the time figures")
    lines += ["",
              "Figures: median (min-max) over the repetitions; failed migrations excluded "
              "(counted in the last column). Times in ms.", "", "## Targets", ""]
    lines += _table(("target", "where", "verdict", "figure"),
                    ((t["target"], t["where"], _verdict(t["met"]), t["figure"])
                     for t in summary["targets"]))
    lines += ["", "## Migrations", ""]
    lines += _table(
        ("workload", "SC size", "mode", "live + synthetic entries", "QEMU downtime",
         "QEMU total", "wall", "SC in stop window", "QEMU pre-switchover pause",
         "SC entries moved", "RAM sent MiB",
         "dirty syncs", "longest TCP gap", "flows survived", "failed"),
        ((c["workload"], f"{c['size']:,}", c["mode"],
          f"{span(c['live_entries'])} + {span(c['synthetic_entries'])}",
          span(c["downtime_ms"]), span(c["total_time_ms"]), span(c["wall_ms"]),
          span(c["sc_stop_window_ms"]), span(c["sc_pause_ms"]), span(c["sc_entries"]),
          span(c["ram_transferred_mib"]), span(c["dirty_sync_count"]),
          span(c["longest_tcp_gap_ms"]), f"{c['flows_survived']}/{c['flows']}",
          f"{c['failed']}/{c['samples']}") for c in summary["cells"]))
    lines += ["", "## Overhead over `none` (ratio of medians, difference of medians)", ""]
    lines += _table(("workload", "SC size", "mode", "QEMU downtime", "QEMU total", "wall"),
                    ((o["workload"], f"{o['size']:,}", o["mode"], ratio_cell(o["downtime_ms"]),
                      ratio_cell(o["total_time_ms"]), ratio_cell(o["wall_ms"]))
                     for o in summary["overheads"]))
    if summary["ips_overheads"]:
        lines += ["", f"## Carrying IPS state (`precopy` over `{NOIPS}`)", ""]
        lines += _table(("workload", "SC size", "IPS blocks", "QEMU downtime",
                         "SC in stop window", "QEMU total", "wall"),
                        ((o["workload"], f"{o['size']:,}", span(o["ips_blocks"]),
                          *(ratio_cell(o[key]) for key in IPS_KEYS))
                         for o in summary["ips_overheads"]))
    http = [c for c in summary["cells"] if c["http_requests_per_s"]]
    if http:
        lines += ["", "## HTTP load during the migrations (wrk, 4 connections)", ""]
        lines += _table(("SC size", "mode", "requests/s", "errors", "timeouts",
                         "max latency ms"),
                        ((f"{c['size']:,}", c["mode"], span(c["http_requests_per_s"]),
                          span(c["http_errors"]), span(c["http_timeouts"]),
                          span(c["http_latency_max_ms"])) for c in http))
    if summary["memory_check"]:
        lines += ["", "## Does the memory workload dirty RAM? (medians, idle → memory)", ""]
        lines += _table(("SC size", "mode", "RAM sent MiB", "dirty syncs", "QEMU downtime"),
                        ((f"{m['size']:,}", m["mode"], *(
                            f"{_num(m[k]['idle'])} → {_num(m[k]['memory'])}"
                            for k in ("ram_transferred_mib", "dirty_sync_count", "downtime_ms")))
                         for m in summary["memory_check"]))
    lines += _microbench_lines(summary["microbench"])
    if summary["rejections"]:
        lines += ["", "## SC records the destination rejected", ""]
        lines += [f"- {r['workload']}, {r['size']:,} entries, {r['mode']} rep {r['rep']}: "
                  f"{r['rejected']} rejected: {r['reasons']}" for r in summary["rejections"]]
    failures = [(c["workload"], c["size"], c["mode"], f) for c in summary["cells"]
                for f in c["failures"]]
    if failures:
        lines += ["", "## Failed migrations", ""]
        lines += [f"- {w}, {s:,} entries, {m}: {f}" for w, s, m, f in failures]
    return "\n".join(lines) + "\n"


def _microbench_lines(microbench: dict[str, Any] | None) -> list[str]:
    if not microbench:
        return []
    lines = ["", "## SC move micro-benchmark (`python -m nseh.agent.ctbench`)", "",
             "Moving the VM's entries from one conntrack table to another; every step a fresh "
             "process, start-up included for all; medians (s) of the runs in microbench.json.",
             ""]
    rows = []
    for run in microbench.get("runs", []):
        if "error" in run:
            rows.append((f"{run['entries']:,}", f"failed: {run['error']}", *[""] * 6))
            continue
        for path, figures in run["paths"].items():
            if "skipped" in figures:
                rows.append((f"{run['entries']:,}", path, f"skipped: {figures['skipped']}",
                             *[""] * 5))
                continue
            inside = figures["inside_process"].get("insert.install_s")
            rows.append((f"{run['entries']:,}", path,
                         *(f"{figures[m]['median_s']:.3f}" for m in
                           ("dump", "insert", "end_to_end", "empty_dump")),
                         f"{figures['transfer_bytes']:,}",
                         f"{inside['per_s']:,}" if inside else "-"))
    lines += _table(("entries", "path", "dump s", "insert s", "end to end s",
                     "start-up (empty dump) s", "bytes moved", "install/s inside"), rows)
    return lines
