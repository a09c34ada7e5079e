"""The `nseh` command line. It talks to host agents through their API (never by reaching into
a host itself), so the same commands drive the one-machine lab and real hosts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import traceback
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from typer.core import TyperGroup

from nseh.api.client import AgentError
from nseh.cluster import Cluster
from nseh.definition import DefinitionError, load_definition
from nseh.guest.image import CACHE_ENV, DEFAULT_CACHE_DIR
from nseh.inventory import Inventory, InventoryError
from nseh.oneline import one_line
from nseh.prerequisites import BENCH_PROGRAMS, LAB_PROGRAMS, MissingPrerequisite, require
from nseh.sc.pki import PkiError

if TYPE_CHECKING:
    from nseh.guest.image import CachedImage
    from nseh.lab import LabStatus


class OneLineErrors(TyperGroup):
    """The last resort behind the commands' own error handling: Ctrl-C (and SIGTERM, which
    `interrupt_on_signals` turns into the same) ends with one line and exit status 130; any
    other unexpected exception with one line and status 1, its traceback in `error_log()`."""

    def invoke(self, ctx: typer.Context) -> Any:
        interrupt_on_signals()
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # exit statuses and usage errors: typer reports them
        except KeyboardInterrupt:
            print_error("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:
            print_error(f"internal error: {type(exc).__name__}: {one_line(str(exc))} "
                        f"({save_traceback(exc)})")
            raise typer.Exit(1) from None


app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False, cls=OneLineErrors)
lab_app = typer.Typer(help="The embedded one-machine lab: hosts and clients as namespaces.",
                      no_args_is_help=True)
vm_app = typer.Typer(help="Start, stop, list VMs and run commands inside them.",
                     no_args_is_help=True)
app.add_typer(lab_app, name="lab")
host_app = typer.Typer(help="Ask a host's agent about the host.", no_args_is_help=True)
pki_app = typer.Typer(help="The cluster CA and the hosts' certificates for the SC channel.",
                      no_args_is_help=True)
app.add_typer(pki_app, name="pki")
app.add_typer(vm_app, name="vm")
app.add_typer(host_app, name="host")
ips_app = typer.Typer(help="A VM's intrusion prevention: its blocked sources.",
                      no_args_is_help=True)
app.add_typer(ips_app, name="ips")

out = Console()
err = Console(stderr=True)
T = TypeVar("T")
FLOATING_FIELDS = ("floating_ipv4", "floating_ipv6")  # of a VM as the agents describe it

JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
InventoryOption = Annotated[
    Path | None,
    typer.Option("--inventory", envvar="NSEH_INVENTORY",
                 help="Inventory of hosts (default: the running lab's, then "
                      "/etc/nseh/inventory.toml)."),
]


def print_error(message: str) -> None:
    err.print(f"[bold red]nseh: error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def fail(message: str) -> NoReturn:
    print_error(message)
    raise typer.Exit(1)


def describe(exc: Exception) -> str:
    """An expected error as one line; an OSError as 'path: what went wrong'."""
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return one_line(str(exc))


def error_log() -> Path:
    """Where tracebacks of internal errors go: $XDG_STATE_HOME/nseh if set, else
    /var/log/nseh for root and ~/.local/state/nseh for other users."""
    if state := os.environ.get("XDG_STATE_HOME"):
        return Path(state) / "nseh" / "errors.log"
    if os.geteuid() == 0:
        return Path("/var/log/nseh/errors.log")
    return Path.home() / ".local" / "state" / "nseh" / "errors.log"


def save_traceback(exc: Exception) -> str:
    """Append the command line and `exc`'s traceback to the error log; say where (or why
    not) for the error line."""
    log = error_log()
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as file:
            file.write(f"{datetime.now(UTC).isoformat(timespec='seconds')} "
                       f"{' '.join(sys.argv)}\n{''.join(traceback.format_exception(exc))}\n")
    except OSError as why:
        return f"traceback not saved: cannot write {log}: {why.strerror}"
    return f"traceback in {log}"


def needs_root(command: str) -> None:
    """Refuse before anything happens: `command` builds or removes a lab."""
    if os.geteuid() != 0:
        fail(f"nseh {command} needs root (the lab is namespaces, QEMU and nftables)")


def needs_installed(programs: dict[str, str]) -> None:
    try:
        require(programs)
    except MissingPrerequisite as exc:
        fail(str(exc))


def interrupt_on_signals() -> None:
    """Ctrl-C and `kill` raise KeyboardInterrupt in this process, so that every command gets
    the clean-up it does on failure (lab down, QEMU stopped). A child forked from this process
    (pyroute2 forks one to open a socket in a namespace, and stops it with SIGTERM) exits at
    once instead: unwinding through this process's stack, it would run that clean-up too and
    tear down the lab its parent is still building."""
    owner = os.getpid()

    def interrupt(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupt)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run an async CLI action; known failures become a one-line error."""
    try:
        return asyncio.run(coroutine)
    except (AgentError, InventoryError, DefinitionError, PkiError) as exc:
        fail(str(exc))


