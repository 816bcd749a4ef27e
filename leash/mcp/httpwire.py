"""HTTP/1.1 message framing on asyncio streams, as much as a reverse proxy for
one MCP endpoint needs: heads, Content-Length and chunked bodies (read whole
under a bound, or streamed chunk by chunk), close-delimited response bodies.

Strict where leniency would let the proxy and the server frame a message
differently: a request with both Content-Length and Transfer-Encoding,
differing Content-Lengths, a transfer coding other than chunked, folded
header lines or bare-LF line ends is refused.
"""

from __future__ import annotations

import asyncio
import re
from typing import AsyncIterator

import msgspec

HEAD_LIMIT = 64 << 10
MAX_HEADERS = 100
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_CHUNK = 1 << 16

# Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy always sets itself.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade", "content-length", "host", "expect",
    "accept-encoding",
})


class HttpError(Exception):
    """A malformed or unsupported HTTP message; `status` is the answer to give."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Head(msgspec.Struct):
    """A request head (method, target) or a response head (status, reason)."""
    version: str
    headers: list[tuple[str, str]]                       # as received, in order
    method: str = ""
    target: str = ""
    status: int = 0
    reason: str = ""
    index: dict[str, list[str]] = {}                     # lowercased name -> values

    def __post_init__(self) -> None:
        for k, v in self.headers:
            self.index.setdefault(k.lower(), []).append(v)

    def get(self, name: str) -> str | None:
        values = self.index.get(name)
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        """Values of a header; `name` in lowercase."""
        return self.index.get(name, [])

    def tokens(self, name: str) -> set[str]:
        """Comma-separated header tokens, lowercased (Connection, Transfer-Encoding)."""
        return {t.strip().lower() for v in self.get_all(name) for t in v.split(",") if t.strip()}

    def end_to_end(self) -> list[tuple[str, str]]:
        """The headers a proxy passes on."""
        named = self.tokens("connection")
        return [(k, v) for k, v in self.headers if k.lower() not in HOP_BY_HOP and k.lower() not in named]


class Framing(msgspec.Struct, frozen=True):
    kind: str                 # "length" | "chunked" | "close" | "none"
    length: int = 0


async def read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The bytes of one head up to and including the blank line; None at a
    clean EOF before any byte."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise HttpError(400, "connection closed in the middle of a message head") from None
    except asyncio.LimitOverrunError:
        raise HttpError(431, f"message head exceeds {HEAD_LIMIT} bytes") from None


def parse_request_head(data: bytes) -> Head:
    line, headers = _split_head(data)
    parts = line.split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if version != "HTTP/1.1":
        raise HttpError(505, "only HTTP/1.1 is supported")
    if not _TOKEN.match(method.encode()):
        raise HttpError(400, "malformed request method")
    return Head(version, headers, method=method, target=target)


def parse_response_head(data: bytes) -> Head:
    line, headers = _split_head(data)
    version, _, rest = line.partition(" ")
    status_text, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(status_text) != 3 or not status_text.isdigit():
        raise HttpError(502, "malformed status line from the upstream server")
    return Head(version, headers, status=int(status_text), reason=reason)


def _split_head(data: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = data[:-4].split(b"\r\n")
    if any(b"\n" in line or b"\r" in line for line in lines):
        raise HttpError(400, "bare CR or LF in a message head")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise HttpError(400, "malformed header field")
        try:
            headers.append((name.decode("ascii"), value.strip(b" \t").decode("latin-1")))
        except UnicodeDecodeError:
            raise HttpError(400, "malformed header field") from None
    return lines[0].decode("latin-1"), headers


def request_framing(head: Head) -> Framing:
    return _framing(head, request=True)


def response_framing(head: Head, request_method: str) -> Framing:
    if head.status < 200 or head.status in (204, 304) or request_method == "HEAD":
        return Framing("none")
    return _framing(head, request=False)


def _framing(head: Head, request: bool) -> Framing:
    codings = head.tokens("transfer-encoding")
    lengths = head.get_all("content-length")
    if codings:
        if lengths:
            raise HttpError(400 if request else 502, "both Transfer-Encoding and Content-Length")
        if codings != {"chunked"}:
            raise HttpError(501 if request else 502, "unsupported transfer coding")
        return Framing("chunked")
    if lengths:
        values = {v.strip() for one in lengths for v in one.split(",")}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise HttpError(400 if request else 502, "invalid Content-Length")
        return Framing("length", int(values.pop()))
    return Framing("none") if request else Framing("close")


async def iter_body(reader: asyncio.StreamReader, framing: Framing) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive. Raises HttpError(502/400) when the
    peer breaks the framing (EOF inside a body, a bad chunk line)."""
    try:
        if framing.kind == "length":
            left = framing.length
            while left:
                chunk = await reader.read(min(left, _CHUNK))
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(chunk)
                yield chunk
        elif framing.kind == "chunked":
            while True:
                size = _chunk_size(await reader.readuntil(b"\r\n"))
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass                     # trailer fields are dropped
                    return
                left = size
                while left:
                    chunk = await reader.read(min(left, _CHUNK))
                    if not chunk:
                        raise asyncio.IncompleteReadError(b"", left)
                    left -= len(chunk)
                    yield chunk
                if await reader.readexactly(2) != b"\r\n":
                    raise HttpError(502, "malformed chunked body")
        elif framing.kind == "close":
            while chunk := await reader.read(_CHUNK):
                yield chunk
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise HttpError(502, "the body ended before its framing said") from None


def _chunk_size(line: bytes) -> int:
    text = line[:-2].split(b";", 1)[0].strip()
    if not text or len(text) > 16 or not re.fullmatch(rb"[0-9A-Fa-f]+", text):
        raise HttpError(502, "malformed chunk size")
    return int(text, 16)


class TooLarge(Exception):
    def __init__(self, prefix: bytes) -> None:
        super().__init__("body over the limit")
        self.prefix = prefix


async def read_body(reader: asyncio.StreamReader, framing: Framing, limit: int,
                    prefix_bytes: int = 4096) -> bytes:
    """A whole body of at most `limit` bytes; TooLarge (with the first bytes)
    beyond that, without reading the rest."""
    if framing.kind == "length" and framing.length > limit:
        raise TooLarge(await reader.read(min(prefix_bytes, framing.length)))
    body = bytearray()
    async for chunk in iter_body(reader, framing):
        body += chunk
        if len(body) > limit:
            raise TooLarge(bytes(body[:prefix_bytes]))
    return bytes(body)


def format_head(start_line: str, headers: list[tuple[str, str]]) -> bytes:
    out = [start_line]
    out.extend(f"{k}: {v}" for k, v in headers)
    return ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")


def status_line(status: int) -> str:
    return f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


LAST_CHUNK = b"0\r\n\r\n"

_REASONS = {
    100: "Continue", 200: "OK", 202: "Accepted", 204: "No Content", 400: "Bad Request",
    404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable", 408: "Request Timeout",
    413: "Content Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}
