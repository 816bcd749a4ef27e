"""leash's processes are the last the kernel's OOM killer picks; what leash
starts is not.

An agent that exhausts memory should not get the daemon killed instead of
itself: the records would stop, compat's responder would take its agents
along, the MCP gateway would go. So the daemon asks to be spared (and the
compat responder and watchdog it starts inherit that), and what it starts
for others gets the default back: a command before it is exec'd, an MCP
server as soon as it exists. Lowering the
value needs CAP_SYS_RESOURCE, which a command leash runs does not hold
(capabilities.py), so an agent cannot spare itself in turn.
"""

from __future__ import annotations

SPARED = -1000
DEFAULT = 0


def _write(pid: int | str, value: int) -> None:
    with open(f"/proc/{pid}/oom_score_adj", "w") as f:
        f.write(str(value))


def spare_self() -> None:
    """OSError if the kernel refuses (not root)."""
    _write("self", SPARED)


def restore_default(pid: int | str = "self") -> None:
    """Give `pid` (default: this process, e.g. a child before exec) the
    default again; best effort: a process that is gone needs nothing."""
    try:
        _write(pid, DEFAULT)
    except OSError:
        pass
