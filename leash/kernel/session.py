"""What both kernel backends do with their BPF objects, in one place: load
them with one shared set of maps sized for the policy, keep the decision
tables in two generations and swap them, mark agent cgroups, attach and pin
the programs, and turn ring-buffer events into AuditRecords.

    session = BpfSession("lsm", (objects.SCOPE, *objects.LSM))
    session.load(tables, mode)          # objects loaded, generation 0 written, nothing attached
    session.map("leash_protect")        # a map, to fill before attaching
    session.attach(sink)                # programs attached and pinned; sink(AuditRecord) from now on
    session.update(tables)              # the next generation, swapped in
    session.govern(agent_id, cgroup)
    session.stop()                      # drain the ring, detach, close (safe in any state)

A backend says what differs: which objects, how a program attaches, the
reasons its own programs record. docs/bpf.md describes the maps and the
event record decoded here.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

from leash import audit
from leash.kernel import libbpf, objects
from leash.policy import tables as tbl

Sink = Callable[[audit.AuditRecord], None]
Attach = Callable[[str, libbpf.Program], libbpf.Link]     # (object name, program) -> link

PIN_ROOT = "/sys/fs/bpf/leash"
SWAP_GRACE_S = 1.0          # docs/tables.md: hooks that read the old generation are done by then
POLL_MS = 100
STATS_EVERY_S = 1.0

# Per-generation capacity of each table when the policy is small; a larger
# policy gets room for two copies of itself, up to the hard limit.
DEFAULT_CAPACITY = {"leash_paths": 32768, "leash_addrs": 8192, "leash_ports": 32768}
HARD_LIMIT = {"leash_paths": 1 << 20, "leash_addrs": 1 << 18, "leash_ports": 1 << 20}

EVENT = struct.Struct("<Q9I2H6BH16s16s256s")
DEDUP_KEY = struct.Struct("<3IH4BH16s256s")
DEDUP_VAL = struct.Struct("<QII")
CONFIG = struct.Struct("<4I")

ACTIONS = {1: tbl.FILE_READ, 2: tbl.FILE_WRITE, 3: tbl.EXEC, 4: tbl.CONNECT, 5: "SelfProtect"}
# leash.h's enum leash_reason; a backend adds the reasons of its own programs
REASONS = {
    0: "",
    1: "the kernel could not resolve the path (too long or unreachable)",
    2: "the file has no absolute path (pipe, socket or other pseudo file)",
    3: "no table entry matched (incomplete tables)",
    4: "address family not covered by policy",
    5: "transport not covered by policy (only TCP and UDP are)",
    6: "executing a file with no name (memfd or deleted file)",
    7: "executable mapping by a directly run ELF interpreter",
    8: "governed agents may not use bpf()",
    9: "governed agents may not trace processes outside their agent (the leash daemon included)",
    10: "governed agents may not signal processes outside their agent (the leash daemon included)",
    11: "governed agents may not write cgroup files",
    12: "leash's own files",
    13: "hard link to a file the agent may not both read and write",
    14: "rename of a file the agent may not both read and write (or of a directory)",
    15: "making a file mapping executable under a directly run ELF interpreter",
    16: "governed agents may not run io_uring requests under other credentials",
    17: "governed agents may not mount (mount, move_mount, fsmount, pivot_root)",
    18: "reached through a mount outside the process's mount namespace (detached, or another "
        "namespace's): its path there is not its name",
    19: "governed agents may not change their root or mount namespace (chroot, setns)",
    20: "unix socket with an abstract name: no path a policy can name",
    21: "socket no policy can name (packet, raw, or a family beyond inet and unix)",
    22: "governed agents may not change the priority, scheduling or limits of processes "
        "outside their agent",
    23: "governed agents may not load kernel modules, use raw I/O, make device nodes or reboot",
}
# reasons whose record names a socket family (in target) rather than a path or
# address: leash.h's LEASH_WHY_SOCKET and compat.h's COMPAT_WHY_SOCKET
SOCKET_REASONS = {21, 34}
VIA_UNIX = 1                # leash_event.target of a file decision: reached by a unix socket
STATS = {0: "deny", 1: "allow", 2: "audit"}
PROTOCOLS = {tbl.PROTO_TCP: "tcp", tbl.PROTO_UDP: "udp"}


class TablesTooLarge(ValueError):
    """The compiled tables cannot fit the kernel maps; nothing was changed."""


def _boot_offset_ns() -> int:
    """Wall clock minus CLOCK_BOOTTIME: event times are boot-relative."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def mount_bpffs() -> None:
    if not os.path.ismount("/sys/fs/bpf"):
        subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale_pins(root: str = PIN_ROOT) -> list[int]:
    """Unpin (and so detach) what a daemon killed with SIGKILL left enforced.
    Returns the dead daemons' pids."""
    gone = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.isdigit() and not _pid_alive(int(name)):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                gone.append(int(name))
    return gone


