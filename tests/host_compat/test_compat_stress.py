"""The host goes on while an agent is governed: an ungoverned process opens
thousands of files (and many in parallel threads) while the agent works;
nothing of the host's is refused, nothing of the agent's is decided wrongly,
and every governed deny is recorded."""

from __future__ import annotations

import errno
import os

import pytest

from compat_harness import LT, other_agent, running

EPERM = errno.EPERM
FILES = 3000


@pytest.fixture(scope="module")
def lz(tmp_path_factory):
    with running(str(tmp_path_factory.mktemp("stress"))) as lz:
        os.makedirs(f"{LT}/many", exist_ok=True)
        for i in range(FILES):
            with open(f"{LT}/many/{i}", "w") as f:
                f.write(str(i))
        yield lz


def test_ungoverned_opens_thousands_while_an_agent_works(lz):
    host = other_agent()
    bot = lz.agent()
    try:
        # Host: every file, four threads at once, three times over, plus writes.
        host.send(
            "import threading\n"
            "bad = []\n"
            "def work(k):\n"
            f"    for rnd in range(3):\n"
            f"        for i in range(k, {FILES}, 4):\n"
            f"            e = try_open('{LT}/many/%d' % i, os.O_RDWR if rnd == 2 else os.O_RDONLY)\n"
            "            if e: bad.append((i, e))\n"
            "ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"
            "result = bad")
        # Agent, meanwhile: a mix it may and may not do.
        agent_results = bot.run(
            "out = []\n"
            "for i in range(300):\n"
            f"    out.append((try_open('{LT}/w/ok.txt'), try_open('{LT}/w/secrets/s.txt'),"
            f" try_open('{LT}/many/%d' % i), try_open('{LT}/many/%d' % i, os.O_RDWR)))\n"
            "result = out")
        host_failures = host.receive()
    finally:
        host.close()
        bot.close()
    assert host_failures == []
    assert all(r == [0, EPERM, 0, EPERM] for r in agent_results)
    denies = lz.records.matching(lambda r: r.agent == "bot" and r.decision == "deny")
    secret = [r for r in denies if r.resource == f"{LT}/w/secrets/s.txt"]
    writes = [r for r in denies if r.resource.startswith(f"{LT}/many/") and r.action == "FileOpenReadWrite"]
    assert sum(r.count for r in secret) == 300
    assert sum(r.count for r in writes) == 300
    assert lz.backend.responder.poll() is None       # the responder process lives on
