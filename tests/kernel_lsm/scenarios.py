"""The scenarios both kernel suites run unchanged, each on the kernel that
can run its backend: the lsm suite in the VM (test_enforce.py, test_swap.py)
and the compat suite on the build machine's own kernel
(tests/host_compat/test_compat_enforce.py, test_compat_swap.py). A governed
agent (`bot`) and an ungoverned process (`other`) try the same thing side by
side under harness.POLICY, and policy swaps happen under a running agent.
Each suite imports these into its own test module, where pytest collects them
with that module's `lz` (a started backend); scenarios whose outcome differs
by backend stay in the suites."""

from __future__ import annotations

import errno
import os

import pytest

from harness import LT, POLICY, compile_dir, other_agent, write_policy

EPERM, ECONNREFUSED = errno.EPERM, errno.ECONNREFUSED


@pytest.fixture(scope="module")
def bot(lz):
    a = lz.agent()
    assert a.run("result = os.getpid()") == a.pid
    yield a


@pytest.fixture(scope="module")
def other(lz):
    a = other_agent()
    yield a
    a.close()


def both(bot, other, code):
    return bot.run(code), other.run(code)


def test_scope_map_knows_the_agent(lz, bot, other):
    assert lz.backend.agent_of_pid(bot.pid) == 1
    assert lz.backend.agent_of_pid(other.pid) == 0


def test_reads(lz, bot, other):
    assert both(bot, other, f"result = try_open('{LT}/w/ok.txt')") == (0, 0)
    assert both(bot, other, f"result = try_open('{LT}/w/secrets/s.txt')") == (EPERM, 0)
    assert both(bot, other, f"result = try_open('{LT}/w/key.txt')") == (EPERM, 0)
    assert both(bot, other, f"result = try_open('{LT}/w/secrets')") == (EPERM, 0)   # the directory


def test_symlink(lz, bot, other):
    bot.run(f"os.symlink('{LT}/w/secrets/s.txt', '{LT}/w/sym'); result = 0")
    assert both(bot, other, f"result = try_open('{LT}/w/sym')") == (EPERM, 0)


def test_relative_paths(lz, bot, other):
    code = (f"os.chdir('{LT}/w/secrets'); a = try_open('s.txt'); os.chdir('{LT}/w');"
            f" b = try_open('secrets/../secrets/s.txt'); c = try_open('./ok.txt'); os.chdir('/');"
            f" result = [a, b, c]")
    assert both(bot, other, code) == ([EPERM, EPERM, 0], [0, 0, 0])


def test_proc_self_fd_reopen_for_write(lz, bot, other):
    code = (f"fd = os.open('{LT}/ro/r.txt', os.O_RDONLY);"
            f" result = try_open(f'/proc/self/fd/{{fd}}', os.O_WRONLY); os.close(fd)")
    assert both(bot, other, code) == (EPERM, 0)


def test_exec(lz, bot, other):
    assert both(bot, other, f"result = try_exec(['{LT}/bin/allowed'])") == (["status", 0], ["status", 0])
    assert both(bot, other, f"result = try_exec(['{LT}/bin/forbidden'])") == (["errno", EPERM], ["status", 0])
    rec = lz.records.find(lambda r: r.action == "ProcessExec" and r.resource == f"{LT}/bin/forbidden")
    assert rec.decision == "deny" and rec.policies == ["no-forbidden"]


def test_exec_through_symlink_and_relative_path(lz, bot, other):
    os.symlink(f"{LT}/bin/forbidden", f"{LT}/w/innocent")
    assert both(bot, other, f"result = try_exec(['{LT}/w/innocent'])") == (["errno", EPERM], ["status", 0])
    code = f"os.chdir('{LT}/bin'); result = try_exec(['./forbidden']); os.chdir('/')"
    assert both(bot, other, code) == (["errno", EPERM], ["status", 0])


def test_connect_ipv6(lz, bot, other):
    c = "result = try_connect(socket.AF_INET6, '::1', {})"
    assert both(bot, other, c.format(8080)) == (ECONNREFUSED, ECONNREFUSED)
    assert both(bot, other, c.format(8081)) == (EPERM, ECONNREFUSED)
    lz.records.find(lambda r: r.action == "NetworkConnect" and r.resource == "[::1]:8081"
                    and r.decision == "deny")


def test_ipv4_mapped_ipv6(lz, bot, other):
    c = "result = try_connect(socket.AF_INET6, '::ffff:{}', {})"
    assert both(bot, other, c.format("127.0.0.1", 8080)) == (ECONNREFUSED, ECONNREFUSED)
    assert both(bot, other, c.format("127.0.0.1", 8081)) == (EPERM, ECONNREFUSED)
    assert both(bot, other, c.format("127.0.0.2", 8080)) == (EPERM, ECONNREFUSED)
    rec = lz.records.find(lambda r: r.action == "NetworkConnect" and r.resource == "127.0.0.2:8080")
    assert rec.decision == "deny"


