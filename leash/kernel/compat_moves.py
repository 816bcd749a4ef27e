"""Hard links and renames by governed processes: what the compat backend does
instead of refusing them (fanotify has no permission event for either).

The lsm backend refuses a governed link or rename of a file unless the agent
could read and write it where it opened it (so it gains nothing it could not
get by copying), and refuses every governed directory rename whose subtree is
not uniformly read-write for it. Here the operation has already happened when
we hear of it, so the object moved out of its class is tainted instead: every
later open of it (for a directory: of anything below it) by a governed
process is refused.

Ordering: the kernel queues the notice before link()/rename() returns, and
the responder drains this queue before each governed decision, so an open
that follows a link or rename is always judged knowing about it.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable

import msgspec

from leash.kernel import fanotify as fan

WATCH_MASK = fan.FAN_CREATE | fan.FAN_RENAME | fan.FAN_ONDIR


class Taint(msgspec.Struct, frozen=True):
    agent: int
    what: str                 # "hard link" | "rename" | "rename onto" (nothing tainted: a record)
    source: str               # where it was (a rename), or "" (a link: unknown)
    target: str               # where it is now
    is_dir: bool


class MountRef(msgspec.Struct, frozen=True):
    fd: int                   # a directory fd on the filesystem, for open_by_handle_at
    dev: int                  # st_dev of its files


def fsid_of(path: str) -> bytes:
    """The 8 bytes a FID info record carries for this filesystem."""
    fsid = os.statvfs(path).f_fsid
    return (fsid & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")


class MoveWatcher:
    def __init__(self, group: fan.NotifyGroup, actor: Callable[[int], int],
                 may_copy: Callable[[int, str, bool], bool], marked: Callable[[int, int, bytes], bool],
                 on_taint: Callable[[Taint, int], None], unignore: Callable[[int], None],
                 fault: Callable[[str], None]) -> None:
        self.group = group
        self.actor = actor               # thread id -> agent (also for exited threads), 0 none
        self.may_copy = may_copy         # agent could read and write it (the subtree) at this path
        self.marked = marked             # agent opened this inode where it may read and write it
        self.on_taint = on_taint
        self.unignore = unignore         # drop an ignore mark from this fd's inode
        self.fault = fault               # record an internal error
        self.mounts: dict[bytes, MountRef] = {}
        self.by_dev: dict[int, MountRef] = {}
        self.files: dict[tuple[int, bytes], Taint] = {}
        self.dirs: dict[tuple[int, bytes], Taint] = {}
        self.lock = threading.Lock()
        self.unwatched: list[str] = []

    def watch(self, path: str) -> bool:
        """Watch one filesystem (any of its mount points). False where the
        kernel cannot report file handles (sysfs, devpts, securityfs, bpffs)."""
        try:
            self.group.mark_filesystem(path, WATCH_MASK)
            fsid = fsid_of(path)
        except OSError:
            self.unwatched.append(path)
            return False
        # Not O_PATH: open_by_handle_at refuses a path-only mount fd.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        ref = self.mounts.setdefault(fsid, MountRef(fd, os.fstat(fd).st_dev))
        if ref.fd != fd:
            os.close(fd)
        self.by_dev.setdefault(ref.dev, ref)
        return True

    def resolve(self, dev: int, handle: bytes) -> str | None:
        """The path of a file through leash's own mount of its filesystem."""
        ref = self.by_dev.get(dev)
        if ref is None:
            return None
        try:
            fd = fan.open_by_handle(ref.fd, handle)
        except OSError:
            return None
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        finally:
            os.close(fd)
        return path if path.startswith("/") else None

    def close(self) -> None:
        for m in self.mounts.values():
            os.close(m.fd)
        self.mounts.clear()
        self.by_dev.clear()
        self.group.close()

    # ------------------------------------------------------------ draining

    def drain(self) -> None:
        with self.lock:
            for notice in self.group.read():
                try:
                    agent = self.actor(notice.tid)
                    if agent:
                        self._consider(agent, notice)
                except Exception as e:   # noqa: BLE001 - one bad notice must not drop the rest
                    self._failed(notice, e)

    def _failed(self, notice: fan.Notice, error: Exception) -> None:
        """A link or rename we could not judge: taint what it touched, so no
        governed open of it follows unjudged (fail closed), and say so."""
        obj = next((i for i in notice.infos if i.kind == fan.INFO_FID), None)
        if obj is not None:
            mount = self.mounts.get(obj.fsid)
            is_dir = bool(notice.mask & fan.FAN_ONDIR)
            (self.dirs if is_dir else self.files)[(mount.dev if mount else 0, obj.handle)] = \
                Taint(0, "rename" if notice.mask & fan.FAN_RENAME else "hard link", "", "", is_dir)
        self.fault(f"link/rename notice of thread {notice.tid} not judged, object tainted: "
                   f"{type(error).__name__}: {error}")

    def _consider(self, agent: int, notice: fan.Notice) -> None:
        by_kind = {i.kind: i for i in notice.infos}
        obj = by_kind.get(fan.INFO_FID)
        if obj is None:
            return
        mount = self.mounts.get(obj.fsid)
        if notice.mask & fan.FAN_RENAME:
            old, new = by_kind.get(fan.INFO_OLD_DFID_NAME), by_kind.get(fan.INFO_NEW_DFID_NAME)
            is_dir = bool(notice.mask & fan.FAN_ONDIR)
            source = self._path(old) if old else None
            target = self._path(new) if new else None
            if target is not None and not self.may_copy(agent, target, is_dir):
                # It may have replaced a file the agent may not write; lsm
                # refuses that, compat can only say it happened.
                self.on_taint(Taint(agent, "rename onto", source or "", target, is_dir), notice.tid)
            if source is not None:
                if self.may_copy(agent, source, is_dir):
                    return
                if not is_dir and mount is not None and self.marked(agent, mount.dev, obj.handle):
                    return
            self._taint(Taint(agent, "rename", source or "", target or "", is_dir), obj, mount, notice.tid)
        elif notice.mask & fan.FAN_CREATE and not notice.mask & fan.FAN_ONDIR:
            if mount is None:
                return
            try:
                fd = fan.open_by_handle(mount.fd, obj.handle)
            except OSError:
                return            # gone already: nothing left to open
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            # A new regular file has one name; more means link(2) gave an
            # existing file another one.
            if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
                return
            if self.marked(agent, mount.dev, obj.handle):
                return
            where = by_kind.get(fan.INFO_DFID_NAME)
            target = (self._path(where) if where else None) or ""
            self._taint(Taint(agent, "hard link", "", target, False), obj, mount, notice.tid)

    def _path(self, info: fan.Info) -> str | None:
        mount = self.mounts.get(info.fsid)
        if mount is None:
            return None
        try:
            fd = fan.open_by_handle(mount.fd, info.handle)
        except OSError:
            return None
        try:
            directory = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        finally:
            os.close(fd)
        return directory.rstrip("/") + "/" + info.name if info.name else directory

    def _taint(self, taint: Taint, obj: fan.Info, mount: MountRef | None, tid: int) -> None:
        dev = mount.dev if mount is not None else 0
        (self.dirs if taint.is_dir else self.files)[(dev, obj.handle)] = taint
        if mount is not None and not taint.is_dir:
            try:
                fd = fan.open_by_handle(mount.fd, obj.handle)
            except OSError:
                fd = -1
            if fd >= 0:
                try:
                    self.unignore(fd)
                finally:
                    os.close(fd)
        self.on_taint(taint, tid)

    # ------------------------------------------------------------ checking

    def check(self, fd: int, st: os.stat_result, path: str, handle: bytes | None = None) -> Taint | None:
        """The taint on the file being opened, or on a directory above it."""
        if not self.files and not self.dirs:
            return None
        if self.files:
            handle = handle or fan.handle_of(fd)
            hit = self.files.get((st.st_dev, handle)) if handle is not None else None
            if hit is not None:
                return hit
        if self.dirs:
            d = path
            while True:
                try:
                    dev = os.stat(d).st_dev
                except OSError:
                    dev = -1
                handle = fan.handle_of_path(d)
                hit = self.dirs.get((dev, handle)) if handle is not None else None
                if hit is not None:
                    return hit
                if d in ("/", ""):
                    break
                d = os.path.dirname(d) or "/"
        return None
