"""The QEMU command line of a VM, and the files a running VM keeps in its run directory.

Both ends of a live migration build the command from the same definition and guest image,
so the device configuration matches; only the run directory, the tap and `-incoming` differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nseh.definition import VMDefinition
from nseh.guest.image import GuestImage, kernel_cmdline

QEMU_BINARY = "qemu-system-x86_64"
# Versioned, so a newer QEMU on the other end of a migration emulates the same hardware.
MACHINE_TYPE = "pc-i440fx-7.2"
CPU_MODEL = "qemu64"  # migratable under TCG and KVM alike, unlike "host" or "max"
ACCELERATORS = ("auto", "kvm", "tcg")
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL


class QemuConfigError(ValueError):
    """A VM cannot be started as asked; the message is one line."""


@dataclass(frozen=True)
class VMRunFiles:
    """The files of one running VM, all in its run directory."""

    run_dir: Path

    @property
    def qmp(self) -> Path:
        """QMP socket (server; for the qemu.qmp library)."""
        return self.run_dir / "qmp.sock"

    @property
    def console(self) -> Path:
        """Kernel console (ttyS0) output."""
        return self.run_dir / "console.log"

    @property
    def guest_socket(self) -> Path:
        """Guest command channel (ttyS1), see nseh.guest.console."""
        return self.run_dir / "guest.sock"

    @property
    def log(self) -> Path:
        """QEMU's own messages (`-D`: a daemonized QEMU writes its errors there, e.g. why an
        incoming migration failed to load, instead of to /dev/null)."""
        return self.run_dir / "qemu.log"

    @property
    def pidfile(self) -> Path:
        """PID of the daemonized QEMU."""
        return self.run_dir / "qemu.pid"


def kvm_usable() -> bool:
    # /dev/kvm alone is not enough: a PVM-only KVM (kvm_pvm) hangs stock guest kernels.
    return Path("/dev/kvm").exists() and any(
        Path("/sys/module", module).exists() for module in ("kvm_intel", "kvm_amd"))


def detect_accel(preference: str = "auto") -> str:
    """The accelerator to use: "kvm" or "tcg"; "auto" picks KVM when it is usable."""
    if preference not in ACCELERATORS:
        raise QemuConfigError(f"unknown accelerator {preference!r} (expected auto, kvm or tcg)")
    if preference == "tcg":
        return "tcg"
    if kvm_usable():
        return "kvm"
    if preference == "kvm":
        raise QemuConfigError(
            "accelerator kvm requested but KVM is not usable here (needs /dev/kvm and the "
            "kvm_intel or kvm_amd module); use tcg")
    return "tcg"


def qemu_command(*, image: GuestImage, definition: VMDefinition, tap: str, run_dir: Path,
                 accel: str, incoming: str | None = None) -> list[str]:
    """argv that starts the VM daemonized, attached to the existing tap device `tap`.

    run_dir must exist; QEMU creates the files of `VMRunFiles(run_dir)` in it.
    """
    if accel not in ("kvm", "tcg"):
        raise QemuConfigError(f"accelerator must be kvm or tcg, not {accel!r}")
    files = VMRunFiles(run_dir)
    for socket in (files.qmp, files.guest_socket):
        if len(str(socket).encode()) > _UNIX_PATH_MAX:
            raise QemuConfigError(f"run directory {run_dir} is too long for a unix socket path")
    argv = [
        QEMU_BINARY,
        "-name", f"guest={_opt(definition.name)},process=nseh-{definition.name}",
        "-daemonize", "-pidfile", str(files.pidfile), "-D", str(files.log),
        "-nodefaults", "-no-user-config", "-display", "none",
        # A guest that panics or reboots stops instead of looping (init.sh is PID 1).
        "-no-reboot",
        "-machine", MACHINE_TYPE, "-accel", accel, "-cpu", CPU_MODEL,
        "-m", str(definition.memory_mib), "-smp", str(definition.vcpus),
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", kernel_cmdline(definition),
        "-chardev", f"socket,id=qmp,path={_opt(files.qmp)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        # The first -serial is the guest's ttyS0 (kernel console), the second its ttyS1.
        "-chardev", f"file,id=console,path={_opt(files.console)}",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=guest,path={_opt(files.guest_socket)},server=on,wait=off",
        "-serial", "chardev:guest",
        "-netdev", f"tap,id=net0,ifname={_opt(tap)},script=no,downscript=no",
        # romfile= skips the PXE option ROM: the kernel is loaded directly.
        "-device", f"virtio-net-pci,netdev=net0,mac={definition.mac},romfile=",
    ]
    if incoming is not None:
        argv += ["-incoming", incoming]
    return argv


def _opt(value: object) -> str:
    # QEMU option values escape commas by doubling them.
    return str(value).replace(",", ",,")
