"""Newline-delimited framing (MCP's stdio transport) with a size bound.

An over-long line is never held whole: past the limit its bytes are skipped
up to the next newline, and only a prefix is kept so the error can name the
request id the sender is waiting on.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

PREFIX_BYTES = 4096
_CHUNK = 1 << 16


async def read_lines(reader: asyncio.StreamReader, limit: int) -> AsyncIterator[tuple[bytes, bool]]:
    """Yields (line, oversized). A line is stripped of its newline and any
    trailing CR; for an oversized line only its first PREFIX_BYTES are given.
    A last line without a newline is still yielded at EOF."""
    buf = bytearray()
    skipping: bytes | None = None          # prefix of the oversized line being skipped
    while True:
        chunk = await reader.read(_CHUNK)
        if not chunk:
            if skipping is not None:
                yield skipping, True
            elif buf:
                yield _strip(buf), False
            return
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            end = len(chunk) if nl < 0 else nl
            if skipping is None:
                buf += chunk[start:end]
                if len(buf) > limit:
                    skipping = bytes(buf[:PREFIX_BYTES])
                    buf.clear()
            if nl < 0:
                break
            if skipping is not None:
                yield skipping, True
                skipping = None
            else:
                yield _strip(buf), False
                buf.clear()
            start = nl + 1


def _strip(buf: bytearray) -> bytes:
    return bytes(buf[:-1]) if buf.endswith(b"\r") else bytes(buf)
