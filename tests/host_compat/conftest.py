"""The host-kernel suite: the compat backend on the build machine's own
kernel. Needs root (CI has it); without root every test fails (it is not
skipped: a skipped test is not a passing one), other suites run as usual.

A watchdog process (started before any fanotify mark exists) SIGKILLs this
test process if no test starts or ends for STALL_S seconds: a responder bug
could otherwise hold every open on the machine, this process's included.
Killing it closes the fanotify group and the kernel allows what is pending.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

STALL_S = 300

_WATCHDOG = r"""
import os, select, signal, sys
target, stall = int(sys.argv[1]), float(sys.argv[2])
fd = sys.stdin.fileno()
while True:
    ready, _, _ = select.select([fd], [], [], stall)
    if not ready:
        os.write(2, b"host_compat watchdog: no progress, killing the test process\n")
        os.kill(target, signal.SIGKILL)
        sys.exit(1)
    if not os.read(fd, 4096):
        sys.exit(0)
"""

_dog: subprocess.Popen | None = None


HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_sessionstart(session):
    global _dog
    if os.geteuid() == 0:
        _dog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(STALL_S)],
                                stdin=subprocess.PIPE)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if str(item.fspath).startswith(HERE + os.sep):
            item.add_marker(pytest.mark.host_kernel)


@pytest.fixture(autouse=True)
def _root():
    if os.geteuid() != 0:
        pytest.fail("tests/host_compat needs root: it loads BPF programs and answers fanotify "
                    "permission events (sudo python -m pytest tests/host_compat)", pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    if _dog is not None:
        _dog.stdin.close()
        _dog.wait(timeout=10)


def _beat():
    if _dog is not None and _dog.poll() is None:
        _dog.stdin.write(b".")
        _dog.stdin.flush()


def pytest_runtest_logstart(nodeid, location):
    _beat()


def pytest_runtest_logfinish(nodeid, location):
    _beat()
