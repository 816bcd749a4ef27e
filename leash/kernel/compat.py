"""The compat backend: the same policy on kernels whose LSM list lacks `bpf`.

    network   cgroup sock_addr programs (connect4/6, sendmsg4/6) and sock_create,
              attached at the root of the cgroup v2 hierarchy, reading the same
              tables as the lsm backend (compat_net.bpf.c)
    files     fanotify permission events on every filesystem, decided in
              userspace from the same tables (compat_files.py)
    processes tp_btf fork/exec/exit: scope by task (scope.bpf.c) and by thread
              id for the responder and sock_addr programs (compat_tasks.bpf.c)
    mounts    syscall tracepoints: a governed process that mounts is killed and
              its mount namespace poisoned (compat_mounts.bpf.c)

The tables, their two generations, the ring buffer and its records are the
lsm backend's machinery, inherited; what differs is what is loaded and where
it is attached. docs/compat.md says precisely what this backend cannot do.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable

import msgspec

from leash.audit import AuditRecord, now_ns
from leash.kernel import cgroup, compat_watchdog, libbpf, objects
from leash.kernel import fanotify as fan
from leash.kernel.compat_files import FileDecider, Oracle
from leash.kernel.compat_moves import MoveWatcher
from leash.kernel.lsm import PIN_ROOT, LsmBackend, default_protected, mount_bpffs, remove_stale_pins
from leash.policy.tables import DecisionTables

COMPAT_OBJECTS = ("compat_tasks", "compat_net", "compat_mounts")
TRACEFS = "/sys/kernel/tracing"
# compat.h's reasons beyond leash.h's
COMPAT_REASONS = {
    32: "mount by a governed process: compat cannot refuse it, so the process was killed "
        "and its mount namespace poisoned",
    33: "open in a mount namespace where a governed process mounted: killed before it "
        "could use it",
}
MARK_MASK = fan.FAN_OPEN_PERM | fan.FAN_OPEN_EXEC_PERM | fan.FAN_ONDIR
BTF_PATH = "/sys/kernel/btf/vmlinux"

# procfs refuses permission events (FS_DISALLOW_NOTIFY_PERM: they could
# deadlock); autofs holds no files, what it mounts appears as a new mount.
UNMARKABLE = {"proc": "procfs refuses fanotify permission events",
              "autofs": "an automount point holds no files"}
CGROUP_TYPES = ("cgroup", "cgroup2")
HEARTBEAT_S = 1.0
BACKLOG = 65536             # records waiting for the audit sink before backpressure
STUCK_S = 5.0               # a batch taking longer than this: the responder is stuck


class ProbeResult(msgspec.Struct, frozen=True):
    """One mechanism the compat backend needs, as `leash doctor` prints it."""
    name: str
    ok: bool
    detail: str


class CompatUnavailable(RuntimeError):
    """The compat backend cannot enforce here; str() is the one-line reason."""


class Mount(msgspec.Struct, frozen=True):
    dev: int              # kernel dev_t: major << 20 | minor
    user_dev: int         # st_dev as stat() reports it
    path: str
    fstype: str
    root: str = "/"       # the directory of the filesystem mounted there
    mount_id: int = 0


def mounts(mountinfo: str | None = None) -> list[Mount]:
    """Every mount in leash's mount namespace, in mount order."""
    if mountinfo is None:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
    out = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        major, minor = (int(x) for x in fields[2].split(":"))
        out.append(Mount(major << 20 | minor, os.makedev(major, minor), cgroup._unescape(fields[4]),
                         fields[sep + 1], cgroup._unescape(fields[3]), int(fields[0])))
    return out


def filesystems(mountinfo: str | None = None) -> list[Mount]:
    """One mount per superblock, in mount order: where its whole tree is
    mounted when it is (so paths resolved through it are the real ones)."""
    seen: dict[int, Mount] = {}
    for m in mounts(mountinfo):
        if m.dev not in seen or (m.root == "/" and seen[m.dev].root != "/"):
            seen[m.dev] = m
    return list(seen.values())


