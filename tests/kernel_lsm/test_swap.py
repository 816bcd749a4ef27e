"""Policy changes under a running agent: the tables swap generations
atomically, never an empty window, and records follow the live policy."""

from __future__ import annotations

import errno
import os

import pytest

from harness import LT, POLICY, compile_dir, running, write_policy

EPERM = errno.EPERM
# B: the key becomes readable, ok.txt stops being.
POLICY_B = POLICY.replace('resource == File::"/tmp/lt/w/key.txt"', 'resource == File::"/tmp/lt/w/ok.txt"') \
                 .replace('@id("no-key")', '@id("no-ok")')

LOOP = f"""
import time
fails, states, n = 0, set(), 0
while not os.path.exists('{LT}/stop'):
    if try_open('{LT}/ro/r.txt') != 0:
        fails += 1
    states.add((try_open('{LT}/w/ok.txt'), try_open('{LT}/w/key.txt')))
    n += 1
result = [fails, n, sorted(states)]
"""


@pytest.fixture(scope="module")
def lz(tmp_path_factory):
    with running(str(tmp_path_factory.mktemp("swap"))) as lz:
        yield lz


def test_swap_under_a_running_agent(lz, tmp_path):
    assert POLICY_B != POLICY
    write_policy(str(tmp_path / "b"), POLICY_B)
    tables_a, tables_b = compile_dir(lz.policy_dir), compile_dir(str(tmp_path / "b"))
    bot = lz.agent()
    probe = lz.agent()
    try:
        assert probe.run(f"result = [try_open('{LT}/w/ok.txt'), try_open('{LT}/w/key.txt')]") == [0, EPERM]
        bot.send(LOOP)
        for _ in range(2):
            lz.backend.update(tables_b)
            assert probe.run(f"result = [try_open('{LT}/w/ok.txt'), try_open('{LT}/w/key.txt')]") == [EPERM, 0]
            lz.backend.update(tables_a)
            assert probe.run(f"result = [try_open('{LT}/w/ok.txt'), try_open('{LT}/w/key.txt')]") == [0, EPERM]
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


def test_update_that_does_not_fit_changes_nothing(lz, tmp_path, monkeypatch):
    from leash.kernel import session

    tables = compile_dir(lz.policy_dir)
    paths = lz.backend.session.map("leash_paths")
    monkeypatch.setattr(type(paths), "max_entries", property(lambda self: 3))
    with pytest.raises(session.TablesTooLarge):
        lz.backend.update(tables)
    monkeypatch.undo()
    bot = lz.agent()
    try:
        assert bot.run(f"result = [try_open('{LT}/w/ok.txt'), try_open('{LT}/w/key.txt')]") == [0, EPERM]
    finally:
        bot.close()
