"""fanotify permission events: the kernel interface and the responder loop.

The kernel holds every opener on a marked filesystem until this group answers
(FAN_OPEN_PERM, FAN_OPEN_EXEC_PERM). So the loop here has one rule above all
others: every event read gets an answer, whatever the handler does. If the
whole process dies the kernel allows everything still pending when the group
fd closes; that is why nothing else may hold a copy of the fd.

This module knows nothing about policy: a Handler says who is governed and
decides; this module reads, answers, and keeps the kernel-side cache of
inode ignore marks.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import threading
import time
from typing import Callable, Protocol

import msgspec

# fanotify_init flags
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_CLASS_CONTENT = 0x4
FAN_UNLIMITED_QUEUE = 0x10
FAN_UNLIMITED_MARKS = 0x20
FAN_REPORT_TID = 0x100
FAN_REPORT_FID = 0x200
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
FAN_REPORT_TARGET_FID = 0x1000

# fanotify_mark flags
FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2
FAN_MARK_IGNORED_SURV_MODIFY = 0x40
FAN_MARK_FLUSH = 0x80
FAN_MARK_FILESYSTEM = 0x100
FAN_MARK_EVICTABLE = 0x200
FAN_MARK_IGNORE = 0x400

# events
FAN_CREATE = 0x100
FAN_Q_OVERFLOW = 0x4000
FAN_OPEN_PERM = 0x10000
FAN_OPEN_EXEC_PERM = 0x40000
FAN_RENAME = 0x10000000
FAN_ONDIR = 0x40000000

# info records of FID-reporting groups
INFO_FID = 1
INFO_DFID_NAME = 2
INFO_OLD_DFID_NAME = 10
INFO_NEW_DFID_NAME = 12

FAN_ALLOW = 0x1
FAN_DENY = 0x2
FAN_NOFD = -1
METADATA_VERSION = 3

AT_FDCWD = -100

_META = struct.Struct("=IBBHQii")     # event_len, vers, reserved, metadata_len, mask, fd, pid
_INFO = struct.Struct("=BBH8sIi")      # info_type, pad, len, fsid, handle_bytes, handle_type
_RESPONSE = struct.Struct("=iI")      # fd, response
# Preallocated and below malloc's mmap threshold: a fresh 256 KiB buffer per
# read costs an mmap/munmap pair on every wakeup.
_READ_SIZE = 64 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_libc.fanotify_mark.restype = ctypes.c_int
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_libc.open_by_handle_at.restype = ctypes.c_int
_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_libc.name_to_handle_at.restype = ctypes.c_int
AT_EMPTY_PATH = 0x1000
MAX_HANDLE_SZ = 128


class FanotifyError(OSError):
    pass


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise FanotifyError(err, f"{what}: {os.strerror(err)}")
    return ret


class PermEvent:
    """One permission event of a governed process, while the opener waits."""
    __slots__ = ("mask", "fd", "tid", "agent")

    def __init__(self, mask: int, fd: int, tid: int, agent: int) -> None:
        self.mask = mask
        self.fd = fd
        self.tid = tid
        self.agent = agent


class Handler(Protocol):
    def scope(self, tid: int) -> int:
        """Agent id of thread `tid`, 0 when ungoverned. Must be fast: every
        open on a marked filesystem that no ignore mark covers comes here."""

    def decide(self, event: PermEvent) -> bool:
        """Allow? May raise; the responder then denies and calls fault()."""

    def allowed(self, fd: int, mask: int) -> None:
        """After an allow was sent, while `fd` is still open: the place to
        decide on an ignore mark. Errors are recorded, never fatal."""

    def fault(self, event: PermEvent | None, tid: int, error: BaseException) -> None:
        """Record an internal error (the event was already answered)."""


class PermissionGroup:
    """A FAN_CLASS_CONTENT group reporting thread ids (so the opener's
    /proc/TID/syscall names the very syscall it is blocked in)."""

    def __init__(self) -> None:
        self.fd = _check(_libc.fanotify_init(
            FAN_CLASS_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_TID
            | FAN_UNLIMITED_QUEUE | FAN_UNLIMITED_MARKS,
            os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC | os.O_NOATIME), "fanotify_init")

    def mark_filesystem(self, path: str, mask: int) -> None:
        _check(_libc.fanotify_mark(self.fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, mask,
                                   AT_FDCWD, path.encode()), f"fanotify_mark {path}")

    def ignore_inode(self, event_fd: int, mask: int, is_dir: bool) -> bool:
        """Stop asking about this inode for `mask`. Evictable, so the cache
        never pins inodes. A file's mark goes when the file is modified (no
        FAN_MARK_IGNORED_SURV_MODIFY), so new content is asked about again;
        the kernel insists a directory's mark survives modification (every
        new entry modifies it) and be explicit about FAN_ONDIR."""
        flags = FAN_MARK_ADD | FAN_MARK_IGNORE | FAN_MARK_EVICTABLE
        if is_dir:
            flags |= FAN_MARK_IGNORED_SURV_MODIFY
            mask |= FAN_ONDIR
        return _libc.fanotify_mark(self.fd, flags, mask, event_fd, None) == 0

    def unignore_inode(self, fd: int) -> None:
        """Drop this inode's ignore mark, if it has one."""
        _libc.fanotify_mark(self.fd, FAN_MARK_REMOVE | FAN_MARK_IGNORE,
                            FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM, fd, None)

    def flush_ignores(self) -> None:
        """Drop every inode mark (this group only places ignore marks on inodes)."""
        _check(_libc.fanotify_mark(self.fd, FAN_MARK_FLUSH, 0, AT_FDCWD, None), "fanotify flush")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Responder:
    """Reads permission events and answers each one exactly once.

    Ungoverned events are answered in one batched write before any governed
    decision starts, so a slow governed decision never holds up the host.
    `lock` is held while a batch is decided: update() takes it to swap
    tables and flush ignore marks between batches, never inside one.
    """

    def __init__(self, group: PermissionGroup, handler: Handler) -> None:
        self.group = group
        self.handler = handler
        self.lock = threading.Lock()
        self.events = 0                      # answered, for tests and stats
        self.governed_events = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.crashed: BaseException | None = None
        # While a batch is in hand: when it last made progress (started, or
        # answered an event); 0 when idle. A stuck responder stops moving it.
        self.busy_since = 0.0
        self.on_crash: Callable[[BaseException], None] | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="leash-fanotify", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=10)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:   # noqa: BLE001 - the group must close whatever happened
            self.crashed = e
            # Closing the group makes the kernel allow whatever is pending and
            # stop generating events: the host never hangs on a dead responder.
            self.group.close()
            if self.on_crash is not None:
                self.on_crash(e)

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self.group.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        buf = bytearray(_READ_SIZE)
        while not self._stopping:
            poller.poll()
            if self._stopping:
                return
            try:
                n = os.readv(self.group.fd, [buf])
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            self.busy_since = time.monotonic()
            with self.lock:
                self._batch(buf, n)
            self.busy_since = 0.0

    def _batch(self, data: bytearray, size: int) -> None:
        handler = self.handler
        allow: list[tuple[int, int]] = []
        governed: list[PermEvent] = []
        offset = 0
        try:
            while offset + _META.size <= size:
                length, vers, _, _, mask, fd, tid = _META.unpack_from(data, offset)
                if vers != METADATA_VERSION or length < _META.size:
                    raise FanotifyError(errno.EPROTO, f"fanotify metadata version {vers}")
                offset += length
                if fd == FAN_NOFD:
                    continue                      # overflow notice: nothing to answer
                try:
                    agent = handler.scope(tid)
                except BaseException as e:   # noqa: BLE001
                    # Scope unknown: answer as a governed open would be
                    # answered on error (fail closed), and say so.
                    governed.append(PermEvent(mask, fd, tid, -1))
                    self._fault(None, tid, e)
                    continue
                if agent:
                    governed.append(PermEvent(mask, fd, tid, agent))
                else:
                    allow.append((fd, mask))
        finally:
            # Ungoverned opens first; then each governed one as it is decided.
            # One response per write: the kernel reads a single response per
            # write() and would leave the rest of a longer buffer unanswered.
            for fd, mask in allow:
                self._answer(fd, FAN_ALLOW, mask)
            self.events += len(allow)
            for ev in governed:
                self._answer_governed(ev)

    def _answer_governed(self, ev: PermEvent) -> None:
        verdict = False
        try:
            if ev.agent > 0:
                verdict = bool(self.handler.decide(ev))
        except BaseException as e:   # noqa: BLE001
            self._fault(ev, ev.tid, e)
        finally:
            self._answer(ev.fd, FAN_ALLOW if verdict else FAN_DENY, ev.mask)
            self.events += 1
            self.governed_events += 1
            self.busy_since = time.monotonic()

    def _answer(self, fd: int, response: int, mask: int) -> None:
        try:
            os.write(self.group.fd, _RESPONSE.pack(fd, response))
            if response == FAN_ALLOW:
                try:
                    self.handler.allowed(fd, mask)
                except Exception as e:   # noqa: BLE001 - a cache miss costs time, not safety
                    self._fault(None, 0, e)
        except OSError as e:
            # ENOENT: the opener was killed while waiting and the kernel has
            # dropped the event. Anything else means answers are being lost:
            # give up the group (the caller's crash path) so the kernel
            # answers for us.
            if e.errno != errno.ENOENT:
                raise
        finally:
            os.close(fd)

    def _fault(self, ev: PermEvent | None, tid: int, error: BaseException) -> None:
        try:
            self.handler.fault(ev, tid, error)
        except BaseException:   # noqa: BLE001 - a broken recorder must not stop answers
            pass