def default_protected() -> list[str]:
    """The package itself and leash's pins, protected in every run."""
    return [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "/sys/fs/bpf"]


def open_objects(names: Iterable[str], sizes: Mapping[str, int] | None = None
                 ) -> tuple[list[libbpf.Object], dict[str, libbpf.Map]]:
    """Load the named objects in order, the first creating the maps and every
    later one reusing them (bpf_map__reuse_fd), so all share one set; `sizes`
    sets max_entries of maps before they are created. Closes what it loaded
    when one fails."""
    loaded: list[libbpf.Object] = []
    maps: dict[str, libbpf.Map] = {}
    try:
        for name in names:
            obj = libbpf.Object(objects.load_bytes(name), name)
            loaded.append(obj)
            for map_name, m in obj.maps.items():
                if map_name in maps:
                    m.reuse_fd(maps[map_name].fd)
                elif sizes and map_name in sizes:
                    m.set_max_entries(sizes[map_name])
            obj.load()
            for map_name, m in obj.maps.items():
                maps.setdefault(map_name, m)
    except BaseException:
        for obj in loaded:
            obj.close()
        raise
    return loaded, maps


def _count(entries: Iterable[tbl.KernelEntry]) -> Counter[str]:
    return Counter(e.map_name for e in entries)


def capacity(need: Counter[str]) -> dict[str, int]:
    """Table map sizes for a policy needing `need` entries per generation."""
    sizes = {}
    for name, default in DEFAULT_CAPACITY.items():
        size = 2 * max(default, need[name])
        if size > HARD_LIMIT[name]:
            raise TablesTooLarge(f"{name}: the policy compiles to {need[name]} entries; the kernel "
                                 f"table holds at most {HARD_LIMIT[name] // 2} per generation")
        sizes[name] = size
    return sizes


def _attach_plain(_obj: str, prog: libbpf.Program) -> libbpf.Link:
    return prog.attach()


