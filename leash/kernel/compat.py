"""The compat backend: the same policy on kernels whose LSM list lacks `bpf`.

    network   cgroup sock_addr programs (connect4/6, sendmsg4/6) and sock_create,
              attached at the root of the cgroup v2 hierarchy, reading the same
              tables as the lsm backend (compat_net.bpf.c)
    files     fanotify permission events on every filesystem, decided from the
              same tables in a process of its own (compat_responder.py)
    processes tp_btf task creation/exec/exit: scope by task (scope.bpf.c) and by
              thread id for the responder and sock_addr programs (compat_tasks.bpf.c)
    mounts    syscall tracepoints: a governed process that mounts is killed and
              its mount namespace poisoned (compat_mounts.bpf.c)
    liveness  a watchdog process (compat_watchdog.py)

The tables, their two generations, the ring buffer and its records are the
shared BpfSession's (session.py), as for lsm; what differs is what is loaded,
where it is attached, and the responder process. docs/compat.md says
precisely what this backend cannot do.
"""

from __future__ import annotations

import os
import queue
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
from leash.kernel import compat_responder as cr
from leash.kernel import fanotify as fan
from leash.kernel.session import PIN_ROOT, BpfSession, default_protected, open_objects
from leash.policy.tables import DecisionTables

TRACEFS = "/sys/kernel/tracing"
# compat.h's reasons beyond leash.h's
COMPAT_REASONS = {
    32: "mount by a governed process: compat cannot refuse it, so the process was killed "
        "and its mount namespace poisoned",
    33: "open in a mount namespace where a governed process mounted: killed before it "
        "could use it",
    34: "socket family no policy can name (packet, vsock, bluetooth, ...): compat cannot "
        "refuse it, so the process was killed",
}
BTF_PATH = "/sys/kernel/btf/vmlinux"
BACKLOG = 65536             # records waiting for the audit sink before backpressure
RESPONDER_SILENT_S = 3.0    # no heartbeat from the responder for this long: stuck
START_TIMEOUT_S = 60.0
REPLY_TIMEOUT_S = 30.0


class ProbeResult(msgspec.Struct, frozen=True):
    """One mechanism the compat backend needs, as `leash doctor` prints it."""
    name: str
    ok: bool
    detail: str


class CompatUnavailable(RuntimeError):
    """The compat backend cannot enforce here; str() is the one-line reason."""


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


