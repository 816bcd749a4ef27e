"""The compat backend's file and exec decisions, made in userspace from the
compiled tables while the opener waits in a fanotify permission event.

What the event does not say, the blocked thread's /proc entries do: the
syscall it is in (so the open flags: read or read-write, or an exec), its
process, parent, uid and executable. A governed open is answered from the
tables (TableIndex, the kernel's longest-prefix lookups done in userspace).
The tables answer every path of every agent they know (the path is complete
here, never cut at 252 bytes); anything they cannot answer is refused and
recorded, as is anything that cannot be resolved (DESIGN.md 1.5).

The same semantics as lsm_file.bpf.c / lsm_exec.bpf.c, with the differences
docs/compat.md lists.
"""

from __future__ import annotations

import glob
import os
import platform
import stat
import struct
import threading
import time
from collections import OrderedDict
from typing import Callable

from leash.audit import AuditRecord, now_ns
from leash.kernel import fanotify as fan
from leash.kernel.compat_moves import MoveWatcher, Taint
from leash.kernel.fanotify import PermEvent, PermissionGroup
from leash.policy.tables import EXEC, FILE_READ, FILE_WRITE, DecisionTables, TableIndex

SELF_PROTECT = "SelfProtect"

# The syscalls that open a file, per architecture: number -> index of the
# flags argument (None: the flags are behind a pointer, openat2's open_how).
_X86_64 = {"open": 2, "openat": 257, "creat": 85, "openat2": 437, "open_by_handle_at": 304,
           "execve": 59, "execveat": 322}
_AARCH64 = {"openat": 56, "openat2": 437, "open_by_handle_at": 265, "execve": 221, "execveat": 281}
_FLAGS_ARG = {"open": 1, "openat": 2, "open_by_handle_at": 2}

O_ACCMODE = 0o3
O_RDONLY = 0
O_CREAT = 0o100
O_TRUNC = 0o1000
PF_DUMPCORE = 0x200

# Where the dynamic loaders live; a loader run directly maps code it chose.
_LOADER_GLOBS = ("/lib*/ld-linux*.so*", "/usr/lib*/ld-linux*.so*", "/lib/*/ld-linux*.so*",
                 "/usr/lib/*/ld-linux*.so*", "/lib/ld-musl-*.so.1", "/usr/lib/ld-musl-*.so.1")

# Identical allows folded within this window (as the kernel side does).
DEDUP_WINDOW_NS = 1_000_000_000
_NEGATIVE_CACHE = 65536
_RW_MARKS = 65536

def _syscall_names() -> dict[int, str]:
    table = _AARCH64 if platform.machine() in ("aarch64", "arm64") else _X86_64
    return {nr: name for name, nr in table.items()}


def loader_identities() -> set[tuple[int, int]]:
    out = set()
    for pattern in _LOADER_GLOBS:
        for path in glob.glob(pattern):
            try:
                st = os.stat(path)
            except OSError:
                continue
            out.add((st.st_dev, st.st_ino))
    return out


class Task:
    """What /proc says about the thread blocked in the event. The syscall and
    flags decide; the rest is read only when a record is written."""
    __slots__ = ("tid", "ppid", "flags", "syscall", "args", "_tgid", "_uid", "_exe")

    def __init__(self, tid: int) -> None:
        self.tid = tid
        self.ppid = self.flags = 0
        self._tgid: int | None = None
        self._uid = 0
        self._exe: str | None = None
        self.syscall: int | None = None
        self.args: list[int] = []
        try:
            after = fan.read_proc(f"/proc/{tid}/stat").rsplit(b")", 1)[1].split()
            self.ppid = int(after[1])
            self.flags = int(after[6])
        except (OSError, IndexError, ValueError):
            self.flags = PF_DUMPCORE       # unknown state: judged as strictly as a core dump
        sc = fan.syscall_of(tid)
        if sc is not None:
            self.syscall, self.args = sc

    def _status(self) -> None:
        self._tgid = self.tid
        try:
            with open(f"/proc/{self.tid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Tgid:"):
                        self._tgid = int(line.split()[1])
                    elif line.startswith(b"Uid:"):
                        self._uid = int(line.split()[1])
                        break
        except (OSError, ValueError):
            pass

    @property
    def tgid(self) -> int:
        if self._tgid is None:
            self._status()
        return self._tgid

    @property
    def uid(self) -> int:
        if self._tgid is None:
            self._status()
        return self._uid

    @property
    def exe(self) -> str:
        if self._exe is None:
            try:
                self._exe = os.readlink(f"/proc/{self.tid}/exe")
            except OSError:
                self._exe = ""
        return self._exe


