"""A governed agent and an ungoverned process side by side, under one real
Cedar policy (conftest.POLICY) compiled into the kernel tables."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time

import pytest

from harness import LT, Agent, cgroup_of, finish_thread_exec, other_agent, running, start_thread_exec
# The scenarios both backends share (scenarios.py): pytest collects them here,
# run with this module's `lz`.
from scenarios import (  # noqa: F401
    both, bot, other,
    test_scope_map_knows_the_agent,
    test_reads,
    test_symlink,
    test_relative_paths,
    test_proc_self_fd_reopen_for_write,
    test_exec,
    test_exec_through_symlink_and_relative_path,
    test_connect_ipv6,
    test_ipv4_mapped_ipv6,
    test_udp_connect_and_sendto_without_connect,
    test_fork_and_double_fork_stay_governed,
    test_clone_into_another_cgroup_stays_governed,
    test_cannot_open_leash_files,
)
from leash.kernel import backend as backend_mod
from leash.kernel import cgroup

EPERM, ECONNREFUSED = errno.EPERM, errno.ECONNREFUSED


@pytest.fixture(scope="module")
def lz(tmp_path_factory):
    with running(str(tmp_path_factory.mktemp("enforce"))) as lz:
        yield lz


def test_probe_says_lsm_works_here():
    probe = backend_mod.probe_lsm()
    assert probe.ok, probe.reason
    assert "bpf" in probe.active_lsms.split(",")


# ------------------------------------------------------------------ files

def test_writes(lz, bot, other):
    wr = "os.O_WRONLY | os.O_CREAT"
    assert both(bot, other, f"result = try_open('{LT}/w/new.txt', {wr})") == (0, 0)
    assert both(bot, other, f"result = try_open('{LT}/ro/r.txt', os.O_RDWR)") == (EPERM, 0)
    assert both(bot, other, f"result = try_open('{LT}/ro/r.txt')") == (0, 0)
    assert both(bot, other, f"result = try_open('{LT}/w/secrets/new', {wr})") == (EPERM, 0)


def test_opens_that_change_the_file_are_writes(lz, bot, other):
    ro, policy = f"{LT}/ro/t.txt", os.path.join(lz.policy_dir, "policy.cedar")
    with open(ro, "w") as f:
        f.write("read only")
    policy_text = open(policy).read()
    # O_TRUNC empties the file whatever the access mode; truncate(2) opens nothing
    assert bot.run(f"result = try_open('{ro}', os.O_RDONLY | os.O_TRUNC)") == EPERM
    assert bot.run(f"result = try_call(os.truncate, '{ro}', 0)") == EPERM
    assert open(ro).read() == "read only"
    recs = lz.records.at_least(2, lambda r: r.resource == ro and r.pid == bot.pid)
    assert [(r.action, r.decision) for r in recs] == [("FileOpenReadWrite", "deny")] * 2
    # creating a file adds it to its directory (the kernel has made it before the open is judged)
    assert bot.run(f"result = try_open('{LT}/ro/made.txt', os.O_RDONLY | os.O_CREAT)") == EPERM
    lz.records.find(lambda r: r.resource == f"{LT}/ro/made.txt" and r.action == "FileOpenReadWrite"
                    and r.decision == "deny")
    # leash's own files cannot be emptied either
    assert bot.run(f"result = try_call(os.truncate, '{policy}', 0)") == EPERM
    assert open(policy).read() == policy_text
    lz.records.find(lambda r: r.action == "SelfProtect" and r.resource == policy and r.pid == bot.pid)
    # where writing is allowed, all of it works
    w = f"{LT}/w/t.txt"
    code = (f"open('{w}', 'w').write('x'); a = try_open('{w}', os.O_RDONLY | os.O_TRUNC);"
            f" open('{w}', 'w').write('x'); b = try_call(os.truncate, '{w}', 0);"
            f" result = [a, b, try_open('{LT}/w/made.txt', os.O_RDONLY | os.O_CREAT), os.path.getsize('{w}')]")
    assert bot.run(code) == [0, 0, 0, 0]
    # and ungoverned processes are not judged
    code = (f"a = try_open('{ro}', os.O_RDONLY | os.O_TRUNC); open('{ro}', 'w').write('read only');"
            f" b = try_call(os.truncate, '{ro}', 0);"
            f" result = [a, b, try_open('{LT}/ro/made2.txt', os.O_RDONLY | os.O_CREAT), os.path.getsize('{ro}')]")
    assert other.run(code) == [0, 0, 0, 0]


def test_overlay_copy_up_is_not_judged_again(lz, bot):
    """/etc is an overlay in the VM with the host's /etc below: writing a
    lower-layer file copies it up through work files leash never judges."""
    assert bot.run("result = try_open('/etc/hostname', os.O_WRONLY | os.O_APPEND)") == 0
    assert bot.run("result = try_open('/etc/passwd', os.O_WRONLY | os.O_APPEND)") == EPERM
    assert not lz.records.matching(lambda r: r.pid == bot.pid and "virtme" in r.resource)


def test_deny_record_names_policy_path_and_process(lz, bot):
    assert bot.run(f"result = try_open('{LT}/w/secrets/s.txt')") == EPERM
    rec = lz.records.find(lambda r: r.resource == f"{LT}/w/secrets/s.txt" and r.decision == "deny")
    assert rec.agent == "bot"
    assert rec.action == "FileOpenReadOnly"
    assert rec.policies == ["no-secrets"]
    assert rec.pid == bot.pid and rec.backend == "lsm" and rec.mode == "enforce"
    assert rec.exe.endswith("python3") or "python3" in rec.exe
    rec = lz.records.find(lambda r: r.resource == f"{LT}/w/key.txt" and r.decision == "deny")
    assert rec.policies == ["no-key"]


def test_allow_records_are_folded_and_counted(lz, bot):
    path = f"{LT}/w/fold.txt"
    bot.run(f"open('{path}', 'w').close(); result = [try_open('{path}') for _ in range(200)]")
    mine = lambda r: r.resource == path and r.pid == bot.pid and r.action == "FileOpenReadOnly"
    first = lz.records.find(mine)
    assert first.decision == "allow" and set(first.policies) == {"read-anything", "work"}
    time.sleep(1.1)   # past the fold window: the next record carries the folded count
    bot.run(f"result = try_open('{path}')")
    deadline = time.monotonic() + 10
    while sum(r.count for r in lz.records.matching(mine)) < 201 and time.monotonic() < deadline:
        time.sleep(0.1)
    recs = lz.records.matching(mine)
    assert sum(r.count for r in recs) == 201
    assert len(recs) < 50


# --------------------------------------------------------------- bypasses

def test_hardlink_to_secret_refused(lz, bot, other):
    assert bot.run(f"result = try_call(os.link, '{LT}/w/secrets/s.txt', '{LT}/w/hl')") == EPERM
    assert not os.path.exists(f"{LT}/w/hl")
    rec = lz.records.find(lambda r: r.action == "SelfProtect" and "hard link" in r.reason)
    assert rec.decision == "deny" and rec.pid == bot.pid
    # its own file: nothing to gain, allowed
    assert bot.run(f"open('{LT}/w/mine.txt', 'w').close();"
                   f" result = try_call(os.link, '{LT}/w/mine.txt', '{LT}/w/mine2.txt')") == 0
    assert other.run(f"result = try_call(os.link, '{LT}/w/secrets/s.txt', '{LT}/w/hl2')") == 0


def test_rename_out_of_a_forbidden_class_refused(lz, bot):
    assert bot.run(f"result = try_call(os.rename, '{LT}/w/secrets/s.txt', '{LT}/w/moved.txt')") == EPERM
    assert bot.run(f"result = try_call(os.rename, '{LT}/w/key.txt', '{LT}/w/key2.txt')") == EPERM
    assert bot.run(f"result = try_call(os.rename, '{LT}/w/secrets', '{LT}/w/public')") == EPERM
    assert os.path.exists(f"{LT}/w/secrets/s.txt") and os.path.exists(f"{LT}/w/key.txt")
    # an editor's write-then-rename over a file it may write
    assert bot.run(f"open('{LT}/w/doc.tmp', 'w').write('x'); open('{LT}/w/doc', 'w').close();"
                   f" result = try_call(os.rename, '{LT}/w/doc.tmp', '{LT}/w/doc')") == 0
    # but never over a file it may not write
    assert bot.run(f"open('{LT}/w/evil', 'w').close();"
                   f" result = try_call(os.rename, '{LT}/w/evil', '{LT}/w/key.txt')") == EPERM


# ------------------------------------------------------------------- exec

def test_dynamic_loader_bypass(lz, bot, other):
    ld = "/lib64/ld-linux-x86-64.so.2"
    allowed = both(bot, other, f"result = try_exec(['{ld}', '{LT}/bin/allowed'])")
    assert allowed == (["status", 0], ["status", 0])
    bot_r, other_r = both(bot, other, f"result = try_exec(['{ld}', '{LT}/bin/forbidden'])")
    assert other_r == ["status", 0]
    assert bot_r[0] == "status" and bot_r[1] != 0          # ld.so could not map it
    rec = lz.records.find(lambda r: r.action == "ProcessExec" and r.resource == f"{LT}/bin/forbidden"
                          and "interpreter" in r.reason)
    assert rec.decision == "deny"


def test_memfd_exec(lz, bot, other):
    code = f"result = try_memfd_exec('{LT}/bin/allowed')"
    assert both(bot, other, code) == (["errno", EPERM], ["status", 0])
    rec = lz.records.find(lambda r: r.action == "ProcessExec" and "memfd" in r.reason)
    assert rec.decision == "deny" and rec.resource.startswith("/memfd:")


# ---------------------------------------------------------------- network

def test_connect_ipv4(lz, bot, other):
    c = "result = try_connect(socket.AF_INET, '127.0.0.1', {})"
    assert both(bot, other, c.format(8080)) == (ECONNREFUSED, ECONNREFUSED)
    assert both(bot, other, c.format(8081)) == (EPERM, ECONNREFUSED)
    assert both(bot, other, "result = try_connect(socket.AF_INET, '127.0.0.2', 8080)") == (EPERM, ECONNREFUSED)
    rec = lz.records.find(lambda r: r.action == "NetworkConnect" and r.resource == "127.0.0.1:8081")
    assert rec.decision == "deny" and rec.details.get("protocol") == "tcp"


def test_packet_and_raw_sockets_refused_at_creation(lz, bot, other):
    # they send to any address without connect or sendto naming it
    packet = "result = try_socket(socket.AF_PACKET, socket.SOCK_RAW)"
    raw_tcp = "result = try_socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)"
    assert both(bot, other, packet) == (EPERM, 0)
    assert both(bot, other, raw_tcp) == (EPERM, 0)
    assert bot.run("result = try_socket(socket.AF_INET6, socket.SOCK_DGRAM)") == 0
    rec = lz.records.find(lambda r: r.resource == "socket(AF_PACKET)")
    assert rec.decision == "deny" and rec.ppid == bot.pid and "no policy can name" in rec.reason


# ----------------------------------------------------------- unix sockets

UNIX_SERVER = """
import socket, sys
held = []
for kind, path in [(socket.SOCK_STREAM, p) for p in sys.argv[1].split(",")] + \\
                  [(socket.SOCK_DGRAM, p) for p in sys.argv[2].split(",")]:
    s = socket.socket(socket.AF_UNIX, kind)
    s.bind(path.replace("@", "\\0", 1))
    if kind == socket.SOCK_STREAM:
        s.listen(64)
    held.append(s)
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def unix_sockets(lz):
    """Unix sockets bound by an ungoverned process that is not leash, plus a
    symlink and a hard link under w/ to the one under w/secrets/."""
    stream = [f"{LT}/w/ok.sock", f"{LT}/w/secrets/s.sock", f"{LT}/ro/r.sock", "@leash-test-abstract"]
    dgram = [f"{LT}/w/d.sock", f"{LT}/ro/d.sock"]
    server = subprocess.Popen([sys.executable, "-c", UNIX_SERVER, ",".join(stream), ",".join(dgram)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    os.symlink(f"{LT}/w/secrets/s.sock", f"{LT}/w/link.sock")
    os.link(f"{LT}/w/secrets/s.sock", f"{LT}/w/hard.sock")
    yield
    server.stdin.close()
    server.wait(timeout=10)
    for path in (f"{LT}/w/link.sock", f"{LT}/w/hard.sock", *stream[:3], *dgram):
        os.unlink(path)


def test_unix_connect_is_a_write_of_the_socket_path(lz, bot, other, unix_sockets):
    c = "result = try_unix({!r})"
    assert both(bot, other, c.format(f"{LT}/w/ok.sock")) == (0, 0)
    assert both(bot, other, c.format(f"{LT}/w/secrets/s.sock")) == (EPERM, 0)
    assert both(bot, other, c.format(f"{LT}/ro/r.sock")) == (EPERM, 0)      # readable, not writable
    rec = lz.records.find(lambda r: r.resource == f"{LT}/w/secrets/s.sock" and r.decision == "deny")
    assert rec.action == "FileOpenReadWrite" and rec.details.get("via") == "unix socket"
    assert "no-secrets" in rec.policies and rec.pid == bot.pid


def test_unix_connect_through_symlink_hardlink_or_relative_path(lz, bot, other, unix_sockets):
    # judged at the path the socket was bound at, however the caller named it
    for path in (f"{LT}/w/link.sock", f"{LT}/w/hard.sock", f"{LT}/w/secrets/s.sock".lstrip("/")):
        assert both(bot, other, f"result = try_unix({path!r})") == (EPERM, 0), path


def test_unix_datagrams(lz, bot, other, unix_sockets):
    c = "result = try_unix({!r}, socket.SOCK_DGRAM)"
    assert both(bot, other, c.format(f"{LT}/w/d.sock")) == (0, 0)
    assert both(bot, other, c.format(f"{LT}/ro/d.sock")) == (EPERM, 0)


def test_abstract_unix_sockets_refused(lz, bot, other, unix_sockets):
    assert both(bot, other, "result = try_unix('\\0leash-test-abstract')") == (EPERM, 0)
    rec = lz.records.find(lambda r: r.resource == "@leash-test-abstract")
    assert rec.decision == "deny" and "abstract" in rec.reason


def test_socketpairs_and_leash_own_sockets_stay_open(lz, bot, tmp_path):
    code = ("a, b = socket.socketpair({})\na.send(b'x')\nresult = b.recv(1) == b'x'\n"
            "a.close()\nb.close()")
    assert bot.run(code.format("")) is True
    assert bot.run(code.format("type=socket.SOCK_DGRAM")) is True
    # a socket the leash process itself listens on (the MCP relay's door), even
    # where the policy forbids writing
    door = socket.socket(socket.AF_UNIX)
    door.bind(f"{LT}/w/secrets/leash.sock")
    door.listen(4)
    try:
        assert bot.run(f"result = try_unix('{LT}/w/secrets/leash.sock')") == 0
    finally:
        door.close()
        os.unlink(f"{LT}/w/secrets/leash.sock")


# --------------------------------------------------------- scope and self

def test_cgroup_procs_write_refused(lz, bot):
    root = os.path.dirname(os.path.dirname(lz.cgroup))
    assert bot.run(f"result = try_call(lambda: open('{root}/cgroup.procs', 'w').write(str(os.getpid())))") == EPERM
    assert bot.run(f"result = try_open('{lz.cgroup}/cgroup.procs', os.O_WRONLY)") == EPERM
    assert bot.pid in [int(p) for p in open(f"{lz.cgroup}/cgroup.procs").read().split()]


def test_moved_to_another_cgroup_stays_governed(lz):
    a = lz.agent()
    try:
        child = a.run("import subprocess; p = subprocess.Popen(['/usr/bin/sleep', '60']); result = p.pid")
        root = os.path.dirname(os.path.dirname(lz.cgroup))
        # Something outside the agent moves it out (the agent itself cannot):
        with open(f"{root}/cgroup.procs", "w") as f:
            f.write(str(a.pid))
        assert str(a.pid) not in open(f"{lz.cgroup}/cgroup.procs").read().split()
        assert a.run(f"result = try_open('{LT}/w/secrets/s.txt')") == EPERM
        assert a.run(f"result = in_child(lambda: try_open('{LT}/w/secrets/s.txt'))") == EPERM
        assert child > 0
    finally:
        a.close()


def test_thread_exec_after_a_move_stays_governed(lz):
    # a non-leader thread that execs takes over the process id; the leader
    # exits on the way (its task storage goes with it)
    a = lz.agent()
    try:
        start_thread_exec(a)
        cgroup.move_pid(os.path.dirname(os.path.dirname(lz.cgroup)), a.pid)   # from outside
        assert finish_thread_exec(a) == (EPERM, a.pid)
        assert lz.backend.agent_of_pid(a.pid) == 1
    finally:
        a.close()


def test_thread_of_a_process_moved_in_and_out_stays_governed(lz):
    # An administrator moves a running two-threaded process into the agent's
    # cgroup and back where it was. Its second thread had asked about its
    # scope there before (answered "not governed") and not since.
    a = other_agent()
    try:
        start_thread_exec(a)
        home = cgroup_of(a.pid)
        cgroup.move_pid(lz.cgroup, a.pid)
        assert a.run(f"result = try_open('{LT}/w/secrets/s.txt')") == EPERM
        cgroup.move_pid(home, a.pid)
        assert a.run(f"result = try_open('{LT}/w/secrets/s.txt')") == EPERM
        assert finish_thread_exec(a) == (EPERM, a.pid)
        assert lz.backend.agent_of_pid(a.pid) == 1
    finally:
        a.close()


def test_thread_exec_of_a_process_found_in_a_newly_governed_cgroup(lz):
    cg = cgroup.create_agent_cgroup("bot", f"found-{os.getpid()}-{time.monotonic_ns()}")
    a = Agent(cg)
    try:
        start_thread_exec(a)
        lz.backend.govern(1, cg)                # the process is in it already
        assert a.run(f"result = try_open('{LT}/w/secrets/s.txt')") == EPERM
        cgroup.move_pid(os.path.dirname(os.path.dirname(lz.cgroup)), a.pid)
        assert finish_thread_exec(a) == (EPERM, a.pid)
        assert lz.backend.agent_of_pid(a.pid) == 1
    finally:
        a.close()
        cgroup.remove_cgroup(cg)


def test_io_uring(lz, bot, other):
    secret, ok = f"{LT}/w/secrets/s.txt", f"{LT}/w/ok.txt"
    assert both(bot, other, f"result = try_uring_open('{ok}')") == (0, 0)
    assert both(bot, other, f"result = try_uring_open('{secret}')") == (EPERM, 0)
    assert both(bot, other, f"result = try_uring_open('{ok}', personality=True)") == (EPERM, 0)
    lz.records.find(lambda r: r.action == "SelfProtect" and "io_uring" in r.reason)


def test_io_uring_workers_of_a_moved_agent_stay_governed(lz):
    a = lz.agent()
    try:
        root = os.path.dirname(os.path.dirname(lz.cgroup))
        with open(f"{root}/cgroup.procs", "w") as f:
            f.write(str(a.pid))
        assert a.run(f"result = try_uring_open('{LT}/w/secrets/s.txt')") == EPERM
    finally:
        a.close()


def test_bpf_refused(lz, bot, other):
    assert both(bot, other, "result = try_bpf()") == (EPERM, 0)
    rec = lz.records.find(lambda r: r.action == "SelfProtect" and "bpf()" in r.reason)
    assert rec.pid == bot.pid


def test_cannot_signal_or_trace_leash(lz, bot, other):
    me = os.getpid()
    assert bot.run(f"result = try_call(os.kill, {me}, signal.SIGTERM)") == EPERM
    assert bot.run(f"result = try_call(os.kill, {me}, signal.SIGKILL)") == EPERM
    assert other.run(f"result = try_call(os.kill, {me}, signal.SIGCONT)") == 0
    assert bot.run(f"result = try_ptrace({me})") == EPERM
    assert bot.run(f"result = try_open('/proc/{me}/mem')") in (EPERM, errno.EACCES)
    lz.records.find(lambda r: r.action == "SelfProtect" and "signal" in r.reason)
    lz.records.find(lambda r: r.action == "SelfProtect" and "trace" in r.reason)


def test_cannot_signal_or_trace_outside_the_agent(lz, bot, other):
    # code injected into a process outside the scope would run ungoverned
    assert bot.run(f"result = try_call(os.kill, {other.pid}, signal.SIGCONT)") == EPERM
    assert bot.run(f"result = try_ptrace({other.pid})") == EPERM
    # /proc/PID/mem needs ptrace's attach right, even to read
    assert bot.run(f"result = try_open('/proc/{other.pid}/mem')") == errno.EACCES
    assert other.run(f"result = try_open('/proc/{bot.pid}/mem')") == 0
    rec = lz.records.find(lambda r: r.action == "SelfProtect" and r.details.get("target") == other.pid
                          and "trace" in r.reason)
    assert rec.decision == "deny" and rec.pid == bot.pid
    # inside the agent both still work: its own children
    code = ("import subprocess\np = subprocess.Popen(['sleep', '30'])\n"
            "r = [try_ptrace(p.pid), try_call(os.kill, p.pid, signal.SIGKILL)]\np.wait()\nresult = r")
    assert bot.run(code) == [0, 0]


def test_capabilities_below_the_policy_refused(lz, bot, other):
    # a root agent leash did not start holds every capability: kernel code
    # and device nodes (a disk's node under an allowed path) stay out of reach
    finit_module = ("libc.syscall.restype = ctypes.c_long\n"
                    "result = 0 if libc.syscall(313, -1, b'', 0) == 0 else ctypes.get_errno()")
    assert both(bot, other, finit_module) == (EPERM, errno.EBADF)    # EBADF: past the capability check
    node = f"{LT}/w/disk"
    mknod = f"result = try_call(os.mknod, {node!r}, 0o600 | stat.S_IFBLK, os.makedev(7, 0))"
    assert bot.run("import stat\n" + mknod) == EPERM
    assert other.run("import stat\n" + mknod) == 0
    os.unlink(node)
    rec = lz.records.find(lambda r: r.action == "SelfProtect" and "kernel modules" in r.reason)
    assert rec.pid == bot.pid and rec.details.get("target") in (16, 27)


def test_signal_owner_outside_the_agent_refused(lz, bot, other):
    # a file's owner gets SIGIO (or F_SETSIG's signal) when I/O is possible:
    # owning it from outside the agent would be a kill() nobody judges
    code = ("import fcntl\nr, w = os.pipe()\nsetown = lambda who: try_call(fcntl.fcntl, r, fcntl.F_SETOWN, who)\n"
            "res = [setown({0}), setown(-os.getpgid(0)), setown(os.getpid()), setown(0),\n"
            "       try_call(fcntl.fcntl, r, 15, struct.pack('ii', 1, os.getpid()))]\n"  # F_SETOWN_EX
            "os.close(r)\nos.close(w)\nresult = res")
    assert bot.run(code.format(other.pid)) == [EPERM, EPERM, 0, 0, EPERM]
    assert other.run(code.format(bot.pid)) == [0, 0, 0, 0, 0]
    rec = lz.records.find(lambda r: r.action == "SelfProtect" and r.details.get("target") == other.pid
                          and "signal" in r.reason)
    assert rec.pid == bot.pid


def test_cannot_reprioritise_or_limit_outside_the_agent(lz, bot, other):
    # a CPU-time limit of zero would kill leash; renicing starves it
    nofile = ("import resource\n"
              "result = try_call(resource.prlimit, {0}, resource.RLIMIT_NOFILE, "
              "resource.prlimit({0}, resource.RLIMIT_NOFILE))")
    changes = (nofile, "result = try_call(os.setpriority, os.PRIO_PROCESS, {0}, 0)",
               "result = try_call(os.sched_setaffinity, {0}, os.sched_getaffinity({0}))")
    for code in changes:
        assert bot.run(code.format(other.pid)) == EPERM, code
        assert bot.run(code.format(os.getpid())) == EPERM, code
        assert other.run(code.format(bot.pid)) == 0, code
        assert bot.run(code.format(bot.pid)) == 0, code
    rec = lz.records.find(lambda r: r.action == "SelfProtect" and "priority" in r.reason)
    assert rec.decision == "deny" and rec.pid == bot.pid