def _visible(m: Mount) -> bool:
    """False when another mount hides this one's mount point."""
    try:
        return os.stat(m.path).st_dev == m.user_dev
    except OSError:
        return False


def mark_all(group: fan.PermissionGroup, mounts: Iterable[Mount]) -> tuple[list[Mount], list[str]]:
    """Mark every superblock that can hold a governed file. Returns what was
    marked and, for each one that refused, a one-line reason."""
    marked, refused = [], []
    for m in mounts:
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


def mount_tracefs() -> None:
    """libbpf finds syscall tracepoints through tracefs."""
    if not os.path.isdir(os.path.join(TRACEFS, "events")):
        subprocess.run(["mount", "-t", "tracefs", "tracefs", TRACEFS], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def threads_in(cgroup_path: str) -> list[int]:
    """Every thread in the subtree now."""
    out = []
    for dirpath, _dirs, _files in os.walk(cgroup_path):
        try:
            with open(os.path.join(dirpath, "cgroup.threads")) as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


class _Scope:
    """compat_tids lookups for the responder: one bpf() syscall with buffers
    made once, since every unignored open on the host comes through here."""

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
        raise OSError(-rc, f"compat_tids lookup: {os.strerror(-rc)}")


class CompatBackend(LsmBackend):
    name = "compat"

    def __init__(self, protected_paths: Iterable[str] = (), pin_root: str | None = PIN_ROOT,
                 oracle: Oracle | None = None, cache_allows: bool = True,
                 watchdog_stall_s: float = 10.0) -> None:
        """`cache_allows`: once a file may be opened in every way by every
        agent, let the kernel stop asking about it (fanotify ignore marks).
        Ungoverned processes then pay nothing for it, and governed opens of
        it are no longer recorded (docs/compat.md)."""
        super().__init__((), pin_root)
        # No leash_protect map here: leash's own files are guarded by the
        # fanotify responder instead.
        self.protected = []
        self.file_protected = [os.path.realpath(p) for p in (*default_protected(), *protected_paths)]
        self.oracle = oracle
        self.cache_allows = cache_allows
        self.watchdog_stall_s = watchdog_stall_s
        self.watchdog: subprocess.Popen | None = None
        self._heart: threading.Thread | None = None
        self._heart_stop = threading.Event()
        self.group: fan.PermissionGroup | None = None
        self.responder: fan.Responder | None = None
        self.decider: FileDecider | None = None
        self.moves: MoveWatcher | None = None
        self.marked: list[Mount] = []
        self._records: queue.SimpleQueue = queue.SimpleQueue()
        self.backlog_limit = BACKLOG
        self._backlog = 0
        self._drained = threading.Condition()
        self._recorder: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._watch_stop_r, self._watch_stop_w = -1, -1
        self._outer_sink: Callable[[AuditRecord], None] | None = None
        self._cgroup_fd = -1

    # ----------------------------------------------------------- lifecycle

    def start(self, tables: DecisionTables, mode: str, sink: Callable[[AuditRecord], None]) -> None:
        if os.geteuid() != 0:
            raise CompatUnavailable("the compat backend needs root (BPF programs, fanotify)")
        try:
            root = cgroup.cgroup2_mount()
        except cgroup.CgroupError as e:
            raise CompatUnavailable(str(e)) from None
        self._cgroup_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._outer_sink = sink
        self._recorder = threading.Thread(target=self._record_loop, name="leash-compat-audit",
                                          daemon=True)
        self._recorder.start()
        try:
            try:
                self.group = fan.PermissionGroup()
            except fan.FanotifyError as e:
                raise CompatUnavailable(f"fanotify permission events are unavailable: "
                                        f"{os.strerror(e.errno)} (needs CONFIG_FANOTIFY_ACCESS_PERMISSIONS)") from None
            super().start(tables, mode, self._submit_from_ring)
            self._start_watchdog()
            self._start_files(tables, mode)
        except BaseException:
            self.stop()
            raise

    def _start_files(self, tables: DecisionTables, mode: str) -> None:
        assert self.group is not None
        cgroup_devs = set()
        filesystems_now = filesystems()
        for m in filesystems_now:
            if m.fstype in CGROUP_TYPES:
                cgroup_devs.add(m.user_dev)
        self.decider = FileDecider(self.group, _Scope(self._maps["compat_tids"].fd), mode,
                                   self._submit, tuple(self.file_protected), cgroup_devs, self.oracle,
                                   self.cache_allows, self.backlogged)
        self.decider.set_tables(tables)
        self.decider.set_mounts(mounts())
        try:
            notify = fan.NotifyGroup()
        except fan.FanotifyError as e:
            raise CompatUnavailable(f"fanotify cannot report file handles here ({os.strerror(e.errno)}): "
                                    "links and renames by agents could not be followed") from None
        live, gone = _Scope(self._maps["compat_tids"].fd), _Scope(self._maps["compat_gone"].fd)
        self.moves = MoveWatcher(notify, lambda tid: live(tid) or gone(tid), self.decider.may_copy,
                                 self.decider.rw_marked, self.decider.tainted, self.decider.unignore,
                                 lambda why: self._internal(why, decision="deny"))
        self.decider.moves = self.moves
        # Answer from the first marked event on: a mark without a responder
        # would hold every open on that filesystem.
        self.responder = fan.Responder(self.group, self.decider)
        self.responder.on_crash = self._responder_crashed
        self.responder.start()
        self.marked, refused = mark_all(self.group, filesystems_now)
        if refused:
            raise CompatUnavailable(refused[0] + (f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""))
        self._note_marked(self.marked)
        self._watch_stop_r, self._watch_stop_w = os.pipe2(os.O_CLOEXEC)
        self._watcher = threading.Thread(target=self._watch_mounts, name="leash-compat-mounts",
                                         daemon=True)
        self._watcher.start()

    def _start_watchdog(self) -> None:
        """Before any mark: the watchdog must exist before anything can hang
        on us, and must not inherit the fanotify fds (they are CLOEXEC)."""
        tids_fd = self._maps["compat_tids"].fd
        self.watchdog = subprocess.Popen(
            [sys.executable, "-I", "-S", compat_watchdog.__file__, str(os.getpid()),
             str(self.watchdog_stall_s), str(tids_fd)],
            stdin=subprocess.PIPE, pass_fds=(tids_fd,), cwd="/")
        self._heart_stop.clear()
        self._heart = threading.Thread(target=self._heartbeat, name="leash-compat-heartbeat", daemon=True)
        self._heart.start()

    def _tell_watchdog(self, data: bytes) -> None:
        try:
            assert self.watchdog is not None and self.watchdog.stdin is not None
            self.watchdog.stdin.write(data)
            self.watchdog.stdin.flush()
        except (OSError, ValueError, AssertionError) as e:
            self._internal(f"watchdog unreachable ({e}): a crash of leash would leave agents running",
                           decision="deny")

    def _heartbeat(self) -> None:
        while not self._heart_stop.wait(HEARTBEAT_S):
            r = self.responder
            if r is not None and r.busy_since and time.monotonic() - r.busy_since > STUCK_S:
                continue      # let the watchdog see a stuck responder
            self._tell_watchdog(b"\0")

    def update(self, tables: DecisionTables) -> None:
        """Files switch a moment before the kernel tables (which the inherited
        update fills, flips, and retires); each decision sees one policy."""
        assert self.responder is not None and self.decider is not None
        old = self.decider.tables
        with self.responder.lock:
            self.decider.set_tables(tables)
        try:
            super().update(tables)
        except BaseException:
            with self.responder.lock:
                self.decider.set_tables(old)
            raise

    def govern(self, agent_id: int, cgroup_path: str) -> None:
        super().govern(agent_id, cgroup_path)
        # Threads already inside: everything started later is caught by
        # compat_tasks (fork, exec, cgroup attach).
        tids = self._maps["compat_tids"]
        for tid in threads_in(cgroup_path):
            tids.update(struct.pack("<I", tid), struct.pack("<I", agent_id))
        self._tell_watchdog(b"c " + os.fsencode(cgroup_path) + b"\n")

    def stop(self) -> None:
        if self._watcher is not None:
            os.write(self._watch_stop_w, b"x")
            self._watcher.join()
            self._watcher = None
        for fd in (self._watch_stop_r, self._watch_stop_w):
            if fd >= 0:
                os.close(fd)
        self._watch_stop_r = self._watch_stop_w = -1
        if self.responder is not None:
            self.responder.stop()
            self.responder = None
        if self.group is not None:
            self.group.close()        # the kernel allows anything still pending
            self.group = None
        if self.moves is not None:
            self.moves.close()
            self.moves = None
        if self.decider is not None:
            self.decider.flush()
        if self._heart is not None:
            self._heart_stop.set()
            self._heart.join()
            self._heart = None
        if self.watchdog is not None:
            # A clean stop is not a crash: nothing to kill.
            self._tell_watchdog(b"stop\n")
            self.watchdog.stdin.close()
            self.watchdog.wait(timeout=10)
            self.watchdog = None
        super().stop()
        if self._cgroup_fd >= 0:
            os.close(self._cgroup_fd)
            self._cgroup_fd = -1
        if self._recorder is not None:
            self._records.put(None)
            self._recorder.join()
            self._recorder = None

    # ---------------------------------------------------- loading, attaching

    def _load(self, sizes: dict[str, int]) -> None:
        for name in (objects.SCOPE, *COMPAT_OBJECTS):
            obj = libbpf.Object(objects.load_bytes(name), name)
            self._objects.append(obj)
            for map_name, m in obj.maps.items():
                if map_name in self._maps:
                    m.reuse_fd(self._maps[map_name].fd)
                elif map_name in sizes:
                    m.set_max_entries(sizes[map_name])
            obj.load()
            for map_name, m in obj.maps.items():
                self._maps.setdefault(map_name, m)

    def _attach(self) -> None:
        """tp_btf programs attach to their tracepoints; the sock_addr ones to
        the hierarchy's root, so scope (per thread) decides, not cgroup."""
        mount_tracefs()
        if self.pin_root:
            mount_bpffs()
            remove_stale_pins(self.pin_root)
            self.pin_dir = os.path.join(self.pin_root, str(os.getpid()))
            os.makedirs(self.pin_dir, exist_ok=True)
        for obj in self._objects:
            for prog in obj.programs.values():
                if obj.name == "compat_net":
                    link = prog.attach_cgroup(self._cgroup_fd)
                else:
                    link = prog.attach()
                self._links.append(link)
                if self.pin_dir:
                    link.pin(os.path.join(self.pin_dir, prog.name))

    def _record(self, f: tuple) -> AuditRecord:
        rec = super()._record(f)
        reason = f[11]
        if reason in COMPAT_REASONS:
            rec.reason = COMPAT_REASONS[reason]
        return rec

    # ------------------------------------------------------------- marks

    def _note_marked(self, mounts: Iterable[Mount]) -> None:
        assert self.moves is not None
        fs = self._maps["compat_fs"]
        for m in mounts:
            fs.update(struct.pack("<I", m.dev), struct.pack("<I", 1))
            self.moves.watch(m.path)

    def _watch_mounts(self) -> None:
        """Mark filesystems mounted after start (until marked, a moment, opens
        there are not seen; governed execs from them are killed meanwhile),
        and keep the link/rename queue short while no governed open drains it."""
        assert self.moves is not None
        with open("/proc/self/mountinfo", "rb") as f:
            poller = select.poll()
            poller.register(f.fileno(), select.POLLPRI | select.POLLERR)
            poller.register(self._watch_stop_r, select.POLLIN)
            poller.register(self.moves.group.fd, select.POLLIN)
            while True:
                ready = dict(poller.poll())
                if self._watch_stop_r in ready:
                    return
                try:
                    if self.moves.group.fd in ready:
                        self.moves.drain()
                    if f.fileno() in ready:
                        f.seek(0)
                        f.read()
                        self._mark_new()
                except Exception as e:   # noqa: BLE001 - keep watching, say why
                    self._internal(f"compat watcher: {type(e).__name__}: {e}")

    def _mark_new(self) -> None:
        assert self.group is not None and self.decider is not None
        self.decider.set_mounts(mounts())
        known = {m.dev for m in self.marked}
        new = [m for m in filesystems() if m.dev not in known]
        marked, refused = mark_all(self.group, new)
        self.marked.extend(marked)
        self._note_marked(marked)
        for reason in refused:
            self._internal(f"{reason}: opens there are not governed")

    # ------------------------------------------------------------ records

    def _submit(self, rec: AuditRecord) -> None:
        """Every record goes through one thread: the responder must never
        block on a slow audit sink."""
        rec.backend = self.name
        with self._drained:
            self._backlog += 1
        self._records.put(rec)

    def backlogged(self) -> bool:
        return self._backlog >= self.backlog_limit

    def _submit_from_ring(self, rec: AuditRecord) -> None:
        """The ring buffer's consumer waits while the sink is behind, so the
        ring fills and the kernel side does what it does when records cannot
        be kept: counts lost denies, refuses allows it cannot record."""
        with self._drained:
            while self._backlog >= self.backlog_limit and not self._stopping.is_set():
                self._drained.wait(0.1)
        self._submit(rec)

    def _record_loop(self) -> None:
        while True:
            rec = self._records.get()
            if rec is None:
                return
            try:
                assert self._outer_sink is not None
                self._outer_sink(rec)
            except Exception:   # noqa: BLE001 - one bad write must not stop the audit trail
                pass
            with self._drained:
                self._backlog -= 1
                self._drained.notify_all()

    def _internal(self, reason: str, decision: str = "allow") -> None:
        self._submit(AuditRecord(time_ns=now_ns(), agent="", action="Internal", resource="compat",
                                 decision=decision, mode=self._mode, reason=reason))

    def _responder_crashed(self, error: BaseException) -> None:
        """The kernel already allowed what was pending when the group closed.
        Governed processes must not go on unwatched: kill them, record why,
        then make the daemon stop (its SIGTERM path) so the failure is seen."""
        tids = self._maps.get("compat_tids")
        for key in tids.keys() if tids is not None else ():
            try:
                os.kill(struct.unpack("<I", key)[0], signal.SIGKILL)
            except OSError:
                pass
        self._internal(f"fanotify responder crashed ({type(error).__name__}: {error}); "
                       "governed processes killed, leash stopping", decision="deny")
        with self._drained:
            self._drained.wait_for(lambda: self._backlog == 0, timeout=5)
        os.kill(os.getpid(), signal.SIGTERM)

    # ------------------------------------------------------------- queries

    def agent_of_pid(self, pid: int) -> int:
        v = self._maps["compat_tids"].lookup(struct.pack("<I", pid))
        return struct.unpack("<I", v)[0] if v else 0


# ------------------------------------------------------------------ probe

def probe_compat() -> list[ProbeResult]:
    """Each mechanism the compat backend needs, tried for real."""
    out: list[ProbeResult] = []
    root = os.geteuid() == 0
    out.append(ProbeResult("BTF", os.path.exists(BTF_PATH),
                           BTF_PATH if os.path.exists(BTF_PATH)
                           else f"{BTF_PATH} missing (needs CONFIG_DEBUG_INFO_BTF)"))
    try:
        mount = cgroup.cgroup2_mount()
        out.append(ProbeResult("cgroup v2", True, f"mounted at {mount}"))
    except cgroup.CgroupError as e:
        mount = None
        out.append(ProbeResult("cgroup v2", False, str(e)))
    if not root:
        why = "not probed: needs root"
        return out + [ProbeResult(n, False, why) for n in
                      ("tp_btf programs", "ring buffer", "cgroup sock_addr attach", "syscall tracepoints",
                       "fanotify permission events")]
    out.extend(_probe_bpf(mount))
    out.append(_probe_fanotify())
    return out


def _probe_bpf(mount: str | None) -> list[ProbeResult]:
    out: list[ProbeResult] = []
    loaded: list[libbpf.Object] = []
    shared: dict[str, int] = {}
    try:
        for name in (objects.SCOPE, *COMPAT_OBJECTS):
            obj = libbpf.Object(objects.load_bytes(name), name)
            loaded.append(obj)
            for map_name, m in obj.maps.items():
                if map_name in shared:
                    m.reuse_fd(shared[map_name])
            obj.load()
            for map_name, m in obj.maps.items():
                shared.setdefault(map_name, m.fd)
    except (libbpf.LibbpfMissing, FileNotFoundError, libbpf.BpfError) as e:
        out.append(ProbeResult("tp_btf programs", False, f"loading the compat objects failed: {e}"))
        for obj in loaded:
            obj.close()
        return out
    try:
        for obj in loaded:
            if obj.name in (objects.SCOPE, "compat_tasks"):
                for prog in obj.programs.values():
                    prog.attach().destroy()
        out.append(ProbeResult("tp_btf programs", True, "task creation, fork, exec, exit and "
                               "cgroup attach tracepoints attach"))
    except libbpf.BpfError as e:
        out.append(ProbeResult("tp_btf programs", False, str(e)))
    try:
        rb = libbpf.RingBuffer(shared["leash_events"], lambda _data: None)
        rb.free()
        out.append(ProbeResult("ring buffer", True, "BPF ring buffer consumer works"))
    except libbpf.BpfError as e:
        out.append(ProbeResult("ring buffer", False, str(e)))
    net = next(o for o in loaded if o.name == "compat_net")
    if mount is None:
        out.append(ProbeResult("cgroup sock_addr attach", False, "no cgroup v2 hierarchy"))
    else:
        fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            links = [p.attach_cgroup(fd) for p in net.programs.values()]
            for link in links:
                link.destroy()
            out.append(ProbeResult("cgroup sock_addr attach", True,
                                   f"connect4/6, sendmsg4/6, sock_create attach at {mount}"))
        except libbpf.BpfError as e:
            out.append(ProbeResult("cgroup sock_addr attach", False, str(e)))
        finally:
            os.close(fd)
    try:
        mount_tracefs()
        tp = next(o for o in loaded if o.name == "compat_mounts").programs["compat_mount"].attach()
        tp.destroy()
        out.append(ProbeResult("syscall tracepoints", True, "mount-family and open-family syscalls"))
    except (libbpf.BpfError, subprocess.CalledProcessError) as e:
        out.append(ProbeResult("syscall tracepoints", False,
                               f"{e} (needs CONFIG_FTRACE_SYSCALLS and tracefs)"))
    for obj in loaded:
        obj.close()
    return out


def _probe_fanotify() -> ProbeResult:
    try:
        group = fan.PermissionGroup()
    except fan.FanotifyError as e:
        return ProbeResult("fanotify permission events", False,
                           f"fanotify_init: {os.strerror(e.errno)} (needs CONFIG_FANOTIFY_ACCESS_PERMISSIONS)")
    try:
        # Events raised while the marks exist wait for this group; closing it
        # at once lets the kernel allow them.
        found = filesystems()
        marked, refused = mark_all(group, found)
    finally:
        group.close()
    skipped = sorted({m.fstype for m in found if m.fstype in UNMARKABLE})
    detail = f"{len(marked)} filesystems can be watched"
    if skipped:
        detail += f" (not {', '.join(skipped)}: {'; '.join(UNMARKABLE[t] for t in skipped)})"
    if refused:
        return ProbeResult("fanotify permission events", False, "; ".join(refused))
    return ProbeResult("fanotify permission events", True, detail)