class BpfSession:
    def __init__(self, backend: str, object_names: Sequence[str], pin_root: str | None = PIN_ROOT,
                 attach: Attach = _attach_plain, reasons: Mapping[int, str] | None = None) -> None:
        """`backend` names the records' backend; `attach` attaches one program
        of the named object (default: where its section says); `reasons`
        decode the reasons of the backend's own programs."""
        self.backend = backend
        self.object_names = tuple(object_names)
        self.pin_root = pin_root
        self.pin_dir: str | None = None
        self.reasons = {**REASONS, **(reasons or {})}
        self._attach_one = attach
        self._objects: list[libbpf.Object] = []
        self._links: list[libbpf.Link] = []
        self._maps: dict[str, libbpf.Map] = {}
        self._tables: dict[int, tbl.DecisionTables] = {}
        self._names: dict[int, dict[int, str]] = {}
        self._written: dict[int, list[tbl.KernelEntry]] = {}
        self._generation = 0
        self._mode = "enforce"
        self._sink: Sink | None = None
        self._ring: libbpf.RingBuffer | None = None
        self._poller: threading.Thread | None = None
        self._stopping = threading.Event()
        self._update_lock = threading.Lock()
        self._epoch = 0
        self._lost_seen = [0] * len(STATS)
        self._boot_offset = _boot_offset_ns()

    # ----------------------------------------------------------- lifecycle

    def load(self, tables: tbl.DecisionTables, mode: str) -> None:
        """Load the objects, sized for `tables`, and write the configuration
        and generation 0. Raises TablesTooLarge before loading anything."""
        if mode not in ("enforce", "audit"):
            raise ValueError(f"mode must be enforce or audit, not {mode!r}")
        entries = tbl.kernel_entries(tables, 0)
        sizes = capacity(_count(entries))
        self._mode = mode
        self._objects, self._maps = open_objects(self.object_names, sizes)
        self._write_config(0)
        self._write_entries(entries)
        self._written[0] = entries
        self._tables[0] = tables
        self._names[0] = {v: k for k, v in tables.agents.items()}

    def attach(self, sink: Sink) -> None:
        """Hand every event to `sink` from now on, attach every program and
        pin its link under PIN_ROOT/<pid> (a daemon killed with SIGKILL leaves
        its programs enforcing until the next start removes them)."""
        self._sink = sink
        self._ring = libbpf.RingBuffer(self._maps["leash_events"].fd, self._on_event)
        if self.pin_root:
            mount_bpffs()
            remove_stale_pins(self.pin_root)
            self.pin_dir = os.path.join(self.pin_root, str(os.getpid()))
            os.makedirs(self.pin_dir, exist_ok=True)
        for obj in self._objects:
            for prog in obj.programs.values():
                link = self._attach_one(obj.name, prog)
                self._links.append(link)
                if self.pin_dir:
                    link.pin(os.path.join(self.pin_dir, prog.name))
        self._stopping.clear()
        self._poller = threading.Thread(target=self._poll_loop, name=f"leash-{self.backend}-events",
                                        daemon=True)
        self._poller.start()

    def update(self, tables: tbl.DecisionTables) -> None:
        """Fill the inactive generation, flip, wait, retire the old one. On any
        error the active generation is untouched."""
        with self._update_lock:
            old, new = self._generation, 1 - self._generation
            entries = tbl.kernel_entries(tables, new)
            need, have = _count(entries), _count(self._written.get(old, []))
            for name, n in need.items():
                room = self._maps[name].max_entries - have[name]
                if n > room:
                    raise TablesTooLarge(f"{name}: the new policy needs {n} entries, {room} are free "
                                         f"beside the active one (restart leash to resize)")
            try:
                self._write_entries(entries)
            except BaseException:
                self._delete_entries(entries)
                raise
            self._written[new] = entries
            self._tables[new] = tables
            self._names[new] = {v: k for k, v in tables.agents.items()}
            self._write_config(new)
            self._generation = new
            time.sleep(SWAP_GRACE_S)
            self._delete_entries(self._written.pop(old, []))

    def govern(self, agent_id: int, cgroup_path: str) -> None:
        if agent_id <= 0:
            raise ValueError("agent ids start at 1")
        cgroup_id = os.stat(cgroup_path).st_ino
        self._maps["leash_cgroups"].update(struct.pack("<Q", cgroup_id), struct.pack("<I", agent_id))
        self._epoch += 1
        # leash_scope_epoch[0]: userspace's counter (the kernel keeps [1])
        self._maps["leash_scope_epoch"].update(struct.pack("<I", 0), struct.pack("<I", self._epoch))

    def stop(self) -> None:
        """Report what the ring still holds, then detach and close everything.
        Safe whatever start got through."""
        self._stopping.set()
        if self._poller is not None:
            self._poller.join()
            self._poller = None
        if self._ring is not None:
            self._ring.consume()
            self._check_lost()
            self._flush_dedup()
        for link in reversed(self._links):
            link.destroy()
        self._links.clear()
        if self.pin_dir:
            shutil.rmtree(self.pin_dir, ignore_errors=True)
            self.pin_dir = None
        if self._ring is not None:
            self._ring.free()
            self._ring = None
        for obj in self._objects:
            obj.close()
        self._objects.clear()
        self._maps.clear()

    # ------------------------------------------------------------- queries

    @property
    def loaded(self) -> bool:
        """Whether any object is loaded or program attached."""
        return bool(self._objects or self._links)

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def tables(self) -> tbl.DecisionTables | None:
        """The tables of the active generation."""
        return self._tables.get(self._generation)

    def map(self, name: str) -> libbpf.Map:
        """A loaded map by name (KeyError when nothing by that name is loaded)."""
        return self._maps[name]

    def lost(self) -> dict[str, int]:
        """Records the kernel could not hand over, by kind (deny/allow/audit)."""
        stats = self._maps["leash_stats"]
        return {kind: struct.unpack("<Q", stats.lookup(struct.pack("<I", i)) or b"\0" * 8)[0]
                for i, kind in STATS.items()}

    # -------------------------------------------------------------- tables

    def _write_config(self, generation: int) -> None:
        mode = 1 if self._mode == "audit" else 0
        self._maps["leash_config"].update(struct.pack("<I", 0),
                                          CONFIG.pack(generation, mode, os.getpid(), 0))

    def _write_entries(self, entries: list[tbl.KernelEntry]) -> None:
        for e in entries:
            self._maps[e.map_name].update(e.key, e.value)

    def _delete_entries(self, entries: list[tbl.KernelEntry]) -> None:
        for e in entries:
            try:
                self._maps[e.map_name].delete(e.key)
            except OSError as err:
                if err.errno != errno.ENOENT:
                    raise

    # -------------------------------------------------------------- events

    def _poll_loop(self) -> None:
        assert self._ring is not None
        last_stats = time.monotonic()
        while not self._stopping.is_set():
            self._ring.poll(POLL_MS)
            if time.monotonic() - last_stats >= STATS_EVERY_S:
                self._check_lost()
                last_stats = time.monotonic()

    def _emit(self, rec: audit.AuditRecord) -> None:
        assert self._sink is not None
        self._sink(rec)

    def _on_event(self, data: bytes) -> None:
        try:
            rec = self._record(EVENT.unpack_from(data))
        except (struct.error, ValueError, KeyError) as e:
            rec = audit.AuditRecord(time_ns=audit.now_ns(), agent="", action="Internal",
                                    resource="ring buffer", decision="deny", backend=self.backend,
                                    mode=self._mode, reason=f"undecodable kernel event: {e}")
        self._emit(rec)

    def _record(self, f: tuple) -> audit.AuditRecord:
        (ktime, tgid, _pid, ppid, uid, agent, generation, class_id, count, target, action, reason,
         denied, enforced, is_dir, family, proto, truncated, port, addr, comm, path) = f
        tables = self._tables.get(generation)
        action_name = ACTIONS.get(action, f"action-{action}")
        details: dict[str, object] = {}
        if reason in SOCKET_REASONS:
            resource = _socket(target, proto)
            target = 0
        elif action == 4:
            resource = _host(family, addr, port)
            details["protocol"] = PROTOCOLS.get(proto, str(proto))
        else:
            resource = path.split(b"\0", 1)[0].decode(errors="replace")
            if is_dir and resource and not resource.endswith("/") and action != 5:
                resource += "/"
            if truncated:
                resource += "..."
        if target == VIA_UNIX and action in (1, 2):
            details["via"] = "unix socket"
        elif target:
            details["target"] = target
        policies: list[str] = []
        if reason == 0 and tables is not None and action != 5:
            policies = _policy_ids(tables, action_name, class_id, bool(is_dir))
        return audit.AuditRecord(
            time_ns=self._boot_offset + ktime,
            agent=self._names.get(generation, {}).get(agent, f"agent-{agent}"),
            action=action_name, resource=resource,
            decision="deny" if denied else "allow", policies=policies, backend=self.backend,
            mode="enforce" if enforced else self._mode, pid=tgid, ppid=ppid, uid=uid,
            exe=_exe(tgid, comm), count=count, reason=self.reasons.get(reason, f"reason {reason}"),
            details=details)

    def _check_lost(self) -> None:
        for i, (kind, n) in enumerate(self.lost().items()):
            new = n - self._lost_seen[i]
            if new > 0:
                self._lost_seen[i] = n
                what = {"deny": "refused operations whose records were lost",
                        "allow": "operations refused because they could not be recorded",
                        "audit": "audit-mode records lost"}[kind]
                self._emit(audit.AuditRecord(
                    time_ns=audit.now_ns(), agent="", action="Internal", resource="ring buffer",
                    decision="allow" if kind == "audit" else "deny", backend=self.backend,
                    mode=self._mode, count=new, reason=f"{new} {what} (ring buffer full)"))

    def _flush_dedup(self) -> None:
        """Identical allows folded in the kernel and not yet reported."""
        dedup = self._maps["leash_dedup"]
        for key in dedup.keys():
            val = dedup.lookup(key)
            if val is None:
                continue
            _emitted, suppressed, generation = DEDUP_VAL.unpack(val)
            if not suppressed:
                continue
            (agent, tgid, class_id, action, is_dir, family, proto, _pad, port, addr,
             path) = DEDUP_KEY.unpack(key)
            rec = self._record((0, tgid, tgid, 0, 0, agent, generation, class_id, suppressed, 0, action,
                                0, 0, 0, is_dir, family, proto, 0, port, addr, b"", path))
            rec.time_ns = audit.now_ns()
            self._emit(rec)


def _policy_ids(tables: tbl.DecisionTables, action: str, class_id: int, is_dir: bool) -> list[str]:
    try:
        if action == tbl.CONNECT:
            return tables.policy_ids(class_id)
        verdict = tables.path_classes[class_id].verdict_for(action, is_dir)
        return tables.policy_ids(verdict) if verdict >= 0 else []
    except IndexError:
        return []


def _host(family: int, addr: bytes, port: int) -> str:
    if family == 4:
        return f"{ipaddress.IPv4Address(addr[:4])}:{port}"
    return f"[{ipaddress.IPv6Address(addr)}]:{port}"


def _socket(family: int, proto: int) -> str:
    try:
        name = socket.AddressFamily(family).name
    except ValueError:
        name = f"family {family}"
    return f"socket({name}, protocol {proto})" if proto else f"socket({name})"


def _exe(tgid: int, comm: bytes) -> str:
    try:
        return os.readlink(f"/proc/{tgid}/exe")
    except OSError:
        return comm.split(b"\0", 1)[0].decode(errors="replace")
