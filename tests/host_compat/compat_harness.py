"""Helpers of the host-kernel suite. The policy, the file tree, the agent
stand-in (worker.py) and the record sink are the lsm suite's own
(tests/kernel_lsm/harness.py): the two suites run the same scenarios, each
on the kernel that can run its backend."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

from leash.kernel.compat import CompatBackend

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS)
# The lsm suite's harness and scenarios are imported under their own names,
# by this suite's modules and by helper processes alike.
KERNEL_LSM = os.path.join(TESTS, "kernel_lsm")
if KERNEL_LSM not in sys.path:
    sys.path.append(KERNEL_LSM)
from harness import (  # noqa: E402,F401  (found through the path above)
    AGENTS, LT, POLICY, PYTHON, WORKER, Agent, Leash, Records, cgroup_of, compile_dir, finish_thread_exec,
    make_world, other_agent, start_thread_exec, write_policy)
from harness import running as _running  # noqa: E402


def running(tmp_dir: str, mode: str = "enforce", policy: str = POLICY, **options) -> Iterator[Leash]:
    """The lsm suite's harness.running with the compat backend (`options` are
    CompatBackend's)."""
    return _running(tmp_dir, mode, policy, backend_class=CompatBackend, **options)


def leash_cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """`python -m leash ARGS` as a separate process, as an operator runs it."""
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "leash", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd="/", **kw)
