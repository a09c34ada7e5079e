"""The host agent's configuration: one TOML file per hypervisor host.

On a real host the operator writes it (e.g. /etc/nseh/agent.toml); the lab writes one per
namespace host.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nseh.api.protocol import MAX_MESSAGE_BYTES
from nseh.definition import DEFAULT_MAX_POLICY_RULES
from nseh.guest.image import DEFAULT_CACHE_DIR
from nseh.migration.sc_transfer import DEFAULT_MAX_SC_ENTRIES
from nseh.oneline import first_validation_error, read_toml
from nseh.sc.pki import HostCredentials
from nseh.sc.wire import (
    DEFAULT_MAX_ENTRIES_PER_FRAME,
    DEFAULT_MAX_FRAME_BYTES,
    MAX_FRAME_BYTES,
    MIN_FRAME_BYTES,
)


class AgentConfigError(ValueError):
    """An agent configuration that cannot be used; the message is one line."""


class Limits(BaseModel):
    """What the agent accepts from peers and clients (the optional `[limits]` table). Input
    beyond a limit is refused with an error that names it, e.g. `limits.sc_frame_bytes`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # One SC frame, header included; a source also sizes the frames it sends by it.
    sc_frame_bytes: int = Field(default=DEFAULT_MAX_FRAME_BYTES, ge=MIN_FRAME_BYTES,
                                le=MAX_FRAME_BYTES)
    # Entries (or deletions) in one SC frame; a source also batches by it.
    sc_entries_per_frame: int = Field(default=DEFAULT_MAX_ENTRIES_PER_FRAME, ge=1)
    # Entries an incoming migration may create for its VM, over all rounds.
    sc_entries_per_vm: int = Field(default=DEFAULT_MAX_SC_ENTRIES, ge=1)
    # One API request line (the agent's answers are bounded by the protocol's maximum).
    api_request_bytes: int = Field(default=MAX_MESSAGE_BYTES, ge=1024, le=MAX_MESSAGE_BYTES)
    # Allow rules (inbound and outbound) of one VM's policy, for vm.start and migrations.
    policy_rules: int = Field(default=DEFAULT_MAX_POLICY_RULES, ge=0)


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")
    state_dir: Path
    # Local API for the CLI (a unix socket path works across network namespaces).
    api_socket: Path
    # Address that incoming migration streams (QEMU, SC) are accepted on.
    management_address: ipaddress.IPv4Address | ipaddress.IPv6Address
    vm_bridge: str = "br-vm"
    # Where this host owns and announces its VMs' floating addresses; VMs with a floating
    # address cannot run on a host without one.
    public_interface: str | None = None
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    guest_cache: Path = DEFAULT_CACHE_DIR  # built by `nseh image build`
    migration_port_base: int = Field(default=49152, ge=1024, le=65000)
    # The SC channel: TLS on management_address:sc_port, certificates from the cluster CA.
    sc_port: int = Field(default=7470, ge=1, le=65535)
    # The API on management_address:api_port too (mutual TLS), for CLIs and agents on other
    # machines; off when absent.
    api_port: int | None = Field(default=None, ge=1, le=65535)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_revoked: Path | None = None  # serial numbers the cluster CA revoked, one per line
    limits: Limits = Limits()

    @model_validator(mode="after")
    def _api_port_needs_tls(self) -> AgentConfig:
        if self.api_port is not None and self.credentials() is None:
            raise ValueError("api_port needs tls_cert, tls_key and tls_ca")
        return self

    def credentials(self) -> HostCredentials | None:
        """The host's SC-channel credentials, or None if TLS is not configured."""
        if self.tls_cert is None or self.tls_key is None or self.tls_ca is None:
            return None
        return HostCredentials(host=self.host, cert_path=self.tls_cert, key_path=self.tls_key,
                               ca_path=self.tls_ca, revoked_path=self.tls_revoked)

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        try:
            return cls.model_validate(read_toml(path, AgentConfigError))
        except ValidationError as exc:
            raise AgentConfigError(f"{path}: {first_validation_error(exc)}") from None

    def save(self, path: Path) -> None:
        path.write_text(tomli_w.dumps(self.model_dump(mode="json", exclude_none=True)))