def test_udp_connect_and_sendto_without_connect(lz, bot, other):
    udp = "socket.SOCK_DGRAM"
    assert both(bot, other, f"result = try_connect(socket.AF_INET, '127.0.0.1', 8080, {udp})") == (0, 0)
    assert both(bot, other, f"result = try_connect(socket.AF_INET, '127.0.0.1', 9999, {udp})") == (EPERM, 0)
    assert both(bot, other, "result = try_sendto(socket.AF_INET, '127.0.0.1', 5353)") == (0, 0)
    assert both(bot, other, "result = try_sendto(socket.AF_INET, '127.0.0.1', 9999)") == (EPERM, 0)
    assert both(bot, other, "result = try_sendto(socket.AF_INET6, '::ffff:127.0.0.1', 9999)") == (EPERM, 0)
    assert both(bot, other, "result = try_sendto(socket.AF_INET6, '::1', 5353)") == (EPERM, 0)
    # TCP on 5353 is not covered by the UDP-only permit
    assert both(bot, other, "result = try_connect(socket.AF_INET, '127.0.0.1', 5353)") == (EPERM, ECONNREFUSED)
    rec = lz.records.find(lambda r: r.resource == "127.0.0.1:9999" and r.details.get("protocol") == "udp")
    assert rec.decision == "deny"


def test_fork_and_double_fork_stay_governed(lz, bot, other):
    code = f"result = in_child(lambda: try_open('{LT}/w/secrets/s.txt'), depth={{}}, setsid={{}})"
    for depth, setsid in ((1, False), (2, True), (3, True)):
        assert both(bot, other, code.format(depth, setsid)) == (EPERM, 0)


def test_clone_into_another_cgroup_stays_governed(lz, bot):
    # clone3(CLONE_INTO_CGROUP) places a child in any cgroup whose directory
    # the agent can open, with no cgroup.procs write to refuse
    outside = os.path.join(os.path.dirname(lz.cgroup), f"outside-{os.getpid()}")
    os.mkdir(outside)
    try:
        errno_, where = bot.run(f"result = try_clone_into_cgroup({outside!r}, '{LT}/w/secrets/s.txt')")
        assert where.endswith(os.path.basename(outside)) and errno_ == EPERM
    finally:
        os.rmdir(outside)


def test_cannot_open_leash_files(lz, bot, other):
    import leash
    own = os.path.join(os.path.dirname(leash.__file__), "audit.py")
    policy = os.path.join(lz.policy_dir, "policy.cedar")
    assert both(bot, other, f"result = try_open('{own}')") == (EPERM, 0)
    assert both(bot, other, f"result = try_open('{policy}')") == (EPERM, 0)
    rec = lz.records.find(lambda r: r.action == "SelfProtect" and r.resource == own)
    assert rec.reason == "leash's own files"


# ------------------------------------------------------------ policy swaps

# B: the key becomes readable, ok.txt stops being; 8081 opens, 8080 closes.
POLICY_B = (POLICY.replace('resource == File::"/tmp/lt/w/key.txt"', 'resource == File::"/tmp/lt/w/ok.txt"')
            .replace('@id("no-key")', '@id("no-ok")')
            .replace("context.port == 8080 }", "context.port == 8081 }"))

LOOP = f"""
fails, states, n = 0, set(), 0
while not os.path.exists('{LT}/stop'):
    if try_open('{LT}/ro/r.txt') != 0:
        fails += 1
    states.add((try_open('{LT}/w/ok.txt'), try_open('{LT}/w/key.txt')))
    n += 1
result = [fails, n, sorted(states)]
"""
PROBE = (f"result = [try_open('{LT}/w/ok.txt'), try_open('{LT}/w/key.txt'),"
         f" try_connect(socket.AF_INET, '127.0.0.1', 8080), try_connect(socket.AF_INET, '127.0.0.1', 8081)]")
A_STATE = [0, EPERM, errno.ECONNREFUSED, EPERM]
B_STATE = [EPERM, 0, EPERM, errno.ECONNREFUSED]


def test_swap_under_a_running_agent(lz, tmp_path):
    assert POLICY_B != POLICY
    write_policy(str(tmp_path / "b"), POLICY_B)
    tables_a, tables_b = compile_dir(lz.policy_dir), compile_dir(str(tmp_path / "b"))
    bot = lz.agent()
    probe = lz.agent()
    try:
        assert probe.run(PROBE) == A_STATE
        bot.send(LOOP)
        for _ in range(2):
            lz.backend.update(tables_b)
            assert probe.run(PROBE) == B_STATE
            lz.backend.update(tables_a)
            assert probe.run(PROBE) == A_STATE
        lz.backend.update(tables_b)
        open(f"{LT}/stop", "w").close()
        fails, n, states = bot.receive()
    finally:
        if os.path.exists(f"{LT}/stop"):
            os.unlink(f"{LT}/stop")
        bot.close()
        probe.close()
    assert fails == 0, f"the always-allowed file was refused {fails} times in {n} rounds"
    assert n > 0
    assert [0, EPERM] in states and [EPERM, 0] in states
    rec = lz.records.find(lambda r: r.resource == f"{LT}/w/ok.txt" and r.decision == "deny")
    assert rec.policies == ["no-ok"]
    lz.backend.update(tables_a)


def test_update_that_does_not_fit_changes_nothing(lz, monkeypatch):
    from leash.kernel import session

    tables = compile_dir(lz.policy_dir)
    addrs = lz.backend.session.map("leash_addrs")
    monkeypatch.setattr(type(addrs), "max_entries", property(lambda self: 3))
    with pytest.raises(session.TablesTooLarge):
        lz.backend.update(tables)
    monkeypatch.undo()
    bot = lz.agent()
    try:
        assert bot.run(PROBE) == A_STATE
    finally:
        bot.close()
