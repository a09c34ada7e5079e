"""The embedded one-machine lab: hypervisor hosts and clients as network namespaces.

`up()` builds a fabric switch (`nseh-fabric`), hosts `nseh-h{i}` and clients `nseh-c{j}`,
writes the run directory (/run/nseh/lab) and starts one agent per host; `down()` removes
all of it from whatever state it is in; `status()` reports it. Names and addresses are in
`nseh.lab.layout` and re-exported here.
"""

from __future__ import annotations

import fcntl
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nseh.agent.config import AgentConfig
from nseh.guest.image import GuestImageError, Progress, build_image, guest_cache_dir
from nseh.inventory import LAB_INVENTORY, Inventory
from nseh.lab import layout, processes, topology
from nseh.lab.layout import (
    CLIENT_LINK,
    FABRIC_MGMT_BRIDGE,
    FABRIC_NAMESPACE,
    FABRIC_VM_BRIDGE,
    HOST_MGMT_LINK,
    HOST_UPLINK,
    HOST_VM_BRIDGE,
    LAB_DIR,
    LAB_STATE_FILE,
    MAX_CLIENTS,
    MAX_HOSTS,
    MGMT_SUBNET4,
    MGMT_SUBNET6,
    ROUTER4,
    ROUTER6,
    VM_SUBNET4,
    VM_SUBNET6,
    client_ipv4,
    client_ipv6,
    client_namespace,
    host_mgmt_ipv4,
    host_mgmt_ipv6,
    host_namespace,
    netns_exec_argv,
)
from nseh.lab.processes import start_agent, stop_agent
from nseh.lab.state import (
    HostStatus,
    LabClient,
    LabError,
    LabHost,
    LabState,
    LabStatus,
    load_state,
    save_state,
)
from nseh.oneline import one_line
from nseh.sc.pki import CertAuthority, create_ca, issue_host_certificate

__all__ = [
    "CLIENT_LINK",
    "FABRIC_MGMT_BRIDGE",
    "FABRIC_NAMESPACE",
    "FABRIC_VM_BRIDGE",
    "HOST_MGMT_LINK",
    "HOST_UPLINK",
    "HOST_VM_BRIDGE",
    "LAB_DIR",
    "LAB_STATE_FILE",
    "MAX_CLIENTS",
    "MAX_HOSTS",
    "MGMT_SUBNET4",
    "MGMT_SUBNET6",
    "ROUTER4",
    "ROUTER6",
    "VM_SUBNET4",
    "VM_SUBNET6",
    "HostStatus",
    "LabClient",
    "LabError",
    "LabHost",
    "LabStatus",
    "client_ipv4",
    "client_ipv6",
    "client_namespace",
    "down",
    "host_mgmt_ipv4",
    "host_mgmt_ipv6",
    "host_namespace",
    "netns_exec_argv",
    "start_agent",
    "status",
    "stop_agent",
    "up",
]

# How long up/down wait for another up/down to finish (an agent start alone may take 30 s).
LOCK_TIMEOUT = 90.0
# down() repeats its sweep this often, for processes started while it was killing others.
_SWEEPS = 3


@contextmanager
def _lab_lock() -> Iterator[None]:
    """Serialises up and down, so two of them never build or tear down at once."""
    layout.LAB_LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with layout.LAB_LOCK_FILE.open("w") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(f"another `nseh lab up` or `down` is still running "
                                   f"(it holds {layout.LAB_LOCK_FILE})") from None
                time.sleep(0.1)
        yield


def _leftovers() -> list[str]:
    found = [str(LAB_DIR)] if LAB_DIR.exists() else []
    return found + topology.lab_namespaces()


def up(hosts: int = 2, clients: int = 1, start_agents: bool = True,
       guest_cache: Path | None = None, progress: Progress | None = None) -> LabStatus:
    """Build the lab and (unless told not to) start the agents; undo everything on failure.
    The agents boot the guest image of `guest_cache` (default: $NSEH_GUEST_CACHE, else
    /var/cache/nseh/guest), built here first if it is not there."""
    if not 1 <= hosts <= MAX_HOSTS:
        raise LabError(f"the lab needs 1 to {MAX_HOSTS} hosts, not {hosts}")
    if not 0 <= clients <= MAX_CLIENTS:
        raise LabError(f"the lab takes 0 to {MAX_CLIENTS} clients, not {clients}")
    guest_cache = (guest_cache or guest_cache_dir()).absolute()  # agents have their own cwd
    if start_agents:
        # Here, in the root namespace: the agents' namespaces have no route to the archive.
        try:
            build_image(guest_cache, progress)
        except GuestImageError as exc:
            raise LabError(f"guest image: {exc}") from None
    with _lab_lock():
        if found := _leftovers():
            raise LabError(f"a lab is already up or left over ({', '.join(found)}); "
                           "run `nseh lab down` first")
        shutil.rmtree(layout.FAILED_UP_DIR, ignore_errors=True)
        try:
            _build(hosts, clients, start_agents, guest_cache)
        except Exception as exc:
            kept_logs = _keep_agent_logs()
            _teardown()
            message = str(exc) if isinstance(exc, LabError) else (
                f"lab set-up failed: {type(exc).__name__}: {one_line(str(exc).strip())}")
            # A message may name logs under LAB_DIR, which is gone now: point at the copies.
            if kept_logs:
                message = message.replace(f"{LAB_DIR}/", f"{layout.FAILED_UP_DIR}/")
            raise LabError(f"{message}; the lab was removed") from exc
        except BaseException:
            _teardown()
            raise
    return status()


