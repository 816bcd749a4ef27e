"""Audit mode, internal errors, and what happens when the daemon crashes,
is killed or gets stuck: governed processes never go on unwatched, and the
host never hangs."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from compat_harness import LT, POLICY, Agent, compile_dir, make_world, other_agent, running, write_policy
from leash.kernel import cgroup, compat
from leash.kernel.session import PIN_ROOT

EPERM = errno.EPERM
HERE = os.path.dirname(os.path.abspath(__file__))


def test_audit_mode_records_without_refusing(tmp_path):
    with running(str(tmp_path), mode="audit") as lz:
        bot = lz.agent()
        assert bot.run(f"result = try_open('{LT}/w/secrets/s.txt')") == 0
        assert bot.run(f"result = try_exec(['{LT}/bin/forbidden'])") == ["status", 0]
        child = bot.run("result = exec_children[-1]")           # try_exec's child made the execve
        assert bot.run("result = try_connect(socket.AF_INET, '127.0.0.1', 8081)") == errno.ECONNREFUSED
        for resource, pid, ppid in ((f"{LT}/w/secrets/s.txt", bot.pid, None),
                                    (f"{LT}/bin/forbidden", child, bot.pid),
                                    ("127.0.0.1:8081", bot.pid, None)):
            rec = lz.records.find(lambda r: r.resource == resource and r.decision == "deny")
            assert rec.mode == "audit" and rec.backend == "compat" and rec.pid == pid
            assert ppid is None or rec.ppid == ppid
        rec = lz.records.find(lambda r: r.resource == f"{LT}/w/secrets/s.txt")
        assert rec.policies == ["no-secrets"]
        # self-protection is not audited but enforced, as with lsm
        import leash
        own = os.path.join(os.path.dirname(leash.__file__), "audit.py")
        assert bot.run(f"result = try_open('{own}')") == EPERM
        root = os.path.dirname(os.path.dirname(lz.cgroup))
        assert bot.run(f"result = try_open('{root}/cgroup.procs', os.O_WRONLY)") == EPERM
        rec = lz.records.find(lambda r: r.resource == own)
        assert rec.action == "SelfProtect" and rec.mode == "enforce"


def test_internal_error_refuses_the_governed_open_only(tmp_path):
    with running(str(tmp_path), fault="decide:/w/ok.txt") as lz:
        bot, other = lz.agent(), other_agent()
        try:
            assert bot.run(f"result = try_open('{LT}/w/ok.txt')") == EPERM       # fail closed
            assert other.run(f"result = try_open('{LT}/w/ok.txt')") == 0         # never touched
            assert bot.run(f"result = try_open('{LT}/ro/r.txt')") == 0           # the rest works
        finally:
            other.close()
        rec = lz.records.find(lambda r: r.action == "Internal" and "injected" in r.reason)
        assert rec.decision == "deny" and rec.agent == "bot"


def test_the_daemon_itself_loads_code_while_enforcing(tmp_path):
    # CPython keeps its lock while it loads a C extension, and glibc loads NSS
    # modules on its own: the opens they make must not wait on the daemon.
    import importlib
    import pwd
    with running(str(tmp_path)) as lz:
        fresh = [m for m in ("_lsprof", "_bz2", "_lzma", "_dbm", "_curses", "_sqlite3", "_testcapi")
                 if m not in sys.modules]
        assert fresh
        for name in fresh:
            try:
                importlib.import_module(name)
            except ImportError:
                pass
        assert pwd.getpwnam("nobody").pw_uid == 65534
        assert lz.backend.stats().events > 0


def test_stuck_audit_sink_backpressure(tmp_path):
    # a 3 s watchdog: a stuck sink must not look like a stuck leash
    with running(str(tmp_path), backlog_limit=2000, watchdog_stall_s=3) as lz:
        bot = lz.agent()
        with lz.records.held():
            # Past the backlog the ring consumer waits, so denies pile up in
            # the 4 MiB ring (~12 000 records) and then are lost (counted).
            n = bot.run("result = sum(try_connect(socket.AF_INET, '127.0.0.1', 8081) == 1 for _ in range(20000))")
            assert n == 20000                                   # every deny still enforced
            assert bot.run("result = try_connect(socket.AF_INET, '127.0.0.1', 8080)") == EPERM
            # an allow that cannot be recorded (ro/ is never kernel-cached: always asked)
            assert bot.run(f"result = try_open('{LT}/ro/r.txt')") == EPERM
            assert bot.run(f"result = try_open('{LT}/w/key.txt')") == EPERM  # denies as ever
            lost = lz.backend.lost()
            assert lost["deny"] > 0 and lost["allow"] >= 1
            time.sleep(6)                                       # well past the watchdog's 3 s
            assert bot.run(f"result = try_open('{LT}/w/key.txt')") == EPERM
        rec = lz.records.find(lambda r: r.action == "Internal" and "records were lost" in r.reason)
        assert rec.count >= lost["deny"] and rec.decision == "deny"
        lz.records.find(lambda r: r.resource == f"{LT}/ro/r.txt" and "backlog" in r.reason)
        lz.records.find(lambda r: r.resource == f"{LT}/w/key.txt" and r.decision == "deny")
        # once drained, allows are allowed again
        deadline = time.monotonic() + 30
        while lz.backend.backlogged() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert bot.run(f"result = try_open('{LT}/ro/r.txt')") == 0


@pytest.fixture
def helper(tmp_path):
    """A compat daemon in its own process, governing a fresh cgroup."""
    make_world()
    policy_dir = str(tmp_path / "policy")
    write_policy(policy_dir, POLICY)
    cg = cgroup.create_agent_cgroup("bot", f"helper-{os.getpid()}-{time.monotonic_ns()}")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "compat_daemon_helper.py"), policy_dir, cg, "3"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        while True:
            line = proc.stdout.readline()
            assert line, "helper died before it was ready"
            if line.strip() == "ready":
                break
        yield proc, cg
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        cgroup.remove_cgroup(cg)


def _gone(agent: Agent, timeout: float = 30.0) -> bool:
    try:
        agent.proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _host_opens_work() -> None:
    other = other_agent()
    try:
        assert other.run(f"result = sum(try_open('{LT}/w/secrets/s.txt') for _ in range(100))") == 0
    finally:
        other.close()


def test_killed_daemon_takes_its_agents_along(helper):
    proc, cg = helper
    bot = Agent(cg)
    assert bot.run(f"result = try_open('{LT}/w/secrets/s.txt')") == EPERM
    child = bot.run("import subprocess; p = subprocess.Popen(['/usr/bin/sleep', '600']); result = p.pid")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    # fanotify now allows everything; the watchdog kills what was governed
    assert _gone(bot)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z"
    _host_opens_work()


def test_stuck_daemon_is_killed_and_the_host_released(helper):
    proc, cg = helper
    bot = Agent(cg)
    assert bot.run(f"result = try_open('{LT}/w/secrets/s.txt')") == EPERM
    proc.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    # An ungoverned open now waits for the stopped daemon ... until the
    # watchdog (3 s stall here) kills it and the kernel allows.
    _host_opens_work()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert time.monotonic() - started < 25
    assert _gone(bot)


def test_crashed_responder_kills_agents_and_stops_the_daemon(helper):
    proc, cg = helper
    bot = Agent(cg)
    assert bot.run(f"result = try_open('{LT}/w/secrets/s.txt')") == EPERM
    proc.stdin.write("crash\n")
    proc.stdin.flush()
    while proc.stdout.readline().strip() != "armed":
        pass
    _host_opens_work()                          # the next batch crashes the loop; the kernel allows
    assert _gone(bot)
    out, _ = proc.communicate(timeout=30)
    assert "fanotify responder crashed" in out
    assert proc.returncode == -signal.SIGTERM


# ------------------------------------------------------------ bad input

def test_unwatchable_filesystem_refuses_to_start(tmp_path):
    make_world()
    write_policy(str(tmp_path), POLICY)
    backend = compat.CompatBackend(fault="refuse-mark:/dev/shm")
    with pytest.raises(compat.CompatUnavailable) as info:
        backend.start(compile_dir(str(tmp_path)), "enforce", lambda rec: None)
    assert str(info.value).startswith("cannot watch /dev/shm (tmpfs) for permission events")
    assert "\n" not in str(info.value)
    # nothing half-started: no programs, no responder, no watchdog, no pins
    assert not backend.session.loaded and backend.responder is None
    assert backend.watchdog is None
    assert not os.path.exists(os.path.join(PIN_ROOT, str(os.getpid())))
    _host_opens_work()


def test_no_fanotify_permission_events_refuses_to_start(tmp_path):
    make_world()
    write_policy(str(tmp_path), POLICY)
    backend = compat.CompatBackend(fault="no-fanotify")
    with pytest.raises(compat.CompatUnavailable, match="fanotify permission events are unavailable"):
        backend.start(compile_dir(str(tmp_path)), "enforce", lambda rec: None)
    assert not backend.session.loaded and backend.responder is None
