"""A scripted Streamable HTTP MCP server for the proxy's raw-protocol tests,
running in a thread of the test process. It records every request it gets
and misbehaves on request, by tool name (or method)."""

from __future__ import annotations

import gzip
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Seen:
    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        self.method, self.path, self.headers, self.body = method, path, headers, body

    def json(self) -> object:
        return json.loads(self.body)


class Upstream:
    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.release = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def reset(self) -> None:
        self.release.set()            # whatever still waits from the last test
        self.seen.clear()
        self.release = threading.Event()

    def calls(self) -> list[str]:
        return [s.json()["params"]["name"] for s in self.seen
                if s.method == "POST" and isinstance(s.json(), dict) and s.json().get("method") == "tools/call"]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _result(rid: object, text: str) -> dict:
    return {"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": text}]}}


def _handler(up: Upstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def handle(self) -> None:
            try:
                super().handle()
            except (BrokenPipeError, ConnectionResetError):
                pass                # the proxy hung up: that is what some tests are about

        def _record(self) -> bytes:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            up.seen.append(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            return body

        def _send(self, status: int, body: bytes, ctype: str = "application/json", **headers: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k.replace("_", "-"), v)
            self.end_headers()
            self.wfile.write(body)

        def _sse_start(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def _event(self, obj: object, event_id: str | None = None) -> None:
            head = f"id: {event_id}\n" if event_id else ""
            self._chunk(f"{head}event: message\ndata: {json.dumps(obj)}\n\n".encode())

        def _sse_end(self) -> None:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def do_DELETE(self) -> None:
            self._record()
            self._send(200, b"")

        def do_GET(self) -> None:
            self._record()
            self._sse_start()
            self._chunk(b": ping\n\n")
            self._chunk(b"event: surprise\ndata: {}\n\n")
            self._event({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}, "g1")
            self._sse_end()

        def do_POST(self) -> None:
            body = self._record()
            msg = json.loads(body)
            if isinstance(msg, list):
                self._send(200, json.dumps([_result(m["id"], m["method"]) for m in msg if "id" in m]).encode())
                return
            rid, method = msg.get("id"), msg.get("method")
            params = msg.get("params") or {}
            if rid is None or method is None:
                self._send(202, b"")
                return
            if method == "initialize":
                self._send(200, json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"protocolVersion": "2025-11-25"}})
                           .encode(), Mcp_Session_Id="sess-1")
                return
            if method == "tools/list":
                tools = [{"name": n, "inputSchema": {}} for n in ("echo", "delete_file", "stream")]
                self._send(200, json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"tools": tools}}).encode())
                return
            name = params.get("name")
            if name == "stream":                    # progress, then wait for the test, then the answer
                self._sse_start()
                self._event({"jsonrpc": "2.0", "method": "notifications/progress",
                             "params": {"progressToken": 1, "progress": 1}}, "e1")
                up.release.wait(30)
                self._chunk(b": ping\n\n")
                self._event(_result(rid, "streamed"), "e2")
                self._sse_end()
            elif name == "ask":                     # a server request leash refuses, then the answer
                self._sse_start()
                self._event({"jsonrpc": "2.0", "id": "s0", "method": "x/unknown"})
                self._event({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
                self._event(_result(rid, "asked"))
                self._sse_end()
            elif name == "die_midstream":
                self._sse_start()
                self._event({"jsonrpc": "2.0", "method": "notifications/progress",
                             "params": {"progressToken": 1, "progress": 1}})
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
            elif name == "hang":
                up.release.wait(30)
                self.close_connection = True
            elif name == "html":
                self._send(200, b"<html>oops</html>", "text/html")
            elif name == "wrong_id":
                self._send(200, json.dumps(_result("someone-else", "hi")).encode())
            elif name == "gzip":
                self._send(200, gzip.compress(json.dumps(_result(rid, "zipped")).encode()),
                           Content_Encoding="gzip")
            elif name == "big":
                self._send(200, json.dumps(_result(rid, "x" * params["arguments"]["size"])).encode())
            elif name == "session_gone":
                self._send(404, json.dumps({"jsonrpc": "2.0", "id": None,
                                            "error": {"code": -32001, "message": "Session not found"}}).encode())
            else:
                self._send(200, json.dumps(_result(rid, f"called {name}")).encode(), Mcp_Session_Id="sess-1")

    return Handler
