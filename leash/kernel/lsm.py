"""The BPF LSM backend: the objects of bpf/src that refuse in the kernel
(lsm_*.bpf.c, with scope.bpf.c), attached where their sections say, and
leash's own files written into leash_protect before anything is attached.
The tables, their generations, the ring buffer and its records are the
shared BpfSession's (session.py).

docs/bpf.md describes the objects, maps and events.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

from leash.kernel import objects
from leash.kernel.session import PIN_ROOT, BpfSession, Sink, default_protected
from leash.policy import tables as tbl


def _protect_key(path: str) -> bytes:
    """leash_protect key: a directory covers everything below it, anything
    else (a file, or one not created yet such as an audit log) only itself.
    The owner word is unused (0)."""
    real = os.path.realpath(path)
    if os.path.isdir(real):
        data = (real.rstrip("/") + "/").encode()
    else:
        data = real.encode() + b"\0"
    data = data[:tbl.PATH_DATA_BYTES]
    return struct.pack("<I", 32 + 8 * len(data)) + b"\0\0\0\0" + data.ljust(tbl.PATH_DATA_BYTES, b"\0")


class LsmBackend:
    name = "lsm"

    def __init__(self, protected_paths: Iterable[str] = (), pin_root: str | None = PIN_ROOT) -> None:
        self.protected = [*default_protected(), *protected_paths]
        self.session = BpfSession(self.name, (objects.SCOPE, *objects.LSM), pin_root)

    def start(self, tables: tbl.DecisionTables, mode: str, sink: Sink) -> None:
        try:
            self.session.load(tables, mode)
            protect = self.session.map("leash_protect")
            for path in self.protected:
                protect.update(_protect_key(path), struct.pack("<I", 1))
            self.session.attach(sink)
        except BaseException:
            self.session.stop()
            raise

    def update(self, tables: tbl.DecisionTables) -> None:
        self.session.update(tables)

    def govern(self, agent_id: int, cgroup_path: str) -> None:
        self.session.govern(agent_id, cgroup_path)

    def stop(self) -> None:
        self.session.stop()

    def lost(self) -> dict[str, int]:
        """Records the kernel could not hand over, by kind (deny/allow/audit)."""
        return self.session.lost()

    def agent_of_pid(self, pid: int) -> int:
        """The agent a process is governed as (0: none), from the scope map."""
        v = self.session.map("leash_procs").lookup(struct.pack("<I", pid))
        return struct.unpack("<I", v)[0] if v else 0
