"""The compat backend's watchdog: a separate process, standard library only,
run by path (python3 compat_watchdog.py DAEMON_PID STALL_S MAP_FD).

fanotify fails open: when the daemon dies its group closes and the kernel
allows every open. And a stuck daemon holds every open on the host. So this
process, started by the daemon before any fanotify mark exists, reads the
daemon's pipe on stdin:

    b"\\0"           a heartbeat (the responder is answering)
    b"c PATH\\n"     a cgroup now governed
    b"r PID\\n"      the daemon's file responder process
    b"stop\\n"       clean shutdown: exit quietly

On EOF without "stop" (the daemon died) or no heartbeat for STALL_S seconds
(stuck: the daemon and its responder are SIGKILLed first, which closes the
fanotify groups and releases the host), every governed process is killed: every thread id in the
compat_tids map (inherited as MAP_FD) and everything in the governed
cgroups. Governed work never goes on unwatched.
"""

import ctypes
import os
import select
import signal
import sys

SYS_BPF = 321 if os.uname().machine == "x86_64" else 280
BPF_MAP_GET_NEXT_KEY = 4


def governed_tids(map_fd: int) -> list[int]:
    libc = ctypes.CDLL(None, use_errno=True)
    key, nxt = ctypes.c_uint32(), ctypes.c_uint32()
    # union bpf_attr for map element commands: map_fd, pad, key ptr, next_key ptr
    attr = (ctypes.c_uint64 * 4)()
    out, first = [], True
    while len(out) < 1 << 20:
        attr[0] = map_fd
        attr[1] = 0 if first else ctypes.addressof(key)
        attr[2] = ctypes.addressof(nxt)
        if libc.syscall(SYS_BPF, BPF_MAP_GET_NEXT_KEY, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
            break
        out.append(nxt.value)
        key.value, first = nxt.value, False
    return out


def kill_governed(map_fd: int, cgroups: list[str]) -> int:
    killed = 0
    for path in cgroups:
        try:
            with open(os.path.join(path, "cgroup.kill"), "w") as f:
                f.write("1")
        except OSError:
            pass
    for tid in governed_tids(map_fd):
        try:
            os.kill(tid, signal.SIGKILL)
            killed += 1
        except OSError:
            pass
    return killed


def main() -> int:
    daemon, stall, map_fd = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the operator's ^C is for the daemon
    fd = sys.stdin.fileno()
    cgroups: list[str] = []
    responders: list[int] = []
    pending = b""
    while True:
        ready, _, _ = select.select([fd], [], [], stall)
        if not ready:
            why = f"no heartbeat for {stall:.0f}s: killed the stuck daemon"
            break
        data = os.read(fd, 65536)
        if not data:
            why = "the daemon died"
            break
        pending += data.replace(b"\0", b"")
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if line == b"stop":
                return 0
            if line.startswith(b"c "):
                cgroups.append(os.fsdecode(line[2:]))
            elif line.startswith(b"r "):
                responders.append(int(line[2:]))
    for pid in (daemon, *responders):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    n = kill_governed(map_fd, cgroups)
    os.write(2, f"leash watchdog: {why}; killed {n} governed processes\n".encode())
    return 1


if __name__ == "__main__":
    sys.exit(main())
