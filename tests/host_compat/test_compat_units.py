"""The parts of the compat backend that are plain functions of their input."""

from __future__ import annotations

import os
import subprocess

import pytest

from leash.kernel import cgroup
from leash.kernel import compat_responder as cr
from leash.kernel import fanotify
from leash.kernel.mountinfo import Mount

HYBRID = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
25 22 0:21 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:22 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw
27 25 0:23 / /sys/fs/cgroup/memory rw,nosuid shared:11 - cgroup cgroup rw,memory
30 22 0:5 / /proc rw shared:12 - proc proc rw
"""
PURE = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
26 22 0:22 / /sys/fs/cgroup rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
"""
CONTAINER = """\
100 90 0:50 / / rw - overlay overlay rw
101 100 0:22 /kubepods/pod1 /sys/fs/cgroup ro - cgroup2 cgroup2 rw
"""


def test_cgroup2_mount_hybrid_and_pure(tmp_path):
    for text, want in ((HYBRID, "/sys/fs/cgroup/unified"), (PURE, "/sys/fs/cgroup")):
        p = tmp_path / "mountinfo"
        p.write_text(text)
        assert cgroup.cgroup2_mount(str(p)) == want


def test_cgroup2_mount_refuses_a_container_view(tmp_path):
    # a bind of a sub-cgroup cannot hold leash's own subtree beside the agents
    p = tmp_path / "mountinfo"
    p.write_text(CONTAINER)
    with pytest.raises(cgroup.CgroupError, match="no cgroup v2 hierarchy"):
        cgroup.cgroup2_mount(str(p))


def test_mountinfo_escapes():
    line = r"40 22 0:60 / /mnt/with\040space rw - tmpfs tmpfs rw" + "\n"
    assert cgroup.cgroup2_mounts(line.replace("tmpfs tmpfs", "cgroup2 x")) == ["/mnt/with space"]
    (m,) = cr.filesystems(line)
    assert m.path == "/mnt/with space" and m.fstype == "tmpfs"


def test_one_mount_per_superblock_kernel_dev_encoding():
    text = HYBRID + "40 22 254:0 /srv /srv rw - ext4 /dev/vda rw\n" + "41 22 259:70000 / /big rw - xfs /dev/x rw\n"
    mounts = cr.filesystems(text)
    assert [m.path for m in mounts] == ["/", "/sys/fs/cgroup", "/sys/fs/cgroup/unified",
                                        "/sys/fs/cgroup/memory", "/proc", "/big"]
    big = mounts[-1]
    assert big.dev == 259 << 20 | 70000                   # what BPF sees in s_dev
    assert big.user_dev == os.makedev(259, 70000)        # what stat() says


def test_agent_cgroup_lifecycle():
    root = cgroup.leash_root()
    path = cgroup.create_agent_cgroup("a b/c", f"unit-{os.getpid()}")
    try:
        assert os.path.dirname(path) == root and os.path.basename(path).startswith("a_b_c-")
        assert cgroup.cgroup_id(path) == os.stat(path).st_ino
        with pytest.raises(cgroup.CgroupError):
            cgroup.create_agent_cgroup("a b/c", f"unit-{os.getpid()}")   # never reuse a live one
        sleeper = subprocess.Popen(["/usr/bin/sleep", "60"])
        cgroup.move_pid(path, sleeper.pid)
        assert cgroup.pids(path) == [sleeper.pid]
    finally:
        cgroup.remove_cgroup(path)          # kills what is left inside
    assert not os.path.exists(path)
    assert sleeper.wait(timeout=10) == -9


def test_a_filesystem_that_refuses_a_mark_is_named():
    class Picky:
        def mark_filesystem(self, path, mask):
            if path == "/tmp":
                raise fanotify.FanotifyError(22, "fanotify_mark /tmp: Invalid argument")
    root, tmp = os.stat("/").st_dev, os.stat("/tmp").st_dev
    found = [Mount(1, root, "/", "ext4"), Mount(2, tmp, "/tmp", "xfs"), Mount(3, 0, "/proc", "proc")]
    marked, refused = cr.mark_all(Picky(), found)
    assert [m.path for m in marked] == ["/"]                    # proc: skipped, not refused
    assert refused == ["cannot watch /tmp (xfs) for permission events: Invalid argument"]
