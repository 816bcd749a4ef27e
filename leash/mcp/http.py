"""`leash mcp proxy`: a reverse proxy for one Streamable HTTP MCP endpoint.

The client talks to LISTEN exactly as it would to the upstream endpoint:
POST carries its JSON-RPC messages (answered with JSON or an SSE stream), GET
opens the server's event stream, DELETE ends a session; `Mcp-Session-Id`,
`MCP-Protocol-Version` and every other end-to-end header pass through. Each
POST body is decided by the MCP session it belongs to (`Mcp-Session-Id`, or a
fresh session for session-less requests) before the upstream server sees it;
each JSON body or SSE event coming back is checked and forwarded as soon as
it is complete, so an event stream is never held whole.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import signal
import ssl
import sys
from collections import OrderedDict
from typing import Callable
from urllib.parse import urlsplit

import msgspec

from leash.mcp import jsonrpc, sse
from leash.mcp.httpwire import (HEAD_LIMIT, LAST_CHUNK, Framing, Head, HttpError, TooLarge, chunk,
                                format_head, iter_body, parse_request_head, parse_response_head,
                                read_body, read_head, request_framing, response_framing, status_line)
from leash.mcp.session import CLIENT, SERVER, Gateway, Routed, Session

IDLE_CLIENT_S = 300.0        # a keep-alive client connection with no request this long is closed
CONNECT_TIMEOUT_S = 10.0
MAX_SESSIONS = 256           # MCP sessions remembered (least recently used beyond that are dropped)
MAX_IDLE_UPSTREAM = 16       # idle keep-alive connections to the upstream kept for reuse
_STATUS_OF_CODE = {
    jsonrpc.PARSE_ERROR: 400, jsonrpc.INVALID_REQUEST: 400, jsonrpc.INVALID_PARAMS: 400,
    jsonrpc.HEADER_MISMATCH: 400, jsonrpc.METHOD_NOT_FOUND: 404,
    jsonrpc.UPSTREAM_FAILED: 502, jsonrpc.UPSTREAM_TIMEOUT: 504,
}
# Methods whose target name the 2026-07-28 transport mirrors into Mcp-Name.
_NAME_PARAM = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


class UpstreamURLError(ValueError):
    pass


class ProxyConfig(msgspec.Struct, frozen=True):
    listen_host: str
    listen_port: int
    upstream: str                 # the URL as given
    scheme: str
    host: str
    port: int
    target: str                   # path and query sent upstream
    authority: str                # Host header sent upstream
    endpoint: str                 # the path served on LISTEN (the upstream's path)

    @classmethod
    def create(cls, listen_host: str, listen_port: int, url: str) -> "ProxyConfig":
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamURLError(f"--upstream {url!r}: expected an http:// or https:// URL")
        if parts.username or parts.password or parts.fragment:
            raise UpstreamURLError(f"--upstream {url!r}: no credentials or fragment in the URL")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise UpstreamURLError(f"--upstream {url!r}: invalid port") from None
        path = parts.path or "/"
        target = path + (f"?{parts.query}" if parts.query else "")
        return cls(listen_host, listen_port, url, parts.scheme, parts.hostname, port, target,
                   parts.netloc, path)


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reused: bool) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = reused

    def close(self) -> None:
        self.writer.close()


class _Upstream:
    """Connections to the upstream server, kept alive and reused."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self._idle: list[_Conn] = []
        self._ssl = ssl.create_default_context() if config.scheme == "https" else None

    async def request(self, method: str, headers: list[tuple[str, str]], body: bytes) -> tuple[_Conn, Head]:
        """Send one request, return the connection and the final response head.
        A reused connection the server closed meanwhile is retried once on a
        fresh one (nothing reached the server's application then)."""
        c = self.config
        data = format_head(f"{method} {c.target} HTTP/1.1",
                           [*headers, ("Host", c.authority), ("Content-Length", str(len(body)))]) + body
        while True:
            conn = self._take() or await self._open()
            try:
                conn.writer.write(data)
                await conn.writer.drain()
                while True:
                    raw = await read_head(conn.reader)
                    if raw is None:
                        raise ConnectionResetError("the upstream server closed the connection")
                    head = parse_response_head(raw)
                    if head.status >= 200:
                        return conn, head
            except (ConnectionError, OSError, HttpError):
                conn.close()
                if not conn.reused:
                    raise
            except BaseException:
                conn.close()            # cancelled mid-exchange (a timeout): unusable
                raise

    def _take(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            conn.close()
        return None

    async def _open(self) -> _Conn:
        c = self.config
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(c.host, c.port, ssl=self._ssl, limit=HEAD_LIMIT,
                                    server_hostname=c.host if self._ssl else None),
            CONNECT_TIMEOUT_S)
        return _Conn(reader, writer, reused=False)

    def release(self, conn: _Conn, head: Head) -> None:
        if "close" in head.tokens("connection") or conn.reader.at_eof() or len(self._idle) >= MAX_IDLE_UPSTREAM:
            conn.close()
            return
        conn.reused = True
        self._idle.append(conn)

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


