"""The benchmark's figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use(): the backend must be chosen first
from matplotlib.ticker import LogLocator, NullLocator, ScalarFormatter

from nseh.bench.matrix import NOIPS

MODE_STYLE = {"none": ("tab:gray", "o"), "stopcopy": ("tab:red", "s"),
              "precopy": ("tab:blue", "^"), NOIPS: ("tab:green", "v")}


def _zero_position(sizes: list[int]) -> float:
    """Where SC size 0 goes on the log axis: a decade left of the smallest non-zero size."""
    positive = [s for s in sizes if s > 0]
    return min(positive) / 10 if positive else 1.0


def downtime_vs_size(cells: list[dict[str, Any]], path: Path) -> None:
    """QEMU downtime (median, min-max bars) against SC size, one panel per workload."""
    workloads = list(dict.fromkeys(c["workload"] for c in cells))
    sizes = sorted({c["size"] for c in cells})
    zero = _zero_position(sizes)
    figure, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4),
                                squeeze=False, sharey=True)
    for ax, workload in zip(axes[0], workloads, strict=True):
        for mode, (color, marker) in MODE_STYLE.items():
            points = sorted((c["size"], c["downtime_ms"]) for c in cells
                            if c["workload"] == workload and c["mode"] == mode
                            and c["downtime_ms"])
            if not points:
                continue
            xs = [size or zero for size, _ in points]
            medians = [d["median"] for _, d in points]
            errors = [[d["median"] - d["min"] for _, d in points],
                      [d["max"] - d["median"] for _, d in points]]
            ax.errorbar(xs, medians, yerr=errors, color=color, marker=marker, capsize=3,
                        label=mode)
        ax.set_xscale("log")
        # Log y too: stopcopy's downtime grows to ~1 s while the others stay at tens of ms.
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xticks([size or zero for size in sizes],
                      [f"{size:,}" for size in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_title(f"workload: {workload}")
        ax.set_xlabel("SC size (conntrack entries of the VM; log, 0 at the left)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("QEMU downtime (ms, log), median and min-max")
    axes[0][0].legend(title="--sc")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def sc_rates(microbench: dict[str, Any], path: Path) -> None:
    """Entries/s of each way of moving the SC, per step, start-up included (medians)."""
    runs = [r for r in microbench.get("runs", []) if "error" not in r]
    measures = (("dump", "dump"), ("insert", "insert"), ("end_to_end", "end to end"))
    colors = {"nseh": "tab:blue", "conntrack_cli": "tab:gray", "pyroute2": "tab:olive"}
    # One y scale for all panels, so that bars of different sizes compare.
    figure, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False,
                                sharey=True)
    for ax, run in zip(axes[0], runs, strict=True):
        paths = [p for p, figures in run["paths"].items() if "skipped" not in figures]
        width = 0.8 / len(paths)
        for index, name in enumerate(paths):
            xs = [m + (index - (len(paths) - 1) / 2) * width for m in range(len(measures))]
            values = [run["paths"][name][key]["per_s"] for key, _ in measures]
            ax.bar(xs, values, width, label=name, color=colors.get(name))
            for x, value in zip(xs, values, strict=True):
                ax.annotate(f"{value / 1000:.0f}k" if value >= 10_000 else f"{value / 1000:.1f}k",
                            (x, value), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(measures)), [label for _, label in measures])
        ax.set_yscale("log")
        ax.set_title(f"{run['entries']:,} entries")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("entries per second (log), start-up included")
    labelled = {label: handle for ax in axes[0]
                for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    figure.legend(labelled.values(), labelled.keys(), fontsize=8, ncol=len(labelled),
                  loc="lower center")
    figure.suptitle("Moving a VM's conntrack entries between tables (medians)")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
