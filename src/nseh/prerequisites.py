"""What nseh needs installed besides its Python packages, with the Debian package of each.

Commands check it before they start anything, so that a missing program is one line naming
the package to install, not a failure halfway through building a lab or starting a VM.
"""

from __future__ import annotations

import ctypes
import shutil

# Program -> the Debian package that installs it (scripts/setup.sh installs them all).
AGENT_PROGRAMS = {"qemu-system-x86_64": "qemu-system-x86", "ss": "iproute2"}
LAB_PROGRAMS = {**AGENT_PROGRAMS, "ip": "iproute2", "sysctl": "procps"}
BENCH_PROGRAMS = {**LAB_PROGRAMS, "wrk": "wrk", "conntrack": "conntrack"}
# The agents' firewall and IPS drive nftables through this library (pip-nftables loads it).
NFTABLES_LIBRARY = "libnftables.so.1"
NFTABLES_PACKAGE = "libnftables1"


class MissingPrerequisite(RuntimeError):
    """Something to install is missing; the message is one line naming the packages."""


def require(programs: dict[str, str]) -> None:
    """Raise MissingPrerequisite unless `programs` are on PATH and libnftables loads."""
    missing = {program: package for program, package in programs.items()
               if shutil.which(program) is None}
    try:
        ctypes.CDLL(NFTABLES_LIBRARY)
    except OSError:
        missing[NFTABLES_LIBRARY] = NFTABLES_PACKAGE
    if missing:
        packages = " ".join(sorted(set(missing.values())))
        raise MissingPrerequisite(
            f"not found: {', '.join(missing)}; install with `apt-get install {packages}` "
            "(or run scripts/setup.sh)")
