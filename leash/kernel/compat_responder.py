"""The compat backend's file side, in a process of its own: fanotify
permission events (compat_files), link and rename notices (compat_moves),
filesystems mounted later. The daemon starts it (`python -m
leash.kernel.compat_responder`), sends a Config line on stdin, and reads JSON
lines back on stdout: records, heartbeats with counters, acknowledgements.

Why a process: the responder answers every open on the host, the daemon's own
included. CPython keeps its interpreter lock while it loads a C extension, and
glibc loads NSS modules on its own; a daemon thread doing either would hold an
open that a responder *thread* could never answer. This process imports
everything before it places a mark, and from then on runs only its own code.

If the daemon goes away (stdin closes) this process exits, which closes its
fanotify groups: the kernel then allows everything, and the watchdog kills
the governed processes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import select
import struct
import sys
import threading
import time

import msgspec

from leash.audit import AuditRecord, now_ns
from leash.kernel import libbpf, mountinfo
from leash.kernel import fanotify as fan
from leash.kernel.compat_files import FileDecider
from leash.kernel.compat_moves import MoveWatcher
from leash.kernel.mountinfo import Mount
from leash.policy.tables import DecisionTables

MARK_MASK = fan.FAN_OPEN_PERM | fan.FAN_OPEN_EXEC_PERM | fan.FAN_ONDIR
# procfs refuses permission events (FS_DISALLOW_NOTIFY_PERM: they could
# deadlock); autofs holds no files, what it mounts appears as a new mount.
UNMARKABLE = {"proc": "procfs refuses fanotify permission events",
              "autofs": "an automount point holds no files"}
CGROUP_TYPES = ("cgroup", "cgroup2")
HEARTBEAT_S = 1.0
STUCK_S = 5.0               # no event answered for this long inside a batch: stuck


# ------------------------------------------------------------------ wire

class Config(msgspec.Struct):
    mode: str
    protected: list[str]
    cache_allows: bool
    backlog_limit: int
    tids_fd: int            # compat_tids, compat_gone, compat_fs: inherited map fds
    gone_fd: int
    fs_fd: int
    tables: DecisionTables
    fault: str = ""         # test seam: see _inject


class Update(msgspec.Struct, tag="update"):
    tables: DecisionTables


class Query(msgspec.Struct, tag="query"):
    pass


class Stop(msgspec.Struct, tag="stop"):
    pass


class Crash(msgspec.Struct, tag="crash"):
    """Test seam: the next batch raises, as a responder bug would."""


class Backlog(msgspec.Struct, tag="backlog"):
    """The daemon's audit sink is (no longer) far behind."""
    full: bool


class Ready(msgspec.Struct, tag="ready"):
    pid: int
    group_fd: int           # the permission group, for /proc/PID/fdinfo
    filesystems: int


class Refused(msgspec.Struct, tag="refused"):
    reason: str             # one line: why compat cannot enforce here


class Record(msgspec.Struct, tag="record"):
    rec: AuditRecord


class Alive(msgspec.Struct, tag="alive"):
    """The heartbeat: the responder is answering."""


class Counts(msgspec.Struct, tag="counts"):
    """The answer to a Query."""
    events: int             # permission events answered
    governed: int           # ... of governed threads
    ignore_marks: int


class Updated(msgspec.Struct, tag="updated"):
    pass


class Crashed(msgspec.Struct, tag="crashed"):
    reason: str


ToResponder = Update | Query | Stop | Crash | Backlog
FromResponder = Ready | Refused | Record | Alive | Counts | Updated | Crashed


class Unavailable(RuntimeError):
    """compat cannot enforce here; str() is the one-line reason."""


# ----------------------------------------------------------- filesystems

def filesystems(text: str | None = None) -> list[Mount]:
    """One mount per superblock, in mount order: where its whole tree is
    mounted when it is (so paths resolved through it are the real ones)."""
    seen: dict[int, Mount] = {}
    for m in (mountinfo.mounts() if text is None else mountinfo.parse(text)):
        if m.dev not in seen or (m.root == "/" and seen[m.dev].root != "/"):
            seen[m.dev] = m
    return list(seen.values())


def _visible(m: Mount) -> bool:
    """False when another mount hides this one's mount point."""
    try:
        return os.stat(m.path).st_dev == m.user_dev
    except OSError:
        return False


def mark_all(group: fan.PermissionGroup, found: list[Mount]) -> tuple[list[Mount], list[str]]:
    """Mark every superblock that can hold a governed file. Returns what was
    marked and, for each one that refused, a one-line reason."""
    marked, refused = [], []
    for m in found:
        if m.fstype in UNMARKABLE or not _visible(m):
            continue
        try:
            group.mark_filesystem(m.path, MARK_MASK)
        except fan.FanotifyError as e:
            refused.append(f"cannot watch {m.path} ({m.fstype}) for permission events: "
                           f"{os.strerror(e.errno)}")
            continue
        marked.append(m)
    return marked, refused