def cluster(inventory: Path | None) -> Cluster:
    try:
        return Cluster(Inventory.find(inventory))
    except InventoryError as exc:
        fail(str(exc))


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def show_event(event: dict[str, Any]) -> None:
    if "message" in event:
        err.print(f"  [dim]{event.get('phase') or event.get('step', '')}[/] "
                  f"{escape(event['message'])}",
                  highlight=False)


# -- lab --------------------------------------------------------------------------------


@lab_app.command("up")
def lab_up(hosts: Annotated[int, typer.Option(help="Hypervisor hosts to create.")] = 2,
           clients: Annotated[int, typer.Option(help="Client nodes to create.")] = 1,
           guest_cache: Annotated[Path, typer.Option(
               envvar=CACHE_ENV, help="Guest image cache of the lab's agents; the image is "
                                      "built there first if missing.")] = DEFAULT_CACHE_DIR,
           as_json: JsonOption = False) -> None:
    """Create the lab: hosts (with their agents) and clients joined by a fabric switch."""
    from nseh import lab

    needs_root("lab up")
    needs_installed(LAB_PROGRAMS)
    try:
        with err.status(f"creating a lab of {hosts} hosts and {clients} clients") as spinner:
            status = lab.up(hosts=hosts, clients=clients, guest_cache=guest_cache,
                            progress=spinner.update)
    except lab.LabError as exc:
        fail(str(exc))
    show_lab(status, as_json)


@lab_app.command("down")
def lab_down() -> None:
    """Remove the lab: every namespace, link, process and file it made (VMs included)."""
    from nseh import lab

    needs_root("lab down")
    try:
        with err.status("removing the lab"):
            lab.down()
    except lab.LabError as exc:
        fail(str(exc))
    err.print("lab removed")


@lab_app.command("status")
def lab_status(as_json: JsonOption = False) -> None:
    """Show the lab's hosts and clients with their namespaces and addresses."""
    from nseh import lab

    show_lab(lab.status(), as_json)


def show_lab(status: LabStatus, as_json: bool) -> None:
    if as_json:
        print_json(status.model_dump(mode="json"))
        return
    out.print(f"lab is {status.state}")
    for problem in status.problems:
        err.print(f"[yellow]problem:[/] {escape(problem)}", highlight=False)
    if not status.hosts and not status.clients:
        return
    table = Table("node", "namespace", "addresses", "agent")
    for host in status.hosts:
        table.add_row(host.name, host.namespace,
                      f"{host.management_ipv4}, {host.management_ipv6}",
                      f"{host.agent_endpoint} ({'alive' if host.agent_alive else 'DOWN'})")
    for client in status.clients:
        table.add_row(client.name, client.namespace, f"{client.ipv4}, {client.ipv6}", "")
    out.print(table)


# -- guest image ------------------------------------------------------------------------

image_app = typer.Typer(help="The guest image VMs boot: Debian's kernel and an initramfs built "
                             "from Debian packages.", no_args_is_help=True)
app.add_typer(image_app, name="image")
CacheOption = Annotated[Path, typer.Option(
    "--cache", envvar=CACHE_ENV, help="The guest image cache (the agents' `guest_cache`).")]


