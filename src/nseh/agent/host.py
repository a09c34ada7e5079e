"""The host agent: owns this host's VMs, their virtual network and their security engines,
and serves the API the CLI and other hosts' agents use."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import signal
import socket
import ssl
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from nseh.agent.config import AgentConfig
from nseh.agent.conntrack import enable_event_generation
from nseh.agent.engines import FirewallEngine, SecurityEngine, VMScope
from nseh.agent.firewall import Firewall
from nseh.agent.ips import IpsEngine, IpsError
from nseh.agent.network import (
    NetworkError,
    claim_floating,
    create_tap,
    delete_tap,
    release_floating,
    tap_name,
)
from nseh.agent.qemu import detect_accel
from nseh.agent.vms import VM, VMError, VMState, load_all
from nseh.api.client import AgentClient, AgentError
from nseh.api.server import ApiError, ApiServer, Emit, Handler
from nseh.definition import DefinitionError, VMDefinition
from nseh.guest.console import GuestConsoleError
from nseh.guest.image import current_image
from nseh.migration.orchestrator import (
    ABORTABLE_PHASES,
    HOLDABLE_PHASES,
    SC_MODES,
    SourceMigration,
    settle_handover,
)
from nseh.migration.phases import Handover, Phase
from nseh.migration.sc_transfer import receive_sc
from nseh.sc import channel as sc_channel
from nseh.sc.pki import client_context

log = logging.getLogger(__name__)

GUEST_READY_TIMEOUT = 120.0
COMMIT_TIMEOUT = 30.0
SETTLE_RETRY = 3.0  # between attempts to learn where a handed-over VM runs
WATCH_INTERVAL = 2.0  # between checks that the VMs' QEMU processes are alive


class HostAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.host = config.host
        self.vms_dir = config.state_dir / "vms"
        self.accel = detect_accel(config.accel)
        self.firewall = Firewall()
        self.ips = IpsEngine()
        # Every security engine whose state migrates with a VM. New engines register here.
        self.engines: list[SecurityEngine] = [FirewallEngine(self.firewall), self.ips]
        self.credentials = config.credentials()
        self.vms: dict[str, VM] = {}
        # Serializes changes to the set of VMs (names, marks, addresses, ports).
        self._vms_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        self.vms_dir.mkdir(parents=True, exist_ok=True)
        self.firewall.ensure_base()
        # SC pre-copy tracks changes through conntrack events, which must exist for every
        # entry from its creation on.
        enable_event_generation()
        self._readopt()
        for vm in list(self.vms.values()):
            if vm.state == VMState.RUNNING:
                await self._claim_floating(vm)
            elif vm.state == VMState.MIGRATING:
                self._in_background(self._recover_outgoing(vm))
        self._in_background(self._watch())
        # IPS events (NFLOG) are read on the event loop: a few per new connection at most.
        self.ips.start()
        asyncio.get_running_loop().add_reader(self.ips.fileno(), self.ips.poll)
        sc_server = None
        limits = self.config.limits
        if self.credentials is not None:
            sc_server = await sc_channel.serve(
                str(self.config.management_address), self.config.sc_port, self.credentials,
                lambda channel: receive_sc(channel, self.engines, self._incoming_scope,
                                           limits.sc_entries_per_vm),
                max_frame_bytes=limits.sc_frame_bytes,
                max_entries_per_frame=limits.sc_entries_per_frame)
        api = ApiServer(self.handlers(), limits.api_request_bytes)
        servers = [await api.serve_unix(self.config.api_socket)]
        if self.config.api_port is not None:
            assert self.credentials is not None  # AgentConfig refuses api_port without TLS
            servers.append(await api.serve_tls(str(self.config.management_address),
                                               self.config.api_port, self.credentials))
        log.info("agent for host %s serving on %s%s (accel %s, %d VMs); SC channel %s",
                 self.host, self.config.api_socket,
                 f" and tls://{self.host}@{self.config.management_address}:"
                 f"{self.config.api_port}" if self.config.api_port else "",
                 self.accel, len(self.vms),
                 f"on {self.config.management_address}:{self.config.sc_port}"
                 if sc_server else "off (no TLS credentials)")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        # VMs keep running without their agent; a restarted agent re-adopts them.
        log.info("agent for host %s stopping; %d VMs keep running", self.host, len(self.vms))
        for server in servers:
            server.close()
        if sc_server is not None:
            sc_server.close()
            await sc_server.wait_closed()
        loop.remove_reader(self.ips.fileno())
        self.ips.stop()
        self.config.api_socket.unlink(missing_ok=True)

    def _readopt(self) -> None:
        self.vms = load_all(self.vms_dir)
        installed = self.firewall.installed_vms()
        for vm in self.vms.values():
            if vm.pid() is None and vm.state == VMState.INCOMING:
                continue  # the migration died with its QEMU: the watcher purges it
            if vm.pid() is None:
                vm.state = VMState.CRASHED
                vm.save()
                log.warning("VM %s: its QEMU is gone; marked crashed", vm.name)
                continue
            if installed.get(vm.name) != vm.mark:
                log.warning("VM %s: firewall policy missing; reinstalling", vm.name)
                self.firewall.install_vm(vm.definition, vm.mark)
            # The kernel kept the blocklists; detections in progress died with the old agent.
            scope = VMScope(vm.definition, vm.mark)
            self.ips.import_policy(scope, self.ips.export_policy(scope))
            log.info("re-adopted VM %s (%s, QEMU pid %s)", vm.name, vm.state, vm.pid())

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._background.discard)

    async def _recover_outgoing(self, vm: VM) -> None:
        """Finish or roll back a migration this agent was driving when it stopped, from the
        VM's record and what QEMU says: once QEMU has handed the VM over, only the
        destination can say where it runs; before that, the source still owns it."""
        try:
            status = (await vm.execute("query-migrate")).get("status")
        except VMError as exc:
            log.error("VM %s: cannot recover its migration to %s: %s", vm.name,
                      vm.migrating_to, exc)
            return
        log.info("VM %s was migrating to %s when this agent stopped; QEMU says %s",
                 vm.name, vm.migrating_to, status)
        if status == "completed":
            await self._settle_handover(vm)
            return
        with contextlib.suppress(VMError):
            if status in ("setup", "active", "device", "pre-switchover"):
                await vm.execute("migrate_cancel")
        if vm.migration_endpoint:
            try:
                await AgentClient(vm.migration_endpoint, tls=self._tls()).call(
                    "migration.abort", {"name": vm.name}, timeout=60)
            except AgentError as exc:
                # Its QEMU exits with the cancelled stream; its agent then purges the rest.
                log.warning("VM %s: could not purge %s: %s", vm.name, vm.migrating_to, exc)
        await self._keep_here(vm)

    async def _settle_handover(self, vm: VM) -> None:
        """Ask the destination until it says whether it runs `vm`; the source's copy stays
        paused meanwhile, so the VM never runs on two hosts."""
        if vm.migration_endpoint is None:
            log.error("VM %s: handed over, but its record names no destination", vm.name)
            return
        destination = AgentClient(vm.migration_endpoint, tls=self._tls())
        while (outcome := await settle_handover(vm.name, self.host, destination)
               ) == Handover.UNKNOWN:
            await asyncio.sleep(SETTLE_RETRY)
        if outcome == Handover.MOVED:
            log.info("VM %s runs on %s: releasing it here", vm.name, vm.migrating_to)
            await self._destroy(vm)
        else:
            log.info("VM %s is not on %s: resuming it here", vm.name, vm.migrating_to)
            await self._keep_here(vm)

    async def _keep_here(self, vm: VM) -> None:
        """The VM did not move: it runs here, owned by this host, again."""
        await vm.resume()
        vm.state = VMState.RUNNING
        vm.migrating_to = vm.migration_endpoint = None
        vm.save()
        await self._claim_floating(vm)

    async def _watch(self) -> None:
        """Notice QEMU processes that are gone: an incoming VM whose stream was cancelled
        (its QEMU exits) is purged; a running VM is marked crashed."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            for vm in list(self.vms.values()):
                if not vm.launched or vm.pid() is not None:
                    continue
                if vm.state == VMState.INCOMING:
                    log.warning("VM %s: its incoming QEMU exited (it said: %s); purging it",
                                vm.name, vm.qemu_said() or "nothing")
                    try:
                        await self._destroy(vm)
                    except (VMError, RuntimeError) as exc:  # the watch goes on; next time
                        log.error("VM %s: purge failed: %s", vm.name, exc)
                elif vm.state == VMState.RUNNING:
                    log.error("VM %s: its QEMU is gone (it said: %s); marked crashed", vm.name,
                              vm.qemu_said() or "nothing")
                    vm.state = VMState.CRASHED
                    vm.save()

    # -- helpers -------------------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        return {
            "host.info": self.host_info,
            "vm.list": self.vm_list,
            "vm.start": self.vm_start,
            "vm.stop": self.vm_stop,
            "vm.exec": self.vm_exec,
            "vm.migrate": self.vm_migrate,
            "firewall.counters": self.firewall_counters,
            "ips.list": self.ips_list,
            "ips.block": self.ips_block,
            "ips.unblock": self.ips_unblock,
            "migration.prepare": self.migration_prepare,
            "migration.commit": self.migration_commit,
            "migration.abort": self.migration_abort,
        }

    def _tls(self) -> ssl.SSLContext | None:
        """Client context for calling other hosts' agents over TLS, if this host has one."""
        return client_context(self.credentials) if self.credentials else None

    def _vm(self, params: dict[str, Any]) -> VM:
        name = params.get("name")
        vm = self.vms.get(name) if isinstance(name, str) else None
        if vm is None:
            raise ApiError("not-found", f"no VM named {name!r} on host {self.host}")
        return vm

    def _definition(self, params: dict[str, Any]) -> VMDefinition:
        try:
            return VMDefinition.from_json(params.get("definition"),
                                          max_policy_rules=self.config.limits.policy_rules)
        except DefinitionError as exc:
            raise ApiError("bad-definition", str(exc)) from None

    def _check_free(self, definition: VMDefinition) -> None:
        if definition.name in self.vms:
            raise ApiError("exists", f"a VM named {definition.name!r} already exists "
                                     f"on host {self.host}")
        taken = {addr: vm.name for vm in self.vms.values() for addr in vm.definition.addresses}
        for addr in definition.addresses:
            if addr in taken:
                raise ApiError("exists", f"address {addr} is already used by VM "
                                         f"{taken[addr]!r} on host {self.host}")
        for floating, _ in definition.network.floating:
            if self.config.public_interface is None:
                raise ApiError("no-public-interface",
                               f"VM {definition.name} has floating address {floating}, but host "
                               f"{self.host} has no public_interface in its agent config")
            for vm in self.vms.values():
                if any(floating == other for other, _ in vm.definition.network.floating):
                    raise ApiError("exists", f"floating address {floating} is already used "
                                             f"by VM {vm.name!r} on host {self.host}")

    async def _claim_floating(self, vm: VM) -> None:
        """Own and announce the VM's floating addresses here (it runs here now)."""
        for floating, interface in vm.definition.network.floating:
            assert self.config.public_interface is not None  # checked when the VM was created
            await asyncio.to_thread(claim_floating, floating, interface.ip,
                                    self.config.public_interface, self.config.vm_bridge)
            log.info("VM %s: floating address %s claimed and announced on %s", vm.name,
                     floating, self.config.public_interface)

    async def _release_floating(self, vm: VM) -> None:
        if self.config.public_interface is None:
            return
        for floating, interface in vm.definition.network.floating:
            await asyncio.to_thread(release_floating, floating, interface.ip,
                                    self.config.public_interface)

    def _free_mark(self) -> int:
        used = {vm.mark for vm in self.vms.values()} | set(self.firewall.installed_vms().values())
        return next(mark for mark in range(1, 1 << 16) if mark not in used)

    def _free_migration_port(self) -> int:
        address = str(self.config.management_address)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        for port in range(self.config.migration_port_base, self.config.migration_port_base + 512):
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind((address, port))
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        continue
                    raise ApiError("host", f"cannot listen on {address}: {exc.strerror}") from None
                return port
        raise ApiError("host", f"no free migration port on {address}")

    async def _create(self, definition: VMDefinition, state: VMState, emit: Emit,
                      incoming: str | None = None, incoming_from: str | None = None,
                      policies: dict[str, Any] | None = None) -> VM:
        """Policy first, then the tap, then QEMU; on any failure, undo all of it.
        `policies` (engine name -> document) come from the source host when migrating."""
        # Built beforehand (`nseh image build`, `nseh lab up`): agents may run where the
        # Debian archive is out of reach, so they never build it.
        image = current_image(self.config.guest_cache)
        async with self._vms_lock:
            self._check_free(definition)
            vm = VM(definition=definition, mark=self._free_mark(), state=state,
                    record_dir=self.vms_dir / definition.name, accel=self.accel,
                    incoming_from=incoming_from, launched=False)
            vm.record_dir.mkdir(parents=True)
            vm.save()
            self.vms[vm.name] = vm
        try:
            emit({"step": "policy", "message": f"installing the policy of {vm.name}"})
            scope = VMScope(definition, vm.mark)
            for engine in self.engines:
                document = (policies or {}).get(engine.name, engine.export_policy(scope))
                engine.import_policy(scope, document)
            # pyroute2's sync API runs its own event loop: keep it off ours.
            tap = await asyncio.to_thread(create_tap, vm.name, self.config.vm_bridge)
            emit({"step": "qemu", "message": f"starting QEMU ({self.accel})"})
            await vm.launch(image, tap, incoming=incoming)
        except Exception:
            await self._destroy(vm)
            raise
        return vm

    async def _destroy(self, vm: VM) -> None:
        """Remove every trace of `vm` from this host: QEMU, tap, policy, conntrack, record."""
        await vm.kill()
        await self._release_floating(vm)
        await asyncio.to_thread(delete_tap, vm.name)
        self.firewall.remove_vm(vm.name)
        for engine in self.engines:
            await asyncio.to_thread(engine.purge, VMScope(vm.definition, vm.mark))
        vm.forget()
        self.vms.pop(vm.name, None)
        log.info("VM %s removed from host %s", vm.name, self.host)

    # -- API: host and VMs ---------------------------------------------------------------

    async def host_info(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return {"host": self.host, "management_address": str(self.config.management_address),
                "accel": self.accel, "vms": sorted(self.vms), **_agent_memory()}

    async def vm_list(self, params: dict[str, Any], emit: Emit) -> list[dict[str, Any]]:
        return [vm.describe(self.host) for vm in self.vms.values()]

    async def vm_start(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        definition = self._definition(params)
        try:
            vm = await self._create(definition, VMState.RUNNING, emit)
        except (VMError, RuntimeError) as exc:
            raise ApiError("start-failed", str(exc)) from None
        try:
            await self._claim_floating(vm)
        except NetworkError as exc:
            await self._destroy(vm)
            raise ApiError("start-failed", str(exc)) from None
        if params.get("wait_ready", True):
            emit({"step": "boot", "message": "waiting for the guest to boot"})
            try:
                await vm.console.wait_ready(GUEST_READY_TIMEOUT)
            except GuestConsoleError as exc:
                await self._destroy(vm)
                raise ApiError("start-failed", f"{vm.name} did not boot: {exc}") from None
        log.info("VM %s started on host %s", vm.name, self.host)
        return vm.describe(self.host)

    async def vm_stop(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        vm = self._vm(params)
        if vm.state in (VMState.MIGRATING, VMState.INCOMING):
            raise ApiError("busy", f"VM {vm.name} is migrating; stop it when that ends")
        await self._destroy(vm)
        return {"name": vm.name, "host": self.host, "state": "stopped"}

    async def vm_exec(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        vm = self._vm(params)
        if vm.state not in (VMState.RUNNING, VMState.MIGRATING):
            raise ApiError("busy", f"VM {vm.name} is {vm.state} on host {self.host}")
        try:
            result = await vm.console.exec(str(params.get("command", "")),
                                           timeout=float(params.get("timeout", 30)))
        except GuestConsoleError as exc:
            raise ApiError("exec-failed", str(exc)) from None
        return {"exit_code": result.exit_code, "output": result.output}

    async def firewall_counters(self, params: dict[str, Any], emit: Emit) -> dict[str, int]:
        return self.firewall.counters()

    # -- API: IPS -------------------------------------------------------------------------

    def _ips_source(self, params: dict[str, Any]) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        try:
            return ipaddress.ip_address(params.get("source"))
        except ValueError:
            raise ApiError("bad-request", f"source {params.get('source')!r} is not an IPv4 or "
                                          "IPv6 address") from None

    async def ips_list(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        vm = self._vm(params)
        try:
            blocks = await asyncio.to_thread(self.ips.blocks, vm.name)
        except IpsError as exc:
            raise ApiError("ips", str(exc)) from None
        return {"name": vm.name, "host": self.host,
                "blocks": [{"source": str(b.source), "timeout_s": b.timeout_ms / 1000,
                            "expires_s": b.expires_ms / 1000} for b in blocks]}

    async def ips_block(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        vm, source = self._vm(params), self._ips_source(params)
        seconds = params.get("seconds")
        if seconds is not None and (type(seconds) is not int or seconds < 1):
            raise ApiError("bad-request", f"seconds {seconds!r} is not a positive integer")
        try:
            block = await asyncio.to_thread(self.ips.block, vm.name, source, seconds)
        except IpsError as exc:
            raise ApiError("ips", str(exc)) from None
        return {"name": vm.name, "source": str(block.source), "timeout_s": block.timeout_ms / 1000}

    async def ips_unblock(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        vm, source = self._vm(params), self._ips_source(params)
        try:
            removed = await asyncio.to_thread(self.ips.unblock, vm.name, source)
        except IpsError as exc:
            raise ApiError("ips", str(exc)) from None
        return {"name": vm.name, "source": str(source), "unblocked": removed}

    # -- API: migration, source side -----------------------------------------------------

    async def vm_migrate(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        vm = self._vm(params)
        destination, endpoint = params.get("destination"), params.get("destination_endpoint")
        sc_mode = params.get("sc", "none")
        if sc_mode not in SC_MODES:
            raise ApiError("bad-request", f"unknown SC mode {sc_mode!r} "
                                          f"(choose from {', '.join(SC_MODES)})")
        if not isinstance(destination, str) or not isinstance(endpoint, str):
            raise ApiError("bad-request", "vm.migrate needs destination and destination_endpoint")
        if destination == self.host:
            raise ApiError("bad-request", f"VM {vm.name} already runs on {self.host}")
        if vm.state != VMState.RUNNING:
            raise ApiError("busy", f"VM {vm.name} is {vm.state}, not running")
        abort_at, hold_at = params.get("abort_at"), params.get("hold_at")
        if abort_at not in (None, *ABORTABLE_PHASES):
            raise ApiError("bad-request", f"cannot abort in phase {abort_at!r} (choose from "
                                          f"{', '.join(ABORTABLE_PHASES)})")
        if hold_at not in (None, *HOLDABLE_PHASES):
            raise ApiError("bad-request", f"cannot hold in phase {hold_at!r} (choose from "
                                          f"{', '.join(HOLDABLE_PHASES)})")
        hold_seconds = params.get("hold_seconds", 15.0)
        if not isinstance(hold_seconds, int | float) or not 0 <= hold_seconds <= 600:
            raise ApiError("bad-request", "hold_seconds must be a number of seconds, 0 to 600")
        skip = self._skipped_engines(params.get("skip_engines") or [])
        vm.state = VMState.MIGRATING
        vm.migrating_to, vm.migration_endpoint = destination, endpoint
        vm.save()
        # A skipped engine's state stays behind; the destination still installs its policy
        # from the VM's definition (`_create`), so it protects the VM from a clean slate.
        migration = SourceMigration(vm=vm, source=self.host, destination=destination,
                                    destination_agent=AgentClient(endpoint, tls=self._tls()),
                                    sc_mode=sc_mode,
                                    engines=[e for e in self.engines if e.name not in skip],
                                    credentials=self.credentials,
                                    limits=self.config.limits, emit=emit,
                                    abort_at=Phase(abort_at) if abort_at else None,
                                    hold_at=Phase(hold_at) if hold_at else None,
                                    hold_seconds=float(hold_seconds))
        report = await migration.run()
        report["skipped_engines"] = sorted(skip)
        if migration.run_state.phase == Phase.DONE:
            await self._destroy(vm)
        elif migration.run_state.unsettled:
            self._in_background(self._settle_handover(vm))
        else:
            vm.state = VMState.RUNNING
            vm.migrating_to = vm.migration_endpoint = None
            vm.save()
        return report

    def _skipped_engines(self, names: Any) -> set[str]:
        known = [engine.name for engine in self.engines]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ApiError("bad-request", "skip_engines must be a list of engine names")
        if unknown := [n for n in names if n not in known]:
            raise ApiError("bad-request", f"unknown security engine {unknown[0]!r} "
                                          f"(choose from {', '.join(known)})")
        return set(names)

    # -- API: migration, destination side ------------------------------------------------

    async def migration_prepare(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        definition = self._definition(params)
        async with self._vms_lock:
            port = self._free_migration_port()
        address = ipaddress.ip_address(self.config.management_address)
        host = f"[{address}]" if address.version == 6 else str(address)
        uri = f"tcp:{host}:{port}"
        source, policies = params.get("source"), params.get("policies")
        if not isinstance(source, str) or not isinstance(policies, dict):
            raise ApiError("bad-request", "migration.prepare needs source and policies")
        try:
            await self._create(definition, VMState.INCOMING, emit, incoming=uri,
                               incoming_from=source, policies=policies)
        except (VMError, RuntimeError, ValueError) as exc:
            raise ApiError("prepare-failed", str(exc)) from None
        log.info("prepared incoming migration of %s from %s on %s", definition.name, source,
                 uri)
        return {"uri": uri, "tap": tap_name(definition.name),
                "sc": {"host": self.host, "address": str(address),
                       "port": self.config.sc_port} if self.credentials else None}

    def _incoming_scope(self, vm_name: str, peer: str) -> VMScope | str:
        """The scope of VM `vm_name` if this host expects its SC from `peer`, else why not."""
        vm = self.vms.get(vm_name)
        if vm is None or vm.state != VMState.INCOMING:
            return f"no incoming migration of {vm_name!r} on {self.host}"
        if vm.incoming_from != peer:
            return f"{vm_name} migrates from {vm.incoming_from}, not from {peer}"
        return VMScope(vm.definition, vm.mark)

    async def migration_commit(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """The source asks whether the VM it handed over runs here. Idempotent (the source
        asks again after a lost answer). `commit-failed` means it does not run here and has
        been purged, so the source may resume it; `not-found`: it never came."""
        vm = self._vm(params)
        scope = VMScope(vm.definition, vm.mark)
        if vm.state == VMState.RUNNING and vm.incoming_from == params.get("source"):
            # Committed before; the answer was lost.
            entries = sum([await asyncio.to_thread(e.count, scope) for e in self.engines])
            return vm.describe(self.host) | {"sc_entries": entries}
        if vm.state != VMState.INCOMING:
            raise ApiError("busy", f"VM {vm.name} is {vm.state}, not incoming")
        if problem := await vm.wait_running(COMMIT_TIMEOUT):
            if said := vm.qemu_said():
                problem += f"; QEMU said: {said}"
            await self._destroy(vm)
            log.error("VM %s does not run here after its migration (%s); purged it",
                      vm.name, problem)
            raise ApiError("commit-failed", f"VM {vm.name} does not run on {self.host} "
                                            f"({problem}); purged it there")
        try:
            # First: until the address moves, clients' packets to it reach the source.
            await self._claim_floating(vm)
        except NetworkError as exc:
            log.error("VM %s runs on %s but its floating address is not claimed: %s",
                      vm.name, self.host, exc)
        vm.state = VMState.RUNNING
        vm.save()
        log.info("VM %s now runs on host %s", vm.name, self.host)
        entries = sum([await asyncio.to_thread(e.count, scope) for e in self.engines])
        return vm.describe(self.host) | {"sc_entries": entries}

    async def migration_abort(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        vm = self.vms.get(str(params.get("name")))
        if vm is None:
            return {"aborted": False}
        if vm.state != VMState.INCOMING:
            raise ApiError("busy", f"VM {vm.name} is {vm.state} on {self.host}; not aborting")
        await self._destroy(vm)
        return {"aborted": True}


def _agent_memory() -> dict[str, float]:
    """The agent's resident memory now and its peak since it started, in MiB."""
    fields = {"VmRSS": "agent_rss_mib", "VmHWM": "agent_peak_rss_mib"}
    memory: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            memory[fields[key]] = round(int(value.split()[0]) / 1024, 1)  # kB
    return memory
