"""Helpers of the host-kernel suite. The policy, the file tree, the agent
stand-in (worker.py) and the record sink are the lsm suite's own
(tests/kernel_lsm/harness.py): the two suites run the same scenarios, each
on the kernel that can run its backend."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from leash.kernel import cgroup
from leash.kernel.compat import CompatBackend

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS)
_spec = importlib.util.spec_from_file_location("lsm_harness", os.path.join(TESTS, "kernel_lsm", "harness.py"))
lsm_harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lsm_harness)

AGENTS = lsm_harness.AGENTS
cgroup_of = lsm_harness.cgroup_of
finish_thread_exec = lsm_harness.finish_thread_exec
start_thread_exec = lsm_harness.start_thread_exec
LT = lsm_harness.LT
POLICY = lsm_harness.POLICY
PYTHON = lsm_harness.PYTHON
WORKER = lsm_harness.WORKER
Agent = lsm_harness.Agent
Records = lsm_harness.Records
compile_dir = lsm_harness.compile_dir
make_world = lsm_harness.make_world
other_agent = lsm_harness.other_agent
write_policy = lsm_harness.write_policy


class Leash:
    """A started CompatBackend with one governed agent cgroup."""

    def __init__(self, backend: CompatBackend, records: Records, cgroup_path: str, policy_dir: str) -> None:
        self.backend = backend
        self.records = records
        self.cgroup = cgroup_path
        self.policy_dir = policy_dir

    def agent(self) -> Agent:
        return Agent(self.cgroup)


@contextmanager
def running(tmp_dir: str, mode: str = "enforce", policy: str = POLICY, **options) -> Iterator[Leash]:
    make_world()
    policy_dir = os.path.join(tmp_dir, "policy")
    write_policy(policy_dir, policy)
    records = Records()
    backend = CompatBackend(protected_paths=[policy_dir], **options)
    backend.start(compile_dir(policy_dir), mode, records)
    cg = cgroup.create_agent_cgroup("bot", f"{os.getpid()}-{time.monotonic_ns()}")
    try:
        backend.govern(AGENTS["bot"], cg)
        yield Leash(backend, records, cg, policy_dir)
    finally:
        cgroup.kill_all(cg)
        backend.stop()
        cgroup.remove_cgroup(cg)


def leash_cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """`python -m leash ARGS` as a separate process, as an operator runs it."""
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "leash", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd="/", **kw)
