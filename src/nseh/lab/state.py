"""What the lab made (lab.json) and what `status()` reports."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from nseh.lab.layout import LAB_STATE_FILE


class LabError(RuntimeError):
    """A lab operation that cannot be done; the message is one line."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LabHost(_Model):
    name: str
    namespace: str
    management_ipv4: IPv4Address
    management_ipv6: IPv6Address
    agent_endpoint: str
    agent_config: Path
    agent_pid: int | None = None


class LabClient(_Model):
    name: str
    namespace: str
    ipv4: IPv4Address
    ipv6: IPv6Address


class LabState(_Model):
    """The content of lab.json."""

    fabric_namespace: str
    router_ipv4: IPv4Address
    router_ipv6: IPv6Address
    hosts: list[LabHost]
    clients: list[LabClient]


class HostStatus(LabHost):
    agent_alive: bool


class LabStatus(_Model):
    """JSON-serialisable (`model_dump(mode="json")`) report of the lab."""

    # "damaged": leftovers of a lab that is not fully there (run `down`).
    state: Literal["up", "down", "damaged"]
    fabric_namespace: str | None = None
    hosts: list[HostStatus] = []
    clients: list[LabClient] = []
    problems: list[str] = []


def load_state(path: Path = LAB_STATE_FILE) -> LabState:
    try:
        return LabState.model_validate_json(path.read_text())
    except OSError as exc:
        raise LabError(f"{path}: cannot read: {exc.strerror}") from None
    except ValidationError as exc:
        raise LabError(f"{path}: not a valid lab state: {exc.errors()[0]['msg']}") from None


def save_state(state: LabState, path: Path = LAB_STATE_FILE) -> None:
    # Write then rename, so a reader never sees half a file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state.model_dump_json(indent=2))
    tmp.replace(path)
