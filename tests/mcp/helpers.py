"""Shared helpers for the MCP gateway tests: policy directories, real
processes (the gateway, SDK-built servers, a scripted stdio server), ports,
audit logs."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from leash.audit import AuditRecord, decode_records

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SERVER_APP = HERE / "server_app.py"
FAKE_SERVER = HERE / "fake_stdio_server.py"
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}

POLICY = """\
@id("echo-for-all")
permit(principal, action == Action::"McpCall", resource == MCP::Tool::"echo");

@id("read-workspace")
permit(principal in AgentGroup::"coders", action == Action::"McpCall", resource == MCP::Tool::"read_file")
when { context.arguments has path && context.arguments.path like "/workspace/*" };

@id("add-small")
permit(principal, action == Action::"McpCall", resource == MCP::Tool::"add")
when { context.arguments has a && context.arguments.a < 100 };

@id("count-ok")
permit(principal, action == Action::"McpCall", resource == MCP::Tool::"count");

@id("no-secrets")
forbid(principal, action == Action::"McpCall", resource in MCP::Server::"files")
when { context.arguments has path && context.arguments.path like "*secret*" };

@id("no-delete")
forbid(principal, action, resource == MCP::Tool::"delete_file");

@id("delete-overruled")
permit(principal, action, resource == MCP::Tool::"delete_file");
"""

CONFIG = """\
[agents.claude]
groups = ["coders"]

[groups.coders]
"""

# What agent "claude" may see of server_app.py's tools.
VISIBLE = ["add", "count", "echo", "read_file"]


def write_policy(directory: Path, cedar: str = POLICY, toml: str | None = CONFIG) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tools.cedar").write_text(cedar)
    if toml is not None:
        (directory / "leash.toml").write_text(toml)
    return directory


def gateway_args(policy: Path, audit: Path, *extra: str, agent: str = "claude") -> list[str]:
    return [sys.executable, "-m", "leash.mcp", *extra[:1], "--policy", str(policy), "--agent", agent,
            "--server", "files", "--audit-log", str(audit), *extra[1:]]


def records(path: Path) -> list[AuditRecord]:
    return decode_records(path.read_bytes()) if path.exists() else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_http_server(kind: str) -> tuple[subprocess.Popen, int]:
    """server_app.py over Streamable HTTP answering with JSON or SSE."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SERVER_APP), "http", str(port), kind],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    wait_port(port, proc, "the SDK server")
    return proc, port


def start_proxy(policy: Path, audit: Path, upstream: str, *extra: str, agent: str = "claude"
                ) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(gateway_args(policy, audit, "proxy", "--listen", f"127.0.0.1:{port}",
                                         "--upstream", upstream, *extra, agent=agent),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    wait_port(port, proc, "leash mcp proxy")
    return proc, port


class LinePeer:
    """A process spoken to in JSON lines over its stdin/stdout."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=ENV)
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, message: object) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        assert self.proc.stdin is not None
        self.proc.stdin.write(data + b"\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = 20) -> object:
        """The next message; raises if none comes (a hang is a failure)."""
        line = self._lines.get(timeout=timeout)
        if line is None:
            raise EOFError("the peer closed its stdout")
        return json.loads(line)

    def call(self, message: dict) -> dict:
        self.send(message)
        return self.recv()

    def eof(self, timeout: float = 20) -> bool:
        return self._lines.get(timeout=timeout) is None

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        stop(self.proc)


def request(rid: object, method: str, params: dict | None = None) -> dict:
    msg: dict = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        msg["params"] = params
    return msg


def tool_call(rid: object, name: str, arguments: dict | None = None) -> dict:
    params: dict = {"name": name}
    if arguments is not None:
        params["arguments"] = arguments
    return request(rid, "tools/call", params)
