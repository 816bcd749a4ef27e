"""The agent of tests/mcp/test_daemon_stdio.py, run governed by `leash --policy
DIR -- python daemon_agent.py SETUP_JSON`. It imports nothing of leash (whose
files are closed to it) and prints one JSON object with what it saw.

It uses the official MCP SDK client with the daemon's published relay as its
stdio server command (the way an agent's MCP configuration would), claims to
be another client in every way a client can, and tries the server's program
directly, which its policy forbids.
"""

import json
import os
import socket
import subprocess
import sys
import time

import anyio
from mcp import Client, MCPError, StdioServerParameters
from mcp.types import Implementation

setup = json.loads(sys.argv[1])
out: dict = {"agent_pid": os.getpid()}


def relay_params(server: str) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=[setup["relay"], server])


async def refused(client: Client, tool: str, arguments: dict) -> dict:
    try:
        await client.call_tool(tool, arguments)
    except MCPError as e:
        return {"code": e.code, "message": e.message}
    return {"code": None, "message": "not refused"}


async def files_session() -> None:
    # A client may call itself anything; the principal is what the kernel says.
    async with Client(relay_params("files"), client_info=Implementation(name="root-agent", version="1")) as client:
        out["listed"] = sorted(t.name for t in (await client.list_tools()).tools)
        out["echo"] = (await client.call_tool("echo", {"text": "hi"})).content[0].text
        out["read_workspace"] = await read_or_refusal(client, "/workspace/notes.txt")
        out["delete"] = await refused(client, "delete_file", {"path": "/w"})
        out["read_etc"] = await refused(client, "read_file", {"path": "/etc/passwd"})
        if "control" in setup:
            # The test changes the policy now; the same session's next call
            # is decided by the new one.
            open(os.path.join(setup["control"], "phase1"), "w").close()
            go = os.path.join(setup["control"], "go")
            deadline = time.monotonic() + 60
            while not os.path.exists(go) and time.monotonic() < deadline:
                time.sleep(0.05)
            out["echo_after_reload"] = await refused(client, "echo", {"text": "hi"})


async def read_or_refusal(client: Client, path: str) -> object:
    try:
        return (await client.call_tool("read_file", {"path": path})).content[0].text
    except MCPError as e:
        return {"code": e.code, "message": e.message}


def whoami() -> dict:
    """The second server, spoken to in raw JSON lines through the relay."""
    lines = [{"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                         "clientInfo": {"name": "raw", "version": "0"}}},
             {"jsonrpc": "2.0", "method": "notifications/initialized"},
             {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}]
    proc = subprocess.run([sys.executable, setup["relay"], "who"], capture_output=True, timeout=300,
                          input=b"".join(json.dumps(m).encode() + b"\n" for m in lines))
    answers = {m.get("id"): m for m in map(json.loads, proc.stdout.splitlines())}
    return json.loads(answers[2]["result"]["content"][0]["text"])


def relay_alone(server: str) -> dict:
    proc = subprocess.run([sys.executable, setup["relay"], server], input=b"", capture_output=True, timeout=300)
    return {"status": proc.returncode, "stdout": proc.stdout.decode(), "stderr": proc.stderr.decode()}


def claim_another_agent() -> dict:
    """A hello that names an agent: there is no such field to claim with."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(setup["socket"])
        s.sendall(json.dumps({"leash": "hello", "server": "files", "agent": "admin"}).encode() + b"\n")
        return json.loads(s.makefile("rb").readline())


try:
    subprocess.run([setup["server_program"]], stdin=subprocess.DEVNULL, timeout=30)
    out["direct_exec"] = "started"
except OSError as e:
    out["direct_exec"] = f"refused: {e.strerror}"

anyio.run(files_session)
if "who" in setup:
    out["whoami"] = whoami()
out["claim"] = claim_another_agent()
out["unknown_server"] = relay_alone("nope")
out["broken_server"] = relay_alone("broken")
print(json.dumps(out), flush=True)
