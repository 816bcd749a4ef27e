"""Added latency of the MCP gateway per tools/call, against a direct
connection to the same server, in one run.

    python bench/mcp_gateway.py [--calls 3000] [--block 100]

Server: tests/mcp/server_app.py (the official SDK), its `echo` tool.
Policy: tests/mcp/helpers.POLICY (7 policies, one reading an argument).
Transports:
  stdio       a JSON-lines client -> server_app.py          vs  client -> leash mcp wrap -> server_app.py
  http-json   an HTTP/1.1 keep-alive client -> server_app.py (JSON answers)  vs  through leash mcp proxy
  http-sse    the same with SSE answers
Clients speak the raw protocol (initialize handshake, then sequential
tools/call), so what is measured is the server and the gateway, not an SDK
client. Direct and gateway calls alternate in blocks so both see the same
machine load; the gateway's own CPU time per call is measured too (from
/proc), a figure other load on the machine does not inflate. Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.mcp.helpers import (ENV, SERVER_APP, free_port, start_http_server, start_proxy,  # noqa: E402
                               stop, write_policy)

INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def call(rid: int) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": "tools/call",
                       "params": {"name": "echo", "arguments": {"text": "hello"}}}).encode()


class StdioPeer:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=ENV)
        self.rid = 0
        self._send(json.dumps(INIT).encode())
        self._recv()
        self._send(json.dumps(INITIALIZED).encode())

    def _send(self, data: bytes) -> None:
        self.proc.stdin.write(data + b"\n")
        self.proc.stdin.flush()

    def _recv(self) -> dict:
        return json.loads(self.proc.stdout.readline())

    def one(self) -> float:
        self.rid += 1
        start = time.perf_counter()
        self._send(call(self.rid))
        answer = self._recv()
        elapsed = time.perf_counter() - start
        assert answer.get("id") == self.rid and "result" in answer, answer
        return elapsed

    def close(self) -> None:
        self.proc.stdin.close()
        stop(self.proc)


class HttpPeer:
    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        self.rid = 0
        _, resp_headers = self._post(json.dumps(INIT).encode())
        self.headers["Mcp-Session-Id"] = resp_headers.get("Mcp-Session-Id", "")
        self.headers["MCP-Protocol-Version"] = "2025-11-25"
        self._post(json.dumps(INITIALIZED).encode())

    def _post(self, body: bytes) -> tuple[bytes, http.client.HTTPMessage]:
        self.conn.request("POST", "/mcp", body, self.headers)
        resp = self.conn.getresponse()
        return resp.read(), resp.headers

    def one(self) -> float:
        self.rid += 1
        start = time.perf_counter()
        body, headers = self._post(call(self.rid))
        elapsed = time.perf_counter() - start
        if headers.get("Content-Type", "").startswith("text/event-stream"):
            body = [line for line in body.split(b"\n") if line.startswith(b"data: ")][-1][6:]
        answer = json.loads(body)
        assert answer.get("id") == self.rid and "result" in answer, answer
        return elapsed

    def close(self) -> None:
        self.conn.close()


def cpu_seconds(pid: int) -> float:
    """User+system CPU time a process has used so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(direct, gated, gateway_pid: int, calls: int, block: int) -> tuple[list[float], list[float], float]:
    """Per-call latencies direct and through the gateway, and the gateway's
    own CPU time per call (which other load on the machine does not inflate)."""
    for _ in range(block):                      # warm-up: imports, caches, connections
        direct.one()
        gated.one()
    a: list[float] = []
    b: list[float] = []
    cpu = cpu_seconds(gateway_pid)
    while len(a) < calls:
        a += [direct.one() for _ in range(block)]
        b += [gated.one() for _ in range(block)]
    return a, b, (cpu_seconds(gateway_pid) - cpu) / len(b)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.machine())
    import cedarpy  # noqa: F401  (version below)
    from importlib.metadata import version
    return (f"{model}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, "
            f"cedarpy {version('cedarpy')}, mcp {version('mcp')}, {time.strftime('%Y-%m-%d')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--block", type=int, default=100)
    args = ap.parse_args()

    load_before = f"{os.getloadavg()[0]:.2f}"
    tmp = Path(tempfile.mkdtemp(prefix="leash-mcp-bench-"))
    policy = write_policy(tmp / "policy")
    audit = tmp / "audit.jsonl"
    rows = []

    direct = StdioPeer([sys.executable, str(SERVER_APP)])
    gated = StdioPeer([sys.executable, "-m", "leash.mcp", "wrap", "--policy", str(policy), "--agent", "claude",
                       "--server", "files", "--audit-log", str(audit), "--", sys.executable, str(SERVER_APP)])
    rows.append(("stdio", *measure(direct, gated, gated.proc.pid, args.calls, args.block)))
    direct.close()
    gated.close()

    for kind in ("json", "sse"):
        server, port = start_http_server(kind)
        proxy, proxy_port = start_proxy(policy, audit, f"http://127.0.0.1:{port}/mcp")
        direct_h, gated_h = HttpPeer(port), HttpPeer(proxy_port)
        rows.append((f"http-{kind}", *measure(direct_h, gated_h, proxy.pid, args.calls, args.block)))
        direct_h.close()
        gated_h.close()
        stop(proxy)
        stop(server)

    recorded = sum(1 for line in audit.read_bytes().splitlines() if b'"tools/call"' in line)
    print(f"Machine: {machine()}; load average {load_before} before, {os.getloadavg()[0]:.2f} after\n")
    print(f"{args.calls} sequential tools/call per path and transport, alternating blocks of {args.block}; "
          f"{recorded} audit records written.\n")
    print("| transport | direct p50 | direct p99 | via leash p50 | via leash p99 | added p50 | added p99 "
          "| calls/s direct | calls/s via leash | gateway CPU per call |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, a, b, cpu in rows:
        ms = [x * 1e3 for x in (pct(a, .5), pct(a, .99), pct(b, .5), pct(b, .99))]
        print(f"| {name} | {ms[0]:.2f} ms | {ms[1]:.2f} ms | {ms[2]:.2f} ms | {ms[3]:.2f} ms "
              f"| {ms[2] - ms[0]:.2f} ms | {ms[3] - ms[1]:.2f} ms "
              f"| {1 / statistics.mean(a):,.0f} | {1 / statistics.mean(b):,.0f} | {cpu * 1e6:.0f} µs |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