class CompatBackend:
    name = "compat"

    def __init__(self, protected_paths: Iterable[str] = (), pin_root: str | None = PIN_ROOT,
                 cache_allows: bool = True, watchdog_stall_s: float = 10.0,
                 backlog_limit: int = BACKLOG, fault: str = "") -> None:
        """`cache_allows`: once a file may be opened in every way by every
        agent, let the kernel stop asking about it (fanotify ignore marks).
        Ungoverned processes then pay nothing for it, and governed opens of
        it are no longer recorded (docs/compat.md). `fault`: a test seam
        passed to the responder (compat_responder._inject)."""
        # No leash_protect map here: leash's own files are guarded by the
        # responder instead.
        self.session = BpfSession(self.name, (objects.SCOPE, *objects.COMPAT), pin_root,
                                  attach=self._attach, reasons=COMPAT_REASONS)
        self.file_protected = [os.path.realpath(p) for p in (*default_protected(), *protected_paths)]
        self.cache_allows = cache_allows
        self.watchdog_stall_s = watchdog_stall_s
        self.fault = fault
        self.backlog_limit = backlog_limit
        self.watchdog: subprocess.Popen | None = None
        self.responder: subprocess.Popen | None = None
        self.ready: cr.Ready | None = None
        self._heart: threading.Thread | None = None
        self._heart_stop = threading.Event()
        self._reader: threading.Thread | None = None
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._last_alive = 0.0
        self._closing = False
        self._records: queue.SimpleQueue = queue.SimpleQueue()
        self._backlog = 0
        self._drained = threading.Condition()
        self._recorder: threading.Thread | None = None
        self._outer_sink: Callable[[AuditRecord], None] | None = None
        self._cgroup_fd = -1
        self._encoder = msgspec.json.Encoder()
        self._send_lock = threading.Lock()
        self._told_full = False

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
            mount_tracefs()
            self.session.load(tables, mode)
            self.session.attach(self._submit_from_ring)
            self._start_watchdog()
            self._start_responder(tables, mode)
        except BaseException:
            self.stop()
            raise

    def _start_watchdog(self) -> None:
        """Before any mark: the watchdog must exist before anything can hang
        on us. It is told the responder's pid once there is one."""
        tids_fd = self.session.map("compat_tids").fd
        self.watchdog = subprocess.Popen(
            [sys.executable, "-I", "-S", compat_watchdog.__file__, str(os.getpid()),
             str(self.watchdog_stall_s), str(tids_fd)],
            stdin=subprocess.PIPE, pass_fds=(tids_fd,), cwd="/")

    def _start_responder(self, tables: DecisionTables, mode: str) -> None:
        fds = {name: self.session.map(name).fd for name in ("compat_tids", "compat_gone", "compat_fs")}
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.responder = subprocess.Popen(
            [sys.executable, "-m", "leash.kernel.compat_responder"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, pass_fds=tuple(fds.values()), cwd="/", env=env)
        self._tell_watchdog(f"r {self.responder.pid}\n".encode())
        self._reader = threading.Thread(target=self._read_loop, name="leash-compat-responder",
                                        daemon=True)
        self._reader.start()
        self._send(cr.Config(mode, self.file_protected, self.cache_allows, self.backlog_limit,
                             fds["compat_tids"], fds["compat_gone"], fds["compat_fs"], tables, self.fault))
        reply = self._reply(START_TIMEOUT_S)
        if isinstance(reply, cr.Refused):
            raise CompatUnavailable(reply.reason)
        if not isinstance(reply, cr.Ready):
            raise CompatUnavailable(f"the file responder did not start ({reply})")
        self.ready = reply
        self._last_alive = time.monotonic()
        self._heart_stop.clear()
        self._heart = threading.Thread(target=self._heartbeat, name="leash-compat-heartbeat", daemon=True)
        self._heart.start()

    def update(self, tables: DecisionTables) -> None:
        """Files switch a moment before the kernel tables (which the session
        fills, flips, and retires); each decision sees one policy."""
        old = self.session.tables
        self._swap_files(tables)
        try:
            self.session.update(tables)
        except BaseException:
            if old is not None:
                self._swap_files(old)
            raise

    def _swap_files(self, tables: DecisionTables) -> None:
        self._send(cr.Update(tables))
        reply = self._reply(REPLY_TIMEOUT_S)
        if not isinstance(reply, cr.Updated):
            raise RuntimeError(f"the file responder did not take the new policy ({reply})")

    def govern(self, agent_id: int, cgroup_path: str) -> None:
        self.session.govern(agent_id, cgroup_path)
        # Threads already inside: everything started later is caught by
        # compat_tasks (task creation, exec, cgroup attach).
        tids = self.session.map("compat_tids")
        for tid in threads_in(cgroup_path):
            tids.update(struct.pack("<I", tid), struct.pack("<I", agent_id))
        self._tell_watchdog(b"c " + os.fsencode(cgroup_path) + b"\n")

    def stop(self) -> None:
        self._closing = True
        if self._heart is not None:
            self._heart_stop.set()
            self._heart.join()
            self._heart = None
        if self.responder is not None:
            # Its exit closes the fanotify groups: the kernel allows anything pending.
            try:
                self._send(cr.Stop())
                self.responder.stdin.close()
            except OSError:
                pass
            try:
                self.responder.wait(timeout=REPLY_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.responder.kill()
                self.responder.wait()
            self.responder = None
        if self._reader is not None:
            self._reader.join()
            self._reader = None
        if self.watchdog is not None:
            # A clean stop is not a crash: nothing to kill.
            self._tell_watchdog(b"stop\n")
            self.watchdog.stdin.close()
            self.watchdog.wait(timeout=10)
            self.watchdog = None
        self.session.stop()
        if self._cgroup_fd >= 0:
            os.close(self._cgroup_fd)
            self._cgroup_fd = -1
        if self._recorder is not None:
            self._records.put(None)
            self._recorder.join()
            self._recorder = None

    # ----------------------------------------------------- the responder

    def _send(self, msg: msgspec.Struct) -> None:
        with self._send_lock:
            assert self.responder is not None and self.responder.stdin is not None
            self.responder.stdin.write(self._encoder.encode(msg) + b"\n")
            self.responder.stdin.flush()

    def _reply(self, timeout: float) -> object:
        try:
            return self._replies.get(timeout=timeout)
        except queue.Empty:
            return f"no answer in {timeout:.0f}s"

    def _read_loop(self) -> None:
        """Everything the responder says. Never waits on the audit sink: the
        responder's heartbeat comes through here too, and backpressure goes
        to the responder as Backlog messages instead."""
        assert self.responder is not None and self.responder.stdout is not None
        decoder = msgspec.json.Decoder(cr.FromResponder)
        for line in self.responder.stdout:
            try:
                msg = decoder.decode(line)
            except msgspec.DecodeError as e:
                self._internal(f"unreadable message from the file responder: {e}", "deny")
                continue
            if isinstance(msg, cr.Record):
                self._submit(msg.rec)
            elif isinstance(msg, cr.Alive):
                self._last_alive = time.monotonic()
            elif isinstance(msg, cr.Crashed):
                self._responder_failed(f"fanotify responder crashed ({msg.reason})")
            else:
                self._replies.put(msg)
        if not self._closing and self.ready is not None:
            self._responder_failed("the file responder process exited")
        self._replies.put("the file responder process exited")

    def stats(self) -> cr.Counts:
        """Fresh counters from the responder (events answered, ignore marks)."""
        self._send(cr.Query())
        reply = self._reply(REPLY_TIMEOUT_S)
        if not isinstance(reply, cr.Counts):
            raise RuntimeError(f"the file responder did not answer ({reply})")
        return reply

    def inject_crash(self) -> None:
        """Test seam: the responder's next batch raises."""
        self._send(cr.Crash())

    def _responder_failed(self, why: str) -> None:
        """The kernel already allowed what was pending when the responder's
        group closed. Governed processes must not go on unwatched: kill them,
        record why, then make the daemon stop (its SIGTERM path)."""
        if self._closing:
            return
        self._closing = True
        for key in self.session.map("compat_tids").keys() if self.session.loaded else ():
            try:
                os.kill(struct.unpack("<I", key)[0], signal.SIGKILL)
            except OSError:
                pass
        self._internal(f"{why}; governed processes killed, leash stopping", decision="deny")
        with self._drained:
            self._drained.wait_for(lambda: self._backlog == 0, timeout=5)
        os.kill(os.getpid(), signal.SIGTERM)

    # ------------------------------------------------------------ liveness

    def _tell_watchdog(self, data: bytes) -> None:
        try:
            assert self.watchdog is not None and self.watchdog.stdin is not None
            self.watchdog.stdin.write(data)
            self.watchdog.stdin.flush()
        except (OSError, ValueError, AssertionError) as e:
            self._internal(f"watchdog unreachable ({e}): a crash of leash would leave agents running",
                           decision="deny")

    def _heartbeat(self) -> None:
        """On to the watchdog while the responder keeps answering: a silent
        responder is a stuck one, and the watchdog then kills both."""
        while not self._heart_stop.wait(cr.HEARTBEAT_S):
            if time.monotonic() - self._last_alive < RESPONDER_SILENT_S:
                self._tell_watchdog(b"\0")

    # ------------------------------------------------------------ attaching

    def _attach(self, obj_name: str, prog: libbpf.Program) -> libbpf.Link:
        """tp_btf and syscall tracepoint programs attach where their sections
        say; the sock_addr ones to the hierarchy's root, so scope (per
        thread) decides, not cgroup."""
        if obj_name == "compat_net":
            return prog.attach_cgroup(self._cgroup_fd)
        return prog.attach()

    # ------------------------------------------------------------ records

    def _submit(self, rec: AuditRecord) -> None:
        """Every record reaches the sink through one thread."""
        rec.backend = self.name
        with self._drained:
            self._backlog += 1
            self._tell_backlog()
        self._records.put(rec)

    def _tell_backlog(self) -> None:
        """The responder refuses governed allows while the sink is far behind
        (an allow that cannot be recorded): tell it when that starts and ends.
        Called with _drained held."""
        full = self._backlog >= self.backlog_limit
        if full != self._told_full and self.ready is not None and not self._closing:
            self._told_full = full
            try:
                self._send(cr.Backlog(full))
            except OSError:
                pass

    def backlogged(self) -> bool:
        return self._backlog >= self.backlog_limit

    def _wait_backlog(self) -> None:
        with self._drained:
            while self._backlog >= self.backlog_limit and not self._closing:
                self._drained.wait(0.1)

    def _submit_from_ring(self, rec: AuditRecord) -> None:
        """The ring buffer's consumer waits while the sink is behind, so the
        ring fills and the kernel side does what it does when records cannot
        be kept: counts lost denies, refuses allows it cannot record."""
        self._wait_backlog()
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
                self._tell_backlog()
                self._drained.notify_all()

    def _internal(self, reason: str, decision: str = "allow") -> None:
        self._submit(AuditRecord(time_ns=now_ns(), agent="", action="Internal", resource="compat",
                                 decision=decision, mode=self.session.mode, reason=reason))

    # ------------------------------------------------------------- queries

    def lost(self) -> dict[str, int]:
        """Records the kernel could not hand over, by kind (deny/allow/audit)."""
        return self.session.lost()

    def agent_of_pid(self, pid: int) -> int:
        """The agent a thread is governed as (0: none), from compat_tids."""
        v = self.session.map("compat_tids").lookup(struct.pack("<I", pid))
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
    try:
        loaded, maps = open_objects((objects.SCOPE, *objects.COMPAT))
    except (libbpf.LibbpfMissing, FileNotFoundError, libbpf.BpfError) as e:
        out.append(ProbeResult("tp_btf programs", False, f"loading the compat objects failed: {e}"))
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
        rb = libbpf.RingBuffer(maps["leash_events"].fd, lambda _data: None)
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
        out.append(ProbeResult("syscall tracepoints", True, "mount-family, open-family and socket syscalls"))
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
        found = cr.filesystems()
        marked, refused = cr.mark_all(group, found)
    finally:
        group.close()
    skipped = sorted({m.fstype for m in found if m.fstype in cr.UNMARKABLE})
    detail = f"{len(marked)} filesystems can be watched"
    if skipped:
        detail += f" (not {', '.join(skipped)}: {'; '.join(cr.UNMARKABLE[t] for t in skipped)})"
    if refused:
        return ProbeResult("fanotify permission events", False, "; ".join(refused))
    return ProbeResult("fanotify permission events", True, detail)
