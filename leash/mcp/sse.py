"""Server-Sent Events, parsed incrementally (WHATWG HTML, "event stream
interpretation"): the proxy reads an MCP server's event stream one event at a
time and writes each on as soon as it has been checked, so a long-lived
stream is never held whole.
"""

from __future__ import annotations

import msgspec

PREFIX_BYTES = 4096


class Event(msgspec.Struct):
    """One dispatched event, or a comment line (`comment` set, nothing else)."""
    data: bytes | None = None         # data lines joined with "\n"; None: no data field
    event: str | None = None
    id: str | None = None
    retry: str | None = None
    comment: bytes | None = None
    oversized: bool = False           # over the limit: `data` holds only its first bytes


class Parser:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._cr = False                 # the last chunk ended in CR: a following LF belongs to it
        self._reset()

    def _reset(self) -> None:
        self._data: list[bytes] = []
        self._size = 0
        self._fields: dict[str, str] = {}
        self._skipping = False

    def feed(self, chunk: bytes) -> list[Event]:
        if self._cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._cr = chunk.endswith(b"\r")
        self._buf += chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events: list[Event] = []
        start = 0
        while (nl := self._buf.find(b"\n", start)) >= 0:
            event = self._line(bytes(self._buf[start:nl]))
            if event is not None:
                events.append(event)
            start = nl + 1
        del self._buf[:start]
        if len(self._buf) > self._limit and not self._skipping:
            self._oversize(bytes(self._buf[:PREFIX_BYTES]))
        if self._skipping:
            self._buf.clear()
        return events

    def _line(self, line: bytes) -> Event | None:
        if not line:
            return self._dispatch()
        if self._skipping:
            return None
        if line.startswith(b":"):
            return Event(comment=line[1:])
        name, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        field = name.decode("utf-8", "replace")
        if field == "data":
            self._data.append(value)
            self._size += len(value) + 1
            if self._size > self._limit:
                self._oversize(b"\n".join(self._data)[:PREFIX_BYTES])
        elif field in ("event", "id", "retry"):
            self._fields[field] = value.decode("utf-8", "replace")
        return None

    def _oversize(self, prefix: bytes) -> None:
        self._skipping = True
        self._data = [prefix]

    def _dispatch(self) -> Event | None:
        data = b"\n".join(self._data) if self._data else None
        f, oversized = self._fields, self._skipping
        self._reset()
        if data is None and not f:
            return None
        return Event(data=data, event=f.get("event"), id=f.get("id"), retry=f.get("retry"),
                     oversized=oversized)


def encode(event: Event) -> bytes:
    if event.comment is not None:
        return b":" + event.comment + b"\n\n"
    out = bytearray()
    for field in ("id", "event", "retry"):
        value = getattr(event, field)
        if value is not None:
            out += f"{field}: {value}\n".encode()
    if event.data is not None:
        for line in event.data.split(b"\n"):
            out += b"data: " + line + b"\n"
    return bytes(out) + b"\n"
