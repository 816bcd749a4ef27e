#!/usr/bin/env python3
"""The agent's end of a daemon-hosted MCP server: relays bytes between the
MCP client that starts it (our stdin/stdout) and the leash daemon's socket.

    mcp-relay SERVER [--socket PATH]

The daemon publishes this file next to its socket (`mcp-relay` beside
`mcp.sock`, /run/leash by default), and the relay connects to the socket
beside itself unless told otherwise. It uses the standard library only and
nothing of leash: it runs inside the agent, where leash's own files (its
code included) are closed to governed processes. It knows no policy and
claims no identity; the daemon asks the kernel which agent connected.

The exchange: the relay sends one hello line, `{"leash": "hello", "server":
SERVER}`; the daemon answers one line, `{"leash": "ready", ...}` once the
server is running (then MCP messages flow both ways, unchanged by the relay),
or a JSON-RPC error, after which it closes the connection.
"""

import argparse
import json
import os
import socket
import sys
import threading

HELLO = "hello"
READY = "ready"
SOCKET_NAME = "mcp.sock"
PUBLISHED_NAME = "mcp-relay"
MAX_LINE = 1 << 16          # the daemon's answer line, and the hello the daemon accepts
_CHUNK = 1 << 16


class Refused(Exception):
    """Why the relay cannot run: one line for the MCP client's log."""


def hello_line(server: str) -> bytes:
    return json.dumps({"leash": HELLO, "server": server}).encode() + b"\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PUBLISHED_NAME,
                                     description="Connect an MCP client to a server the leash daemon hosts.")
    parser.add_argument("server", help="the server's name in the daemon's leash.toml ([mcp.servers.NAME])")
    parser.add_argument("--socket", metavar="PATH",
                        help="the daemon's socket (default: mcp.sock beside this file)")
    args = parser.parse_args(argv)
    path = args.socket or os.path.join(os.path.dirname(os.path.abspath(__file__)), SOCKET_NAME)
    try:
        sock, early = connect(path, args.server)
    except Refused as e:
        print(f"leash: {e}", file=sys.stderr, flush=True)
        return 1
    return pump(sock, early)


def connect(path: str, server: str):
    """A connection the daemon has accepted for `server`, and any bytes that
    followed its ready line. Raises Refused."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise Refused(f"no leash daemon serves MCP at {path} (it is not running, or its "
                      "leash.toml has no [mcp.servers])") from None
    except OSError as e:
        sock.close()
        raise Refused(f"cannot connect to the leash daemon at {path}: {e.strerror or e}") from None
    try:
        sock.sendall(hello_line(server))
        line, early = _read_line(sock)
    except OSError as e:
        sock.close()
        raise Refused(f"the leash daemon at {path} dropped the connection: {e.strerror or e}") from None
    try:
        answer = json.loads(line)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and answer.get("leash") == READY:
        return sock, early
    sock.close()
    error = answer.get("error") if isinstance(answer, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if isinstance(message, str):
        raise Refused(message[len("leash: "):] if message.startswith("leash: ") else message)
    raise Refused(f"the leash daemon at {path} gave no usable answer to the hello")


def _read_line(sock: socket.socket):
    buf = b""
    while b"\n" not in buf:
        if len(buf) > MAX_LINE:
            break
        chunk = sock.recv(_CHUNK)
        if not chunk:
            break
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    return line, rest


def pump(sock: socket.socket, early: bytes) -> int:
    """Relay until the daemon closes the connection or the client stops
    reading. When the client closes our stdin the daemon is told (a half
    close) and answers still in flight are delivered before we exit."""
    threading.Thread(target=_to_daemon, args=(sock,), daemon=True).start()
    try:
        if early:
            _write_all(1, early)
        while True:
            data = sock.recv(_CHUNK)
            if not data:
                return 0
            _write_all(1, data)
    except BrokenPipeError:
        return 0            # the client is gone
    except OSError as e:
        print(f"leash: the connection to the leash daemon broke: {e.strerror or e}", file=sys.stderr, flush=True)
        return 1
    finally:
        sock.close()


def _to_daemon(sock: socket.socket) -> None:
    try:
        while True:
            data = os.read(0, _CHUNK)
            if not data:
                break
            sock.sendall(data)
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


if __name__ == "__main__":
    sys.exit(main())
