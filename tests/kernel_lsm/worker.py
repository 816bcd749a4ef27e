"""An agent stand-in: runs Python snippets sent by the test, one JSON line
each, and answers with their `result` (or the exception). Standard library
only, so it opens nothing of leash's."""

import ctypes
import errno
import json
import os
import signal
import socket
import struct
import sys

libc = ctypes.CDLL(None, use_errno=True)
SYS_BPF = 321
PTRACE_ATTACH = 16
PTRACE_DETACH = 17
MFD_CLOEXEC = 1
SYS_CLONE3 = 435
CLONE_INTO_CGROUP = 0x200000000
libc.syscall.restype = ctypes.c_long


def try_open(path, flags=os.O_RDONLY, mode=0o644):
    """0 on success, else the errno."""
    try:
        os.close(os.open(path, flags, mode))
        return 0
    except OSError as e:
        return e.errno


def try_call(fn, *args):
    try:
        fn(*args)
        return 0
    except OSError as e:
        return e.errno


exec_children = []


def try_exec(argv, fd=None):
    """["errno", n] when execve failed, ["status", code] when the program ran.
    The execve is made by a forked child, whose pid is appended to exec_children."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            devnull = os.open("/dev/null", os.O_RDONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.execve(fd if fd is not None else argv[0], argv, {})
        except OSError as e:
            os.write(w, str(e.errno).encode())
        os._exit(127)
    exec_children.append(pid)
    os.close(w)
    data = os.read(r, 64)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if data:
        return ["errno", int(data)]
    return ["status", os.waitstatus_to_exitcode(status)]


def try_memfd_exec(source):
    fd = os.memfd_create("payload", 0)
    with open(source, "rb") as f:
        os.write(fd, f.read())
    try:
        return try_exec(["payload"], fd=fd)
    finally:
        os.close(fd)


def try_connect(family, host, port, kind=socket.SOCK_STREAM):
    """0, or the errno (ECONNREFUSED means leash let it through)."""
    s = socket.socket(family, kind)
    s.settimeout(5)
    try:
        s.connect((host, port))
        return 0
    except OSError as e:
        return e.errno
    finally:
        s.close()


def try_sendto(family, host, port):
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.sendto(b"x", (host, port))
        return 0
    except OSError as e:
        return e.errno
    finally:
        s.close()


def try_socket(family, kind, proto=0):
    """Make (and close) a socket in a child: 0, the errno, or minus the
    signal that killed the child (the compat backend kills what it cannot
    refuse)."""
    pid = os.fork()
    if pid == 0:
        try:
            socket.socket(family, kind, proto).close()
            os._exit(0)
        except OSError as e:
            os._exit(e.errno)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def try_unix(path, kind=socket.SOCK_STREAM):
    """Connect (stream) or send a datagram (dgram) to the unix socket at
    `path` ("\0name": an abstract one): 0, or the errno."""
    s = socket.socket(socket.AF_UNIX, kind)
    s.settimeout(5)
    try:
        if kind == socket.SOCK_DGRAM:
            s.sendto(b"x", path)
        else:
            s.connect(path)
        return 0
    except OSError as e:
        return e.errno
    finally:
        s.close()


def try_clone_into_cgroup(cgroup_dir, path):
    """clone3(CLONE_INTO_CGROUP): a child born in `cgroup_dir` (which needs
    no cgroup.procs write) tries to open `path`. Returns [its errno, the
    cgroup it was in], or ["clone3", errno] when the clone failed."""
    fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
    r, w = os.pipe()
    args = ctypes.create_string_buffer(struct.pack("<11Q", CLONE_INTO_CGROUP, 0, 0, 0, signal.SIGCHLD,
                                                   0, 0, 0, 0, 0, fd), 88)
    pid = libc.syscall(SYS_CLONE3, args, ctypes.c_size_t(88))
    if pid == 0:
        # the child of a raw clone: as little Python as possible, then out
        e = try_open(path)
        with open("/proc/self/cgroup") as f:
            cg = next(line[3:].strip() for line in f if line.startswith("0::"))
        os.write(w, json.dumps([e, cg]).encode())
        os._exit(0)
    err = ctypes.get_errno()
    os.close(fd)
    os.close(w)
    if pid < 0:
        os.close(r)
        return ["clone3", err]
    os.waitpid(pid, 0)
    data = os.read(r, 65536)
    os.close(r)
    return json.loads(data)


def try_bpf():
    attr = ctypes.create_string_buffer(128)
    ctypes.memmove(attr, (ctypes.c_uint32 * 4)(2, 4, 8, 1), 16)   # BPF_MAP_CREATE array 4/8/1
    fd = libc.syscall(SYS_BPF, 0, attr, 128)
    if fd < 0:
        return ctypes.get_errno()
    os.close(fd)
    return 0


def try_ptrace(pid):
    if libc.ptrace(PTRACE_ATTACH, pid, None, None) < 0:
        return ctypes.get_errno()
    libc.ptrace(PTRACE_DETACH, pid, None, None)
    return 0


def try_uring_open(path, personality=False):
    """openat through io_uring (its worker threads do the open); with a
    registered personality, the request runs under overridden credentials.
    0 on success, else the errno."""
    import mmap
    import struct
    params = ctypes.create_string_buffer(120)
    ring = libc.syscall(425, 4, params)                       # io_uring_setup
    if ring < 0:
        return ctypes.get_errno()
    sq_entries, cq_entries = struct.unpack_from("<II", params, 0)
    sq_head, sq_tail, sq_mask, _, _, _, sq_array = struct.unpack_from("<7I", params, 40)
    cq_head, cq_tail, cq_mask, _, _, cqes = struct.unpack_from("<6I", params, 80)
    size = max(sq_array + sq_entries * 4, cqes + cq_entries * 16)
    rings = mmap.mmap(ring, size, offset=0)
    sqes = mmap.mmap(ring, sq_entries * 64, offset=0x10000000)
    pid = 0
    if personality:
        pid = libc.syscall(427, ring, 9, None, 0)              # IORING_REGISTER_PERSONALITY
        if pid < 0:
            return ctypes.get_errno()
    name = ctypes.create_string_buffer(path.encode())
    tail = struct.unpack_from("<I", rings, sq_tail)[0]
    idx = tail & struct.unpack_from("<I", rings, sq_mask)[0]
    sqe = struct.pack("<BBHiQQIIQHHiQQ", 18, 0x10, 0, -100, 0, ctypes.addressof(name), 0, os.O_RDONLY,
                      7, 0, pid, 0, 0, 0)         # IORING_OP_OPENAT, IOSQE_ASYNC: a worker thread opens
    sqes[idx * 64:idx * 64 + 64] = sqe
    struct.pack_into("<I", rings, sq_array + idx * 4, idx)
    struct.pack_into("<I", rings, sq_tail, tail + 1)
    if libc.syscall(426, ring, 1, 1, 1, None, 0) < 0:           # io_uring_enter, wait for 1
        return ctypes.get_errno()
    head = struct.unpack_from("<I", rings, cq_head)[0]
    off = cqes + (head & struct.unpack_from("<I", rings, cq_mask)[0]) * 16
    _, res, _ = struct.unpack_from("<QiI", rings, off)
    struct.pack_into("<I", rings, cq_head, head + 1)
    rings.close()
    sqes.close()
    os.close(ring)
    if res >= 0:
        os.close(res)
        return 0
    return -res


def in_child(fn, depth=1, setsid=False):
    """Run fn() in a descendant `depth` forks down; its result comes back as JSON."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        for _ in range(depth - 1):
            if os.fork():
                os._exit(0)
        if setsid:
            os.setsid()
        try:
            out = json.dumps(fn())
        except Exception as e:
            out = json.dumps({"error": repr(e)})
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    return json.loads(b"".join(chunks))


def main():
    env = dict(globals())
    out = sys.stdout
    for line in sys.stdin:
        env.pop("result", None)
        try:
            exec(json.loads(line)["code"], env)
            reply = {"result": env.get("result")}
        except Exception as e:
            reply = {"error": repr(e)}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
