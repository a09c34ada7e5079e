"""The agent API over TCP with mutual TLS: how CLIs and agents on other machines call an
agent. Real TLS on loopback, certificates from a CA made for the test."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from nseh.api.client import AgentClient, AgentError
from nseh.api.server import ApiServer, Emit
from nseh.sc.pki import CertAuthority, client_context, create_ca, issue_host_certificate


async def host_info(params: dict[str, Any], emit: Emit) -> dict[str, Any]:
    emit({"message": "looking"})
    return {"host": "h1"}


def call(tmp_path: Path, endpoint_host: str, client: str | None, ca: CertAuthority,
         revoke_client: bool = False) -> Any:
    server_creds = issue_host_certificate(ca, "h1", ["127.0.0.1"], tmp_path / "h1")
    tls = None
    if client is not None:
        other = client.startswith("other:")
        authority = create_ca(tmp_path / "other-ca") if other else ca
        creds = issue_host_certificate(authority, client.removeprefix("other:"), [],
                                       tmp_path / client.replace(":", "-"))
        if revoke_client:
            ca.revoke(creds.cert_path)
        tls = client_context(creds)

    async def scenario() -> Any:
        server = await ApiServer({"host.info": host_info}).serve_tls("127.0.0.1", 0,
                                                                     server_creds)
        port = server.sockets[0].getsockname()[1]
        events: list[dict[str, Any]] = []
        try:
            result = await AgentClient(f"tls://{endpoint_host}@127.0.0.1:{port}",
                                       tls=tls).call("host.info", on_event=events.append,
                                                     timeout=10)
            return result, events
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(scenario())


@pytest.fixture
def ca(tmp_path: Path) -> CertAuthority:
    return create_ca(tmp_path / "ca")


def test_an_operator_certificate_from_the_cluster_ca_may_call(tmp_path, ca):
    result, events = call(tmp_path, "h1", "admin", ca)
    assert result == {"host": "h1"} and events == [{"message": "looking"}]


@pytest.mark.parametrize(("endpoint_host", "client", "revoke", "error"), [
    ("h1", None, False, "needs TLS client credentials"),
    ("h2", "admin", False, "unreachable"),  # the agent's certificate names h1, not h2
    ("h1", "other:admin", False, ""),  # a certificate from another CA
    ("h1", "admin", True, ""),  # a revoked certificate
])
def test_callers_without_the_right_certificate_are_refused(tmp_path, ca, endpoint_host,
                                                            client, revoke, error):
    with pytest.raises(AgentError) as info:
        call(tmp_path, endpoint_host, client, ca, revoke_client=revoke)
    assert error in str(info.value) and "\n" not in str(info.value)