class Scope:
    """Lookups in a thread-id map (compat_tids, compat_gone): one bpf()
    syscall with buffers made once, since every unignored open on the host
    comes through here. One instance per thread."""

    def __init__(self, map_fd: int) -> None:
        self._fd = map_fd
        self._lookup = libbpf.lib().bpf_map_lookup_elem
        self._key = ctypes.create_string_buffer(4)
        self._val = ctypes.create_string_buffer(4)

    def __call__(self, tid: int) -> int:
        struct.pack_into("<I", self._key, 0, tid)
        rc = self._lookup(self._fd, self._key, self._val)
        if rc == 0:
            return struct.unpack_from("<I", self._val)[0]
        if rc == -errno.ENOENT:
            return 0
        raise OSError(-rc, f"scope lookup: {os.strerror(-rc)}")


# ------------------------------------------------------------------ outbox

class Outbox:
    """Messages to the daemon, written by one thread so no decision waits on
    the pipe. When the daemon's audit sink falls behind it stops reading, the
    pipe fills, and this queue grows: past the limit, `backlogged()`."""

    def __init__(self, fd: int, limit: int) -> None:
        self._fd = fd
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.limit = limit
        self.daemon_full = False         # the daemon's own backlog, as it last said
        self._encoder = msgspec.json.Encoder()
        self._thread = threading.Thread(target=self._run, name="leash-responder-out", daemon=True)
        self._thread.start()

    def send(self, msg: FromResponder) -> None:
        self._queue.put(msg)

    def backlogged(self) -> bool:
        return self.daemon_full or self._queue.qsize() >= self.limit

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            msg = self._queue.get()
            if msg is None:
                return
            data = self._encoder.encode(msg) + b"\n"
            try:
                while data:
                    data = data[os.write(self._fd, data):]
            except OSError:
                return          # the daemon is gone; stdin's EOF ends the process


# ------------------------------------------------------------------ server