@image_app.command("build")
def image_build(cache: CacheOption = DEFAULT_CACHE_DIR, as_json: JsonOption = False) -> None:
    """Build the guest image (unless built) and make it the one agents boot.

    Needs the Debian archive: run it on each host (agents never build the image).
    """
    from nseh.guest.image import GuestImageError, build_image

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task("guest image", total=None)

        def step(message: str) -> None:
            progress.console.print(f"  [dim]image[/] {escape(message)}", highlight=False)
            progress.update(task, description=message)

        try:
            result = build_image(cache, step)
        except GuestImageError as exc:
            fail(str(exc))
        except OSError as exc:  # e.g. the disk filled up while building
            fail(f"cannot build the guest image in {cache}: {exc.filename}: {exc.strerror}")
    if as_json:
        print_json({"cache": str(cache), "key": result.key, "kernel": str(result.image.kernel),
                    "initrd": str(result.image.initrd), "built": result.built,
                    "downloaded_bytes": result.downloaded_bytes,
                    "seconds": round(result.seconds, 1)})
        return
    fetched = (f"{result.downloaded_bytes / 1e6:.1f} MB downloaded" if result.downloaded_bytes
               else "packages from the cache")
    done = f"built in {result.seconds:.1f} s ({fetched})" if result.built else "was built already"
    out.print(f"guest image {result.key[:24]} {done}; current in {cache}: "
              f"{result.image.kernel.parent}", highlight=False)


@image_app.command("show")
def image_show(cache: CacheOption = DEFAULT_CACHE_DIR, as_json: JsonOption = False) -> None:
    """Show the current guest image, the other images in the cache and the cached packages."""
    from nseh.guest.image import build_command, cache_contents, plan_prune

    contents = cache_contents(cache)
    current = contents.current
    unused = plan_prune(contents).debs
    debs = {"files": len(contents.debs), "bytes": sum(d.stat().st_size for d in contents.debs),
            "unused_files": len(unused), "unused_bytes": sum(d.stat().st_size for d in unused)}
    if as_json:
        print_json({"cache": str(cache), "current": current and image_json(current),
                    "others": [image_json(i) for i in contents.images if not i.current],
                    "debs": debs})
        return
    if current is None:
        out.print(f"no current guest image in {cache}: `{build_command(cache)}` builds it",
                  highlight=False)
    else:
        out.print(f"current guest image {current.name}, built {utc(current.built_at)}, "
                  f"{current.size_bytes / 1e6:.1f} MB: {current.path}", highlight=False)
        out.print(f"  {len(current.packages)} packages: " + ", ".join(
            deb.removesuffix(".deb").replace("%3a", ":").replace("_", " ", 1).rsplit("_", 1)[0]
            for deb in sorted(current.packages.values())), highlight=False)
        if current.used_by:
            out.print(f"  in use by process {', '.join(map(str, current.used_by))}")
    others = [image for image in contents.images if not image.current]
    if others:
        table = Table("other image", "built", "MB", "in use by", title=f"images in {cache}")
        for image in others:
            table.add_row(image.name, utc(image.built_at), f"{image.size_bytes / 1e6:.1f}",
                          ", ".join(map(str, image.used_by)) or "-")
        out.print(table)
    out.print(f".deb files: {debs['files']} ({debs['bytes'] / 1e6:.1f} MB), "
              f"{debs['unused_files']} of them ({debs['unused_bytes'] / 1e6:.1f} MB) not used "
              "by the current image", highlight=False)


