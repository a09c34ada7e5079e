"""The cluster as the CLI sees it: the inventory's hosts, reached through their agents' API."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from nseh.api.client import AgentClient, AgentError, EventHandler
from nseh.inventory import Inventory
from nseh.sc.pki import client_context


class Cluster:
    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory

    def agent(self, host: str) -> AgentClient:
        credentials = self.inventory.credentials
        return AgentClient(self.inventory.endpoint(host),
                           tls=client_context(credentials) if credentials else None)

    async def call(self, host: str, method: str, params: dict[str, Any] | None = None, *,
                   on_event: EventHandler | None = None, timeout: float | None = 300) -> Any:
        return await self.agent(host).call(method, params, on_event=on_event, timeout=timeout)

    async def list_vms(self) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """Every VM of every reachable host, and the hosts that could not be asked (→ why)."""
        hosts = sorted(self.inventory.hosts)
        answers = await asyncio.gather(*(self.call(h, "vm.list", timeout=10) for h in hosts),
                                       return_exceptions=True)
        vms: list[dict[str, Any]] = []
        unreachable: dict[str, str] = {}
        for host, answer in zip(hosts, answers, strict=True):
            if isinstance(answer, AgentError):
                unreachable[host] = str(answer)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                vms.extend(answer)
        return vms, unreachable

    async def locate(self, vm: str) -> str:
        """The host that owns `vm` (where it runs or is being migrated from)."""
        vms, unreachable = await self.list_vms()
        owners = [v["host"] for v in vms if v["name"] == vm and v["state"] != "incoming"]
        if owners:
            return str(owners[0])
        hint = f" (unreachable hosts: {', '.join(sorted(unreachable))})" if unreachable else ""
        raise AgentError("not-found", f"no VM named {vm!r} on any host{hint}")

    async def migrate(self, vm: str, destination: str, sc_mode: str, *,
                      on_event: EventHandler | None = None,
                      drills: dict[str, Any] | None = None,
                      skip_engines: Sequence[str] = ()) -> dict[str, Any]:
        """`drills`: abort_at / hold_at / hold_seconds (see `nseh migrate --help`)."""
        endpoint = self.inventory.endpoint(destination)
        source = await self.locate(vm)
        result: dict[str, Any] = await self.call(
            source, "vm.migrate",
            {"name": vm, "destination": destination, "destination_endpoint": endpoint,
             "sc": sc_mode, "skip_engines": list(skip_engines), **(drills or {})},
            on_event=on_event, timeout=900)
        return result
