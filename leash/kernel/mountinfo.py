"""/proc/PID/mountinfo, parsed: the one reader of it for cgroup discovery
and the compat backend's filesystem marks."""

from __future__ import annotations

import os
import re

import msgspec


class Mount(msgspec.Struct, frozen=True):
    dev: int              # kernel dev_t: major << 20 | minor
    user_dev: int         # st_dev as stat() reports it
    path: str
    fstype: str
    root: str = "/"       # the directory of the filesystem mounted there
    mount_id: int = 0


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse(text: str) -> list[Mount]:
    """Every mount in `text` (a mountinfo file), in mount order."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        major, minor = (int(x) for x in fields[2].split(":"))
        out.append(Mount(major << 20 | minor, os.makedev(major, minor), _unescape(fields[4]),
                         fields[sep + 1], _unescape(fields[3]), int(fields[0])))
    return out


def mounts() -> list[Mount]:
    """Every mount in this process's mount namespace, in mount order."""
    with open("/proc/self/mountinfo") as f:
        return parse(f.read())
