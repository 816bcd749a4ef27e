"""cgroup v2 for leash: where the unified hierarchy is mounted (a pure v2
host at /sys/fs/cgroup, or the hybrid layout's /sys/fs/cgroup/unified),
leash's own subtree in it, agent cgroups, and cgroup ids.

Both kernel backends key scope on cgroup ids: the id BPF sees
(bpf_get_current_cgroup_id) is the kernfs node id, which is the inode number
of the cgroup's directory.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time

from leash.kernel import mountinfo

LEASH_DIR = "leash"
_PREFERRED_MOUNTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")


class CgroupError(Exception):
    """A one-line, user-facing reason (no cgroup v2, cannot create, ...)."""


def cgroup2_mounts(mountinfo_text: str) -> list[str]:
    """Mount points of cgroup2 filesystems that show the hierarchy's root
    (a container's bind of a sub-cgroup is no use for creating siblings)."""
    return [m.path for m in mountinfo.parse(mountinfo_text) if m.fstype == "cgroup2" and m.root == "/"]


def cgroup2_mount(mountinfo_path: str = "/proc/self/mountinfo") -> str:
    """The unified hierarchy's mount point; raises CgroupError if there is none."""
    with open(mountinfo_path) as f:
        mounts = cgroup2_mounts(f.read())
    if not mounts:
        raise CgroupError("no cgroup v2 hierarchy is mounted (need /sys/fs/cgroup or "
                          "/sys/fs/cgroup/unified of type cgroup2)")
    for preferred in _PREFERRED_MOUNTS:
        if preferred in mounts:
            return preferred
    return mounts[0]


def leash_root(mount: str | None = None) -> str:
    """leash's own subtree (created if missing). It never holds processes
    itself, so v2's no-internal-processes rule cannot bite."""
    path = os.path.join(mount or cgroup2_mount(), LEASH_DIR)
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
    except OSError as e:
        raise CgroupError(f"cannot create leash's cgroup {path}: {e.strerror}") from None
    return path


def _safe_name(agent: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", agent)[:64] or "agent"


def create_agent_cgroup(agent: str, unique: str | int, root: str | None = None) -> str:
    """A fresh cgroup for one governed run of `agent`; `unique` keeps runs
    apart (a pid, a counter). Fails if it already exists: a stale cgroup may
    still hold processes of an earlier run."""
    path = os.path.join(root or leash_root(), f"{_safe_name(agent)}-{unique}")
    try:
        os.mkdir(path, 0o755)
    except OSError as e:
        raise CgroupError(f"cannot create agent cgroup {path}: {e.strerror}") from None
    return path


def cgroup_id(path: str) -> int:
    return os.stat(path).st_ino


def move_pid(path: str, pid: int) -> None:
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(pid))
    except OSError as e:
        raise CgroupError(f"cannot move pid {pid} into {path}: {e.strerror}") from None


def pids(path: str) -> list[int]:
    """Processes directly in `path` (not its descendants)."""
    with open(os.path.join(path, "cgroup.procs")) as f:
        return [int(x) for x in f.read().split()]


def _subtree(path: str) -> list[str]:
    """`path` and every cgroup below it, deepest first."""
    out = []
    for dirpath, _dirs, _files in os.walk(path, topdown=False):
        out.append(dirpath)
    return out


def kill_all(path: str) -> None:
    """SIGKILL every process in the subtree. cgroup.kill (5.14+) does it in
    one step without racing forks; older kernels get a signal per pid."""
    kill_file = os.path.join(path, "cgroup.kill")
    if os.path.exists(kill_file):
        with open(kill_file, "w") as f:
            f.write("1")
        return
    for cg in _subtree(path):
        for pid in pids(cg):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _populated(path: str) -> bool:
    with open(os.path.join(path, "cgroup.events")) as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key == "populated":
                return value.strip() == "1"
    return False


def remove_cgroup(path: str, timeout: float = 5.0) -> None:
    """Kill what is left in the subtree and remove it. Missing is fine."""
    if not os.path.isdir(path):
        return
    kill_all(path)
    deadline = time.monotonic() + timeout
    while _populated(path):
        if time.monotonic() > deadline:
            raise CgroupError(f"processes in {path} survived SIGKILL for {timeout:.0f}s")
        time.sleep(0.01)
    for cg in _subtree(path):
        try:
            os.rmdir(cg)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise CgroupError(f"cannot remove cgroup {cg}: {e.strerror}") from None