class Outcome:
    """One decision and what the audit record needs. `always`: self-protection,
    refused in audit mode too (as the lsm backend does)."""
    __slots__ = ("allow", "action", "resource", "policies", "reason", "table_class", "always")

    def __init__(self, allow: bool, action: str, resource: str, policies: list[str] | None = None,
                 reason: str = "", table_class: str = "", always: bool = False) -> None:
        self.allow = allow
        self.action = action
        self.resource = resource
        self.policies = policies or []
        self.reason = reason
        self.table_class = table_class
        self.always = always


class FileDecider:
    """fanotify.Handler for the compat backend."""

    def __init__(self, group: PermissionGroup, scope: Callable[[int], int], mode: str,
                 sink: Callable[[AuditRecord], None], protected: tuple[str, ...],
                 cgroup_devs: set[int], cache_allows: bool = True,
                 backlogged: Callable[[], bool] = lambda: False) -> None:
        self.group = group
        self.scope = scope
        self.mode = mode
        self.sink = sink
        self.protected = tuple(p.rstrip("/") for p in protected)
        self.cgroup_devs = cgroup_devs
        self.cache_allows = cache_allows
        self.backlogged = backlogged
        self.loaders = loader_identities()
        self.syscalls = _syscall_names()
        self.tables: DecisionTables | None = None
        self.index: TableIndex | None = None
        self.names: dict[int, str] = {}
        self.ignore_marks = 0
        self.moves: MoveWatcher | None = None
        # (agent, dev, file handle): files an agent opened where it may both
        # read and write them; linking or renaming those gains it nothing.
        self._rw: OrderedDict[tuple[int, int, bytes], None] = OrderedDict()
        # (dev, ino, ctime) -> None: files known not to be allow-all, so an
        # ungoverned open of them costs an fstat, not a path lookup. The
        # ctime tells a file from a later one that reuses its inode number
        # (and a renamed or relinked file, which may have changed class).
        self._not_all: OrderedDict[tuple[int, int, int], None] = OrderedDict()
        self._dedup: dict[tuple, list] = {}
        self.trusted_mounts: frozenset[int] = frozenset()
        self._dedup_lock = threading.Lock()

    # --------------------------------------------------------------- tables

    def set_tables(self, tables: DecisionTables) -> None:
        """Called with the responder's lock held (no batch in flight): the
        ignore marks of the old policy go with it."""
        if self.tables is not None:
            self.group.flush_ignores()
        self.tables = tables
        self.index = TableIndex(tables)
        self.names = {i: n for n, i in tables.agents.items()}
        self._not_all.clear()
        self._rw.clear()

    def set_mounts(self, mounts: list) -> None:
        """The mounts of leash's own namespace: a path seen through any of
        them is the path policy speaks about."""
        self.trusted_mounts = frozenset(m.mount_id for m in mounts)

    def _placed(self, fd: int, st: os.stat_result, path: str) -> tuple[str | None, bytes | None]:
        """(the path policy judges, file handle). A file reached through a
        mount outside leash's namespace (a bind mount in an agent's own
        namespace, a detached mount) gets its path through leash's mount of
        the same filesystem; None when that is impossible."""
        found = fan.handle_and_mount(fd)
        if found is None:
            return (path if _mount_id(fd) in self.trusted_mounts else None), None
        handle, mount_id = found
        if mount_id in self.trusted_mounts:
            return path, handle
        return (self.moves.resolve(st.st_dev, handle) if self.moves is not None else None), handle

    def _verdict(self, agent: int, action: str, path: str, is_dir: bool) -> tuple[bool, list[str], str]:
        """(allow, policy ids, table class) from the tables; refused when they
        have no answer (an agent id they do not know)."""
        assert self.index is not None and self.tables is not None
        ans = self.index.path(agent, action, path, is_dir)
        if ans is None:
            return False, [], "no table entry"
        v = self.tables.verdicts[ans.verdict]
        return v.allow, self.tables.policy_ids(ans.verdict), ans.table_class

    # ---------------------------------------------------------- the handler

    def decide(self, ev: PermEvent) -> bool:
        if self.moves is not None:
            self.moves.drain()
        st = os.fstat(ev.fd)
        is_dir = stat.S_ISDIR(st.st_mode)
        seen = os.readlink(f"/proc/self/fd/{ev.fd}")
        path, handle = self._placed(ev.fd, st, seen)
        task = Task(ev.tid)
        if path is None:
            out: Outcome | None = Outcome(False, EXEC if ev.mask & fan.FAN_OPEN_EXEC_PERM else FILE_READ,
                                          seen, reason="reached through a mount outside leash's "
                                          "namespace that leash cannot place")
        else:
            out = self._decide(ev, task, st, is_dir, path)
        if out is None:
            return True
        if out.allow and self.moves is not None:
            taint = self.moves.check(ev.fd, st, path, handle)
            if taint is not None:
                out = Outcome(False, out.action, out.resource, reason=_taint_reason(taint))
        if out.allow and self.mode == "enforce" and self.backlogged():
            # Nothing happens unrecorded (DESIGN.md 1.5): the audit sink is
            # far behind, so an allow would go unrecorded.
            out = Outcome(False, out.action, out.resource, reason="audit backlog full: an allow "
                          "that cannot be recorded is refused")
        if out.allow and stat.S_ISREG(st.st_mode) and out.action in (FILE_READ, FILE_WRITE):
            self._note_rw(ev.agent, st, path, out.action, handle)
        enforced = not out.allow and (self.mode == "enforce" or out.always)
        self._record(ev.agent, task, out, is_dir, enforced)
        return not enforced

    def _decide(self, ev: PermEvent, task: Task, st: os.stat_result, is_dir: bool,
                path: str) -> Outcome | None:
        name = self.syscalls.get(task.syscall) if task.syscall is not None else None
        if ev.mask & fan.FAN_OPEN_EXEC_PERM:
            if not path.startswith("/"):
                return Outcome(False, EXEC, path, reason="no absolute path")
            if (st.st_dev, st.st_ino) in self.loaders:
                # The interpreter of the program being exec'd (which the lsm
                # backend's bprm check never sees), or a loader run directly,
                # whose every mapping is then checked (loader mode below).
                return self._file(ev.agent, FILE_READ, path, is_dir)
            if st.st_nlink == 0:
                return Outcome(False, EXEC, path, reason="exec of a file with no name (memfd, deleted)")
            return self._file(ev.agent, EXEC, path, is_dir)
        if name in ("execve", "execveat"):
            # Every open inside execve is an exec open; its exec half was
            # judged just before (or is allowed for every agent).
            return None

        write = self._open_mode(task, name)
        action = FILE_READ if write is False else FILE_WRITE
        if not path.startswith("/"):
            return Outcome(False, action, path, reason="no absolute path")
        if self._protected(path):
            return Outcome(False, SELF_PROTECT, path, reason="leash's own files", always=True)
        if write is not False and st.st_dev in self.cgroup_devs:
            return Outcome(False, SELF_PROTECT, path, reason="write to a cgroup filesystem", always=True)
        if write is None:
            # Read-only or read-write unknown (io_uring, a core dump, an
            # unknown syscall): judged as read-write, and read must be
            # allowed too.
            r = self._file(ev.agent, FILE_READ, path, is_dir)
            w = self._file(ev.agent, FILE_WRITE, path, is_dir) if r.allow else r
            w.reason = "open mode unknown: read and write both needed"
            return w
        out = self._file(ev.agent, action, path, is_dir)
        if out.allow and not write and not is_dir and _is_elf(ev.fd) and self._loader_mode(task):
            ex = self._file(ev.agent, EXEC, path, is_dir)
            if not ex.allow:
                ex.reason = "mapped by a directly run dynamic loader: needs ProcessExec"
                return ex
        return out

    def _file(self, agent: int, action: str, path: str, is_dir: bool) -> Outcome:
        resource = path + "/" if is_dir and not path.endswith("/") else path
        allow, policies, cls = self._verdict(agent, action, path, is_dir)
        return Outcome(allow, action, resource, policies, table_class=cls)

    def _may(self, agent: int, path: str, is_dir: bool, actions: tuple[str, ...]) -> bool:
        assert self.index is not None and self.tables is not None
        for action in actions:
            ans = self.index.path(agent, action, path, is_dir)
            if ans is None or not self.tables.verdicts[ans.verdict].allow:
                return False
        return True

    def _note_rw(self, agent: int, st: os.stat_result, path: str, allowed: str,
                 handle: bytes | None) -> None:
        """`allowed` (read or write) was just allowed here; is the other too?"""
        other = FILE_WRITE if allowed == FILE_READ else FILE_READ
        if handle is None or not self._may(agent, path, False, (other,)):
            return
        key = (agent, st.st_dev, handle)
        self._rw[key] = None
        self._rw.move_to_end(key)
        if len(self._rw) > _RW_MARKS:
            self._rw.popitem(last=False)

    def rw_marked(self, agent: int, dev: int, handle: bytes) -> bool:
        return (agent, dev, handle) in self._rw

    def may_copy(self, agent: int, path: str, is_dir: bool) -> bool:
        """Could the agent read and write this file (every file and directory
        of this subtree) where it was? Then moving it gains it nothing."""
        if not is_dir:
            return self._may(agent, path, False, (FILE_READ, FILE_WRITE))
        assert self.tables is not None
        top = path.rstrip("/") + "/"
        if any(r.agent == agent and r.path.startswith(top) and r.path != top
               for r in self.tables.path_rules):
            return False       # a differently treated path inside
        return (self._may(agent, top, True, (FILE_READ, FILE_WRITE))
                and self._may(agent, top + "x", False, (FILE_READ, FILE_WRITE)))

    def _protected(self, path: str) -> bool:
        """leash's own files: no governed open, whatever the policy says."""
        return any(path == p or path.startswith(p + "/") for p in self.protected)

    def _open_mode(self, task: Task, name: str | None) -> bool | None:
        """True read-write, False read-only, None unknown."""
        if task.flags & PF_DUMPCORE or name is None:
            return None
        if name == "creat":
            return True
        if name == "openat2":
            raw = fan.read_user(task.tid, task.args[2], 8)
            if raw is None:
                return None
            flags = struct.unpack("<Q", raw)[0]
        elif name in _FLAGS_ARG:
            flags = task.args[_FLAGS_ARG[name]]
        else:
            return None
        # O_CREAT may have just created the file, which the flags cannot tell
        # from opening an existing one: judged a write either way.
        return (flags & O_ACCMODE) != O_RDONLY or bool(flags & (O_TRUNC | O_CREAT))

    def _loader_mode(self, task: Task) -> bool:
        try:
            st = os.stat(f"/proc/{task.tid}/exe")
        except OSError:
            return True      # cannot tell: the stricter answer
        return (st.st_dev, st.st_ino) in self.loaders

    # ------------------------------------------------- ungoverned + caching

    def allowed(self, fd: int, mask: int) -> None:
        """For an ungoverned (or allowed) open: if every agent may do every
        kind of open of this file, stop the kernel asking about it."""
        if self.index is None or not self.cache_allows:
            return
        try:
            st = os.fstat(fd)
        except OSError:
            return
        ident = (st.st_dev, st.st_ino, st.st_ctime_ns)
        if ident in self._not_all:
            self._not_all.move_to_end(ident)
            return
        if self._allow_all(fd, st, mask):
            if self.group.ignore_inode(fd, mask, stat.S_ISDIR(st.st_mode)):
                self.ignore_marks += 1
                return
        self._not_all[ident] = None
        if len(self._not_all) > _NEGATIVE_CACHE:
            self._not_all.popitem(last=False)

    def _allow_all(self, fd: int, st: os.stat_result, mask: int) -> bool:
        assert self.index is not None and self.tables is not None
        try:
            path, _handle = self._placed(fd, st, os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            return False
        if path is None:
            return False
        is_dir = stat.S_ISDIR(st.st_mode)
        if not path.startswith("/") or self._protected(path) or st.st_dev in self.cgroup_devs:
            return False
        if not is_dir and st.st_nlink > 1:
            return False     # an ignore mark is per inode: another name may be in another class
        if mask & fan.FAN_OPEN_EXEC_PERM:
            if is_dir or (st.st_dev, st.st_ino) in self.loaders:
                return False
            actions: tuple[str, ...] = (EXEC,)
        elif is_dir:
            actions = (FILE_READ, FILE_WRITE)
        elif _is_elf(fd):
            actions = (FILE_READ, FILE_WRITE, EXEC)   # a loader run directly would need exec
        else:
            actions = (FILE_READ, FILE_WRITE)
        if not self.tables.agents or not all(self._may(a, path, is_dir, actions)
                                             for a in self.tables.agents.values()):
            return False
        # A tainted file stays asked about: its taint is checked per open.
        return self.moves is None or self.moves.check(fd, st, path) is None

    # ------------------------------------------------------------- records

    def _record(self, agent: int, task: Task, out: Outcome, is_dir: bool, enforced: bool) -> None:
        count = 1
        if out.allow:
            folded = self._fold((agent, task.tid, out.action, out.resource))
            if folded is None:
                return
            count = folded
        self.sink(self._build(agent, task, out, count, "enforce" if enforced else self.mode))

    def _build(self, agent: int, task: Task, out: Outcome, count: int, mode: str) -> AuditRecord:
        details: dict[str, object] = {"tid": task.tid}
        if out.table_class:
            details["class"] = out.table_class
        return AuditRecord(
            time_ns=now_ns(), agent=self.names.get(agent, f"agent#{agent}"), action=out.action,
            resource=out.resource, decision="allow" if out.allow else "deny", policies=out.policies,
            backend="compat", mode=mode, pid=task.tgid, ppid=task.ppid, uid=task.uid,
            exe=task.exe, count=count, reason=out.reason, details=details)

    def _fold(self, key: tuple) -> int | None:
        """Identical allows by one thread within the window become a count on
        the next one recorded: None when this one is folded, else its count
        (flush() reports what is left at stop)."""
        now = time.monotonic_ns()
        with self._dedup_lock:
            slot = self._dedup.get(key)
            if slot is not None and now - slot[0] < DEDUP_WINDOW_NS:
                slot[1] += 1
                return None
            count = 1 + (slot[1] if slot is not None else 0)
            self._dedup[key] = [now, 0, None]
            if len(self._dedup) > 4 * _NEGATIVE_CACHE:
                self._expire(now)
        return count

    def _expire(self, now: int) -> None:
        """Forget old windows; a window that folded allows is reported now
        (its last record's details are gone: it says what and how many)."""
        for key in [k for k, s in self._dedup.items() if now - s[0] >= DEDUP_WINDOW_NS]:
            slot = self._dedup.pop(key)
            if slot[1]:
                agent, tid, action, resource = key
                self.sink(AuditRecord(
                    time_ns=now_ns(), agent=self.names.get(agent, f"agent#{agent}"), action=action,
                    resource=resource, decision="allow", backend="compat", mode=self.mode, pid=tid,
                    count=slot[1], details={"tid": tid, "folded": True}))

    def flush(self) -> None:
        """Report the allows still folded (at stop)."""
        with self._dedup_lock:
            self._expire(time.monotonic_ns() + DEDUP_WINDOW_NS)

    def tainted(self, taint: Taint, tid: int) -> None:
        """A governed link or rename compat could not refuse (see compat_moves)."""
        task = Task(tid)
        what = "directory" if taint.is_dir else "file"
        if taint.what == "rename onto":
            reason = (f"rename onto a path the agent may not both read and write (from {taint.source}): "
                      f"the compat backend cannot refuse it, any file there was replaced")
        else:
            src = f" from {taint.source}" if taint.source else ""
            reason = (f"{taint.what} of a {what} the agent may not both read and write{src}: the compat "
                      f"backend cannot refuse it; governed opens of it are refused from now on")
        self.sink(AuditRecord(
            time_ns=now_ns(), agent=self.names.get(taint.agent, f"agent#{taint.agent}"),
            action=SELF_PROTECT, resource=taint.target or taint.source, decision="allow",
            backend="compat", mode=self.mode, pid=task.tgid, ppid=task.ppid, uid=task.uid,
            exe=task.exe, reason=reason, details={"tid": tid}))

    def unignore(self, fd: int) -> None:
        self.group.unignore_inode(fd)

    def fault(self, event: PermEvent | None, tid: int, error: BaseException) -> None:
        agent = event.agent if event is not None else -1
        self.sink(AuditRecord(
            time_ns=now_ns(), agent=self.names.get(agent, "unknown" if agent < 0 else f"agent#{agent}"),
            action="Internal", resource=f"fanotify event of thread {tid}",
            decision="deny", backend="compat", mode=self.mode, pid=tid,
            reason=f"internal error, refused: {type(error).__name__}: {error}"))


def _taint_reason(t: Taint) -> str:
    where = f" (was {t.source})" if t.source else ""
    kind = "inside a directory renamed" if t.is_dir else ("hard-linked" if t.what == "hard link" else "renamed")
    return f"{kind} by a governed process out of its policy class{where}"


def _mount_id(fd: int) -> int:
    """The mount an fd was opened through, for filesystems without file
    handles (sysfs, devpts): from /proc/self/fdinfo."""
    try:
        for line in fan.read_proc(f"/proc/self/fdinfo/{fd}").splitlines():
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return -1


def _is_elf(fd: int) -> bool:
    try:
        return os.pread(fd, 4, 0) == b"\x7fELF"
    except OSError:
        return False
