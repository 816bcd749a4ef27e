"""A governed agent and an ungoverned process side by side under the lsm
suite's policy, enforced by the compat backend on this machine's kernel.
Where compat cannot act as the lsm backend does (it cannot refuse a link or
a rename, only what follows), the test says so and checks what it does
instead (docs/compat.md)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time

import pytest

from compat_harness import LT, Agent, cgroup_of, finish_thread_exec, other_agent, running, start_thread_exec
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
from leash.kernel import cgroup, compat

EPERM, ECONNREFUSED = errno.EPERM, errno.ECONNREFUSED


@pytest.fixture(scope="module")
def lz(tmp_path_factory):
    with running(str(tmp_path_factory.mktemp("enforce"))) as lz:
        yield lz


def test_probe_says_compat_works_here():
    results = compat.probe_compat()
    assert [r.name for r in results] == ["BTF", "cgroup v2", "tp_btf programs", "ring buffer",
                                         "cgroup sock_addr attach", "syscall tracepoints",
                                         "fanotify permission events"]
    assert all(r.ok for r in results), results


# ------------------------------------------------------------------ files

def test_writes(lz, bot, other):
    wr = "os.O_WRONLY | os.O_CREAT"
    assert both(bot, other, f"result = try_open('{LT}/w/new.txt', {wr})") == (0, 0)
    assert both(bot, other, f"result = try_open('{LT}/ro/r.txt', os.O_RDWR)") == (EPERM, 0)
    assert both(bot, other, f"result = try_open('{LT}/ro/r.txt')") == (0, 0)
    assert both(bot, other, f"result = try_open('{LT}/w/secrets/new', {wr})") == (EPERM, 0)
    # O_TRUNC truncates even a read-only open: judged as a write
    assert both(bot, other, f"result = try_open('{LT}/ro/r.txt', os.O_RDONLY | os.O_TRUNC)") == (EPERM, 0)


def test_openat2_flags_are_read_from_the_agent(lz, bot, other):
    # openat2 passes its flags behind a pointer (struct open_how)
    code = (f"import ctypes\nhow = (ctypes.c_uint64 * 3)(os.O_RDWR, 0, 0)\n"
            f"fd = libc.syscall(437, -100, b'{LT}/ro/r.txt', ctypes.byref(how), 24)\n"
            f"result = ctypes.get_errno() if fd < 0 else 0\nif fd >= 0: os.close(fd)\n"
            f"how = (ctypes.c_uint64 * 3)(os.O_RDONLY, 0, 0)\n"
            f"fd = libc.syscall(437, -100, b'{LT}/ro/r.txt', ctypes.byref(how), 24)\n"
            f"result = [result, ctypes.get_errno() if fd < 0 else 0]\nif fd >= 0: os.close(fd)")
    assert both(bot, other, code) == ([EPERM, 0], [0, 0])


def test_read_only_create_is_a_write(lz, bot, other):
    # O_RDONLY|O_CREAT may create the file: judged as the write it may be
    code = (f"fd = os.open('{LT}/ro/r.txt', os.O_RDONLY | os.O_CREAT)\nos.close(fd)\nresult = 0")
    wrapped = f"try:\n    {code.replace(chr(10), chr(10) + '    ')}\nexcept OSError as e:\n    result = e.errno"
    assert both(bot, other, wrapped) == (EPERM, 0)


def test_deny_record_names_policy_path_and_process(lz, bot):
    assert bot.run(f"result = try_open('{LT}/w/secrets/s.txt')") == EPERM
    rec = lz.records.find(lambda r: r.resource == f"{LT}/w/secrets/s.txt" and r.decision == "deny")
    assert rec.agent == "bot"
    assert rec.action == "FileOpenReadOnly"
    assert rec.policies == ["no-secrets"]
    assert rec.pid == bot.pid and rec.backend == "compat" and rec.mode == "enforce"
    assert "python3" in rec.exe
    assert rec.ppid == os.getppid() or rec.ppid > 0
    rec = lz.records.find(lambda r: r.resource == f"{LT}/w/key.txt" and r.decision == "deny")
    assert rec.policies == ["no-key"]


def test_allow_records_are_folded_and_counted(lz, bot):
    # ro/ is readable, not writable: never cached, so every open is asked
    path = f"{LT}/ro/fold.txt"
    open(path, "w").close()
    bot.run(f"result = [try_open('{path}') for _ in range(200)]")
    mine = lambda r: r.resource == path and r.pid == bot.pid and r.action == "FileOpenReadOnly"
    first = lz.records.find(mine)
    assert first.decision == "allow" and first.policies == ["read-anything"]
    time.sleep(1.1)   # past the fold window: the next record carries the folded count
    bot.run(f"result = try_open('{path}')")
    deadline = time.monotonic() + 10
    while sum(r.count for r in lz.records.matching(mine)) < 201 and time.monotonic() < deadline:
        time.sleep(0.1)
    recs = lz.records.matching(mine)
    assert sum(r.count for r in recs) == 201
    assert len(recs) < 50


def _ignored(lz, path: str) -> bool:
    """Does the responder's group hold an ignore mark on this file?"""
    ino = f"ino:{os.stat(path).st_ino:x} "
    with open(f"/proc/{lz.backend.ready.pid}/fdinfo/{lz.backend.ready.group_fd}") as f:
        return any(ino in line and "ignored_mask:0" not in line for line in f)