@image_app.command("prune")
def image_prune(cache: CacheOption = DEFAULT_CACHE_DIR, as_json: JsonOption = False) -> None:
    """Remove images but the current one, and the packages it is not built from.

    Images a running process (QEMU) boots from are kept.
    """
    from nseh.guest.image import GuestImageError, prune_cache

    try:
        result = prune_cache(cache)
    except GuestImageError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot prune {cache}: {exc.filename}: {exc.strerror}")
    if as_json:
        print_json({"cache": str(cache), "removed_images": result.removed_images,
                    "removed_debs": result.removed_debs, "freed_bytes": result.freed_bytes,
                    "kept_in_use": [{"name": i.name, "used_by": list(i.used_by)}
                                    for i in result.kept_in_use]})
        return
    images, debs = len(result.removed_images), len(result.removed_debs)
    out.print(f"removed {images} image{'s' * (images != 1)} and {debs} .deb file"
              f"{'s' * (debs != 1)} from {cache}: {result.freed_bytes / 1e6:.1f} MB freed",
              highlight=False)
    for image in result.kept_in_use:
        out.print(f"kept image {image.name}: in use by process "
                  f"{', '.join(map(str, image.used_by))}", highlight=False)


def image_json(image: CachedImage) -> dict[str, Any]:
    return {"name": image.name, "path": str(image.path), "key": image.key,
            "size_bytes": image.size_bytes, "built_at": utc(image.built_at),
            "packages": image.packages, "used_by": list(image.used_by)}


def utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- VMs --------------------------------------------------------------------------------


