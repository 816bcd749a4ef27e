"""Daemon-hosted stdio MCP servers: the daemon serves a unix socket, and a
governed agent reaches the servers `[mcp.servers]` in leash.toml declares only
through it.

Why the daemon and not a wrapper the agent starts: a wrapper started by the
agent's MCP client runs in the agent's scope, so it cannot read the policy or
write the audit log (leash's own files are closed to governed processes),
it names its agent itself (`--agent`), and the agent could start the server
without it. Here the daemon, which no policy governs, starts the server, asks
the kernel which agent is on the other end of the connection (SO_PEERCRED,
then the backend's scope map), and runs the gateway session between the two,
deciding with the daemon's live policy and recording to the daemon's audit
log. The agent needs no access to the server's program at all.

    service = McpService(socket_path, policy, agent_of_pid, sink, mode)
    service.start()       # binds the socket (ServiceError: one line why not), serves from a thread
    service.stop()        # closes the socket, ends every session, removes what start created

The agent's side is leash/mcp/relay.py, published beside the socket. The
exchange on a connection: the client's hello line, then the daemon's ready
line and MCP messages both ways, or one JSON-RPC error and the end of the
connection.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import select
import socket
import stat
import struct
import sys
import threading
from importlib import resources
from typing import Callable, Union

import msgspec

from leash import oom
from leash.audit import AuditRecord, now_ns
from leash.mcp import jsonrpc, relay
from leash.mcp.lines import read_lines
from leash.mcp.session import Gateway, Settings
from leash.mcp.stdio import EXIT_GRACE_S, run_session
from leash.policy.config import McpServerConfig
from leash.policy.loader import LoadedPolicy

HELLO_TIMEOUT_S = 10.0
MAX_SESSIONS_PER_AGENT = 32      # each session is a server process: bound what one agent can start
SERVER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STDERR_LINE_BYTES = 4096
TRANSPORT = "daemon"
# SO_PEERPIDFD (Linux 6.5) is 77 on x86_64 and aarch64; Python 3.11 lacks the name.
_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
_UCRED = struct.Struct("3i")


class ServiceError(Exception):
    """The service cannot start; str() is the one-line reason."""


class Hello(msgspec.Struct, forbid_unknown_fields=True):
    leash: str
    server: str


class Ready(msgspec.Struct):
    leash: str
    agent: str
    server: str


class Peer(msgspec.Struct):
    """Who is on the other end of a connection, as the kernel says."""
    pid: int
    uid: int
    agent: Union[str, None]          # None: not a governed agent (then `why` says so)
    why: str = ""


class _Refusal(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class McpService:
    def __init__(self, socket_path: str, policy: Callable[[], LoadedPolicy],
                 agent_of_pid: Callable[[int], Union[str, None]],
                 sink: Callable[[AuditRecord], None], mode: str = "enforce") -> None:
        """`policy()`: the policy in force (asked per connection and per
        decision); `agent_of_pid(pid)`: the agent the kernel governs that
        process as, None when none."""
        self.socket_path = socket_path
        self.relay_path = os.path.join(os.path.dirname(socket_path), relay.PUBLISHED_NAME)
        self.policy = policy
        self.agent_of_pid = agent_of_pid
        self.sink = sink
        self.mode = mode
        self._listener: socket.socket | None = None
        self._created: list[tuple[str, int]] = []      # (path, inode) this service made
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()
        self._sessions: dict[str, int] = {}            # agent -> live sessions

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Raises ServiceError when the socket cannot be served."""
        directory = os.path.dirname(self.socket_path)
        _prepare_directory(directory)
        self._listener = _listen(self.socket_path)
        self._created.append((self.socket_path, os.stat(self.socket_path).st_ino))
        try:
            self._created.append((self.relay_path, _publish_relay(self.relay_path)))
        except OSError as e:
            self._close_listener()
            raise ServiceError(f"cannot write the MCP relay {self.relay_path}: {e.strerror or e}") from None
        self._loop = asyncio.new_event_loop()
        self._stopping = asyncio.Event()
        serving = threading.Event()
        failed: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(serving, failed), name="leash-mcp", daemon=True)
        self._thread.start()
        serving.wait()
        if failed:
            self.stop()
            raise ServiceError(f"cannot serve MCP on {self.socket_path}: {failed[0]}")

    def _run(self, serving: threading.Event, failed: list[BaseException]) -> None:
        assert self._loop is not None
        try:
            self._loop.run_until_complete(self._serve(serving))
        except BaseException as e:          # reported by start(), or lost only at shutdown
            failed.append(e)
        finally:
            serving.set()

    def stop(self) -> None:
        """Stop accepting, end every session (each server gets its stdin
        closed, then the usual grace period), remove the socket and relay."""
        if self._thread is None:
            return
        assert self._loop is not None and self._stopping is not None
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join()
        self._loop.close()
        self._thread = None
        self._close_listener()

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for path, inode in self._created:
            try:
                if os.lstat(path).st_ino == inode:
                    os.unlink(path)
            except OSError:
                pass
        self._created = []

    async def _serve(self, serving: threading.Event) -> None:
        assert self._stopping is not None
        server = await asyncio.start_unix_server(self._accepted, sock=self._listener, limit=relay.MAX_LINE)
        serving.set()
        await self._stopping.wait()
        server.close()
        for writer in list(self._connections):
            writer.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    # ------------------------------------------------------------ one connection

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._connections.add(writer)
        peer = Peer(0, 0, None, "not identified")
        try:
            peer = self._identify(writer.get_extra_info("socket"))
            await self._connection(peer, reader, writer)
        except Exception as e:      # a fault here ends this connection, never the service
            self._record(peer, "-", "deny", "internal error", f"{type(e).__name__}: {e}")
        finally:
            self._connections.discard(writer)
            writer.close()
            self._tasks.discard(task)

    def _identify(self, sock: socket.socket) -> Peer:
        """The connecting process and its agent. With SO_PEERPIDFD the
        process is held while its pid is looked up: if it exited meanwhile
        its pid could name another process by now, so it is refused."""
        pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        try:
            pidfd = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
        except OSError:
            pidfd = -1          # kernel older than 6.5: the pid alone
        try:
            try:
                agent = self.agent_of_pid(pid)
            except Exception as e:
                return Peer(pid, uid, None, f"the kernel's scope of pid {pid} cannot be read ({e})")
            if pidfd >= 0 and _exited(pidfd):
                return Peer(pid, uid, None, f"pid {pid} exited before it could be identified")
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        if agent is None:
            return Peer(pid, uid, None, f"pid {pid} is not a governed agent")
        return Peer(pid, uid, agent)

    async def _connection(self, peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            name = await _read_hello(reader)
        except _Refusal as e:
            await self._refuse(peer, "-", writer, e)
            return
        try:
            if peer.agent is None:
                raise _Refusal(jsonrpc.CONNECTION_REFUSED, f"leash: refused: {peer.why}; only a governed "
                                                           "agent's processes may use daemon-hosted MCP servers")
            config = self.policy().config.mcp.servers.get(name)
            if config is None:
                raise _Refusal(jsonrpc.CONNECTION_REFUSED,
                               f"leash: no MCP server {name!r} in the daemon's leash.toml ([mcp.servers.{name}])")
            if self._sessions.get(peer.agent, 0) >= MAX_SESSIONS_PER_AGENT:
                raise _Refusal(jsonrpc.CONNECTION_REFUSED,
                               f"leash: agent {peer.agent!r} already has {MAX_SESSIONS_PER_AGENT} MCP sessions open")
        except _Refusal as e:
            await self._refuse(peer, name, writer, e)
            return
        agent = peer.agent
        self._sessions[agent] = self._sessions.get(agent, 0) + 1
        proc = None
        try:
            try:
                proc = await _spawn(config)
            except _Refusal as e:
                await self._refuse(peer, name, writer, e)
                return
            self._record(peer, name, "allow", "connected", "", server_pid=proc.pid)
            writer.write(msgspec.json.encode(Ready(relay.READY, agent, name)) + b"\n")
            settings = Settings(agent=agent, server=name, transport=TRANSPORT, mode=self.mode,
                                client_pid=peer.pid, client_uid=peer.uid)
            assert proc.stderr is not None
            log = asyncio.create_task(_log_stderr(proc.stderr, f"mcp server {name!r} (pid {proc.pid}, "
                                                               f"agent {agent!r})"))
            await run_session(Gateway(settings, self.policy, self.sink), proc, reader, writer)
            # The server has exited; its stderr ends with it unless a process
            # it left behind still holds it.
            await asyncio.wait([log], timeout=EXIT_GRACE_S)
            log.cancel()
        finally:
            self._sessions[agent] -= 1
            if proc is not None and proc.returncode is None:     # only after a fault: no server outlives its session
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass

    async def _refuse(self, peer: Peer, server: str, writer: asyncio.StreamWriter, refusal: _Refusal) -> None:
        self._record(peer, server, "deny", "refused connection", refusal.message.removeprefix("leash: "))
        data = {"agent": peer.agent, "server": server} if peer.agent else {"server": server}
        try:
            writer.write(jsonrpc.encode(jsonrpc.error_reply(None, refusal.code, refusal.message, data)) + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass

    def _record(self, peer: Peer, server: str, decision: str, outcome: str, reason: str,
                **details: object) -> None:
        self.sink(AuditRecord(time_ns=now_ns(), agent=peer.agent or "", action="McpCall", resource="-",
                              decision=decision, backend="mcp", mode=self.mode, pid=peer.pid, uid=peer.uid,
                              reason=reason, details={"server": server, "transport": TRANSPORT, "method": "-",
                                                      "outcome": outcome, **details}))


# ---------------------------------------------------------------- pieces

async def _read_hello(reader: asyncio.StreamReader) -> str:
    """The server name the hello line asks for. Raises _Refusal."""
    try:
        line = await asyncio.wait_for(reader.readuntil(b"\n"), HELLO_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise _Refusal(jsonrpc.INVALID_REQUEST, f"leash: no hello line within {HELLO_TIMEOUT_S:g} s") from None
    except asyncio.IncompleteReadError:
        raise _Refusal(jsonrpc.INVALID_REQUEST, "leash: the connection ended before the hello line") from None
    except asyncio.LimitOverrunError:
        raise _Refusal(jsonrpc.INVALID_REQUEST, "leash: the hello line is too long") from None
    try:
        hello = msgspec.json.decode(line, type=Hello)
    except msgspec.DecodeError as e:
        raise _Refusal(jsonrpc.INVALID_REQUEST, 'leash: expected the hello line {"leash": "hello", '
                                                f'"server": NAME}} first ({e})') from None
    if hello.leash != relay.HELLO:
        raise _Refusal(jsonrpc.INVALID_REQUEST, f'leash: expected "leash": "hello", got {hello.leash!r}')
    return hello.server


async def _spawn(config: McpServerConfig) -> asyncio.subprocess.Process:
    """Start the server as configured: outside every agent's scope (the
    daemon is not governed), in a session of its own, with a minimal
    environment (the daemon's own is not passed on). Raises _Refusal."""
    try:
        account = (pwd.getpwnam(config.user) if isinstance(config.user, str)
                   else pwd.getpwuid(os.geteuid() if config.user is None else config.user))
    except KeyError:
        raise _Refusal(jsonrpc.UPSTREAM_FAILED, f"leash: cannot start the MCP server: no user {config.user!r}") from None
    env = {"PATH": SERVER_PATH, "HOME": account.pw_dir, "USER": account.pw_name, "LOGNAME": account.pw_name}
    env.update(config.env)
    credentials: dict = {}
    if config.user is not None:
        credentials = {"user": account.pw_uid, "group": account.pw_gid,
                       "extra_groups": await _groups_of(account.pw_name)}
    try:
        proc = await asyncio.create_subprocess_exec(
            *config.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, cwd=config.cwd or "/", start_new_session=True,
            **credentials)
        oom.restore_default(proc.pid)      # the daemon is spared; its servers are not
        return proc
    except OSError as e:
        raise _Refusal(jsonrpc.UPSTREAM_FAILED,
                       f"leash: cannot start the MCP server {config.command[0]!r}: {e.strerror or e}") from None


async def _groups_of(user: str) -> list[int]:
    """Every group `user` is in, asked of `id -G` rather than
    os.getgrouplist: that call holds the GIL while NSS opens /etc/group, and
    under the compat backend the open waits for the fanotify responder, a
    thread of this very process, which then cannot run. Raises _Refusal."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "id", "-G", "--", user, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, env={"PATH": SERVER_PATH})
        out, err = await proc.communicate()
    except OSError as e:
        raise _Refusal(jsonrpc.UPSTREAM_FAILED,
                       f"leash: cannot start the MCP server: `id -G {user}` failed: {e.strerror or e}") from None
    if proc.returncode != 0 or not out.split():
        raise _Refusal(jsonrpc.UPSTREAM_FAILED, f"leash: cannot start the MCP server: the groups of {user!r} "
                                                f"are unknown ({err.decode(errors='replace').strip()})")
    return [int(g) for g in out.split()]


async def _log_stderr(stream: asyncio.StreamReader, label: str) -> None:
    """The server's stderr, line by line, on the daemon's stderr."""
    async for line, _oversized in read_lines(stream, STDERR_LINE_BYTES):
        print(f"leash: {label}: {line.decode(errors='replace')}", file=sys.stderr, flush=True)


def _exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _prepare_directory(directory: str) -> None:
    """The socket's directory: created 0755 if missing; refused if another
    user could replace the socket or the relay in it."""
    try:
        if not os.path.lexists(directory):
            os.makedirs(directory, exist_ok=True)
            os.chmod(directory, 0o755)       # whatever the umask: agents must reach the socket
        st = os.lstat(directory)
    except OSError as e:
        raise ServiceError(f"cannot create the MCP socket directory {directory}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ServiceError(f"the MCP socket directory {directory} is not a directory")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ServiceError(f"the MCP socket directory {directory} must be owned by uid {os.geteuid()} and "
                           f"writable by no one else (it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}); "
                           "set [mcp] socket in leash.toml to a path in such a directory")


def _listen(path: str) -> socket.socket:
    """A listening socket at `path`, mode 0666 (any process may connect: the
    kernel, not the socket's mode, says who is an agent). A stale socket left
    by a daemon that died is replaced; a live one is not."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise ServiceError(f"cannot serve MCP on {path}: {e.strerror or e}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ServiceError(f"cannot serve MCP on {path}: it exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            raise ServiceError(f"cannot serve MCP on {path}: another process is serving it "
                               "(another leash daemon?)")
        except ConnectionRefusedError:
            os.unlink(path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise ServiceError(f"cannot serve MCP on {path}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


def _publish_relay(path: str) -> int:
    """Write the agent's relay (leash/mcp/relay.py) at `path`, mode 0755;
    returns its inode. Written beside and renamed, so a relay starting at
    that moment reads a whole file."""
    data = resources.files("leash.mcp").joinpath("relay.py").read_bytes()
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "wb") as f:
        f.write(data)
        os.fchmod(f.fileno(), 0o755)
    os.rename(temp, path)
    return os.stat(path).st_ino
