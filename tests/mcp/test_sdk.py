"""The official MCP SDK's client, through `leash mcp wrap` (stdio) and `leash
mcp proxy` (Streamable HTTP, JSON and SSE answers), talking to a server built
with the SDK, in both protocol eras the SDK speaks (2026-07-28 per-request
envelopes, and the initialize handshake)."""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from mcp import Client, MCPError, StdioServerParameters

from leash.mcp.jsonrpc import POLICY_REFUSED
from tests.mcp.helpers import (CONFIG, ENV, POLICY, SERVER_APP, VISIBLE, records, start_http_server,
                                start_proxy, stop, write_policy)

TRANSPORTS = ["stdio", "http-json", "http-sse"]
MODES = ["auto", "legacy"]


@pytest.fixture(scope="module")
def http_servers():
    servers = {kind: start_http_server(kind) for kind in ("json", "sse")}
    yield {kind: port for kind, (_, port) in servers.items()}
    for proc, _ in servers.values():
        stop(proc)


@pytest.fixture
def connect(http_servers, tmp_path):
    """connect(transport, mode, policy_dir, agent) -> async context manager
    yielding an SDK Client whose every message passes through leash."""
    proxies = []

    @asynccontextmanager
    async def open_client(transport: str, mode: str, policy: Path, agent: str = "claude"):
        audit = tmp_path / "audit.jsonl"
        if transport == "stdio":
            args = ["-m", "leash.mcp", "wrap", "--policy", str(policy), "--agent", agent, "--server", "files",
                    "--audit-log", str(audit), "--", sys.executable, str(SERVER_APP)]
            target = StdioServerParameters(command=sys.executable, args=args, env=ENV)
        else:
            upstream = f"http://127.0.0.1:{http_servers[transport.split('-')[1]]}/mcp"
            proc, port = start_proxy(policy, audit, upstream, agent=agent)
            proxies.append(proc)
            target = f"http://127.0.0.1:{port}/mcp"
        async with Client(target, mode=mode) as client:
            yield client

    yield open_client
    for proc in proxies:
        stop(proc)


async def refused(client: Client, tool: str, arguments: dict) -> MCPError:
    with pytest.raises(MCPError) as info:
        await client.call_tool(tool, arguments)
    assert info.value.code == POLICY_REFUSED
    return info.value


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_calls_are_decided_and_listings_filtered(connect, transport, mode, tmp_path):
    policy = write_policy(tmp_path / "policy")
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async def session() -> None:
        async with connect(transport, mode, policy) as client:
            listed = await client.list_tools()
            assert sorted(t.name for t in listed.tools) == VISIBLE

            assert (await client.call_tool("echo", {"text": "hi"})).content[0].text == "hi"
            read = await client.call_tool("read_file", {"path": "/workspace/notes.txt"})
            assert read.content[0].text == "contents of /workspace/notes.txt"
            assert (await client.call_tool("add", {"a": 2, "b": 40})).structured_content == {"result": 42}
            counted = await client.call_tool("count", {"n": 3}, progress_callback=on_progress)
            assert counted.content[0].text == "counted to 3"

            assert "refused by policy no-delete" in (await refused(client, "delete_file", {"path": "/w"})).message
            assert "default deny" in (await refused(client, "read_file", {"path": "/etc/passwd"})).message
            assert "no-secrets" in (await refused(client, "read_file", {"path": "/workspace/secret.key"})).message
            assert "default deny" in (await refused(client, "add", {"a": 500, "b": 1})).message
            assert "default deny" in (await refused(client, "write_file", {"path": "/w", "text": "x"})).message

    anyio.run(session)
    # A server answering with plain JSON has no stream to send progress on.
    assert progress == ([] if transport == "http-json" else [1, 2, 3])

    calls = [r for r in records(tmp_path / "audit.jsonl") if r.details.get("method") == "tools/call"]
    assert [(r.resource, r.decision, r.details["outcome"]) for r in calls] == [
        ("echo", "allow", "result"), ("read_file", "allow", "result"), ("add", "allow", "result"),
        ("count", "allow", "result"),
        ("delete_file", "deny", "refused"), ("read_file", "deny", "refused"), ("read_file", "deny", "refused"),
        ("add", "deny", "refused"), ("write_file", "deny", "refused")]
    assert calls[1].policies == ["read-workspace"]
    assert calls[4].policies == ["no-delete"]
    assert calls[6].policies == ["no-secrets"]
    assert all(r.backend == "mcp" and r.agent == "claude" and r.action == "McpCall" for r in calls)
    assert all("decide_us" in r.details for r in calls)
    assert all("latency_us" in r.details for r in calls if r.decision == "allow")
    assert not any("arguments" in r.details for r in calls), "arguments are not recorded by default"
    listing = [r for r in records(tmp_path / "audit.jsonl") if r.details.get("method") == "tools/list"]
    assert [sorted(r.details["hidden"]) for r in listing] == [["delete_file", "write_file"]]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_principal_and_groups_come_from_config(connect, transport, tmp_path):
    """An agent outside the `coders` group sees no read_file and may not call it."""
    policy = write_policy(tmp_path / "policy")

    async def session() -> None:
        async with connect(transport, "auto", policy, agent="intruder") as client:
            listed = await client.list_tools()
            assert sorted(t.name for t in listed.tools) == ["add", "count", "echo"]
            await refused(client, "read_file", {"path": "/workspace/notes.txt"})

    anyio.run(session)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_arguments_recorded_only_as_configured(connect, transport, tmp_path):
    policy = write_policy(tmp_path / "policy", POLICY, CONFIG + '\n[mcp]\nrecord_arguments = ["path"]\n')

    async def session() -> None:
        async with connect(transport, "auto", policy) as client:
            with pytest.raises(MCPError):
                await client.call_tool("write_file", {"path": "/workspace/a", "text": "s3cr3t"})
            await client.call_tool("read_file", {"path": "/workspace/b"})

    anyio.run(session)
    calls = [r for r in records(tmp_path / "audit.jsonl") if r.details.get("method") == "tools/call"]
    assert [r.details["arguments"] for r in calls] == [{"path": "/workspace/a"}, {"path": "/workspace/b"}]
    assert b"s3cr3t" not in (tmp_path / "audit.jsonl").read_bytes()


@pytest.mark.parametrize("kind", ["json", "sse"])
def test_concurrent_sessions_share_one_proxy(http_servers, kind, tmp_path):
    """Clients in both protocol eras, at once, through one proxy: their request
    ids overlap (each starts at 1) and must not be confused."""
    policy = write_policy(tmp_path / "policy")
    proc, port = start_proxy(policy, tmp_path / "audit.jsonl", f"http://127.0.0.1:{http_servers[kind]}/mcp")
    url = f"http://127.0.0.1:{port}/mcp"
    results: dict[str, list[str]] = {}

    async def one(name: str, mode: str) -> None:
        async with Client(url, mode=mode) as client:
            got = []
            for i in range(5):
                got.append((await client.call_tool("echo", {"text": f"{name}-{i}"})).content[0].text)
                await refused(client, "delete_file", {"path": "/w"})
            results[name] = got

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for name, mode in (("a", "auto"), ("b", "legacy"), ("c", "legacy"), ("d", "auto")):
                tg.start_soon(one, name, mode)

    try:
        anyio.run(main)
    finally:
        stop(proc)
    assert results == {n: [f"{n}-{i}" for i in range(5)] for n in "abcd"}
