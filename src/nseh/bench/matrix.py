"""What a benchmark run measures: the matrix of cells and the order of its migrations.

A cell is (workload, SC size); each repetition of a cell migrates the VM once per SC mode.
The modes' order rotates from one repetition to the next, so that no mode always comes
first (right after a cell's set-up) or always follows the same other mode.

With `--ips-blocks N` the VM has intrusion prevention holding N blocked sources, and the
mode `precopy-noips` (precopy that leaves the IPS state behind, `--skip-engine ips`) joins
the modes: beside `precopy` it gives what carrying the IPS state costs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

WORKLOADS = ("idle", "http", "memory")
MODES = ("none", "stopcopy", "precopy")
NOIPS = "precopy-noips"
MAX_IPS_BLOCKS = 65_535  # the blocked sources' range (workloads.block_sources)


class BenchConfigError(ValueError):
    """A bad benchmark option; the message is one line."""


@dataclass(frozen=True)
class BenchConfig:
    sizes: tuple[int, ...]
    workloads: tuple[str, ...]
    modes: tuple[str, ...]
    reps: int
    # Entry counts for the SC move micro-benchmark (ctbench); empty: skip it.
    microbench_sizes: tuple[int, ...] = ()
    # Blocked sources the VM's IPS holds before each migration; None: the VM has no IPS.
    ips_blocks: int | None = None
    out: Path | None = field(default=None, compare=False)

    def validate(self) -> BenchConfig:
        if not self.sizes:
            raise BenchConfigError("--sizes: give at least one SC size")
        if any(size < 0 for size in self.sizes):
            raise BenchConfigError("--sizes: SC sizes must be 0 or more entries")
        if len(set(self.sizes)) != len(self.sizes):
            raise BenchConfigError("--sizes: a size is listed twice")
        for name, given, known in (("--workloads", self.workloads, WORKLOADS),
                                   ("--modes", self.modes, (*MODES, NOIPS))):
            if not given:
                raise BenchConfigError(f"{name}: give at least one of {', '.join(known)}")
            if unknown := [g for g in given if g not in known]:
                raise BenchConfigError(f"{name}: unknown {', '.join(unknown)} "
                                       f"(choose from {', '.join(known)})")
            if len(set(given)) != len(given):
                raise BenchConfigError(f"{name}: an entry is listed twice")
        if self.reps < 1:
            raise BenchConfigError("--reps: at least 1 repetition")
        if self.ips_blocks is None and NOIPS in self.modes:
            raise BenchConfigError(f"--modes: {NOIPS} needs --ips-blocks (the VM has no IPS "
                                   "without it)")
        if self.ips_blocks is not None and not 0 <= self.ips_blocks <= MAX_IPS_BLOCKS:
            raise BenchConfigError(f"--ips-blocks: 0 to {MAX_IPS_BLOCKS:,} blocked sources")
        return self

    @property
    def migrations(self) -> int:
        return len(self.sizes) * len(self.workloads) * len(self.modes) * self.reps


QUICK = BenchConfig(sizes=(0, 10_000), workloads=("idle", "http"), modes=MODES, reps=2,
                    microbench_sizes=(10_000,))
FULL = BenchConfig(sizes=(0, 1_000, 10_000, 100_000), workloads=WORKLOADS, modes=MODES, reps=5,
                   microbench_sizes=(10_000, 100_000))


def configure(*, quick: bool, sizes: str | None = None, workloads: str | None = None,
              modes: str | None = None, reps: int | None = None, microbench: bool = True,
              ips_blocks: int | None = None, out: Path | None = None) -> BenchConfig:
    """The preset (quick or full) with the options given on the command line applied; with
    `ips_blocks` and no `modes`, the preset's modes and `precopy-noips`."""
    config = QUICK if quick else FULL
    if sizes is not None:
        config = replace(config, sizes=tuple(_parse_size(s) for s in _split(sizes)))
    if workloads is not None:
        config = replace(config, workloads=_split(workloads))
    if modes is not None:
        config = replace(config, modes=_split(modes))
    if reps is not None:
        config = replace(config, reps=reps)
    if not microbench:
        config = replace(config, microbench_sizes=())
    if ips_blocks is not None:
        config = replace(config, ips_blocks=ips_blocks)
        if modes is None:
            config = replace(config, modes=(*config.modes, NOIPS))
    return replace(config, out=out).validate()


def _split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _parse_size(text: str) -> int:
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise BenchConfigError(f"--sizes: {text!r} is not a number of entries") from None


@dataclass(frozen=True)
class PlannedMigration:
    workload: str
    size: int
    rep: int  # 1-based
    mode: str
    order: int  # position of this mode within its repetition, 1-based


def rotated(modes: tuple[str, ...], rep: int) -> tuple[str, ...]:
    """The modes' order in repetition `rep` (1-based): rep 1 as given, then rotated right
    by one per repetition (none, stopcopy, precopy → precopy, none, stopcopy → ...)."""
    shift = (rep - 1) % len(modes)
    return modes[len(modes) - shift:] + modes[:len(modes) - shift]


def plan(config: BenchConfig) -> list[PlannedMigration]:
    """Every migration of the run, in order: workload by workload (a workload is set up once),
    size by size, repetition by repetition."""
    return [PlannedMigration(workload, size, rep, mode, order)
            for workload in config.workloads
            for size in config.sizes
            for rep in range(1, config.reps + 1)
            for order, mode in enumerate(rotated(config.modes, rep), start=1)]