class Proxy:
    def __init__(self, gateway: Gateway, config: ProxyConfig) -> None:
        self.gw = gateway
        self.config = config
        self.upstream = _Upstream(config)
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self._background: set[asyncio.Task] = set()

    # ------------------------------------------------------------ client connections

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            keep = True
            while keep:
                try:
                    raw = await asyncio.wait_for(read_head(reader), IDLE_CLIENT_S)
                except asyncio.TimeoutError:
                    break
                if raw is None:
                    break
                head = parse_request_head(raw)
                keep = await self._exchange(head, reader, writer)
                keep = keep and "close" not in head.tokens("connection")
        except HttpError as e:
            self.gw.record("-", "deny", method="-", outcome="invalid", direction=CLIENT,
                           reason=f"malformed HTTP request: {e.message}")
            await _reply(writer, e.status, [], b"", close=True)
        except TooLarge:
            self.gw.record("-", "deny", method="-", outcome="invalid", direction=CLIENT,
                           reason="HTTP request body over the size limit")
            await _reply(writer, 413, [], b"", close=True)
        except (ConnectionError, OSError):
            pass
        except Exception as e:     # one broken exchange must not take the proxy down
            self.gw.record("-", "deny", method="-", outcome="internal error", direction=CLIENT,
                           reason=f"proxy error: {type(e).__name__}: {e}")
            await _reply(writer, 500, [], b"", close=True)
        finally:
            writer.close()

    async def _exchange(self, head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """One request/response; True when the connection may carry another."""
        framing = request_framing(head)
        if head.target.split("?", 1)[0] != self.config.endpoint:
            await _discard(reader, framing, self.gw.settings.max_message_bytes)
            await _reply(writer, 404, [], b"")
            return True
        if head.method == "POST":
            return await self._post(head, reader, writer, framing)
        await _discard(reader, framing, self.gw.settings.max_message_bytes)
        if head.method == "GET":
            return await self._get(head, reader, writer)
        if head.method == "DELETE":
            return await self._delete(head, writer)
        await _reply(writer, 405, [("Allow", "GET, POST, DELETE")], b"")
        return True

    def _session(self, sid: str | None) -> Session:
        if sid is None:
            return self.gw.session()
        session = self.sessions.get(sid)
        if session is None:
            session = self.sessions[sid] = self.gw.session()
            while len(self.sessions) > MAX_SESSIONS:
                _, old = self.sessions.popitem(last=False)
                old.abandon(None, "session forgotten by the proxy (too many sessions)")
        self.sessions.move_to_end(sid)
        return session

    # ------------------------------------------------------------ POST

    async def _post(self, head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    framing: Framing) -> bool:
        sid = head.get("mcp-session-id")
        session = self._session(sid)
        if "100-continue" in head.tokens("expect"):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            body = await read_body(reader, framing, self.gw.settings.max_message_bytes)
        except TooLarge as e:
            await _answer(writer, 413, session.oversized(CLIENT, e.prefix).to_client, close=True)
            return False
        mismatch = self._routing_mismatch(head, body)
        if mismatch is not None:
            await _answer(writer, 400, [jsonrpc.encode(mismatch)])
            return True
        routed = session.from_client(body)
        if not routed.to_server:
            await _answer(writer, _status_of(routed.to_client), routed.to_client)
            return True
        headers = head.end_to_end()
        try:
            conn, rhead = await _guarded(self.upstream.request("POST", headers, routed.to_server[0]),
                                         session.next_deadline(routed.forwarded), reader)
        except _ClientGone:
            session.abandon(routed.forwarded, "the client disconnected before the answer")
            return False
        except asyncio.TimeoutError:
            timed_out = session.expire(ids=routed.forwarded)
            await _answer(writer, 504, routed.to_client + timed_out.to_client)
            return True
        except (ConnectionError, OSError, HttpError) as e:
            failed = session.fail(routed.forwarded, f"cannot reach the MCP server: {_why(e)}")
            await _answer(writer, 502, routed.to_client + failed.to_client)
            return True
        new_sid = rhead.get("mcp-session-id")
        if new_sid and sid is None:
            self.sessions[new_sid] = session
        return await self._upstream_answer(head, rhead, conn, writer, reader, session, routed)

    def _routing_mismatch(self, head: Head, body: bytes) -> jsonrpc.Message | None:
        """The 2026-07-28 transport mirrors the method and target name into
        Mcp-Method / Mcp-Name headers. The gateway decides on the body; a
        request whose headers say something else is refused, so nothing
        routing on headers downstream can be told a different story."""
        methods_h, names_h = head.get_all("mcp-method"), head.get_all("mcp-name")
        if not methods_h and not names_h:
            return None
        try:
            frame = jsonrpc.parse(body)
        except jsonrpc.WireError:
            return None                  # the session answers that
        msg = frame.items[0]
        if isinstance(msg, jsonrpc.WireError):
            return None
        rid = msg.id if isinstance(msg.id, (int, str)) else None
        why = None
        if frame.batch or len(methods_h) > 1 or len(names_h) > 1:
            why = "routing headers on a batch, or repeated"
        elif methods_h and methods_h[0] != msg.method:
            why = "Mcp-Method header does not match the body's method"
        elif names_h and msg.method in _NAME_PARAM:
            key = _NAME_PARAM[msg.method]
            params = msg.params if isinstance(msg.params, dict) else {}
            try:
                value = jsonrpc.decode_raw(params[key], str) if key in params else None
            except msgspec.DecodeError:
                value = None
            if value is None or _decode_header_value(names_h[0]) != value:
                why = f"Mcp-Name header does not match the body's params.{key}"
        if why is None:
            return None
        self.gw.record(str(msg.method), "deny", method=str(msg.method), outcome="invalid", id=rid,
                       direction=CLIENT, reason=why)
        return jsonrpc.error_reply(rid, jsonrpc.HEADER_MISMATCH, f"leash: {why}")

    async def _upstream_answer(self, head: Head, rhead: Head, conn: _Conn, writer: asyncio.StreamWriter,
                               reader: asyncio.StreamReader, session: Session, routed: Routed) -> bool:
        framing = response_framing(rhead, "POST")
        ctype = (rhead.get("content-type") or "").split(";")[0].strip().lower()
        encoding = (rhead.get("content-encoding") or "identity").lower()
        passed = [(k, v) for k, v in rhead.end_to_end() if k.lower() not in ("content-type", "content-encoding")]
        if encoding != "identity":
            conn.close()
            failed = session.fail(session.pending(routed.forwarded),
                                  f"the MCP server answered with {encoding}-encoded content leash cannot check")
            await _answer(writer, 502, routed.to_client + failed.to_client)
            return True
        if ctype == "text/event-stream" and framing.kind != "none":
            return await self._stream(rhead, conn, framing, writer, reader, session, routed.to_client,
                                      routed.forwarded, head)
        limit = self.gw.settings.max_message_bytes
        try:
            body = await _guarded(read_body(conn.reader, framing, limit),
                                  session.next_deadline(routed.forwarded), reader)
        except _ClientGone:
            conn.close()
            session.abandon(routed.forwarded, "the client disconnected before the answer")
            return False
        except asyncio.TimeoutError:
            conn.close()
            timed_out = session.expire(ids=routed.forwarded)
            await _answer(writer, 504, routed.to_client + timed_out.to_client)
            return True
        except TooLarge as e:
            conn.close()
            too_big = session.oversized(SERVER, e.prefix)
            self._side_post(too_big.to_server, head)
            frames = routed.to_client + too_big.to_client
            frames += session.fail(session.pending(routed.forwarded), "the MCP server's answer is too large").to_client
            await _answer(writer, 502, frames)
            return True
        except HttpError as e:
            conn.close()
            failed = session.fail(session.pending(routed.forwarded), f"broken answer from the MCP server: {e.message}")
            await _answer(writer, 502, routed.to_client + failed.to_client)
            return True
        self.upstream.release(conn, rhead)
        frames = list(routed.to_client)
        status = rhead.status
        if body and ctype == "application/json":
            if status >= 400:
                frames += self._http_error(body, session, routed.forwarded, status)
            else:
                answer = session.from_server(body)
                frames += answer.to_client
                self._side_post(answer.to_server, head)
        unusable = ""
        if body and ctype != "application/json" or not body and status >= 400:
            unusable = f"the MCP server answered HTTP {status} without a JSON-RPC body"
        left = session.pending(routed.forwarded)
        if left:
            frames += session.fail(left, unusable or "the MCP server's answer left this request unanswered").to_client
            status = 502 if status < 300 else status
        if not frames:
            await _reply(writer, status, passed, b"")
            return True
        if status in (202, 204):
            status = 200
        await _answer(writer, status, frames, passed)
        return True

    def _http_error(self, body: bytes, session: Session, forwarded: list, status: int) -> list[bytes]:
        """A JSON-RPC error the server sent with an HTTP error status (often
        without the request's id: it rejected the POST as a whole) answers
        every request of that POST."""
        try:
            frame = jsonrpc.parse(body)
            msg = frame.items[0]
        except jsonrpc.WireError:
            msg = None
        if isinstance(msg, jsonrpc.Message) and not frame.batch and msg.error is not msgspec.UNSET:
            if isinstance(msg.id, (int, str)) and msg.id in forwarded:
                return session.from_server(body).to_client
            error = msg.error
            return session.fail(session.pending(forwarded), error.message, code=error.code,
                                prefix="").to_client
        return session.fail(session.pending(forwarded),
                            f"the MCP server answered HTTP {status} with an unreadable body").to_client

    # ------------------------------------------------------------ event streams

    async def _stream(self, rhead: Head, conn: _Conn, framing: Framing, writer: asyncio.StreamWriter,
                      reader: asyncio.StreamReader, session: Session, first: list[bytes],
                      forwarded: list, head: Head) -> bool:
        """Relay an SSE response event by event, each as soon as it is checked.
        A POST's stream ends for the client once every request it carried is
        answered (what the server is about to do anyway); otherwise when the
        server ends it, the requests time out, or the client goes away."""
        passed = [(k, v) for k, v in rhead.end_to_end() if k.lower() != "content-encoding"]
        # Output is gathered per upstream read and written at once: fewer
        # wake-ups of the client for the same bytes.
        out = bytearray(format_head(status_line(rhead.status), [*passed, ("Transfer-Encoding", "chunked")]))
        out += _sse_frames(first)
        parser = sse.Parser(self.gw.settings.max_message_bytes)
        body = iter_body(conn.reader, framing).__aiter__()
        watch = asyncio.ensure_future(reader.read(1))
        upstream_done = False
        try:
            if not forwarded:
                await _flush(writer, out)          # an event stream opens now, not at its first event
            while True:
                deadline = session.next_deadline(forwarded)
                step = asyncio.ensure_future(body.__anext__())
                done, _ = await asyncio.wait({step, watch}, return_when=asyncio.FIRST_COMPLETED,
                                             timeout=None if deadline is None else max(0.0, deadline - _now()))
                if watch in done:
                    step.cancel()
                    session.abandon(session.pending(forwarded), "the client disconnected mid-stream")
                    return False
                if not done:
                    step.cancel()
                    out += _sse_frames(session.expire(ids=forwarded).to_client)
                    break
                try:
                    data = step.result()
                except StopAsyncIteration:
                    upstream_done = True
                    break
                except HttpError as e:
                    out += _sse_frames(session.fail(session.pending(forwarded),
                                                    f"the MCP server's stream broke: {e.message}").to_client)
                    break
                for event in parser.feed(data):
                    out += self._relay(event, session, head)
                if forwarded and not session.pending(forwarded):
                    break
                await _flush(writer, out)
            left = session.pending(forwarded)
            if left:
                out += _sse_frames(session.fail(left, "the MCP server ended the stream without answering").to_client)
            out += LAST_CHUNK
            await _flush(writer, out)
            return True
        except (ConnectionError, OSError):
            session.abandon(session.pending(forwarded), "the client disconnected mid-stream")
            return False
        finally:
            watch.cancel()
            if upstream_done:
                self.upstream.release(conn, rhead)
            else:
                self._finish_upstream(conn, rhead, body, parser)

    def _finish_upstream(self, conn: _Conn, rhead: Head, body, parser: sse.Parser) -> None:
        """Read what is left of an upstream stream after the client's part
        ended, in the background, so the connection can be reused; anything
        the server still sends there reaches nobody and is recorded."""
        async def drain() -> None:
            try:
                while True:
                    data = await asyncio.wait_for(body.__anext__(), 1.0)
                    for event in parser.feed(data):
                        if event.data:
                            self.gw.record("-", "deny", method="-", outcome="dropped", direction=SERVER,
                                           reason="message after the stream's last answer")
            except StopAsyncIteration:
                self.upstream.release(conn, rhead)
            except BaseException:
                conn.close()
        task = asyncio.ensure_future(drain())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _relay(self, event: sse.Event, session: Session, head: Head) -> bytes:
        """The chunk to send the client for one upstream event (may be empty)."""
        if event.comment is not None:
            return chunk(sse.encode(event))           # keep-alive pings
        frames: list[bytes] = []
        if event.oversized:
            too_big = session.oversized(SERVER, event.data or b"")
            self._side_post(too_big.to_server, head)
            frames = too_big.to_client
        elif event.data:
            if event.event in (None, "message"):
                routed = session.from_server(event.data)
                frames = routed.to_client
                self._side_post(routed.to_server, head)
            else:
                self.gw.record("-", "deny", method="-", outcome="dropped", direction=SERVER,
                               reason=f"SSE event of type {event.event!r} (MCP sends only messages)")
                if not self.gw.enforce:
                    frames = [event.data]
        out = bytearray()
        for i, frame in enumerate(frames):
            out += sse.encode(sse.Event(data=frame, event=event.event,
                                        id=event.id if i == 0 else None, retry=event.retry if i == 0 else None))
        if not frames and (event.id is not None or event.retry is not None):
            # Nothing to deliver, but the client's resumption point still moves on.
            out += sse.encode(sse.Event(id=event.id, retry=event.retry))
        return chunk(bytes(out))

    def _side_post(self, frames: list[bytes], head: Head) -> None:
        """Answers the gateway gives the server itself (refused server
        requests) go up in POSTs of their own, in the client's session."""
        if not frames:
            return
        headers = [(k, v) for k, v in head.end_to_end()
                   if k.lower() in ("mcp-session-id", "mcp-protocol-version", "authorization")]
        headers += [("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream")]

        async def post(frame: bytes) -> None:
            try:
                conn, rhead = await self.upstream.request("POST", headers, frame)
                await _discard(conn.reader, response_framing(rhead, "POST"), self.gw.settings.max_message_bytes)
                self.upstream.release(conn, rhead)
            except (ConnectionError, OSError, HttpError, TooLarge):
                pass
        for frame in frames:
            task = asyncio.ensure_future(post(frame))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------ GET, DELETE

    async def _get(self, head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        session = self._session(head.get("mcp-session-id"))
        opened = await self._open_upstream("GET", head, writer)
        if opened is None:
            return True
        conn, rhead = opened
        framing = response_framing(rhead, "GET")
        ctype = (rhead.get("content-type") or "").split(";")[0].strip().lower()
        if rhead.status == 200 and ctype == "text/event-stream" and framing.kind != "none" \
                and (rhead.get("content-encoding") or "identity").lower() == "identity":
            return await self._stream(rhead, conn, framing, writer, reader, session, [], [], head)
        return await self._plain(rhead, conn, framing, writer, session, head)

    async def _delete(self, head: Head, writer: asyncio.StreamWriter) -> bool:
        sid = head.get("mcp-session-id")
        session = self._session(sid)
        opened = await self._open_upstream("DELETE", head, writer)
        if opened is None:
            return True
        conn, rhead = opened
        keep = await self._plain(rhead, conn, response_framing(rhead, "DELETE"), writer, session, head)
        if 200 <= rhead.status < 300 and sid is not None:
            self.sessions.pop(sid, None)
            session.abandon(None, "the client ended the session")
        return keep

    async def _open_upstream(self, method: str, head: Head, writer: asyncio.StreamWriter
                             ) -> tuple[_Conn, Head] | None:
        """Send a bodiless request upstream; on failure answer the client
        (502, or 504 once --timeout passed) and return None."""
        timeout = self.gw.settings.timeout_s
        try:
            return await _within(self.upstream.request(method, head.end_to_end(), b""),
                                 _now() + timeout if timeout > 0 else None)
        except (ConnectionError, OSError, HttpError, asyncio.TimeoutError) as e:
            timed_out = isinstance(e, asyncio.TimeoutError)
            self.gw.record("-", "deny", method=method, outcome="timeout" if timed_out else "server failed",
                           direction=SERVER, reason="the MCP server did not answer in time" if timed_out
                           else f"cannot reach the MCP server: {_why(e)}")
            await _reply(writer, 504 if timed_out else 502, [], b"")
            return None

    async def _plain(self, rhead: Head, conn: _Conn, framing: Framing, writer: asyncio.StreamWriter,
                     session: Session, head: Head) -> bool:
        """A response that is not an event stream: its status passes on; a
        JSON body is checked like any message, any other body is dropped."""
        passed = [(k, v) for k, v in rhead.end_to_end() if k.lower() not in ("content-type", "content-encoding")]
        try:
            body = await read_body(conn.reader, framing, self.gw.settings.max_message_bytes)
        except (TooLarge, HttpError):
            conn.close()
            await _reply(writer, 502, [], b"")
            return True
        self.upstream.release(conn, rhead)
        ctype = (rhead.get("content-type") or "").split(";")[0].strip().lower()
        frames: list[bytes] = []
        if body and ctype == "application/json":
            routed = session.from_server(body)
            frames = routed.to_client
            self._side_post(routed.to_server, head)
        if frames:
            await _answer(writer, rhead.status, frames, passed)
        else:
            await _reply(writer, rhead.status, passed, b"")
        return True


# ---------------------------------------------------------------- helpers

async def _discard(reader: asyncio.StreamReader, framing: Framing, limit: int) -> None:
    """Read and drop a body (the connection stays usable)."""
    if framing.kind in ("length", "chunked"):
        await read_body(reader, framing, limit)


async def _reply(writer: asyncio.StreamWriter, status: int, headers: list[tuple[str, str]], body: bytes,
                 close: bool = False) -> None:
    extra = [("Content-Length", str(len(body)))]
    if close:
        extra.append(("Connection", "close"))
    try:
        writer.write(format_head(status_line(status), [*headers, *extra]) + body)
        await writer.drain()
    except (ConnectionError, OSError):
        pass


async def _answer(writer: asyncio.StreamWriter, status: int, frames: list[bytes],
                  headers: list[tuple[str, str]] | None = None, close: bool = False) -> None:
    """JSON-RPC frames as one application/json body (several frames merge
    into one array: the answer to a batch)."""
    if not frames:
        await _reply(writer, 202 if status < 300 else status, headers or [], b"", close)
        return
    await _reply(writer, status, [*(headers or []), ("Content-Type", "application/json")],
                 _merge(frames), close)


def _sse_frames(frames: list[bytes]) -> bytes:
    """Frames the gateway adds to an event stream, as one chunk."""
    return chunk(b"".join(sse.encode(sse.Event(data=frame, event="message")) for frame in frames))


async def _flush(writer: asyncio.StreamWriter, out: bytearray) -> None:
    if out:
        writer.write(bytes(out))
        out.clear()
        await writer.drain()


def _merge(frames: list[bytes]) -> bytes:
    if len(frames) == 1:
        return frames[0]
    items: list[msgspec.Raw] = []
    for frame in frames:
        if frame.lstrip().startswith(b"["):
            items.extend(msgspec.json.decode(frame, type=list[msgspec.Raw]))
        else:
            items.append(msgspec.Raw(frame))
    return msgspec.json.encode(items)


def _status_of(frames: list[bytes]) -> int:
    """HTTP status for answers the gateway gives itself: the MCP transport's
    mapping for one error, 200 otherwise (202 when there is nothing to say)."""
    if not frames:
        return 202
    if len(frames) == 1 and not frames[0].startswith(b"["):
        msg = msgspec.json.decode(frames[0], type=jsonrpc.Message)
        if msg.error is not msgspec.UNSET:
            return _STATUS_OF_CODE.get(msg.error.code, 200)
    return 200


def _decode_header_value(value: str) -> str | None:
    """Mcp-Name values that are not plain printable ASCII travel as =?base64?...?=."""
    if value.startswith("=?base64?") and value.endswith("?="):
        try:
            return base64.b64decode(value[9:-2], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
    return value


def _why(e: BaseException) -> str:
    return getattr(e, "message", None) or getattr(e, "strerror", None) or str(e) or type(e).__name__


def _now() -> float:
    return asyncio.get_running_loop().time()


class _ClientGone(Exception):
    pass


async def _guarded(awaitable, deadline: float | None, client: asyncio.StreamReader):
    """`awaitable`'s result, unless the deadline passes first
    (asyncio.TimeoutError) or the client hangs up while it waits (_ClientGone);
    then `awaitable` is cancelled."""
    task = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(client.read(1))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED,
                                     timeout=None if deadline is None else max(0.0, deadline - _now()))
        if task in done:
            return task.result()
        task.cancel()
        raise _ClientGone() if watch in done else asyncio.TimeoutError()
    finally:
        watch.cancel()


async def _within(awaitable, deadline: float | None):
    """`awaitable`, or asyncio.TimeoutError once the (loop-clock) deadline passes."""
    if deadline is None:
        return await awaitable
    return await asyncio.wait_for(awaitable, max(0.0, deadline - _now()))


async def serve(gateway: Gateway, config: ProxyConfig, reload: Callable[[], None]) -> int:
    """Serve until SIGTERM or SIGINT (exit status 0; 2 when LISTEN cannot be
    bound); SIGHUP calls `reload` (reload the policy now)."""
    loop = asyncio.get_running_loop()
    proxy = Proxy(gateway, config)
    try:
        server = await asyncio.start_server(proxy.handle, config.listen_host, config.listen_port, limit=HEAD_LIMIT)
    except OSError as e:
        print(f"leash mcp proxy: cannot listen on {config.listen_host}:{config.listen_port}: {e.strerror or e}",
              file=sys.stderr)
        return 2
    port = server.sockets[0].getsockname()[1]
    print(f"leash mcp proxy: http://{config.listen_host}:{port}{config.endpoint} -> {config.upstream}",
          file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, reload)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    for session in proxy.sessions.values():
        session.abandon(None, "the proxy stopped")
    proxy.upstream.close()
    return 0
