"""`leash mcp proxy` at the protocol level: HTTP requests written directly,
a scripted upstream (tests/mcp/fake_http_upstream.py) that records what
reaches it and misbehaves on request."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import time

import pytest

from leash.mcp import jsonrpc
from tests.mcp.fake_http_upstream import Upstream
from tests.mcp.helpers import free_port, records, request, start_proxy, stop, tool_call, write_policy

POLICY = """\
@id("most-tools")
permit(principal, action == Action::"McpCall", resource);

@id("no-delete")
forbid(principal, action, resource == MCP::Tool::"delete_file");
"""
JSON = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


@pytest.fixture(scope="module")
def upstream():
    up = Upstream()
    yield up
    up.close()


class Proxied:
    def __init__(self, tmp, upstream_url: str, *options: str) -> None:
        self.audit = tmp / "audit.jsonl"
        self.proc, self.port = start_proxy(write_policy(tmp / "policy", POLICY, None), self.audit,
                                           upstream_url, *options)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def post(self, body: object, headers: dict | None = None, conn: http.client.HTTPConnection | None = None
             ) -> tuple[int, http.client.HTTPResponse, object]:
        conn = conn or self.connection()
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", "/mcp", data, {**JSON, **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, resp, json.loads(raw) if raw else None

    def records(self):
        return records(self.audit)


@pytest.fixture
def proxied(tmp_path, upstream):
    upstream.reset()
    opened: list[Proxied] = []

    def open_(*options: str, url: str | None = None) -> Proxied:
        p = Proxied(tmp_path, url or upstream.url, *options)
        opened.append(p)
        return p

    yield open_
    for p in opened:
        stop(p.proc)


def sse_messages(resp: http.client.HTTPResponse) -> list[dict]:
    return [json.loads(line[6:]) for line in resp.read().decode().splitlines() if line.startswith("data: ")]


def test_refused_call_never_reaches_upstream(proxied, upstream):
    p = proxied()
    status, _, answer = p.post(tool_call(1, "delete_file", {}))
    assert status == 200
    assert (answer["id"], answer["error"]["code"]) == (1, jsonrpc.POLICY_REFUSED)
    assert "no-delete" in answer["error"]["message"]
    assert upstream.calls() == []


def test_headers_pass_through_both_ways(proxied, upstream):
    p = proxied()
    status, resp, answer = p.post(tool_call(1, "echo", {}), {
        "Mcp-Session-Id": "sess-1", "MCP-Protocol-Version": "2025-11-25", "Authorization": "Bearer t",
        "Connection": "keep-alive, X-Hop", "X-Hop": "private"})
    assert status == 200 and answer["result"]["content"][0]["text"] == "called echo"
    assert resp.getheader("Mcp-Session-Id") == "sess-1"
    (seen,) = upstream.seen
    assert seen.headers["mcp-session-id"] == "sess-1"
    assert seen.headers["mcp-protocol-version"] == "2025-11-25"
    assert seen.headers["authorization"] == "Bearer t"
    assert seen.headers["host"] == f"127.0.0.1:{upstream.port}"
    assert "x-hop" not in seen.headers                     # named in Connection: hop-by-hop


def test_bad_messages_get_jsonrpc_errors(proxied, upstream):
    p = proxied("--max-message-bytes", "4096")
    conn = p.connection()
    status, _, answer = p.post(b'{"jsonrpc":"2.0","id":3,', conn=conn)
    assert (status, answer["id"], answer["error"]["code"]) == (400, 3, jsonrpc.PARSE_ERROR)
    status, _, answer = p.post(request(4, "tools/cal"), conn=conn)
    assert (status, answer["id"], answer["error"]["code"]) == (404, 4, jsonrpc.METHOD_NOT_FOUND)
    status, _, answer = p.post(tool_call(5, "echo", {"text": "x" * 10000}))
    assert (status, answer["id"], answer["error"]["code"]) == (413, 5, jsonrpc.INVALID_REQUEST)
    status, _, answer = p.post(tool_call(6, "echo", {}))
    assert status == 200 and "result" in answer
    assert upstream.calls() == ["echo"]


def test_routing_headers_must_match_the_body(proxied, upstream):
    p = proxied()
    status, _, answer = p.post(tool_call(1, "echo", {}), {"Mcp-Method": "tools/call", "Mcp-Name": "delete_file"})
    assert (status, answer["error"]["code"]) == (400, jsonrpc.HEADER_MISMATCH)
    status, _, answer = p.post(tool_call(2, "delete_file", {}), {"Mcp-Method": "tools/call", "Mcp-Name": "echo"})
    assert (status, answer["error"]["code"]) == (400, jsonrpc.HEADER_MISMATCH)
    encoded = "=?base64?" + base64.b64encode("échø".encode()).decode() + "?="
    status, _, answer = p.post(tool_call(3, "échø", {}), {"Mcp-Method": "tools/call", "Mcp-Name": encoded})
    assert status == 200 and "result" in answer
    assert upstream.calls() == ["échø"]


def test_batches_are_answered_in_one_array(proxied, upstream):
    p = proxied()
    status, _, answer = p.post([tool_call(1, "echo", {}), tool_call(2, "delete_file", {})])
    assert status == 200
    assert sorted((m["id"], "error" in m) for m in answer) == [(1, False), (2, True)]
    (seen,) = upstream.seen
    assert [m["id"] for m in seen.json()] == [1]


def test_listings_are_filtered(proxied):
    p = proxied()
    status, _, answer = p.post(request(1, "tools/list"))
    assert [t["name"] for t in answer["result"]["tools"]] == ["echo", "stream"]


def test_event_streams_are_relayed_as_they_come(proxied, upstream):
    """The progress event reaches the client while the upstream is still
    blocked before its answer: nothing waits for the stream to end."""
    p = proxied()
    conn = p.connection()
    conn.request("POST", "/mcp", json.dumps(tool_call(1, "stream", {})).encode(), JSON)
    resp = conn.getresponse()
    assert resp.getheader("Content-Type") == "text/event-stream"
    lines = []
    while not lines or lines[-1] != "":
        lines.append(resp.readline().decode().rstrip("\r\n"))
    assert lines[:2] == ["id: e1", "event: message"]
    assert json.loads(lines[2][6:])["method"] == "notifications/progress"
    upstream.release.set()
    rest = resp.read().decode()
    assert ": ping" in rest and "id: e2" in rest
    (answer,) = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: ")]
    assert answer["result"]["content"][0]["text"] == "streamed"
    status, _, again = p.post(tool_call(2, "echo", {}), conn=conn)          # keep-alive still works
    assert status == 200 and again["id"] == 2


def test_refused_server_requests_are_answered_upstream(proxied, upstream):
    p = proxied()
    conn = p.connection()
    conn.request("POST", "/mcp", json.dumps(tool_call(1, "ask", {})).encode(), {**JSON, "Mcp-Session-Id": "sess-1"})
    messages = sse_messages(conn.getresponse())
    assert [m.get("method") or m["result"]["content"][0]["text"] for m in messages] == [
        "notifications/tools/list_changed", "asked"]
    deadline = time.monotonic() + 20
    while len(upstream.seen) < 2:
        assert time.monotonic() < deadline, "leash did not answer the server's request"
        time.sleep(0.05)
    answer = upstream.seen[1]
    assert answer.json()["id"] == "s0" and answer.json()["error"]["code"] == jsonrpc.METHOD_NOT_FOUND
    assert answer.headers["mcp-session-id"] == "sess-1"


def test_get_streams_and_delete(proxied, upstream):
    p = proxied()
    conn = p.connection()
    conn.request("GET", "/mcp", headers={"Accept": "text/event-stream", "Mcp-Session-Id": "sess-1",
                                         "Last-Event-ID": "g0"})
    resp = conn.getresponse()
    text = resp.read().decode()
    assert ": ping" in text and "surprise" not in text and "id: g1" in text
    assert "notifications/tools/list_changed" in text
    assert upstream.seen[0].headers["last-event-id"] == "g0"
    conn.request("DELETE", "/mcp", headers={"Mcp-Session-Id": "sess-1"})
    assert conn.getresponse().status == 200
    assert [s.method for s in upstream.seen] == ["GET", "DELETE"]
    assert any(r.reason == "SSE event of type 'surprise' (MCP sends only messages)" for r in p.records())


def test_upstream_unreachable(proxied):
    p = proxied(url=f"http://127.0.0.1:{free_port()}/mcp")
    status, _, answer = p.post(tool_call(1, "echo", {}))
    assert (status, answer["id"], answer["error"]["code"]) == (502, 1, jsonrpc.UPSTREAM_FAILED)
    assert "cannot reach the MCP server" in answer["error"]["message"]


def test_upstream_hangs(proxied):
    p = proxied("--timeout", "1")
    status, _, answer = p.post(tool_call(1, "hang", {}))
    assert (status, answer["id"], answer["error"]["code"]) == (504, 1, jsonrpc.UPSTREAM_TIMEOUT)
    status, _, answer = p.post(tool_call(2, "echo", {}))
    assert status == 200


def test_upstream_dies_mid_stream(proxied):
    p = proxied()
    conn = p.connection()
    conn.request("POST", "/mcp", json.dumps(tool_call(1, "die_midstream", {})).encode(), JSON)
    messages = sse_messages(conn.getresponse())
    assert messages[0]["method"] == "notifications/progress"
    assert (messages[1]["id"], messages[1]["error"]["code"]) == (1, jsonrpc.UPSTREAM_FAILED)


def test_client_disconnects_mid_stream(proxied, upstream):
    p = proxied()
    sock = socket.create_connection(("127.0.0.1", p.port))
    body = json.dumps(tool_call(1, "stream", {})).encode()
    sock.sendall(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Accept: text/event-stream\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    received = b""
    while b"notifications/progress" not in received:
        data = sock.recv(65536)
        assert data, "the proxy closed the stream"
        received += data
    sock.close()
    deadline = time.monotonic() + 20
    while not any(r.details.get("outcome") == "client gone" for r in p.records()):
        assert time.monotonic() < deadline, "the disconnect was not noticed"
        time.sleep(0.05)
    upstream.release.set()
    status, _, answer = p.post(tool_call(2, "echo", {}))
    assert status == 200


def test_client_disconnects_while_upstream_thinks(proxied, upstream):
    p = proxied()
    sock = socket.create_connection(("127.0.0.1", p.port))
    body = json.dumps(tool_call(1, "hang", {})).encode()
    sock.sendall(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 20
    while upstream.calls() != ["hang"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    sock.close()
    while not any(r.details.get("outcome") == "client gone" for r in p.records()):
        assert time.monotonic() < deadline, "the disconnect was not noticed"
        time.sleep(0.05)


@pytest.mark.parametrize("tool, why", [
    ("html", "without a JSON-RPC body"),
    ("wrong_id", "left this request unanswered"),
    ("gzip", "gzip-encoded"),
])
def test_unusable_upstream_answers(proxied, tool, why):
    p = proxied()
    status, _, answer = p.post(tool_call(1, tool, {}))
    assert (status, answer["id"], answer["error"]["code"]) == (502, 1, jsonrpc.UPSTREAM_FAILED)
    assert why in answer["error"]["message"]


def test_upstream_answer_too_large(proxied):
    p = proxied("--max-message-bytes", "4096")
    status, _, answer = p.post(tool_call(1, "big", {"size": 10000}))
    assert (status, answer["id"], answer["error"]["code"]) == (502, 1, jsonrpc.UPSTREAM_FAILED)


def test_upstream_http_errors_keep_their_status(proxied):
    p = proxied()
    status, _, answer = p.post(tool_call(1, "session_gone", {}), {"Mcp-Session-Id": "old"})
    assert (status, answer["id"], answer["error"]["message"]) == (404, 1, "Session not found")


def test_malformed_http(proxied):
    p = proxied()
    for raw, status in [
        (b"POST /mcp HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}", b"400"),
        (b"POST /mcp HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}", b"505"),
        (b"POST /mcp HTTP/1.1\r\nBad Header\r\n\r\n", b"400"),
        (b"GET /elsewhere HTTP/1.1\r\n\r\n", b"404"),
        (b"PUT /mcp HTTP/1.1\r\n\r\n", b"405"),
    ]:
        with socket.create_connection(("127.0.0.1", p.port)) as sock:
            sock.sendall(raw)
            assert sock.recv(65536).split(b" ")[1] == status
    status, _, answer = p.post(tool_call(1, "echo", {}))
    assert status == 200