class FileServer:
    """Everything the responder process runs."""

    def __init__(self, cfg: Config, out: Outbox) -> None:
        self.cfg = cfg
        self.out = out
        found = filesystems()
        try:
            self.group = fan.PermissionGroup()
        except fan.FanotifyError as e:
            raise Unavailable(f"fanotify permission events are unavailable: {os.strerror(e.errno)} "
                              "(needs CONFIG_FANOTIFY_ACCESS_PERMISSIONS)") from None
        try:
            notify = fan.NotifyGroup()
        except fan.FanotifyError as e:
            raise Unavailable(f"fanotify cannot report file handles here ({os.strerror(e.errno)}): "
                              "links and renames by agents could not be followed") from None
        cgroup_devs = {m.user_dev for m in found if m.fstype in CGROUP_TYPES}
        self.decider = FileDecider(self.group, Scope(cfg.tids_fd), cfg.mode, self.record,
                                   tuple(cfg.protected), cgroup_devs, cfg.cache_allows, out.backlogged)
        self.decider.set_tables(cfg.tables)
        self.decider.set_mounts(mountinfo.mounts())
        live, gone = Scope(cfg.tids_fd), Scope(cfg.gone_fd)
        self.moves = MoveWatcher(notify, lambda tid: live(tid) or gone(tid), self.decider.may_copy,
                                 self.decider.rw_marked, self.decider.tainted, self.decider.unignore,
                                 lambda why: self.internal(why, "deny"))
        self.decider.moves = self.moves
        self.responder = fan.Responder(self.group, self.decider)
        self.responder.on_crash = lambda e: out.send(Crashed(f"{type(e).__name__}: {e}"))
        self.marked: list[Mount] = []
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._threads: list[threading.Thread] = []
        _inject(cfg.fault, self)
        # Answer from the first marked event on: a mark without a responder
        # would hold every open on that filesystem.
        self.responder.start()
        marked, refused = mark_all(self.group, found)
        if refused:
            raise Unavailable(refused[0] + (f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""))
        self._note_marked(marked)
        for target, name in ((self._watch, "leash-responder-mounts"), (self._heartbeat, "leash-responder-beat")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def record(self, rec: AuditRecord) -> None:
        self.out.send(Record(rec))

    def internal(self, reason: str, decision: str = "allow") -> None:
        self.record(AuditRecord(time_ns=now_ns(), agent="", action="Internal", resource="compat",
                                decision=decision, backend="compat", mode=self.cfg.mode, reason=reason))

    def counts(self) -> Counts:
        return Counts(self.responder.events, self.responder.governed_events, self.decider.ignore_marks)

    def update(self, tables: DecisionTables) -> None:
        with self.responder.lock:
            self.decider.set_tables(tables)
        self.out.send(Updated())

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        for t in self._threads:
            t.join()
        self.responder.stop()
        self.group.close()          # the kernel allows anything still pending
        self.moves.close()
        self.decider.flush()

    def _note_marked(self, found: list[Mount]) -> None:
        for m in found:
            libbpf.map_update(self.cfg.fs_fd, struct.pack("<I", m.dev), struct.pack("<I", 1))
            self.moves.watch(m.path)
        self.marked.extend(found)

    def _heartbeat(self) -> None:
        """Every second, unless the loop has answered nothing for STUCK_S in
        the middle of a batch: then silence, and the daemon stops its own
        heartbeat to the watchdog."""
        while not _wait_readable(self._stop_r, HEARTBEAT_S):
            busy = self.responder.busy_since
            if busy and time.monotonic() - busy > STUCK_S:
                continue
            self.out.send(Alive())

    def _watch(self) -> None:
        """Mark filesystems mounted after start (until marked, a moment, opens
        there are not seen; governed execs from them are killed meanwhile),
        and keep the link/rename queue short while no governed open drains it."""
        with open("/proc/self/mountinfo", "rb") as f:
            poller = select.poll()
            poller.register(f.fileno(), select.POLLPRI | select.POLLERR)
            poller.register(self._stop_r, select.POLLIN)
            poller.register(self.moves.group.fd, select.POLLIN)
            while True:
                ready = dict(poller.poll())
                if self._stop_r in ready:
                    return
                try:
                    if self.moves.group.fd in ready:
                        self.moves.drain()
                    if f.fileno() in ready:
                        f.seek(0)
                        f.read()
                        self._mark_new()
                except Exception as e:   # noqa: BLE001 - keep watching, say why
                    self.internal(f"compat watcher: {type(e).__name__}: {e}")

    def _mark_new(self) -> None:
        self.decider.set_mounts(mountinfo.mounts())
        known = {m.dev for m in self.marked}
        marked, refused = mark_all(self.group, [m for m in filesystems() if m.dev not in known])
        self._note_marked(marked)
        for reason in refused:
            self.internal(f"{reason}: opens there are not governed")


def _wait_readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def _inject(fault: str, server: FileServer | None) -> None:
    """Test seam (tests/host_compat): faults a real deployment never sets.
    Called once before the server exists (server None) and once inside it.
        no-fanotify       the kernel refuses fanotify_init
        refuse-mark:PATH  the filesystem mounted at PATH refuses a permission mark
        decide:SUFFIX     deciding a governed open of a path ending in SUFFIX raises
    """
    kind, _, arg = fault.partition(":")
    if server is None:
        if kind == "no-fanotify":
            def refused(self):
                raise fan.FanotifyError(errno.EINVAL, "fanotify_init: Invalid argument")
            fan.PermissionGroup.__init__ = refused
        return
    if kind == "refuse-mark":
        real_mark = server.group.mark_filesystem

        def picky(path, mask):
            if path == arg:
                raise fan.FanotifyError(errno.EINVAL, "injected")
            return real_mark(path, mask)
        server.group.mark_filesystem = picky
    elif kind == "decide":
        real = server.decider._decide

        def broken(ev, task, st, is_dir, path):
            if path.endswith(arg):
                raise ValueError("injected")
            return real(ev, task, st, is_dir, path)
        server.decider._decide = broken


def _crash(server: FileServer) -> None:
    def broken(data, size):
        raise RuntimeError("injected responder failure")
    server.responder._batch = broken


def main() -> int:
    out = Outbox(sys.stdout.fileno(), 1)
    cfg = msgspec.json.decode(sys.stdin.buffer.readline(), type=Config)
    out.limit = cfg.backlog_limit
    _inject(cfg.fault, None)
    try:
        server = FileServer(cfg, out)
    except Unavailable as e:
        out.send(Refused(str(e)))
        out.close()
        return 1
    out.send(Ready(os.getpid(), server.group.fd, len(server.marked)))
    decoder = msgspec.json.Decoder(ToResponder)
    for line in sys.stdin.buffer:
        msg = decoder.decode(line)
        if isinstance(msg, Update):
            server.update(msg.tables)
        elif isinstance(msg, Query):
            out.send(server.counts())
        elif isinstance(msg, Backlog):
            out.daemon_full = msg.full
        elif isinstance(msg, Crash):
            _crash(server)
        elif isinstance(msg, Stop):
            break
    server.stop()
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
