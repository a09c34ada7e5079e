"""The inventory: which hosts exist and how to reach each host's agent.

A TOML file::

    [hosts.h1]
    agent = "unix:///run/nseh/lab/h1/agent.sock"     # or "tls://h1@10.99.0.1:7471"

    [tls]                     # the CLI's own certificate, for tls:// agents
    cert = "/etc/nseh/tls/admin.pem"
    key = "/etc/nseh/tls/admin-key.pem"
    ca = "/etc/nseh/tls/ca.pem"

The lab writes one; on real hosts the operator does. The CLI finds it through
`--inventory`, then $NSEH_INVENTORY, then the running lab's, then /etc/nseh/inventory.toml.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from nseh.sc.pki import HostCredentials

LAB_INVENTORY = Path("/run/nseh/lab/inventory.toml")
SYSTEM_INVENTORY = Path("/etc/nseh/inventory.toml")


class InventoryError(ValueError):
    """No usable inventory, or an unknown host; the message is one line."""


@dataclass(frozen=True)
class Inventory:
    hosts: dict[str, str]  # host name -> agent endpoint URL
    path: Path | None = None
    credentials: HostCredentials | None = None  # for tls:// endpoints

    def endpoint(self, host: str) -> str:
        try:
            return self.hosts[host]
        except KeyError:
            known = ", ".join(sorted(self.hosts)) or "none"
            raise InventoryError(f"unknown host {host!r} (known hosts: {known})") from None

    def save(self, path: Path) -> None:
        path.write_text(tomli_w.dumps({"hosts": {h: {"agent": e} for h, e in self.hosts.items()}}))

    @classmethod
    def load(cls, path: Path) -> Inventory:
        try:
            data = tomllib.loads(path.read_text())
            hosts = {name: str(entry["agent"]) for name, entry in data.get("hosts", {}).items()}
            tls = data.get("tls")
            credentials = None if tls is None else HostCredentials(
                host="cli", cert_path=Path(tls["cert"]), key_path=Path(tls["key"]),
                ca_path=Path(tls["ca"]))
        except OSError as exc:
            raise InventoryError(f"{path}: cannot read: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise InventoryError(f"{path}: not a valid inventory: {exc}") from None
        return cls(hosts=hosts, path=path, credentials=credentials)

    @classmethod
    def find(cls, explicit: Path | None = None) -> Inventory:
        if explicit is not None:
            return cls.load(explicit)
        env = os.environ.get("NSEH_INVENTORY")
        if env:
            return cls.load(Path(env))
        for candidate in (LAB_INVENTORY, SYSTEM_INVENTORY):
            if candidate.exists():
                return cls.load(candidate)
        raise InventoryError(
            "no inventory: start the lab (`nseh lab up`), pass --inventory, "
            f"or write {SYSTEM_INVENTORY}")
