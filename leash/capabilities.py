"""The capabilities a command run as a governed agent keeps.

A root agent holds every capability, and several act below anything a
policy can name: loading kernel code (SYS_MODULE), raw memory and I/O ports
(SYS_RAWIO), device nodes that reach a disk under an allowed path (MKNOD),
tracing other processes (SYS_PTRACE), bpf() and mounts (BPF, SYS_ADMIN),
rebooting (SYS_BOOT), raw packets (NET_RAW). The runner drops them from the
bounding set before CMD is exec'd, so neither CMD nor anything it runs (a
setuid-root program included) can hold them. What is kept is what container
runtimes give a container's root by default, less NET_RAW, MKNOD and
SYS_CHROOT: enough to own files and switch users, not to change the kernel.
Both backends benefit; for compat, which cannot refuse bpf() or ptrace, it is
what keeps a root agent from detaching leash: without CAP_BPF and SYS_ADMIN
bpf() refuses it, and the kernel lets no process trace (or read the memory
of) one holding capabilities it lacks, as leash's own processes and the
host's root services do (docs/compat.md).
"""

from __future__ import annotations

import ctypes

# include/uapi/linux/capability.h
NUMBERS = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5,
    "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9, "NET_BIND_SERVICE": 10,
    "NET_BROADCAST": 11, "NET_ADMIN": 12, "NET_RAW": 13, "IPC_LOCK": 14, "IPC_OWNER": 15,
    "SYS_MODULE": 16, "SYS_RAWIO": 17, "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20,
    "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23, "SYS_RESOURCE": 24, "SYS_TIME": 25,
    "SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28, "AUDIT_WRITE": 29, "AUDIT_CONTROL": 30,
    "SETFCAP": 31, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33, "SYSLOG": 34, "WAKE_ALARM": 35,
    "BLOCK_SUSPEND": 36, "AUDIT_READ": 37, "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40,
}
AGENT_KEEPS = frozenset({"CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
                         "SETPCAP", "SETFCAP", "NET_BIND_SERVICE", "AUDIT_WRITE"})
PR_CAPBSET_DROP = 24
CAP_LAST_CAP = "/proc/sys/kernel/cap_last_cap"


def parse(names: list[str]) -> frozenset[str]:
    """`--cap-add` values (NET_ADMIN, CAP_NET_ADMIN, net_admin) to canonical
    names; ValueError names an unknown one."""
    out = set()
    for name in names:
        key = name.upper().removeprefix("CAP_")
        if key not in NUMBERS:
            raise ValueError(f"unknown capability: {name} (one of {', '.join(sorted(NUMBERS))})")
        out.add(key)
    return frozenset(out)


def _last_cap() -> int:
    try:
        with open(CAP_LAST_CAP) as f:
            return int(f.read())
    except (OSError, ValueError):
        return max(NUMBERS.values())


def drop_bounding(keep: frozenset[str]) -> None:
    """Drop every capability but `keep` from this process's bounding set
    (needs SETPCAP: call before giving up root). Capabilities the kernel
    knows and this table does not are dropped too. OSError on failure."""
    libc = ctypes.CDLL(None, use_errno=True)      # no ldconfig run in a fresh child
    kept = {NUMBERS[name] for name in keep}
    for cap in range(_last_cap() + 1):
        if cap not in kept and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot drop capability {cap} from the bounding set")
