"""The guest side of nseh: the VM image (kernel + initramfs) and the guest command channel."""

from nseh.guest.console import ExecResult, GuestConsole, GuestConsoleError
from nseh.guest.image import (
    GuestImage,
    GuestImageError,
    build_image,
    current_image,
    kernel_cmdline,
)

__all__ = [
    "ExecResult",
    "GuestConsole",
    "GuestConsoleError",
    "GuestImage",
    "GuestImageError",
    "build_image",
    "current_image",
    "kernel_cmdline",
]