def _keep_agent_logs() -> bool:
    """Copy the agents' logs to FAILED_UP_DIR, keeping their layout; False if there are none."""
    logs = list(LAB_DIR.glob(f"*/{layout.AGENT_LOG_FILE}"))
    for log in logs:
        copy = layout.FAILED_UP_DIR / log.relative_to(LAB_DIR)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, copy)
    return bool(logs)


def _build(hosts: int, clients: int, start_agents: bool, guest_cache: Path) -> None:
    LAB_DIR.mkdir(parents=True)
    for namespace in (FABRIC_NAMESPACE, *map(host_namespace, range(1, hosts + 1)),
                      *map(client_namespace, range(1, clients + 1))):
        topology.create_namespace(namespace)
    topology.build_fabric(hosts, clients)
    for i in range(1, hosts + 1):
        topology.build_host(i)
    for j in range(1, clients + 1):
        topology.build_client(j)

    # The lab is its own cluster CA: every host gets a certificate for the SC channel.
    ca = create_ca(LAB_DIR / "pki", name="nseh lab CA")
    lab_hosts = [_write_host_files(i, ca, guest_cache) for i in range(1, hosts + 1)]
    Inventory(hosts={h.name: h.agent_endpoint for h in lab_hosts}).save(LAB_INVENTORY)
    save_state(LabState(
        fabric_namespace=FABRIC_NAMESPACE, router_ipv4=ROUTER4, router_ipv6=ROUTER6,
        hosts=lab_hosts,
        clients=[LabClient(name=layout.client_name(j), namespace=client_namespace(j),
                           ipv4=client_ipv4(j), ipv6=client_ipv6(j))
                 for j in range(1, clients + 1)]))
    if start_agents:
        for host in lab_hosts:
            start_agent(host.name)


# Agents also serve their API with mutual TLS on their management address, as on real hosts;
# the lab's CLI (in the root namespace, which has no management address) uses the sockets.
LAB_API_PORT = 7471


def _write_host_files(index: int, ca: CertAuthority, guest_cache: Path) -> LabHost:
    name = layout.host_name(index)
    layout.agent_state_dir(name).mkdir(parents=True)
    creds = issue_host_certificate(ca, name, [host_mgmt_ipv4(index), host_mgmt_ipv6(index)],
                                   layout.host_dir(name) / "tls")
    AgentConfig(
        host=name,
        state_dir=layout.agent_state_dir(name),
        api_socket=layout.agent_socket_path(name),
        management_address=host_mgmt_ipv4(index),
        vm_bridge=HOST_VM_BRIDGE,
        public_interface=layout.HOST_PUBLIC_LINK,
        tls_cert=creds.cert_path, tls_key=creds.key_path, tls_ca=creds.ca_path,
        tls_revoked=creds.revoked_path, api_port=LAB_API_PORT, guest_cache=guest_cache,
    ).save(layout.agent_config_path(name))
    return LabHost(
        name=name, namespace=host_namespace(index),
        management_ipv4=host_mgmt_ipv4(index), management_ipv6=host_mgmt_ipv6(index),
        agent_endpoint=layout.agent_endpoint(name),
        agent_config=layout.agent_config_path(name))


def down() -> None:
    """Remove the lab, whatever state it is in; does nothing if there is none."""
    with _lab_lock():
        _teardown()


def _teardown() -> None:
    # Agents first by pidfile and command line, QEMU by command line, then whatever
    # still runs in a lab namespace: any of these would keep its namespace alive.
    for _ in range(_SWEEPS):
        namespaces = topology.lab_namespaces()
        pids = {*processes.recorded_agent_pids(), *processes.lab_agent_pids(),
                *processes.lab_qemu_pids(), *processes.namespace_pids(namespaces)}
        if not pids:
            break
        processes.terminate(pids)
    for namespace in topology.lab_namespaces():
        topology.remove_namespace(namespace)
    shutil.rmtree(LAB_DIR, ignore_errors=True)
    if LAB_DIR.exists():
        raise LabError(f"cannot remove {LAB_DIR}")


def status() -> LabStatus:
    """What the lab is: "up" with its hosts and clients, "down", or "damaged" (leftovers)."""
    if not LAB_STATE_FILE.exists():
        if found := _leftovers():
            return LabStatus(state="damaged",
                             problems=[f"no {LAB_STATE_FILE}, but found: {', '.join(found)}"])
        return LabStatus(state="down")
    try:
        state = load_state()
    except LabError as exc:
        return LabStatus(state="damaged", problems=[str(exc)])
    existing = set(topology.lab_namespaces())
    expected = [state.fabric_namespace, *(h.namespace for h in state.hosts),
                *(c.namespace for c in state.clients)]
    problems = [f"namespace {ns} is missing" for ns in expected if ns not in existing]
    hosts = [HostStatus(**host.model_dump(), agent_alive=_agent_alive(host))
             for host in state.hosts]
    return LabStatus(state="damaged" if problems else "up",
                     fabric_namespace=state.fabric_namespace, hosts=hosts,
                     clients=state.clients, problems=problems)


def _agent_alive(host: LabHost) -> bool:
    pid = host.agent_pid
    return pid is not None and processes.is_agent_of(pid, host.name) and processes.pid_alive(pid)