def syscall_of(tid: int, patience: float = 2.0) -> tuple[int, list[int]] | None:
    """The syscall `tid` is blocked in and its six arguments, or None when the
    kernel cannot say (a kernel thread, gone). A thread waiting for our
    permission answer is blocked, so this names the open that waits. It may
    still be on its way to sleep when we look (it queued the event, woke us,
    and was preempted before sleeping: the kernel says "running"); under load
    that lasts milliseconds, so wait for it, up to `patience` seconds."""
    path = f"/proc/{tid}/syscall"
    deadline = 0.0
    pause = 0.00002
    while True:
        try:
            fields = read_proc(path).split()
        except OSError:
            return None
        if not fields or fields[0] != b"running":
            break
        now = time.monotonic()
        if not deadline:
            deadline = now + patience
            os.sched_yield()
            continue
        if now > deadline:
            return None
        time.sleep(pause)
        pause = min(pause * 2, 0.001)
    if len(fields) < 7 or not fields[0].lstrip(b"-").isdigit():
        return None
    nr = int(fields[0])
    if nr < 0:
        return None
    return nr, [int(x, 16) for x in fields[1:7]]


def read_proc(path: str) -> bytes:
    """A small /proc file in one read, without the io module's layers: the
    responder reads two of these for every governed open."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def read_user(tid: int, address: int, size: int) -> bytes | None:
    """`size` bytes of the blocked thread's memory (openat2's open_how)."""
    try:
        fd = os.open(f"/proc/{tid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.pread(fd, size, address)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) == size else None


# ------------------------------------------------------------ notification

class Info(msgspec.Struct, frozen=True):
    """One FID info record: which object (and, for DFID_NAME kinds, the
    entry name in that directory)."""
    kind: int
    fsid: bytes
    handle: bytes        # a struct file_handle, as open_by_handle_at takes it
    name: str = ""


class Notice(msgspec.Struct, frozen=True):
    mask: int
    tid: int
    infos: list[Info]


class NotifyGroup:
    """A notification group reporting file handles: directory entry changes
    (create, rename) name the parent directories, the entry names and the
    object itself, with the thread that made them."""

    def __init__(self) -> None:
        self.fd = _check(_libc.fanotify_init(
            FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_TID | FAN_REPORT_FID
            | FAN_REPORT_DIR_FID | FAN_REPORT_NAME | FAN_REPORT_TARGET_FID
            | FAN_UNLIMITED_QUEUE | FAN_UNLIMITED_MARKS, os.O_RDONLY | os.O_CLOEXEC), "fanotify_init")
        self.overflowed = False

    def mark_filesystem(self, path: str, mask: int) -> None:
        _check(_libc.fanotify_mark(self.fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, mask,
                                   AT_FDCWD, path.encode()), f"fanotify_mark {path}")

    def read(self) -> list[Notice]:
        """Everything queued now (never blocks)."""
        out: list[Notice] = []
        while True:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return out
            offset = 0
            while offset + _META.size <= len(data):
                length, _, _, meta_len, mask, _, tid = _META.unpack_from(data, offset)
                if mask & FAN_Q_OVERFLOW:
                    self.overflowed = True
                infos, i = [], offset + meta_len
                while i + _INFO.size <= offset + length:
                    kind, _, ilen, fsid, hbytes, _ = _INFO.unpack_from(data, i)
                    handle = bytes(data[i + 12:i + 20 + hbytes])
                    name = data[i + 20 + hbytes:i + ilen].split(b"\0", 1)[0]
                    infos.append(Info(kind, bytes(fsid), handle, os.fsdecode(name)))
                    i += ilen
                out.append(Notice(mask, tid, infos))
                offset += length

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_by_handle(mount_fd: int, handle: bytes, flags: int = os.O_PATH) -> int:
    """An fd for the object `handle` names on the filesystem of `mount_fd`."""
    return _check(_libc.open_by_handle_at(mount_fd, handle, flags | os.O_CLOEXEC), "open_by_handle_at")


def handle_of(fd: int) -> bytes | None:
    """The struct file_handle of an open file, comparable with Info.handle."""
    found = handle_and_mount(fd)
    return found[0] if found else None


def handle_and_mount(fd: int) -> tuple[bytes, int] | None:
    """(file handle, id of the mount the file was opened through)."""
    buf = ctypes.create_string_buffer(8 + MAX_HANDLE_SZ)
    struct.pack_into("=I", buf, 0, MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), AT_EMPTY_PATH) < 0:
        return None
    size = struct.unpack_from("=I", buf)[0]
    return buf.raw[:8 + size], mount_id.value


def handle_of_path(path: str) -> bytes | None:
    buf = ctypes.create_string_buffer(8 + MAX_HANDLE_SZ)
    struct.pack_into("=I", buf, 0, MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), buf, ctypes.byref(mount_id), 0) < 0:
        return None
    size = struct.unpack_from("=I", buf)[0]
    return buf.raw[:8 + size]