@vm_app.command("start")
def vm_start(
    name: Annotated[str, typer.Argument(help="VM name (overrides the definition's).")],
    host: Annotated[str, typer.Option("--host", "-H", help="Host to run it on.")],
    definition: Annotated[Path, typer.Option("--definition", "-d",
                                             help="VM definition (TOML).")],
    no_wait: Annotated[bool, typer.Option("--no-wait",
                                          help="Return once QEMU runs, before boot.")] = False,
    inventory: InventoryOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start a VM on a host, behind its firewall policy."""
    try:
        defn = load_definition(definition, name=name)
    except DefinitionError as exc:
        fail(str(exc))
    c = cluster(inventory)

    async def start() -> dict[str, Any]:
        vms, _ = await c.list_vms()
        for other in vms:
            if other["name"] == name:
                raise AgentError("exists", f"a VM named {name!r} already runs on {other['host']}")
            used = {a.split("/")[0] for a in (other["ipv4"], other["ipv6"]) if a}
            for address in map(str, defn.addresses):
                if address in used:
                    raise AgentError("exists", f"address {address} is already used by VM "
                                               f"{other['name']!r} on host {other['host']}")
        with err.status(f"starting {name} on {host}"):
            return dict(await c.call(host, "vm.start",
                                     {"definition": defn.to_json(), "wait_ready": not no_wait},
                                     on_event=show_event))

    vm = run(start())
    if as_json:
        print_json(vm)
    else:
        addresses = " ".join(filter(None, (vm["ipv4"], vm["ipv6"])))
        floating = "".join(f", floating {vm[key]}" for key in FLOATING_FIELDS if vm.get(key))
        out.print(f"{vm['name']} runs on {vm['host']} ({addresses}{floating})")


@vm_app.command("stop")
def vm_stop(name: str, inventory: InventoryOption = None, as_json: JsonOption = False) -> None:
    """Stop a VM and remove its policy, tap and conntrack state from its host."""
    c = cluster(inventory)

    async def stop() -> dict[str, Any]:
        return dict(await c.call(await c.locate(name), "vm.stop", {"name": name}))

    result = run(stop())
    print_json(result) if as_json else out.print(f"{name} stopped on {result['host']}")


@vm_app.command("list")
def vm_list(inventory: InventoryOption = None, as_json: JsonOption = False) -> None:
    """List the VMs of every host (exit status 1 if no host's agent answered)."""
    nodes = cluster(inventory)
    vms, unreachable = run(nodes.list_vms())
    if unreachable and unreachable.keys() == nodes.inventory.hosts.keys():
        fail("no host's agent answered: " + "; ".join(f"{host}: {why}" for host, why
                                                         in sorted(unreachable.items())))
    if as_json:
        print_json({"vms": vms, "unreachable": unreachable})
    else:
        table = Table("name", "host", "state", "ipv4", "ipv6", "floating", "mac")
        for vm in sorted(vms, key=lambda v: (v["name"], v["host"])):
            table.add_row(vm["name"], vm["host"], vm["state"], vm["ipv4"] or "",
                          vm["ipv6"] or "",
                          " ".join(vm[key] for key in FLOATING_FIELDS if vm.get(key)), vm["mac"])
        out.print(table)
    for host, why in unreachable.items():
        err.print(f"[yellow]warning:[/] host {host}: {escape(why)}", highlight=False)


@vm_app.command("exec", context_settings={"ignore_unknown_options": True})
def vm_exec(name: str,
            command: Annotated[list[str], typer.Argument(help="Command (after --).")],
            timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 30.0,
            inventory: InventoryOption = None, as_json: JsonOption = False) -> None:
    """Run a shell command inside a VM's guest, e.g. `nseh vm exec web1 -- ip addr`."""
    c = cluster(inventory)

    async def execute() -> dict[str, Any]:
        return dict(await c.call(await c.locate(name), "vm.exec",
                                 {"name": name, "command": " ".join(command),
                                  "timeout": timeout}, timeout=timeout + 10))

    result = run(execute())
    if as_json:
        print_json(result)
        return
    sys.stdout.write(result["output"])
    raise typer.Exit(result["exit_code"])


# -- hosts ------------------------------------------------------------------------------


@host_app.command("info")
def host_info(host: str, inventory: InventoryOption = None, as_json: JsonOption = False) -> None:
    """A host's name, management address, accelerator and VMs."""
    info = run(cluster(inventory).call(host, "host.info", timeout=10))
    if as_json:
        print_json(info)
    else:
        out.print(f"{info['host']}: management {info['management_address']}, "
                  f"accel {info['accel']}, VMs: {', '.join(info['vms']) or 'none'}")


@host_app.command("counters")
def host_counters(host: str, inventory: InventoryOption = None,
                  as_json: JsonOption = False) -> None:
    """The host firewall's packet counters (invalid drops, per-VM default drops)."""
    counters = run(cluster(inventory).call(host, "firewall.counters", timeout=10))
    if as_json:
        print_json(counters)
    else:
        table = Table("counter", "packets")
        for name, packets in sorted(counters.items()):
            table.add_row(name, str(packets))
        out.print(table)


# -- IPS --------------------------------------------------------------------------------


def ips_call(inventory: Path | None, method: str, params: dict[str, Any]) -> Any:
    """Call `method` on the agent of the host where VM `params["name"]` runs."""
    nodes = cluster(inventory)

    async def call() -> Any:
        host = await nodes.locate(params["name"])
        return await nodes.call(host, method, params, timeout=30)

    return run(call())


@ips_app.command("list")
def ips_list(vm: Annotated[str, typer.Argument(help="VM name.")],
             inventory: InventoryOption = None, as_json: JsonOption = False) -> None:
    """The sources the VM's IPS blocks, with their remaining time."""
    result = ips_call(inventory, "ips.list", {"name": vm})
    if as_json:
        print_json(result)
        return
    table = Table("source", "blocked for", "remaining", title=f"{vm} on {result['host']}")
    for block in result["blocks"]:
        table.add_row(block["source"], f"{block['timeout_s']:.0f} s",
                      f"{block['expires_s']:.1f} s")
    out.print(table)


@ips_app.command("block")
def ips_block(vm: Annotated[str, typer.Argument(help="VM name.")],
              source: Annotated[str, typer.Argument(help="Address to block.")],
              seconds: Annotated[int | None, typer.Option(
                  help="How long (default: the VM's block_seconds).", min=1)] = None,
              inventory: InventoryOption = None, as_json: JsonOption = False) -> None:
    """Block a source address for the VM's new inbound connections."""
    result = ips_call(inventory, "ips.block", {"name": vm, "source": source, "seconds": seconds})
    if as_json:
        print_json(result)
    else:
        out.print(f"{vm}: {result['source']} blocked for {result['timeout_s']:.0f} s")


@ips_app.command("unblock")
def ips_unblock(vm: Annotated[str, typer.Argument(help="VM name.")],
                source: Annotated[str, typer.Argument(help="Address to unblock.")],
                inventory: InventoryOption = None, as_json: JsonOption = False) -> None:
    """Remove a source's block; its detections start from zero."""
    result = ips_call(inventory, "ips.unblock", {"name": vm, "source": source})
    if as_json:
        print_json(result)
    else:
        out.print(f"{vm}: {result['source']} "
                  f"{'unblocked' if result['unblocked'] else 'was not blocked'}")


# -- PKI --------------------------------------------------------------------------------


@pki_app.command("init")
def pki_init(directory: Annotated[Path, typer.Argument(help="Where the CA's files go.")],
             name: Annotated[str, typer.Option(help="The CA's name.")] = "nseh cluster CA"
             ) -> None:
    """Create the cluster CA (ca.pem, ca-key.pem, revoked.txt); keep ca-key.pem secret."""
    from nseh.sc.pki import PkiError, create_ca

    try:
        ca = create_ca(directory, name=name)
    except (PkiError, OSError) as exc:  # OSError: writing its files
        fail(describe(exc))
    out.print(f"CA created: {ca.cert_path}")


@pki_app.command("issue")
def pki_issue(
    host: Annotated[str, typer.Argument(help="Host name (as in the inventory).")],
    ca_dir: Annotated[Path, typer.Option("--ca", help="The CA's directory.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where the host's files go.")],
    address: Annotated[list[str] | None, typer.Option(
        help="Management address (repeatable); none for an operator's certificate.")] = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
) -> None:
    """Issue a host's certificate; put the printed paths into its agent configuration."""
    from nseh.sc.pki import CertAuthority, PkiError, issue_host_certificate

    try:
        creds = issue_host_certificate(CertAuthority.load(ca_dir), host, address or [], out_dir,
                                       valid_days=days)
    except (PkiError, ValueError, OSError) as exc:
        fail(describe(exc))
    out.print(f'tls_cert = "{creds.cert_path}"\ntls_key = "{creds.key_path}"\n'
              f'tls_ca = "{creds.ca_path}"\ntls_revoked = "{creds.revoked_path}"')


@pki_app.command("revoke")
def pki_revoke(certificate: Annotated[Path, typer.Argument(help="The certificate (PEM).")],
               ca_dir: Annotated[Path, typer.Option("--ca", help="The CA's directory.")]
               ) -> None:
    """Revoke a host's certificate: agents refuse it on their next SC connection."""
    from nseh.sc.pki import CertAuthority, PkiError

    try:
        serial = CertAuthority.load(ca_dir).revoke(certificate)
    except (PkiError, OSError) as exc:  # OSError: writing its files
        fail(describe(exc))
    out.print(f"revoked serial {serial:#x}; copy {ca_dir / 'revoked.txt'} to every host")


# -- migration --------------------------------------------------------------------------


@app.command()
def migrate(
    vm: Annotated[str, typer.Argument(help="VM to migrate.")],
    to: Annotated[str, typer.Option("--to", help="Destination host.")],
    sc: Annotated[str, typer.Option(
        "--sc", help="How the VM's security context moves: precopy (bulk copy and change "
                     "rounds during RAM pre-copy, final delta at switchover), stopcopy (all "
                     "of it at switchover), none (not at all: stock migration).")] = "precopy",
    abort_at: Annotated[str | None, typer.Option(
        "--abort-at", help="Rollback drill: fail on purpose in this phase (prepare, transfer, "
                           "switchover); the VM must stay on the source.")] = None,
    hold_at: Annotated[str | None, typer.Option(
        "--hold-at", help="Fault drill: pause the migration in this phase (prepare, transfer, "
                          "switchover, commit) for --hold-seconds, to inject a fault.")] = None,
    hold_seconds: Annotated[float, typer.Option(
        help="How long --hold-at pauses.")] = 15.0,
    skip_engine: Annotated[list[str] | None, typer.Option(
        "--skip-engine", help="Leave this security engine's state behind (repeatable: "
                              "firewall, ips); the destination still installs its policy.")
    ] = None,
    inventory: InventoryOption = None,
    as_json: JsonOption = False,
) -> None:
    """Live-migrate a VM to another host, with its security context; report the cost."""
    c = cluster(inventory)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TimeElapsedColumn(), console=err, transient=True,
                  disable=not err.is_terminal) as progress:  # else it leaves an empty line
        task = progress.add_task(f"migrating {vm} to {to}", total=None)

        def on_event(event: dict[str, Any]) -> None:
            if "progress" in event:
                figures = event["progress"]
                progress.update(task, completed=figures["ram_transferred"],
                                total=figures["ram_total"] or None)
            elif "message" in event:
                progress.console.print(f"  [dim]{event.get('phase', '')}[/] "
                                       f"{escape(event['message'])}",
                                       highlight=False)

        drills = {"abort_at": abort_at, "hold_at": hold_at, "hold_seconds": hold_seconds}
        report = run(c.migrate(vm, to, sc, on_event=on_event, drills=drills,
                               skip_engines=skip_engine or []))
    if as_json:
        print_json(report)
    else:
        show_report(report)
    if report["result"] == "unsettled":
        fail(f"migration of {vm}: QEMU handed it over to {report['destination']}, which has "
             f"not confirmed it runs there ({report['failure']}); it stays paused on "
             f"{report['source']} until {report['destination']} answers")
    if report["result"] != "migrated":
        fail(f"migration of {vm} failed: {report['failure']}; it still runs on "
             f"{report['source']}")


def show_report(report: dict[str, Any]) -> None:
    qemu = report["qemu"]
    table = Table(title=f"{report['vm']}: {report['source']} → {report['destination']} "
                        f"(SC {report['sc_mode']}): {report['result']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("QEMU status", qemu["status"]),
        ("downtime", f"{qemu['downtime_ms']} ms"),
        ("total time", f"{qemu['total_time_ms']} ms"),
        ("setup time", f"{qemu['setup_time_ms']} ms"),
        ("RAM transferred", f"{(qemu['ram_transferred_bytes'] or 0) / 2**20:.1f} MiB"),
        ("dirty-sync count", str(qemu["dirty_sync_count"])),
        ("wall time (nseh)", f"{report['elapsed_ms']} ms"),
    ]
    if sc := report.get("sc"):
        rows += [
            ("SC entries moved", f"{sc['entries']} (+{sc['deletes']} deletes)"),
            ("SC bytes", f"{sc['bytes'] / 1024:.1f} KiB"),
            ("SC change rounds", str(sc["rounds"])),
            ("SC final delta", f"{sc['final_delta']} records"),
            ("SC time in stop window", f"{sc['stop_window_ms']:.1f} ms"),
            ("SC rejected by destination", str(sc["rejected"])),
            ("SC entries on destination", str(sc["destination_entries"])),
            ("SC engines moved (records)",
             ", ".join(f"{name} {count}" for name, count in sc["engines"].items()) or "none"),
        ]
    if skipped := report.get("skipped_engines"):
        rows.append(("engines left behind", ", ".join(skipped)))
    for name, value in rows:
        table.add_row(name, str(value))
    out.print(table)
    for reason in (sc or {}).get("reasons", []):
        err.print(f"[yellow]rejected:[/] {escape(reason)}", highlight=False)


# -- benchmark --------------------------------------------------------------------------


@app.command()
def bench(
    quick: Annotated[bool, typer.Option(
        "--quick", help="Small matrix (sizes 0,10000; idle,http; 2 reps; micro-benchmark at "
                        "10,000): under 10 minutes.")] = False,
    reps: Annotated[int | None, typer.Option(help="Repetitions per cell (full: 5).")] = None,
    sizes: Annotated[str | None, typer.Option(
        help="SC sizes in entries (full: 0,1000,10000,100000).")] = None,
    workloads: Annotated[str | None, typer.Option(
        help="Workloads: idle,http,memory (full: all).")] = None,
    modes: Annotated[str | None, typer.Option(
        help="SC modes: none,stopcopy,precopy, and precopy-noips with --ips-blocks "
             "(default: all).")] = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Output directory (default: bench/results/<UTC timestamp>).")] = None,
    no_microbench: Annotated[bool, typer.Option(
        "--no-microbench", help="Skip the micro-benchmark (moving a VM's conntrack entries "
                                "between tables).")] = False,
    ips_blocks: Annotated[int | None, typer.Option(
        help="Give the VM an IPS blocking this many sources before each migration, and add "
             "the mode precopy-noips (precopy leaving the IPS state behind) to compare.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Benchmark real migrations on its own lab (needs root): downtime and cost of the SC."""
    from nseh import lab
    from nseh.bench.matrix import BenchConfigError, configure

    try:
        config = configure(quick=quick, sizes=sizes, workloads=workloads, modes=modes,
                           reps=reps, microbench=not no_microbench, ips_blocks=ips_blocks,
                           out=out_dir)
    except BenchConfigError as exc:
        fail(str(exc))
    needs_root("bench")
    needs_installed(BENCH_PROGRAMS)
    from nseh.bench.runner import BenchError, run_bench, show_summary  # loads matplotlib

    try:
        out_path, summary = run_bench(config, err)
    except (BenchError, lab.LabError, AgentError, InventoryError) as exc:
        fail(str(exc))
    if as_json:
        print_json(summary)
    else:
        show_summary(out, summary, out_path)


# -- demo and agent ---------------------------------------------------------------------


@app.command()
def soak(
    migrations: Annotated[int, typer.Option(
        help="Migrations in a row (even: the VM ends where it started).")] = 100,
    as_json: JsonOption = False,
) -> None:
    """Migrate a VM with live connections back and forth on a lab of its own; check that no
    connection is lost and nothing piles up (conntrack, nft objects, processes, agent fds
    and memory). Exit status 1 if anything did."""
    from nseh import lab
    from nseh.soak import SoakError, run_soak

    needs_root("soak")
    needs_installed(LAB_PROGRAMS)
    try:
        result = run_soak(migrations, err if as_json else out)
    except (SoakError, lab.LabError, AgentError, InventoryError) as exc:
        fail(str(exc))
    if as_json:
        print_json(result)
    else:
        spread = result["downtime_ms"] or {}
        out.print(f"{result['migrations']} of {result['planned']} migrations, "
                  f"{result['failed']} failed, in {result['wall_s']} s; downtime "
                  f"{spread.get('median')} ms median ({spread.get('min')}-{spread.get('max')})")
        out.print(f"flows broken: {', '.join(result['broken']) or 'none'}; "
                  f"growth beyond tolerance: {', '.join(result['grown']) or 'none'}")
    if not result["passed"]:
        raise typer.Exit(1)


@app.command()
def demo(
    skip_engine: Annotated[list[str] | None, typer.Option(
        "--skip-engine", help="Leave this security engine's state behind on the precopy "
                              "migration (repeatable: firewall, ips), to see what the "
                              "destination does without it.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Lab up, a VM behind a strict firewall and an IPS, live connections, an attacker, two
    migrations (--sc none, then --sc precopy), lab down. Judges the run by its figures:
    exit status 1 if any check failed (precopy lost a flow or the attacker's block, stock
    migration did not break the TCP flows, a migration failed or left the VM elsewhere)."""
    from nseh import lab
    from nseh.demo import ENGINES, DemoError, run_demo

    skipped = skip_engine or []
    if unknown := [name for name in skipped if name not in ENGINES]:
        fail(f"unknown security engine {unknown[0]!r} for --skip-engine (choose from "
             f"{', '.join(ENGINES)})")
    needs_root("demo")
    needs_installed(LAB_PROGRAMS)
    try:
        result = run_demo(out if not as_json else err, skipped)
    except (DemoError, AgentError, lab.LabError, InventoryError) as exc:
        fail(f"demo: {exc}")
    if as_json:
        print_json(result)
    verdicts = result["verdicts"]
    if failed := [v["check"] for v in verdicts if not v["passed"]]:
        fail(f"demo: {len(failed)} of {len(verdicts)} checks failed: {', '.join(failed)}")


@app.command()
def agent(config: Annotated[Path, typer.Option(help="Agent configuration (TOML).")],
          log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO") -> None:
    """Run this host's agent in the foreground (what a systemd unit would start)."""
    from nseh.agent.__main__ import AgentStartError, run_agent

    try:
        run_agent(config, log_level)
    except AgentStartError as exc:
        fail(str(exc))
