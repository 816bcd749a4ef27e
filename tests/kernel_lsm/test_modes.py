"""Audit mode, lost records, and what a SIGKILLed daemon leaves enforced."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest

from harness import LT, POLICY, compile_dir, make_world, other_agent, running, write_policy
from leash.kernel import cgroup, lsm, session

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
            assert rec.mode == "audit" and rec.pid == pid
            assert ppid is None or rec.ppid == ppid
        rec = lz.records.find(lambda r: r.resource == f"{LT}/w/secrets/s.txt")
        assert rec.policies == ["no-secrets"]
        # Self-protection holds in audit mode too.
        policy_file = os.path.join(lz.policy_dir, "policy.cedar")
        assert bot.run("result = try_bpf()") == EPERM
        assert bot.run(f"result = try_open('{policy_file}')") == EPERM
        assert bot.run(f"result = try_call(os.kill, {os.getpid()}, signal.SIGTERM)") == EPERM
        assert bot.run(f"result = in_child(lambda: try_call(os.chroot, '{LT}/w'))") == EPERM
        rec = lz.records.find(lambda r: r.action == "SelfProtect" and r.resource == policy_file)
        assert rec.mode == "enforce" and rec.decision == "deny"


def test_lost_records_are_counted_and_unrecordable_allows_refused(tmp_path):
    with running(str(tmp_path)) as lz:
        bot = lz.agent()
        with lz.records.held():
            # The consumer is stuck, so ~12 000 records fill the 4 MiB ring.
            n = bot.run(f"result = sum(try_open('{LT}/w/secrets/s.txt') == 1 for _ in range(20000))")
            assert n == 20000                                   # every deny still enforced
            fresh = bot.run(f"result = try_open('{LT}/w/fresh-unrecorded.txt', os.O_WRONLY | os.O_CREAT)")
            assert fresh == EPERM                               # an allow that cannot be recorded
            lost = lz.backend.lost()
            assert lost["deny"] > 0 and lost["allow"] >= 1
        rec = lz.records.find(lambda r: r.action == "Internal" and "records were lost" in r.reason)
        assert rec.count >= lost["deny"] and rec.decision == "deny"
        lz.records.find(lambda r: r.action == "Internal" and "could not be recorded" in r.reason)


def test_sigkilled_daemon_leaves_pinned_enforcement_until_next_start(tmp_path):
    make_world()
    policy_dir = str(tmp_path / "policy")
    write_policy(policy_dir, POLICY)
    cg = cgroup.create_agent_cgroup("bot", f"sigkill-{os.getpid()}")
    daemon = subprocess.Popen([sys.executable, os.path.join(HERE, "daemon_helper.py"), policy_dir, cg],
                              stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    from harness import Agent
    bot = None
    try:
        assert daemon.stdout.readline().strip() == "ready"
        bot = Agent(cg)
        assert bot.run(f"result = try_open('{LT}/w/secrets/s.txt')") == EPERM
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        pins = os.path.join(session.PIN_ROOT, str(daemon.pid))
        assert os.path.isdir(pins) and "leash_file_open" in os.listdir(pins)
        # Still enforced with the last policy, daemon or not:
        assert bot.run(f"result = try_open('{LT}/w/secrets/s.txt')") == EPERM
        assert bot.run(f"result = try_open('{LT}/w/ok.txt')") == 0
        # The next start removes what the dead daemon left:
        with running(str(tmp_path / "next")):
            assert not os.path.exists(pins)
            assert bot.run(f"result = try_open('{LT}/w/secrets/s.txt')") == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
        cgroup.remove_cgroup(cg)


def test_oversized_policy_refused_before_attach(tmp_path, monkeypatch):
    make_world()
    write_policy(str(tmp_path), POLICY)
    monkeypatch.setitem(session.HARD_LIMIT, "leash_paths", 4)
    backend = lsm.LsmBackend()
    with pytest.raises(session.TablesTooLarge):
        backend.start(compile_dir(str(tmp_path)), "enforce", lambda rec: None)
    assert not backend.session.loaded
    other = other_agent()
    try:
        assert other.run(f"result = try_open('{LT}/w/secrets/s.txt')") == 0
    finally:
        other.close()
