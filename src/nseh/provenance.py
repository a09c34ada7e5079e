"""Where a result came from: the code, the machine, the command and when it ran.

`nseh bench` and `nseh soak` put one `Provenance` record in every file they write, so a
figure quoted elsewhere can be traced to the commit and machine that produced it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The checkout this package runs from (src/nseh/ -> the repository), if it is one.
SOURCE_TREE = Path(__file__).resolve().parents[2]
QEMU = "qemu-system-x86_64"
DIRTY_PATHS_KEPT = 20


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _output(argv: list[str], cwd: Path | None = None) -> str | None:
    """The command's stdout, or None if it cannot run or fails."""
    try:
        result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=30,
                                check=False)
    except OSError:
        return None
    return result.stdout if result.returncode == 0 else None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """This machine as a result depends on it (the guest's accel is added by who starts it)."""
    qemu = _output([QEMU, "--version"])
    return {"cores": os.cpu_count(), "kernel": os.uname().release, "cpu_model": _cpu_model(),
            "qemu": qemu.splitlines()[0].strip() if qemu else None, "accel": None}


@dataclass
class Provenance:
    command: list[str]
    started_utc: str
    commit: str | None  # None: the code does not run from a git checkout
    dirty: bool | None  # uncommitted changes (tracked or untracked files) in that checkout
    dirty_paths: list[str]  # the first DIRTY_PATHS_KEPT of them, as `git status` names them
    machine: dict[str, Any] = field(default_factory=machine)
    ended_utc: str | None = None

    @classmethod
    def start(cls, tree: Path = SOURCE_TREE, argv: list[str] | None = None) -> Provenance:
        """The record of a run that starts now, of the code in `tree`."""
        commit = _output(["git", "rev-parse", "HEAD"], tree)
        status = _output(["git", "status", "--porcelain"], tree) if commit else None
        changed = [line[3:] for line in status.splitlines()] if status else []
        # orig_argv: the command as typed, interpreter and `-m` included.
        return cls(command=list(sys.orig_argv if argv is None else argv), started_utc=_now(),
                   commit=commit.strip() if commit else None,
                   dirty=None if status is None else bool(changed),
                   dirty_paths=changed[:DIRTY_PATHS_KEPT])

    def finish(self, accel: str | None = None) -> Provenance:
        self.ended_utc = _now()
        if accel:
            self.machine["accel"] = accel
        return self

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> list[str]:
        """Lines for the top of a Markdown report."""
        code = "not a git checkout" if self.commit is None else (
            f"commit `{self.commit[:12]}`"
            + (f", **dirty tree** ({', '.join(self.dirty_paths)})" if self.dirty else
               ", clean tree"))
        m = self.machine
        return [f"- code: {code}",
                f"- command: `{' '.join(self.command)}`",
                f"- UTC: {self.started_utc} to {self.ended_utc or '(not finished)'}",
                f"- machine: {m['cores']} cores ({m['cpu_model'] or 'CPU model unknown'}), "
                f"kernel {m['kernel']}, {m['qemu'] or 'QEMU not found'}, guest accel "
                f"{m['accel'] or 'not recorded'}"]