def _wait(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_files_every_agent_may_fully_use_are_cached_in_the_kernel(lz, bot, other):
    # w/ is read-write for the only agent: after an open is asked, the kernel
    # stops asking (an ignore mark), for everyone
    path = f"{LT}/w/cached.txt"
    with open(path, "w") as f:
        f.write("x")
    assert bot.run(f"result = try_open('{path}')") == 0
    assert _wait(lambda: _ignored(lz, path))     # placed just after the answer
    time.sleep(0.2)                              # let counts of earlier answers land
    before = lz.backend.stats().governed
    assert both(bot, other, f"result = [try_open('{path}', os.O_RDWR) for _ in range(100)]") == ([0] * 100, [0] * 100)
    assert lz.backend.stats().governed == before
    # a write drops the mark: the new content is asked about again
    with open(path, "w") as f:
        f.write("y")
    assert not _ignored(lz, path)
    assert bot.run(f"result = try_open('{path}')") == 0
    assert _wait(lambda: lz.backend.stats().governed > before)


def test_a_file_is_judged_again_for_caching_when_it_changes_class(lz, other):
    # leash remembers files it may not cache; a file moved into an allow-all
    # class (or a new one reusing a deleted file's inode number) is not that file
    src, dst = f"{LT}/ro/moving.txt", f"{LT}/w/moved.txt"
    with open(src, "w") as f:
        f.write("x")
    assert other.run(f"result = try_open('{src}')") == 0
    time.sleep(0.2)
    assert not _ignored(lz, src)                 # ro/ is read-only for the agent: asked every time
    os.rename(src, dst)
    assert other.run(f"result = try_open('{dst}')") == 0
    assert _wait(lambda: _ignored(lz, dst))


# --------------------------------------------------------------- bypasses

def test_hardlink_to_secret_cannot_be_opened(lz, bot, other):
    # compat cannot refuse link(2) (lsm does): the link exists, but no
    # governed process can open the file through it, or at all
    assert bot.run(f"result = try_call(os.link, '{LT}/w/secrets/s.txt', '{LT}/w/hl')") == 0
    assert both(bot, other, f"result = try_open('{LT}/w/hl')") == (EPERM, 0)
    rec = lz.records.find(lambda r: r.action == "SelfProtect" and "hard link" in r.reason)
    assert rec.pid == bot.pid and rec.resource == f"{LT}/w/hl"
    rec = lz.records.find(lambda r: r.resource == f"{LT}/w/hl" and r.decision == "deny")
    assert "hard-linked by a governed process" in rec.reason
    # a fresh agent process is refused too (the taint is on the file, not the process)
    late = lz.agent()
    try:
        assert late.run(f"result = try_open('{LT}/w/hl')") == EPERM
    finally:
        late.close()
    # its own file: nothing to gain, allowed
    assert bot.run(f"open('{LT}/w/mine.txt', 'w').close();"
                   f" result = [try_call(os.link, '{LT}/w/mine.txt', '{LT}/w/mine2.txt'),"
                   f" try_open('{LT}/w/mine2.txt')]") == [0, 0]
    # an outsider's link is the outsider's choice: path rules apply
    with open(f"{LT}/w/secrets/t.txt", "w") as f:
        f.write("t")
    assert other.run(f"result = try_call(os.link, '{LT}/w/secrets/t.txt', '{LT}/w/hl2')") == 0
    assert bot.run(f"result = [try_open('{LT}/w/hl2'), try_open('{LT}/w/secrets/t.txt')]") == [0, EPERM]


def test_link_by_a_process_that_already_exited(lz, bot):
    # `ln` is gone long before the agent opens the link
    assert bot.run(f"result = try_exec(['/usr/bin/ln', '{LT}/w/key.txt', '{LT}/w/key-ln'])") == ["status", 0]
    assert bot.run(f"result = try_open('{LT}/w/key-ln')") == EPERM


def test_rename_out_of_a_forbidden_class(lz, bot, other):
    assert bot.run(f"result = try_call(os.rename, '{LT}/w/secrets/s.txt', '{LT}/w/moved.txt')") == 0
    assert both(bot, other, f"result = try_open('{LT}/w/moved.txt')") == (EPERM, 0)
    assert bot.run(f"result = try_exec(['/usr/bin/mv', '{LT}/w/key.txt', '{LT}/w/key2.txt'])") == ["status", 0]
    assert both(bot, other, f"result = try_open('{LT}/w/key2.txt')") == (EPERM, 0)
    os.makedirs(f"{LT}/w/secrets/deep", exist_ok=True)
    with open(f"{LT}/w/secrets/deep/d.txt", "w") as f:
        f.write("deep")
    assert bot.run(f"result = try_call(os.rename, '{LT}/w/secrets', '{LT}/w/public')") == 0
    assert both(bot, other, f"result = try_open('{LT}/w/public/deep/d.txt')") == (EPERM, 0)
    assert both(bot, other, f"result = try_open('{LT}/w/public/deep')") == (EPERM, 0)
    rec = lz.records.find(lambda r: r.action == "SelfProtect" and "rename of a directory" in r.reason)
    assert f"from {LT}/w/secrets" in rec.reason
    # an editor's write-then-rename over a file it may write keeps working
    assert bot.run(f"open('{LT}/w/doc.tmp', 'w').write('x'); open('{LT}/w/doc', 'w').close();"
                   f" result = [try_call(os.rename, '{LT}/w/doc.tmp', '{LT}/w/doc'),"
                   f" try_open('{LT}/w/doc'), try_open('{LT}/w/doc', os.O_RDWR)]") == [0, 0, 0]
    # a directory of its own, uniformly writable, moves freely
    assert bot.run(f"os.makedirs('{LT}/w/proj/src'); open('{LT}/w/proj/src/a.py', 'w').close();"
                   f" result = [try_call(os.rename, '{LT}/w/proj', '{LT}/w/proj2'),"
                   f" try_open('{LT}/w/proj2/src/a.py')]") == [0, 0]
    # over a file it may not write: lsm refuses; compat cannot, and says so
    assert bot.run(f"open('{LT}/w/evil', 'w').close();"
                   f" result = try_call(os.rename, '{LT}/w/evil', '{LT}/w/key.txt')") == 0
    rec = lz.records.find(lambda r: r.action == "SelfProtect" and r.resource == f"{LT}/w/key.txt"
                          and "rename onto" in r.reason)
    assert "cannot refuse" in rec.reason
    # restore the world for the following tests
    os.rename(f"{LT}/w/public", f"{LT}/w/secrets")
    os.rename(f"{LT}/w/moved.txt", f"{LT}/w/secrets/s.txt")
    os.rename(f"{LT}/w/key2.txt", f"{LT}/w/key.txt")


# ------------------------------------------------------------------- exec

def test_script_interpreter_is_checked(lz, bot, other):
    with open(f"{LT}/bin/script", "w") as f:
        f.write(f"#!{LT}/bin/forbidden\n")
    os.chmod(f"{LT}/bin/script", 0o755)
    assert both(bot, other, f"result = try_exec(['{LT}/bin/script'])") == (["errno", EPERM], ["status", 0])


def test_dynamic_loader_bypass(lz, bot, other):
    ld = "/lib64/ld-linux-x86-64.so.2"
    allowed = both(bot, other, f"result = try_exec(['{ld}', '{LT}/bin/allowed'])")
    assert allowed == (["status", 0], ["status", 0])
    bot_r, other_r = both(bot, other, f"result = try_exec(['{ld}', '{LT}/bin/forbidden'])")
    assert other_r == ["status", 0]
    assert bot_r[0] == "status" and bot_r[1] != 0          # ld.so could not open it
    rec = lz.records.find(lambda r: r.action == "ProcessExec" and r.resource == f"{LT}/bin/forbidden"
                          and "loader" in r.reason)
    assert rec.decision == "deny"


def test_memfd_exec_is_killed(lz, bot, other):
    # fanotify never sees a memfd: the exec is refused by SIGKILL before the
    # new program runs (lsm: EPERM from execve)
    code = f"result = try_memfd_exec('{LT}/bin/allowed')"
    assert both(bot, other, code) == (["status", -signal.SIGKILL], ["status", 0])
    rec = lz.records.find(lambda r: r.action == "ProcessExec" and "memfd" in r.reason)
    assert rec.decision == "deny"


def test_exec_from_a_thread_stays_governed(lz):
    # a non-leader thread that execs takes over the process id
    probe = (f"import os\ntry:\n    os.close(os.open('{LT}/w/secrets/s.txt', 0)); print(0)\n"
             f"except OSError as e:\n    print(e.errno)")
    a = lz.agent()
    try:
        a.send("import threading\n"
               f"threading.Thread(target=lambda: os.execv('/usr/bin/python3', ['python3', '-c', {probe!r}])).start()\n"
               "import time; time.sleep(30)")
        out = a.proc.stdout.read()
        a.proc.wait(timeout=30)
    finally:
        a.proc.kill()
    assert out.strip() == str(EPERM)


def test_thread_exec_after_a_move_stays_governed(lz):
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
    # cgroup and back where it was: the kernel reports the move for the
    # leader only, and the second thread then execs.
    a = other_agent()
    try:
        start_thread_exec(a)
        home = cgroup_of(a.pid)
        cgroup.move_pid(lz.cgroup, a.pid)
        assert a.run(f"result = try_open('{LT}/w/secrets/s.txt')") == EPERM
        cgroup.move_pid(home, a.pid)
        assert finish_thread_exec(a) == (EPERM, a.pid)
        assert lz.backend.agent_of_pid(a.pid) == 1
    finally:
        a.close()


def test_thread_exec_of_a_process_found_in_a_newly_governed_cgroup(lz):
    # govern() finds the process's threads in the cgroup (by thread id)
    cg = cgroup.create_agent_cgroup("bot", f"found-{os.getpid()}-{time.monotonic_ns()}")
    a = Agent(cg)
    try:
        start_thread_exec(a)
        lz.backend.govern(1, cg)
        assert a.run(f"result = try_open('{LT}/w/secrets/s.txt')") == EPERM
        cgroup.move_pid(os.path.dirname(os.path.dirname(lz.cgroup)), a.pid)
        assert finish_thread_exec(a) == (EPERM, a.pid)
        assert lz.backend.agent_of_pid(a.pid) == 1
    finally:
        a.close()
        cgroup.remove_cgroup(cg)


def test_io_uring_worker_opens_are_governed(lz, tmp_path):
    # IOSQE_ASYNC makes a worker thread (not the caller) do the open; its
    # syscall state says nothing of the flags, so it is judged as read-write
    cc = shutil.which("cc") or shutil.which("clang-14")
    assert cc, "a C compiler (tools/setup installs clang-14)"
    exe = f"{LT}/bin/uring_open"
    subprocess.run([cc, "-O2", "-o", exe, os.path.join(os.path.dirname(__file__), "uring_open.c")], check=True)
    run = lambda *args: bot_or_other(lz, [exe, *args])
    assert run(f"{LT}/w/secrets/s.txt") == ("1", "0")
    assert run(f"{LT}/w/ok.txt") == ("0", "0")                  # read and write allowed
    assert run(f"{LT}/ro/r.txt") == ("1", "0")                  # read allowed, but the mode is unknown
    rec = lz.records.find(lambda r: r.resource == f"{LT}/ro/r.txt" and "mode unknown" in r.reason)
    assert rec.decision == "deny" and rec.details["tid"] != rec.pid     # decided for the worker


def bot_or_other(lz, argv):
    gov = subprocess.run(["/bin/sh", "-c", f'echo $$ > {lz.cgroup}/cgroup.procs && exec "$0" "$@"', *argv],
                         capture_output=True, text=True, timeout=30)
    other = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return gov.stdout.strip(), other.stdout.strip()


# ---------------------------------------------------------------- network

def test_connect_ipv4(lz, bot, other):
    c = "result = try_connect(socket.AF_INET, '127.0.0.1', {})"
    assert both(bot, other, c.format(8080)) == (ECONNREFUSED, ECONNREFUSED)
    assert both(bot, other, c.format(8081)) == (EPERM, ECONNREFUSED)
    assert both(bot, other, "result = try_connect(socket.AF_INET, '127.0.0.2', 8080)") == (EPERM, ECONNREFUSED)
    rec = lz.records.find(lambda r: r.action == "NetworkConnect" and r.resource == "127.0.0.1:8081")
    assert rec.decision == "deny" and rec.details.get("protocol") == "tcp" and rec.backend == "compat"


def test_tcp_fast_open_is_a_connect(lz, bot, other):
    code = ("s = socket.socket()\n"
            "try:\n    s.sendto(b'x', socket.MSG_FASTOPEN, ('127.0.0.1', {}))\n    result = 0\n"
            "except OSError as e:\n    result = e.errno\nfinally:\n    s.close()")
    assert both(bot, other, code.format(8081)) == (EPERM, ECONNREFUSED)
    assert both(bot, other, code.format(8080)) == (ECONNREFUSED, ECONNREFUSED)


def test_other_transports_refused(lz, bot, other):
    # raw and ICMP sockets never pass the connect/sendmsg hooks: refused at creation
    code = ("try:\n    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()\n"
            "    result = 0\nexcept OSError as e:\n    result = e.errno")
    assert both(bot, other, code) == (EPERM, 0)
    rec = lz.records.find(lambda r: r.action == "NetworkConnect" and "transport" in r.reason)
    assert rec.decision == "deny" and rec.pid == bot.pid


def test_packet_sockets_killed_and_raw_sockets_refused(lz, bot, other):
    # both send to any address without connect or sendto naming it; the
    # sock_create hook sees only inet sockets, so a packet socket kills its
    # maker (lsm: EPERM from socket())
    packet = "result = try_socket(socket.AF_PACKET, socket.SOCK_RAW)"
    raw_tcp = "result = try_socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)"
    assert both(bot, other, packet) == (-signal.SIGKILL, 0)
    assert both(bot, other, raw_tcp) == (EPERM, 0)
    assert bot.run("result = try_socket(socket.AF_UNIX, socket.SOCK_STREAM)") == 0
    rec = lz.records.find(lambda r: r.resource == "socket(AF_PACKET)")
    assert rec.decision == "deny" and rec.ppid == bot.pid and rec.action == "SelfProtect"


# --------------------------------------------------------- scope and self

def test_threads_stay_governed(lz, bot, other):
    code = ("import threading\nout = []\n"
            f"t = threading.Thread(target=lambda: out.append(try_open('{LT}/w/secrets/s.txt')))\n"
            "t.start(); t.join(); result = out[0]")
    assert both(bot, other, code) == (EPERM, 0)


def test_cgroup_procs_write_refused(lz, bot):
    root = os.path.dirname(os.path.dirname(lz.cgroup))
    assert bot.run(f"result = try_call(lambda: open('{root}/cgroup.procs', 'w').write(str(os.getpid())))") == EPERM
    assert bot.run(f"result = try_open('{lz.cgroup}/cgroup.procs', os.O_WRONLY)") == EPERM
    assert bot.pid in [int(p) for p in open(f"{lz.cgroup}/cgroup.procs").read().split()]
    rec = lz.records.find(lambda r: r.action == "SelfProtect" and "cgroup" in r.reason)
    assert rec.decision == "deny"


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
        assert a.run("result = try_connect(socket.AF_INET, '127.0.0.1', 8081)") == EPERM
        assert child > 0
    finally:
        a.close()


