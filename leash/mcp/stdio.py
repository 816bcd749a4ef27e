"""A stdio MCP server behind the gateway: `leash mcp wrap` (the client is our
stdin/stdout) and the daemon's hosted servers (the client is a socket
connection, leash/mcp/service.py) share `run_session`.

Three tasks share one `Session`: client -> server lines, server -> client
lines, and a timer that answers requests the server leaves unanswered. A
session ends when the server's stdout ends; when the client closes its side
the server's stdin is closed too, and a server that then does not exit is
terminated after a grace period. Whatever is still pending at the end gets an
error answer (if the client is still there) and an audit record.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
import threading
from typing import Callable, Union

from leash.mcp.lines import read_lines
from leash.mcp.session import CLIENT, SERVER, Gateway, Routed, Session

EXIT_GRACE_S = 5.0


class _Pipes:
    """The two byte streams a session writes to, and what happened to them."""

    def __init__(self, client_out: "_Writer", server_in: asyncio.StreamWriter) -> None:
        self.client_out = client_out
        self.server_in = server_in
        self.client_gone = False
        self.server_closed = False

    async def send(self, routed: Routed) -> None:
        for frame in routed.to_server:
            await self._write_server(frame)
        for frame in routed.to_client:
            await self._write_client(frame)

    async def _write_client(self, frame: bytes) -> None:
        if self.client_gone:
            return
        try:
            self.client_out.write(frame + b"\n")
            await self.client_out.drain()
        except (ConnectionError, OSError):
            self.client_gone = True

    async def _write_server(self, frame: bytes) -> None:
        if self.server_closed:
            return
        try:
            self.server_in.write(frame + b"\n")
            await self.server_in.drain()
        except (ConnectionError, OSError):
            # The server is exiting; its pending requests are answered when
            # its stdout ends.
            self.server_closed = True


async def wrap(gateway: Gateway, argv: list[str], reload: Callable[[], None]) -> int:
    """Run the server `argv` behind the gateway, for the client on our
    stdin/stdout; SIGHUP calls `reload`. Returns the server's exit status
    (128+N when a signal N ended it, 127 when it could not start)."""
    loop = asyncio.get_running_loop()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    except OSError as e:
        gateway.record(argv[0], "deny", method="-", outcome="server failed",
                       reason=f"cannot start the MCP server: {e.strerror or e}")
        print(f"leash: cannot start the MCP server {argv[0]!r}: {e.strerror or e}", file=sys.stderr)
        return 127

    client_in, client_out = await _client_streams(loop)
    loop.add_signal_handler(signal.SIGHUP, reload)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _terminate, proc)
    status = await run_session(gateway, proc, client_in, client_out)
    try:
        client_out.close()
    except OSError:
        pass
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    return status if status >= 0 else 128 - status


async def run_session(gateway: Gateway, proc: asyncio.subprocess.Process, client_in: asyncio.StreamReader,
                      client_out: "_Writer") -> int:
    """One session between a client and the running server `proc` (stdin and
    stdout piped), until the server's stdout ends. Returns its exit status
    (-N: killed by signal N). The caller closes `client_out`."""
    assert proc.stdin is not None and proc.stdout is not None
    session = gateway.session()
    pipes = _Pipes(client_out, proc.stdin)
    limit = gateway.settings.max_message_bytes
    client_task = asyncio.create_task(_client_to_server(session, pipes, client_in, proc, limit))
    timer_task = asyncio.create_task(_timer(session, pipes)) if gateway.settings.timeout_s > 0 else None
    await _server_to_client(session, pipes, proc.stdout, limit)

    status = await _reap(proc)
    for task in (client_task, timer_task):
        if task is not None:
            task.cancel()
    why = (f"the MCP server exited (status {status}) before answering" if status >= 0
           else f"the MCP server was killed by signal {-status} before answering")
    if pipes.client_gone:
        session.abandon(None, "the client went away; " + why)
    else:
        await pipes.send(session.fail(None, why))
    return status


async def _client_streams(loop: asyncio.AbstractEventLoop) -> tuple[asyncio.StreamReader, "_Writer"]:
    """Our stdin and stdout as asyncio streams. MCP clients hand us pipes;
    a regular file (a recorded session replayed, output to a file) is read by
    a thread and written directly instead, as asyncio's pipe transports
    refuse files."""
    reader = asyncio.StreamReader(limit=1 << 16)
    if _pollable(0):
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    else:
        def pump() -> None:
            while chunk := os.read(0, 1 << 16):
                loop.call_soon_threadsafe(reader.feed_data, chunk)
            loop.call_soon_threadsafe(reader.feed_eof)
        threading.Thread(target=pump, daemon=True).start()
    if _pollable(1):
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout.buffer)
        return reader, asyncio.StreamWriter(transport, protocol, None, loop)
    return reader, _FileWriter(1)


def _pollable(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)


class _FileWriter:
    """The part of StreamWriter `_Pipes` uses, for a regular file (writes to
    one never wait on a reader)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        return None


_Writer = Union[asyncio.StreamWriter, _FileWriter]


async def _client_to_server(session: Session, pipes: _Pipes, client_in: asyncio.StreamReader,
                            proc: asyncio.subprocess.Process, limit: int) -> None:
    async for line, oversized in read_lines(client_in, limit):
        if oversized:
            await pipes.send(session.oversized(CLIENT, line))
        elif line.strip():
            await pipes.send(session.from_client(line))
        if pipes.client_gone:
            break
    # The client closed its side: pass the EOF on, as a direct connection
    # would, and give the server a grace period to finish and exit.
    pipes.server_closed = True
    try:
        pipes.server_in.close()
    except OSError:
        pass
    await _reap(proc)


async def _server_to_client(session: Session, pipes: _Pipes, server_out: asyncio.StreamReader,
                            limit: int) -> None:
    async for line, oversized in read_lines(server_out, limit):
        if oversized:
            await pipes.send(session.oversized(SERVER, line))
        elif line.strip():
            await pipes.send(session.from_server(line))


async def _timer(session: Session, pipes: _Pipes) -> None:
    loop = asyncio.get_running_loop()
    while True:
        deadline = session.next_deadline()
        delay = 1.0 if deadline is None else min(1.0, max(0.0, deadline - loop.time()))
        await asyncio.sleep(delay)
        routed = session.expire()
        if routed.to_client or routed.to_server:
            await pipes.send(routed)


async def _reap(proc: asyncio.subprocess.Process) -> int:
    """The server's exit status, after a grace period, SIGTERM, then SIGKILL."""
    for escalate in (_terminate, _kill, None):
        try:
            return await asyncio.wait_for(asyncio.shield(proc.wait()), EXIT_GRACE_S)
        except asyncio.TimeoutError:
            if escalate is not None:
                escalate(proc)
    return await proc.wait()


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass


def _terminate(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass


def client_pid() -> int:
    """The MCP client that spawned the wrapper: the agent process the audit names."""
    return os.getppid()
